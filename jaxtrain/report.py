"""Convergence report of a finished (or running) training run, with PASS/FAIL checks.

  python -m jaxtrain.report --workdir=DIR               # writes DIR/report/report.md + PNGs
  python -m jaxtrain.report --workdir=A --compare=B     # adds A and B side by side

It reads, from a workdir: `metrics.jsonl` (epoch rows for the curves, window rows for the
LR check, the last 'test' row for the final metrics), `config.json`, `run_info.json`
(`steps_per_epoch`, `num_params`) and `predictions/test.npz` (`evaluation.save_predictions`).

The checklist is the monitoring list of the original's convergence-fix note, made explicit:
every item states its rule (thresholds from `config.monitor`) and the numbers behind it, so a
collapsed run cannot pass as "99.99 % loss reduction". The per-task metrics are shown beside
their trivial baselines.
"""

import argparse
import dataclasses
import importlib
import json
import math
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxtrain import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxtrain import monitors  # pylint: disable=g-import-not-at-top,wrong-import-position

# Loss components in metrics.jsonl order; config.loss.weights names 'class' 'classification'.
TERMS = ('signal', 'peak_exist', 'peak_latency', 'peak_amplitude', 'class', 'threshold')
WEIGHT_KEYS = {'class': 'classification'}
# (head, test metric, 'lower' or 'higher' is better) for the "beats its baseline" checks.
HEAD_CHECKS = (
    ('signal reconstruction', 'signal/mse', 'lower'),
    ('wave-V existence', 'peak/exist_auc', 'higher'),
    ('wave-V latency', 'peak/latency_mae_ms', 'lower'),
    ('wave-V amplitude', 'peak/amplitude_mae_uv', 'lower'),
    ('hearing-loss class', 'class/balanced_accuracy', 'higher'),
    ('hearing threshold', 'threshold/mae_db', 'lower'),
)
# Metrics of the test table, by task (those absent in a run are skipped).
TABLE_METRICS = (
    'signal/mse', 'signal/mae', 'signal/pearson_r', 'signal/snr_db', 'signal/clean_mse',
    'signal/clean_pearson_r', 'signal/clean_snr_db',
    'peak/exist_accuracy', 'peak/exist_f1', 'peak/exist_auc',
    'peak/latency_mae_ms', 'peak/latency_rmse_ms', 'peak/latency_r2',
    'peak/latency_within_0.5ms', 'peak/latency_within_1ms',
    'peak/amplitude_mae_uv', 'peak/amplitude_r2', 'peak/amplitude_within_0.05uv',
    'peak/amplitude_within_0.1uv',
    'class/accuracy', 'class/balanced_accuracy', 'class/macro_f1',
    *(f'class/recall_{k}' for k in range(len(evaluation.CLASS_NAMES))),
    'threshold/mae_db', 'threshold/rmse_db', 'threshold/r2', 'threshold/within_5db',
    'threshold/within_10db',
    'peak/latency_pred_mean_ms', 'peak/amplitude_pred_mean_uv', 'threshold/pred_mean_db',
    'signal/pred_std', 'peak/latency_pred_std_ms', 'peak/amplitude_pred_std_uv',
    'threshold/pred_std_db', 'peak/exist_top_pred_share', 'class/top_pred_share',
)
# Figures of one run and of a comparison, in the order the report shows them.
FIGURES = ('loss_total.png', 'loss_components.png', 'lr.png', 'confusion.png',
           'pred_vs_true.png', 'traces.png')
COMPARE_FIGURES = ('compare_loss.png', 'compare_lr.png')
N_EXAMPLE_TRACES = 12


