"""Generation quality of the diffusion model on synthetic data: metrics, checklist item, figures.

It reads `RUN/generation/samples.npz` (`python -m jaxtrain.generation_quality`): for C
conditions (test recordings with a wave V) their statics, class, true wave-V latency (ms) and
amplitude (µV), their recorded and clean traces standardised with the recording's mean and sd
(the unit the model generates in), the condition's expected clean trace (the mean clean trace
of train recordings with these statics: the statics do not fix a patient's traits, see
`jaxtrain.generation_quality`), `num` generated traces [C, num, L] per condition, and the
model's readings of those traces.

Per condition:
  r          Pearson correlation of the mean generated trace with the condition's expected
             clean trace (what a generator given only the statics can match; the checklist's r);
  r_recording  the same with the recording's own clean trace, and r_reachable, that of the
             expected clean trace with it: no generator of the statics alone can do better on
             average, whatever its quality;
  wave V     the largest value of the mean generated trace within the generator's latency
             range (4.8-18.5 ms): its time against the true latency, its value against the
             clean trace at the true latency (standardised units);
  reading    medians of the model's wave-V latency (ms) and amplitude (µV) readings of the
             generated traces, against the generator's labels.
The latency-intensity curve: per intensity, the medians of the generated and of the true
latencies over the conditions at that intensity, and the least-squares slope of each.
"""

import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxtrain import evaluation  # pylint: disable=wrong-import-position
from jaxtrain.data import synthetic  # pylint: disable=wrong-import-position
from jaxtrain.report.figures import save_figure  # pylint: disable=wrong-import-position
from jaxtrain.report.run import Check  # pylint: disable=wrong-import-position
from jaxtrain.report.run import fmt  # pylint: disable=wrong-import-position

FIGURES = ('generation_traces.png', 'generation_latency.png')
MIN_MEAN_R = 0.8  # The target for the mean per-condition correlation.
ITEM = '9. generated traces match the clean ones (synthetic data)'
COMMAND = 'python -m jaxtrain.generation_quality --workdir={workdir}'
OUTDATED = ('generation/samples.npz has no expected clean traces (written by an earlier '
            'version)')
N_SHOWN = 4  # Generated traces drawn per panel besides their mean.


