"""The report's figures: loss curves, learning rate, confusion, predicted vs true, traces."""

import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxtrain.report.run import component_shares  # pylint: disable=wrong-import-position
from jaxtrain.report.run import TERMS  # pylint: disable=wrong-import-position
from jaxtrain.report.run import fmt  # pylint: disable=wrong-import-position
from jaxtrain.report.run import weight  # pylint: disable=wrong-import-position
from jaxtrain.report.run import logged_learning_rate  # pylint: disable=wrong-import-position
from jaxtrain.report.run import restart_epochs  # pylint: disable=wrong-import-position
from jaxtrain.report.run import scheduled_learning_rate  # pylint: disable=wrong-import-position

# Figures of one run and of a comparison, in the order the report shows them.
FIGURES = ('loss_total.png', 'loss_components.png', 'lr.png', 'confusion.png',
           'pred_vs_true.png', 'traces.png')
COMPARE_FIGURES = ('compare_loss.png', 'compare_lr.png')
N_EXAMPLE_TRACES = 12


def _mark_schedule(ax, config, label=True):
  """Dashed lines at the warm-up end and at each restart (x in completed epochs)."""
  warmup, restarts = restart_epochs(config)
  lo, hi = ax.get_xlim()
  if warmup is not None and lo <= warmup <= hi:
    ax.axvline(warmup, color='0.6', ls=':', lw=1, label='warm-up end' if label else None)
  for i, r in enumerate(x for x in restarts if lo <= x <= hi):
    ax.axvline(r, color='0.4', ls='--', lw=1, label='LR restart' if label and i == 0 else None)


def _set_loss_scale(ax, values):
  """Log scale when every value is positive (NLL terms can go negative)."""
  values = np.concatenate([np.ravel(v) for v in values]) if values else np.zeros(0)
  if len(values) and np.all(values > 0):
    ax.set_yscale('log')
    return ''
  return ' (linear: values <= 0)'


def _plot_losses(ax, run, key, style=None, label_prefix=''):
  """Train and val epoch curves of `key` on `ax`; returns the plotted values."""
  plotted = []
  for split, ls in (('train', '-'), ('val', '--')):
    epochs, values = run.series(split, key)
    if len(values):
      ax.plot(epochs, values, ls=ls, marker='o', ms=3, label=f'{label_prefix}{split}',
              **(style or {}))
      plotted.append(values)
  return plotted


def save_figure(fig, path, **savefig_kwargs):
  """Lays out, writes and closes a figure (closed figures free matplotlib's memory)."""
  fig.tight_layout()
  fig.savefig(path, **savefig_kwargs)
  plt.close(fig)


def figure_loss_total(run, path):
  fig, ax = plt.subplots(figsize=(8, 5))
  plotted = _plot_losses(ax, run, 'loss/total')
  window = [(r['step'] / run.steps_per_epoch, r['loss/total']) for r in run.rows
            if r.get('split') == 'train' and r.get('scope') == 'window'
            and r.get('loss/total') is not None]
  if window:
    x, y = np.asarray(window).T
    ax.plot(x, y, color='0.7', lw=0.8, zorder=0,
            label=f'train, every {run.config.training.log_every_steps} updates')
    plotted.append(y)
  note = _set_loss_scale(ax, plotted)
  _mark_schedule(ax, run.config)
  ax.set(title=f'{run.name}: total loss (sum_k w_k L_k){note}',
         xlabel='epochs completed', ylabel='loss/total')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  save_figure(fig, path, dpi=110)


def figure_loss_components(run, path):
  fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
  for ax, term in zip(axes.flat, TERMS):
    note = _set_loss_scale(ax, _plot_losses(ax, run, f'loss/{term}'))
    _mark_schedule(ax, run.config, label=False)
    ax.set(title=f'{term} (weight {weight(run.config, term):g}){note}',
           xlabel='epochs completed', ylabel=f'loss/{term}')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  ax = axes.flat[len(TERMS)]
  epochs, shares = component_shares(run, 'val')
  if len(epochs):
    ax.stackplot(epochs, [shares[t] for t in TERMS], labels=TERMS, alpha=0.8)
    ax.axhline(run.config.monitor.max_component_share, color='k', ls='--', lw=1,
               label='cap')
  ax.set(title='val: share of each weighted component', xlabel='epochs completed',
         ylabel='|w_k L_k| / sum', ylim=(0, 1))
  # The last panel holds the share legend and the line key.
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.05, 1.0), title='share of')
  ax = axes.flat[len(TERMS) + 1]
  ax.axis('off')
  ax.text(0.1, 0.2, 'solid: train (epoch mean)\ndashed: validation\n'
          'grey dashed vertical: LR restart\ngrey dotted: warm-up end', va='center')
  fig.suptitle(f'{run.name}: loss components (unweighted means)')
  save_figure(fig, path, dpi=100)