@dataclasses.dataclass
class Run:
  """What the report reads from one workdir."""
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  info: dict
  rows: list
  preds: dict | None  # predictions/test.npz, None before the run has finished.

  @property
  def steps_per_epoch(self):
    return self.info['steps_per_epoch']

  @property
  def test(self):
    """Metrics of the last test row ({} when the run has none yet)."""
    rows = [r for r in self.rows if r.get('split') == 'test']
    return rows[-1] if rows else {}

  def series(self, split, key):
    """(epochs [E], values [E]) of an epoch-row key."""
    pairs = monitors.epoch_series(self.rows, split, key, math.inf)
    return np.asarray([e for e, _ in pairs], float), np.asarray([v for _, v in pairs], float)


@dataclasses.dataclass
class Check:
  """One checklist item: its rule, the numbers it was judged on, and the verdict."""
  item: str
  rule: str
  numbers: str
  passed: bool


def load_run(workdir):
  """Reads a workdir into a `Run`."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, 'run_info.json')) as f:
    info = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  path = os.path.join(workdir, 'predictions', 'test.npz')
  preds = dict(np.load(path)) if os.path.exists(path) else None
  name = os.path.basename(os.path.normpath(workdir))
  return Run(name, workdir, config, info, rows, preds)


def _fmt(x, digits=4):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return 'n/a'
  return f'{x:.{digits}g}'


def _weight(config, term):
  return float(config.loss.weights[WEIGHT_KEYS.get(term, term)])


def restart_epochs(config):
  """Epoch boundaries (in completed epochs) where the schedule warms up or restarts.

  Returns:
    (warm-up end or None, [restart boundaries]) within `training.num_epochs`.
  """
  t = config.training
  warmup = float(t.warmup_epochs) if t.warmup_epochs > 0 else None
  restarts, boundary, length = [], float(t.warmup_epochs), float(t.restart_epochs)
  if t.restart_epochs <= 0 or t.restart_mult < 1:  # Not a valid schedule: nothing to mark.
    return warmup, restarts
  while boundary + length < t.num_epochs:
    boundary += length
    restarts.append(boundary)
    length *= t.restart_mult
  return warmup, restarts


def scheduled_learning_rate(config, steps_per_epoch, counts):
  """`jaxtrain.optim.create_learning_rate_fn` at the update counts [M] (float64 [M]).

  Imported lazily: the report needs neither JAX nor the optimizer for anything else.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  optim = importlib.import_module('jaxtrain.optim')
  fn = optim.create_learning_rate_fn(config, steps_per_epoch)
  values = jax.jit(jax.vmap(fn))(jnp.asarray(counts, jnp.int32))
  return np.asarray(values, np.float64)


def logged_learning_rate(run):
  """(steps [M], lr [M]) of every train row with an 'lr', one per step, by step."""
  by_step = {r['step']: r['lr'] for r in run.rows
             if r.get('split') == 'train' and r.get('lr') is not None}
  steps = np.asarray(sorted(by_step), np.int64)
  return steps, np.asarray([by_step[s] for s in steps], np.float64)


# ----------------------------------------------------------------------------------------------
# Checks. Each returns a list of `Check`.

def check_steady_decrease(run):
  m = run.config.monitor
  epochs, total = run.series('train', 'loss/total')
  n = min(m.steady_epochs, len(total))
  rule = (f'train loss/total over epochs 1-{m.steady_epochs}: last < first, and no '
          f'epoch-to-epoch rise above {m.steady_max_rise:g} x (first - last)')
  if n < 2:
    return [Check('1. total loss decreases steadily', rule,
                  f'only {len(total)} epoch(s) logged', False)]
  seg = total[:n]
  drop, rises = seg[0] - seg[-1], np.diff(seg)
  worst = int(np.argmax(rises))
  numbers = (f'epoch {epochs[0]:.0f}: {_fmt(seg[0])} -> epoch {epochs[n - 1]:.0f}: '
             f'{_fmt(seg[-1])} (drop {_fmt(drop)}); ')
  numbers += (f'largest rise {_fmt(rises[worst])} (epoch {epochs[worst]:.0f}->'
              f'{epochs[worst + 1]:.0f})' if rises[worst] > 0 else 'no epoch-to-epoch rise')
  if n < m.steady_epochs:
    numbers += f'; only {n} epochs logged'
  passed = drop > 0 and rises.max() <= m.steady_max_rise * drop
  return [Check('1. total loss decreases steadily', rule, numbers, bool(passed))]


