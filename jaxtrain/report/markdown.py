"""The markdown of the report and `write_report`, which writes it with its figures."""

import argparse
import math
import os

from jaxtrain import evaluation
from jaxtrain.report import checks as checks_lib
from jaxtrain.report import figures
from jaxtrain.report import generation
from jaxtrain.report.run import TERMS
from jaxtrain.report.run import fmt
from jaxtrain.report.run import weight
from jaxtrain.report.run import load_run

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
    'threshold/within_10db', 'threshold/patients', 'threshold/patient_mae_db',
    'threshold/patient_rmse_db', 'threshold/patient_within_5db', 'threshold/patient_within_10db',
    'peak/latency_pred_mean_ms', 'peak/amplitude_pred_mean_uv', 'threshold/pred_mean_db',
    'signal/pred_std', 'peak/latency_pred_std_ms', 'peak/amplitude_pred_std_uv',
    'threshold/pred_std_db', 'peak/exist_top_pred_share', 'class/top_pred_share',
)


# ----------------------------------------------------------------------------------------------
# Markdown.

def _better(key):
  """'lower', 'higher' or None (a diagnostic without a better direction) for a metric."""
  name = key.split('/', 1)[1]
  if 'mse' in name or 'mae' in name:
    return 'lower'
  if ('pred_std' in name or 'pred_mean' in name or 'top_pred_share' in name
      or name == 'patients'):
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
      lines.append(f'| {_metric_label(key)} | {fmt(value)} | {fmt(base)} | '
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
      '- loss weights: ' + ', '.join(f'{term} {weight(run.config, term):g}' for term in TERMS)
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
      cells = [f'{fmt(r.test.get(key))} (baseline {fmt(r.test.get(key + "@baseline"))})'
               for r in runs]
      lines.append(f'| test {_metric_label(key)} | {cells[0]} | {cells[1]} |')
  lines += ['', *(f'![{n}]({n})' for n in figures.COMPARE_FIGURES), '']
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
  checks, warnings = checks_lib.run_checks(run)
  written = figures.write_figures(run, out_dir)
  passed = sum(c.passed for c in checks)
  lines = [f'# Convergence report: `{run.name}`', '', *run_summary(run), '']
  if compare is not None:
    other = load_run(compare)
    figures.figure_compare_loss([run, other], os.path.join(out_dir, figures.COMPARE_FIGURES[0]))
    figures.figure_compare_lr([run, other], os.path.join(out_dir, figures.COMPARE_FIGURES[1]))
    lines += compare_lines([run, other], [(checks, warnings), checks_lib.run_checks(other)])
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
  lines += ['', *generation.markdown_lines(run)]
  generation.write_figures(run, out_dir)
  lines += ['## Figures', '', *(f'![{n}]({n})' for n in written)]
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