def _schedule_curve(run, max_step):
  """(steps, lr) of the configured schedule for updates 1..max_step (<= 4000 points), or None
  when the schedule cannot be built."""
  steps = np.unique(np.linspace(1, max(max_step, 1), 4000).astype(np.int64))
  try:
    return steps, scheduled_learning_rate(run.config, run.steps_per_epoch, steps - 1)
  except (ImportError, AttributeError, ValueError):
    return None


def figure_lr(run, path):
  steps, lr = logged_learning_rate(run)
  fig, ax = plt.subplots(figsize=(8, 4.5))
  horizon = max(steps.max() if len(steps) else 0,
                run.config.training.num_epochs * run.steps_per_epoch)
  curve = _schedule_curve(run, horizon)
  if curve is not None:
    ax.plot(curve[0] / run.steps_per_epoch, curve[1], color='C1', lw=2, alpha=0.6,
            label='configured schedule (create_learning_rate_fn)')
  if len(steps):
    ax.plot(steps / run.steps_per_epoch, lr, 'o', color='C0', ms=3, label='logged lr')
  ax.set_yscale('log')
  _mark_schedule(ax, run.config)
  ax.set(title=f'{run.name}: learning rate', xlabel='epochs (optimizer updates / '
         f'{run.steps_per_epoch})', ylabel='learning rate')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  save_figure(fig, path, dpi=110)


def figure_confusion(run, path):
  cm = run.preds['confusion']
  names = [str(n) for n in run.preds['class_names']]
  rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  im = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  for i in range(cm.shape[0]):
    for j in range(cm.shape[1]):
      ax.text(j, i, f'{cm[i, j]}\n{rows[i, j]:.0%}', ha='center', va='center', fontsize=8,
              color='white' if rows[i, j] > 0.6 else 'black')
  ax.set_xticks(range(len(names)), names, rotation=30)
  ax.set_yticks(range(len(names)), names)
  test = run.test
  ax.set(xlabel='predicted class', ylabel='true class',
         title=f'{run.name}: test confusion (count, row share)\naccuracy '
               f'{fmt(test.get("class/accuracy"), 3)} (baseline '
               f'{fmt(test.get("class/accuracy@baseline"), 3)}), balanced '
               f'{fmt(test.get("class/balanced_accuracy"), 3)}')
  fig.colorbar(im, ax=ax, label='share of the true class')
  save_figure(fig, path, dpi=110)


def figure_pred_vs_true(run, path):
  p, test = run.preds, run.test
  # (title, unit, true and predicted arrays in the .npz, metric prefix, metric unit).
  panels = (('hearing threshold', 'dB', 'threshold_true_db', 'threshold_pred_db', 'threshold/',
             'db'),
            ('wave-V latency', 'ms', 'latency_true_ms', 'latency_pred_ms', 'peak/latency_', 'ms'),
            ('wave-V amplitude', 'uV', 'amplitude_true_uv', 'amplitude_pred_uv',
             'peak/amplitude_', 'uv'))
  fig, axes = plt.subplots(1, 3, figsize=(16, 5))
  for ax, (name, unit, true_key, pred_key, prefix, suffix) in zip(axes, panels):
    mae_key = f'{prefix}mae_{suffix}'
    # The baseline predicts one constant (the train median): its mean prediction.
    base = test.get(f'{prefix}pred_mean_{suffix}@baseline')
    true, pred = p[true_key], p[pred_key]
    ok = np.isfinite(true)
    ax.scatter(true[ok], pred[ok], s=6, alpha=0.4, label='test recordings')
    if ok.any():
      lo = min(true[ok].min(), pred[ok].min())
      hi = max(true[ok].max(), pred[ok].max())
      ax.plot([lo, hi], [lo, hi], 'k--', lw=1, label='prediction = truth')
    if base is not None:
      ax.axhline(base, color='C3', lw=1, label=f'baseline: train median {base:.3g} {unit}')
    ax.set(title=f'{name} (n={int(ok.sum())})\nMAE {fmt(test.get(mae_key), 3)} {unit}, '
                 f'baseline {fmt(test.get(mae_key + "@baseline"), 3)} {unit}',
           xlabel=f'true ({unit})', ylabel=f'predicted ({unit})')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'{run.name}: predicted vs true (test split, where the target exists)')
  save_figure(fig, path, dpi=100)