def component_shares(run, split):
  """(epochs [E], {term: |w_k L_k| / sum_j |w_j L_j| [E]}) over epochs with every term."""
  series = {t: dict(zip(*run.series(split, f'loss/{t}'))) for t in TERMS}
  epochs = sorted(set.intersection(*(set(s) for s in series.values())))
  weighted = np.asarray([[abs(_weight(run.config, t) * series[t][e]) for t in TERMS]
                         for e in epochs]).reshape(len(epochs), len(TERMS))
  shares = weighted / np.maximum(weighted.sum(1, keepdims=True), 1e-30)
  return np.asarray(epochs), {t: shares[:, i] for i, t in enumerate(TERMS)}


def check_component_shares(run):
  cap = run.config.monitor.max_component_share
  rule = (f'every epoch (train and val): each weighted component |w_k L_k| is at most '
          f'{cap:.0%} of sum_k |w_k L_k|')
  worst, parts = [], []
  for split in ('train', 'val'):
    epochs, shares = component_shares(run, split)
    if not len(epochs):
      continue
    for t in TERMS:
      i = int(np.argmax(shares[t]))
      worst.append(shares[t][i])
      parts.append((shares[t][i], f'{split} {t} {shares[t][i]:.0%} (epoch {epochs[i]:.0f})'))
  if not worst:
    return [Check('2. no loss component dominates', rule, 'no epoch with every component',
                  False)]
  parts.sort(reverse=True)
  numbers = 'largest shares: ' + ', '.join(p for _, p in parts[:4])
  return [Check('2. no loss component dominates', rule, numbers, max(worst) <= cap)]


def check_components_improve(run):
  min_delta = run.config.training.early_stopping_min_delta
  rule = f'train and val: each loss/<k> at the last epoch < epoch 1 - {min_delta:g}'
  failed, checked = [], 0
  for split in ('train', 'val'):
    for t in TERMS:
      epochs, values = run.series(split, f'loss/{t}')
      if len(values) < 2:
        failed.append(f'{split} {t}: {len(values)} epoch(s)')
        continue
      checked += 1
      if not values[-1] < values[0] - min_delta:
        failed.append(f'{split} {t} {_fmt(values[0])} -> {_fmt(values[-1])}')
  numbers = (f'not improved: {"; ".join(failed)}' if failed
             else f'all {checked} components improved')
  return [Check('3. every component improves from epoch 1 to the end', rule, numbers,
                not failed)]


def check_val_follows_train(run):
  gap_max = run.config.monitor.max_val_gap
  rule = f'every epoch: (val total - train total) / |train total| <= {gap_max:g}'
  train = dict(zip(*run.series('train', 'loss/total')))
  val = dict(zip(*run.series('val', 'loss/total')))
  epochs = sorted(set(train) & set(val))
  if not epochs:
    return [Check('4. validation loss follows training loss', rule, 'no epoch with both',
                  False)]
  gaps = np.asarray([(val[e] - train[e]) / max(abs(train[e]), 1e-30) for e in epochs])
  i = int(np.argmax(gaps))
  last = epochs[-1]
  numbers = (f'largest gap {gaps[i]:+.1%} at epoch {epochs[i]:.0f}; last epoch {last:.0f}: '
             f'val {_fmt(val[last])} vs train {_fmt(train[last])}')
  return [Check('4. validation loss follows training loss', rule, numbers,
                bool(gaps.max() <= gap_max))]


def check_no_plateau(run, warnings):
  m, t = run.config.monitor, run.config.training
  rule = (f'plateau detector: no train/val loss (total or component) goes '
          f'{m.plateau_epochs} epochs without beating its earlier best by '
          f'{t.early_stopping_min_delta:g}')
  plateaus = [(e, w) for e, w in warnings if w.startswith('plateau')]
  numbers = ('none' if not plateaus else
             f'{len(plateaus)} plateau(s); first: epoch {plateaus[0][0]}: {plateaus[0][1]}')
  return [Check('5. no sudden plateau', rule, numbers, not plateaus)]