def save_samples(path, samples):
  """Writes the arrays of generation/samples.npz (the keys listed in generation_quality)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, **samples)


def applies(config):
  """The item is on the checklist of runs that trained the denoiser on synthetic data."""
  return config.data.source == 'synthetic' and float(config.loss.weights.signal) > 0


def wave_v(traces, time_ms):
  """(time ms, value) of the largest value of traces [..., L] within the V latency range."""
  lo, hi = synthetic.LATENCY_RANGE
  window = np.flatnonzero((time_ms >= lo) & (time_ms <= hi))
  i = window[np.argmax(traces[..., window], axis=-1)]
  return time_ms[i], np.take_along_axis(traces, i[..., None], axis=-1)[..., 0]


def condition_metrics(s):
  """Per-condition arrays [C] (see the module docstring)."""
  mean = s['generated'].mean(axis=1)
  latency, value = wave_v(mean, s['time_ms'])
  at_true = np.abs(s['time_ms'][None, :] - s['latency_ms'][:, None]).argmin(axis=1)
  return {'r': evaluation.rowwise_pearson(mean, s['condition_clean']),
          'r_recording': evaluation.rowwise_pearson(mean, s['clean']),
          'r_reachable': evaluation.rowwise_pearson(s['condition_clean'], s['clean']),
          'latency_ms': latency, 'true_latency_ms': s['latency_ms'],
          'amplitude_z': value,
          'true_amplitude_z': s['clean'][np.arange(len(at_true)), at_true],
          'read_latency_ms': np.median(s['read_v_latency_ms'], axis=1),
          'read_amplitude_uv': np.median(s['read_v_amplitude_uv'], axis=1),
          'true_amplitude_uv': s['amplitude_uv'],
          'intensity_db': s['static'][:, 1], 'label': s['label']}


def latency_curve(m):
  """Per intensity: (levels [K], median generated [K], median true latency [K]), and the
  least-squares slopes (ms per 10 dB) of the generated and the true latencies of all C."""
  levels = np.unique(m['intensity_db'])
  at = [m['intensity_db'] == level for level in levels]
  generated = np.asarray([np.median(m['latency_ms'][a]) for a in at])
  true = np.asarray([np.median(m['true_latency_ms'][a]) for a in at])
  slope = lambda y: 10 * np.polyfit(m['intensity_db'], y, 1)[0] if len(levels) > 1 else np.nan
  return levels, generated, true, slope(m['latency_ms']), slope(m['true_latency_ms'])


def summary(s):
  """The headline numbers of the samples `s`, as a dict of floats."""
  m = condition_metrics(s)
  _, _, _, gen_slope, true_slope = latency_curve(m)
  return {'conditions': len(m['r']), 'num': int(s['generated'].shape[1]),
          'mean_r': float(np.mean(m['r'])), 'median_r': float(np.median(m['r'])),
          'mean_r_recording': float(np.mean(m['r_recording'])),
          'mean_r_reachable': float(np.mean(m['r_reachable'])),
          'latency_mae_ms': float(np.mean(np.abs(m['latency_ms'] - m['true_latency_ms']))),
          'read_latency_mae_ms': float(np.mean(np.abs(m['read_latency_ms']
                                                      - m['true_latency_ms']))),
          'read_amplitude_mae_uv': float(np.mean(np.abs(m['read_amplitude_uv']
                                                        - m['true_amplitude_uv']))),
          'slope_ms_per_10db': float(gen_slope), 'true_slope_ms_per_10db': float(true_slope)}


def check(run):
  """The checklist item, or [] for a run it does not apply to (see `applies`)."""
  if not applies(run.config):
    return []
  rule = (f'mean over the conditions of r(mean generated trace, the condition\'s expected clean '
          f'trace) >= {MIN_MEAN_R:g}, and generated wave-V latency falls with intensity '
          '(least-squares slope < 0) as the true one does')
  command = COMMAND.format(workdir=run.workdir)
  if run.generation is None:
    return [Check(ITEM, rule, f'not evaluated: run `{command}`', False)]
  if not _current(run.generation):
    return [Check(ITEM, rule, f'{OUTDATED}: run `{command}` again', False)]
  s = summary(run.generation)
  numbers = (f'{s["conditions"]} conditions x {s["num"]} traces: mean r {s["mean_r"]:.3f} '
             f'(median {s["median_r"]:.3f}); with the recordings\' own clean traces '
             f'{s["mean_r_recording"]:.3f} (reachable {s["mean_r_reachable"]:.3f}); latency '
             f'slope {s["slope_ms_per_10db"]:+.3f} ms/10 dB (true '
             f'{s["true_slope_ms_per_10db"]:+.3f})')
  passed = s['mean_r'] >= MIN_MEAN_R and s['slope_ms_per_10db'] < 0 and (
      s['true_slope_ms_per_10db'] < 0)
  return [Check(ITEM, rule, numbers, bool(passed))]


def _current(s):
  return 'condition_clean' in s


def _settings(s):
  eta = float(s['eta'])
  return (f'checkpoint {int(s["checkpoint"])}, {s["method"]} {int(s["num_steps"])} steps'
          f'{"" if np.isnan(eta) else f", eta {eta:g}"}, guidance {float(s["guidance_scale"]):g}'
          f', seed {int(s["seed"])}')


def summary_lines(s):
  """Plain-text lines of the headline numbers (printed by generation_quality)."""
  head = summary(s)
  return [f'Generation quality ({_settings(s)}):'] + [f'  {k}: {fmt(v)}' for k, v in head.items()]


def markdown_lines(run):
  """The report section, or [] when the item does not apply and nothing was evaluated."""
  s = run.generation
  if s is None:
    return []
  if not _current(s):
    return ['## Generation quality (synthetic test conditions)', '',
            f'{OUTDATED}: run `{COMMAND.format(workdir=run.workdir)}` again.', '']
  m, names = condition_metrics(s), [str(n) for n in s['class_names']]
  head = summary(s)
  levels, generated, true, _, _ = latency_curve(m)
  lines = ['## Generation quality (synthetic test conditions)', '',
           f'{head["conditions"]} conditions (test recordings with a wave V), {head["num"]} '
           f'generated traces each; {_settings(s)}. r: Pearson correlation of the mean '
           'generated trace with the condition\'s expected clean trace (the mean clean trace '
           'of the nearest train recordings at its intensity); with the recording: with the '
           'recording\'s own clean trace, which the statics do not fix (reachable: the '
           'expected clean trace\'s r with it, the best a generator of the statics can do on '
           'average). Latency: the largest value of the mean generated trace in 4.8-18.5 ms. '
           'Reading: the model\'s heads on the generated traces (medians).', '',
           f'- mean r {head["mean_r"]:.3f} (median {head["median_r"]:.3f}); with the '
           f'recording {head["mean_r_recording"]:.3f} (reachable '
           f'{head["mean_r_reachable"]:.3f}); latency MAE '
           f'{head["latency_mae_ms"]:.3f} ms; read latency MAE {head["read_latency_mae_ms"]:.3f}'
           f' ms; read amplitude MAE {head["read_amplitude_mae_uv"]:.3f} µV.',
           f'- latency-intensity slope: generated {head["slope_ms_per_10db"]:+.3f} ms/10 dB, '
           f'true {head["true_slope_ms_per_10db"]:+.3f} ms/10 dB.', '',
           '| intensity (dB) | conditions | mean r | median generated latency (ms) | median true '
           'latency (ms) |', '|---|---|---|---|---|']
  for level, gen, tru in zip(levels, generated, true):
    at = m['intensity_db'] == level
    lines.append(f'| {level:g} | {int(at.sum())} | {np.mean(m["r"][at]):.3f} | {gen:.2f} | '
                 f'{tru:.2f} |')
  lines += ['', '| class | intensity (dB) | age (yr) | r | latency gen / true (ms) | amplitude '
            'gen / clean (sd units) | read latency (ms) | read amplitude / true (µV) |',
            '|---|---|---|---|---|---|---|---|']
  for c in range(len(m['r'])):
    lines.append(
        f'| {names[m["label"][c]]} | {m["intensity_db"][c]:g} | {s["static"][c, 0]:g} | '
        f'{m["r"][c]:.3f} | {m["latency_ms"][c]:.2f} / {m["true_latency_ms"][c]:.2f} | '
        f'{m["amplitude_z"][c]:.2f} / {m["true_amplitude_z"][c]:.2f} | '
        f'{m["read_latency_ms"][c]:.2f} | {m["read_amplitude_uv"][c]:.3f} / '
        f'{m["true_amplitude_uv"][c]:.3f} |')
  return lines + ['', *(f'![{n}]({n})' for n in FIGURES), '']


def _panels(s):
  """Per class: the conditions shown, at its lowest, middle and highest intensity."""
  out = []
  for k in range(len(s['class_names'])):
    rows = np.flatnonzero(s['label'] == k)
    if not len(rows):
      continue
    levels = np.unique(s['static'][rows, 1])
    picks = [levels[0], levels[len(levels) // 2], levels[-1]]
    out.append((k, [rows[s['static'][rows, 1] == level][0] for level in picks]))
  return out


def figure_traces(run, path):
  s, m = run.generation, condition_metrics(run.generation)
  panels, names, x = _panels(s), [str(n) for n in s['class_names']], s['time_ms']
  fig, axes = plt.subplots(len(panels), 3, figsize=(15, 2.6 * len(panels)), squeeze=False)
  for (k, rows), ax_row in zip(panels, axes):
    for ax, c in zip(ax_row, rows):
      ax.plot(x, s['recorded'][c], color='0.6', lw=0.9, label='recorded')
      for i in range(min(N_SHOWN, s['generated'].shape[1])):
        ax.plot(x, s['generated'][c, i], color='C0', lw=0.6, alpha=0.35,
                label='generated' if i == 0 else None)
      ax.plot(x, s['generated'][c].mean(0), color='C0', lw=1.8, label='mean generated')
      ax.plot(x, s['clean'][c], color='k', lw=1.2, label='clean')
      ax.plot(x, s['condition_clean'][c], color='k', lw=1.2, ls=':', label='expected clean')
      ax.axvline(s['latency_ms'][c], color='C3', ls='--', lw=1, label='true wave V')
      ax.set_title(f'{names[k]}, {s["static"][c, 1]:g} dB, age {s["static"][c, 0]:g}: '
                   f'r={m["r"][c]:.2f}', fontsize=9)
      ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=7, ncol=2)
  for ax in axes[-1]:
    ax.set_xlabel('time (ms)', fontsize=8)
  fig.suptitle(f'{run.name}: generated beside recorded traces (standardised units)')
  save_figure(fig, path, dpi=90)


def figure_latency(run, path):
  s = run.generation
  m, names = condition_metrics(s), [str(n) for n in s['class_names']]
  levels, generated, true, gen_slope, true_slope = latency_curve(m)
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  ax = axes[0]
  ax.plot(levels, true, 'o-', color='k', label=f'true (slope {true_slope:+.2f} ms/10 dB)')
  ax.plot(levels, generated, 's-', color='C0',
          label=f'generated (slope {gen_slope:+.2f} ms/10 dB)')
  ax.set(title='latency-intensity curve (medians)', xlabel='intensity (dB nHL)',
         ylabel='wave-V latency (ms)')
  for ax, (key, title) in zip(axes[1:], (('latency_ms', 'wave-V latency'),
                                         ('r', 'r(mean generated, clean)'))):
    for k in np.unique(m['label']):
      at = m['label'] == k
      if key == 'r':
        ax.scatter(m['intensity_db'][at], m['r'][at], s=14, label=names[k])
      else:
        ax.scatter(m['true_latency_ms'][at], m['latency_ms'][at], s=14, label=names[k])
    ax.set_title(title)
  lo, hi = np.min(m['true_latency_ms']), np.max(m['true_latency_ms'])
  axes[1].plot([lo, hi], [lo, hi], 'k--', lw=1)
  axes[1].set(xlabel='true latency (ms)', ylabel='generated latency (ms)')
  axes[2].axhline(MIN_MEAN_R, color='k', ls='--', lw=1, label=f'target mean {MIN_MEAN_R:g}')
  axes[2].set(xlabel='intensity (dB nHL)', ylabel='r', ylim=(min(0, np.min(m['r'])), 1))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f'{run.name}: generated wave V against the generator\'s')
  save_figure(fig, path, dpi=100)


def write_figures(run, out_dir):
  """Writes the generation figures when samples exist; returns the names written."""
  if run.generation is None or not _current(run.generation):
    return []
  figure_traces(run, os.path.join(out_dir, FIGURES[0]))
  figure_latency(run, os.path.join(out_dir, FIGURES[1]))
  return list(FIGURES)