def example_indices(labels, n):
  """Up to `n` row indices, taking classes in turn so that rare classes appear."""
  by_class = [list(np.flatnonzero(labels == k)) for k in np.unique(labels)]
  out = []
  while len(out) < n and any(by_class):
    for rows in by_class:
      if rows and len(out) < n:
        out.append(rows.pop(0))
  return out


def figure_traces(run, path):
  p = run.preds
  names = [str(n) for n in p['class_names']]
  dt = run.config.data.synthetic.sample_period_ms
  idx = example_indices(p['label'], N_EXAMPLE_TRACES)
  cols = 4
  fig, axes = plt.subplots(math.ceil(len(idx) / cols), cols, figsize=(17, 3.2 * math.ceil(
      len(idx) / cols)), squeeze=False)
  x = np.arange(p['signal'].shape[1]) * dt
  for ax, i in zip(axes.flat, idx):
    ax.plot(x, p['signal'][i], color='0.55', lw=1, label='recorded (z-scored)')
    if 'clean' in p:
      ax.plot(x, p['clean'][i], color='C2', lw=1, label='clean (synthetic)')
    ax.plot(x, p['x0_pred'][i], color='C0', lw=1.2, label='reconstruction x0_pred')
    if p['peak_present'][i]:
      ax.axvline(p['latency_true_ms'][i], color='k', lw=1.2, label='true wave V')
    prob = 1 / (1 + np.exp(-float(p['peak_exist_logit'][i])))
    ax.axvline(p['latency_pred_ms'][i], color='C3', ls='--', lw=1.2,
               label='predicted wave V (P shown)')
    ax.set_title(f'{names[p["label"][i]]} -> {names[p["class_pred"][i]]}, '
                 f'{p["static"][i, 1]:.0f} dB, t={int(p["t"][i])}, P(V)={prob:.2f}', fontsize=9)
    ax.set_xlabel('time (ms)', fontsize=8)
    ax.set_ylabel('z-scored amplitude', fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(idx):]:
    ax.axis('off')
  handles = {}  # One legend for the grid: label -> first handle.
  for ax in axes.flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  fig.legend(handles.values(), handles.keys(), loc='upper center', ncol=len(handles),
             fontsize=9, bbox_to_anchor=(0.5, 1.0))
  fig.suptitle(f'{run.name}: example test traces (true class -> predicted, intensity, '
               'diffusion step t of x0_pred)', y=1.04)
  save_figure(fig, path, dpi=90, bbox_inches='tight')


def figure_compare_loss(runs, path):
  fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
  for ax, key in zip(axes.flat, ('loss/total',) + tuple(f'loss/{t}' for t in TERMS)):
    plotted = []
    for k, run in enumerate(runs):
      plotted += _plot_losses(ax, run, key, style={'color': f'C{k}'},
                              label_prefix=f'{run.name} ')
    note = _set_loss_scale(ax, plotted)
    term = key.split('/')[1]
    weights = '' if term == 'total' else ' (weight ' + ' / '.join(
        f'{weight(r.config, term):g}' for r in runs) + ')'
    ax.set(title=f'{key}{weights}{note}', xlabel='epochs completed', ylabel=key)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  axes.flat[-1].axis('off')
  fig.suptitle('loss curves, same axes (solid: train, dashed: val; weights in run order '
               + ' / '.join(r.name for r in runs) + ')')
  save_figure(fig, path, dpi=100)


def figure_compare_lr(runs, path):
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for k, run in enumerate(runs):
    steps, lr = logged_learning_rate(run)
    curve = _schedule_curve(run, max(steps.max() if len(steps) else 0,
                                     run.config.training.num_epochs * run.steps_per_epoch))
    if curve is not None:
      ax.plot(curve[0] / run.steps_per_epoch, curve[1], color=f'C{k}', alpha=0.5, lw=2,
              label=f'{run.name}: configured')
    if len(steps):
      ax.plot(steps / run.steps_per_epoch, lr, 'o', color=f'C{k}', ms=3,
              label=f'{run.name}: logged')
  ax.set_yscale('log')
  ax.set(title='learning rate, same axes', xlabel='epochs', ylabel='learning rate')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  save_figure(fig, path, dpi=110)


def write_figures(run, out_dir):
  """Writes every figure of `run` that its files allow; returns the file names written."""
  makers = {'loss_total.png': figure_loss_total, 'loss_components.png': figure_loss_components,
            'lr.png': figure_lr}
  if run.preds is not None:
    makers.update({'confusion.png': figure_confusion, 'pred_vs_true.png': figure_pred_vs_true,
                   'traces.png': figure_traces})
  for name, make in makers.items():
    make(run, os.path.join(out_dir, name))
  return [n for n in FIGURES if n in makers]