def check_learning_rate(run):
  rtol = run.config.monitor.lr_rtol
  rule = (f'every logged lr (the rate of update `step`) equals create_learning_rate_fn(step - 1) '
          f'within relative {rtol:g}')
  item = '6. learning rate follows the configured warm-up and restarts'
  steps, lr = logged_learning_rate(run)
  if not len(steps):
    return [Check(item, rule, 'no lr logged', False)]
  try:
    expected = scheduled_learning_rate(run.config, run.steps_per_epoch,
                                       np.maximum(steps - 1, 0))
  except (ImportError, AttributeError, ValueError) as e:
    return [Check(item, rule, f'schedule unavailable: {e}', False)]
  err = np.abs(lr - expected) / np.maximum(np.abs(expected), 1e-30)
  i = int(np.argmax(err))
  numbers = (f'{len(steps)} logged values, lr {_fmt(lr.min(), 3)}..{_fmt(lr.max(), 3)}; '
             f'largest relative error {err[i]:.2e} at step {steps[i]} '
             f'(logged {_fmt(lr[i], 5)}, scheduled {_fmt(expected[i], 5)})')
  return [Check(item, rule, numbers, bool(err.max() <= rtol))]


def check_baselines(run):
  m = run.config.monitor
  test, out = run.test, []
  for k, (head, key, better) in enumerate(HEAD_CHECKS):
    item = f'7{"abcdef"[k]}. {head} beats its trivial baseline'
    if better == 'lower':
      rule = f'test {key} <= (1 - {m.baseline_rel_margin:g}) x baseline'
    else:
      rule = f'test {key} >= baseline + {m.baseline_abs_margin:g}'
    value, base = test.get(key), test.get(f'{key}@baseline')
    if value is None or base is None:
      out.append(Check(item, rule, f'{key} missing or undefined in the test metrics', False))
      continue
    if better == 'lower':
      passed = value <= (1 - m.baseline_rel_margin) * base
    else:
      passed = value >= base + m.baseline_abs_margin
    out.append(Check(item, rule, f'{_fmt(value)} vs baseline {_fmt(base)}', bool(passed)))
  return out


def check_no_collapse(run):
  m = run.config.monitor
  rule = (f'test: every head\'s prediction sd >= {m.min_spread_ratio:g} x target sd, and no '
          f'classifier gives one answer to more than {m.max_class_share:.0%} of recordings')
  item = '8. no head collapsed (test split)'
  if not run.test:
    return [Check(item, rule, 'no test metrics logged', False)]
  found = monitors.collapse_findings(run.test, m.min_spread_ratio, m.max_class_share)
  metrics = [key.split(':', 1)[1] for key in found]  # Keys are '<kind>:<metric>'.
  numbers = 'none' if not found else 'collapsed: ' + ', '.join(
      f'{k} = {_fmt(run.test[k], 3)}' for k in metrics)
  return [Check(item, rule, numbers, not found)]


def run_checks(run):
  """Every checklist item of `run`, and the detector warnings replayed epoch by epoch."""
  warnings = monitors.replay(run.config, run.rows)
  checks = (check_steady_decrease(run) + check_component_shares(run)
            + check_components_improve(run) + check_val_follows_train(run)
            + check_no_plateau(run, warnings) + check_learning_rate(run)
            + check_baselines(run) + check_no_collapse(run))
  return checks, warnings


# ----------------------------------------------------------------------------------------------
# Figures.

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



def _save(fig, path, **savefig_kwargs):
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
  _save(fig, path, dpi=110)


def figure_loss_components(run, path):
  fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
  for ax, term in zip(axes.flat, TERMS):
    note = _set_loss_scale(ax, _plot_losses(ax, run, f'loss/{term}'))
    _mark_schedule(ax, run.config, label=False)
    ax.set(title=f'{term} (weight {_weight(run.config, term):g}){note}',
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
  _save(fig, path, dpi=100)


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
  _save(fig, path, dpi=110)


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
               f'{_fmt(test.get("class/accuracy"), 3)} (baseline '
               f'{_fmt(test.get("class/accuracy@baseline"), 3)}), balanced '
               f'{_fmt(test.get("class/balanced_accuracy"), 3)}')
  fig.colorbar(im, ax=ax, label='share of the true class')
  _save(fig, path, dpi=110)


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
    ax.set(title=f'{name} (n={int(ok.sum())})\nMAE {_fmt(test.get(mae_key), 3)} {unit}, '
                 f'baseline {_fmt(test.get(mae_key + "@baseline"), 3)} {unit}',
           xlabel=f'true ({unit})', ylabel=f'predicted ({unit})')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'{run.name}: predicted vs true (test split, where the target exists)')
  _save(fig, path, dpi=100)


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
  _save(fig, path, dpi=90, bbox_inches='tight')


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
        f'{_weight(r.config, term):g}' for r in runs) + ')'
    ax.set(title=f'{key}{weights}{note}', xlabel='epochs completed', ylabel=key)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  axes.flat[-1].axis('off')
  fig.suptitle('loss curves, same axes (solid: train, dashed: val; weights in run order '
               + ' / '.join(r.name for r in runs) + ')')
  _save(fig, path, dpi=100)


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
  _save(fig, path, dpi=110)


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


# ----------------------------------------------------------------------------------------------
# Markdown.

def _better(key):
  """'lower', 'higher' or None (a diagnostic without a better direction) for a metric."""
  name = key.split('/', 1)[1]
  if 'mse' in name or 'mae' in name:
    return 'lower'
  if 'pred_std' in name or 'pred_mean' in name or 'top_pred_share' in name:
    return None
  return 'higher'


def _beats(value, base, better):
  if better is None or value is None or base is None:
    return ''
  if not (math.isfinite(value) and math.isfinite(base)):
    return ''
  if value == base:
    return 'same'
  return 'yes' if (value < base) == (better == 'lower') else 'NO'


def _metric_label(key):
  if key.startswith('class/recall_'):
    k = int(key.rsplit('_', 1)[1])
    return f'{key} ({evaluation.CLASS_NAMES[k]})'
  return key


def _cell(text):
  """Text safe inside a markdown table cell."""
  return text.replace('|', '\\|')


def checklist_table(checks):
  lines = ['| check | rule | numbers | result |', '|---|---|---|---|']
  lines += [f'| {c.item} | {_cell(c.rule)} | {_cell(c.numbers)} | '
            f'**{"PASS" if c.passed else "FAIL"}** |' for c in checks]
  return lines


def metrics_table(run):
  test = run.test
  lines = ['| metric | model | trivial baseline | better than baseline |', '|---|---|---|---|']
  for key in TABLE_METRICS:
    if key in test:
      value, base = test.get(key), test.get(f'{key}@baseline')
      lines.append(f'| {_metric_label(key)} | {_fmt(value)} | {_fmt(base)} | '
                   f'{_beats(value, base, _better(key))} |')
  return lines


def confusion_table(run):
  cm, names = run.preds['confusion'], [str(n) for n in run.preds['class_names']]
  lines = ['| true \\ predicted | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  lines += [f'| {names[i]} | ' + ' | '.join(str(v) for v in cm[i]) + ' |'
            for i in range(len(names))]
  return lines


def run_summary(run):
  t = run.config.training
  last_epoch = max((r['epoch'] for r in run.rows), default=0)
  return [
      f'- workdir: `{run.workdir}`; data: `{run.config.data.source}`; parameters: '
      f'{run.info.get("num_params", "n/a")}; {run.steps_per_epoch} optimizer updates per epoch; '
      f'{last_epoch} of {t.num_epochs} epochs logged.',
      f'- optimizer: lr {t.learning_rate:g} (min {t.min_learning_rate:g}), batch '
      f'{t.batch_size} x {t.accumulation_steps} accumulation, clip {t.grad_clip_norm:g}, '
      f'warm-up {t.warmup_epochs} epochs, T_0 {t.restart_epochs}, T_mult {t.restart_mult}.',
      '- loss weights: ' + ', '.join(f'{term} {_weight(run.config, term):g}' for term in TERMS)
      + '.',
  ]


def compare_lines(runs, results):
  a, b = runs
  (checks_a, _), (checks_b, _) = results
  lines = [f'## Comparison: `{a.name}` vs `{b.name}`', '',
           f'| | {a.name} | {b.name} |', '|---|---|---|']
  for ca, cb in zip(checks_a, checks_b):
    lines.append(f'| {ca.item} | {"PASS" if ca.passed else "FAIL"}: {_cell(ca.numbers)} | '
                 f'{"PASS" if cb.passed else "FAIL"}: {_cell(cb.numbers)} |')
  for key in TABLE_METRICS:
    if key in a.test or key in b.test:
      cells = [f'{_fmt(r.test.get(key))} (baseline {_fmt(r.test.get(key + "@baseline"))})'
               for r in runs]
      lines.append(f'| test {_metric_label(key)} | {cells[0]} | {cells[1]} |')
  lines += ['', *(f'![{n}]({n})' for n in COMPARE_FIGURES), '']
  return lines


def write_report(workdir, compare=None):
  """Writes `workdir/report/report.md` and its figures, prints a summary.

  Args:
    workdir: the run to report on.
    compare: another run's workdir to put beside it (one table, the same axes).

  Returns:
    The path of report.md.
  """
  run = load_run(workdir)
  out_dir = os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  checks, warnings = run_checks(run)
  figures = write_figures(run, out_dir)
  passed = sum(c.passed for c in checks)
  lines = [f'# Convergence report: `{run.name}`', '', *run_summary(run), '']
  if compare is not None:
    other = load_run(compare)
    figure_compare_loss([run, other], os.path.join(out_dir, COMPARE_FIGURES[0]))
    figure_compare_lr([run, other], os.path.join(out_dir, COMPARE_FIGURES[1]))
    lines += compare_lines([run, other], [(checks, warnings), run_checks(other)])
  lines += [f'## Checklist: {passed} of {len(checks)} PASS', '', *checklist_table(checks), '',
            '## Test metrics against trivial baselines', '',
            'Baselines on the same split: zero trace (signal), train majority class (class, wave-V '
            'existence), train median (latency, amplitude, threshold). Diagnostics '
            '(`pred_mean`, `pred_std`, `top_pred_share`) have no better direction.', '']
  lines += metrics_table(run) if run.test else ['No test evaluation logged yet.']
  if run.preds is not None:
    lines += ['', '### Test confusion matrix (rows: true class)', '', *confusion_table(run)]
  lines += ['', '## Detector warnings (replayed epoch by epoch, as logged in training)', '']
  lines += [f'- epoch {e}: {w}' for e, w in warnings] or ['- none']
  lines += ['', '## Figures', '', *(f'![{n}]({n})' for n in figures)]
  if run.preds is None:
    lines.append('\n(No predictions/test.npz: confusion, scatter and trace figures skipped.)')
  path = os.path.join(out_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'Convergence report of {run.workdir}: {passed} of {len(checks)} checks PASS')
  for c in checks:
    print(f'  {"PASS" if c.passed else "FAIL"}  {c.item}: {c.numbers}')
  print(f'  {len(warnings)} detector warning(s). Report: {path}')
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='Run directory to report on.')
  parser.add_argument('--compare', default=None, help='Second run directory, side by side.')
  args = parser.parse_args(argv)
  write_report(args.workdir, args.compare)


if __name__ == '__main__':
  main()
