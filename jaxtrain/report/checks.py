"""The checklist: each item states its rule (thresholds from `config.monitor`) and the numbers
it was judged on."""

import numpy as np

from jaxtrain import monitors
from jaxtrain.report import generation
from jaxtrain.report.run import Check
from jaxtrain.report.run import TERMS
from jaxtrain.report.run import fmt
from jaxtrain.report.run import component_shares
from jaxtrain.report.run import logged_learning_rate
from jaxtrain.report.run import scheduled_learning_rate

# (head, test metric, 'lower' or 'higher' is better) for the "beats its baseline" checks.
HEAD_CHECKS = (
    ('signal reconstruction', 'signal/mse', 'lower'),
    ('wave-V existence', 'peak/exist_auc', 'higher'),
    ('wave-V latency', 'peak/latency_mae_ms', 'lower'),
    ('wave-V amplitude', 'peak/amplitude_mae_uv', 'lower'),
    ('hearing-loss class', 'class/balanced_accuracy', 'higher'),
    ('hearing threshold', 'threshold/mae_db', 'lower'),
    ('hearing threshold per patient', 'threshold/patient_mae_db', 'lower'),
)


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
  numbers = (f'epoch {epochs[0]:.0f}: {fmt(seg[0])} -> epoch {epochs[n - 1]:.0f}: '
             f'{fmt(seg[-1])} (drop {fmt(drop)}); ')
  numbers += (f'largest rise {fmt(rises[worst])} (epoch {epochs[worst]:.0f}->'
              f'{epochs[worst + 1]:.0f})' if rises[worst] > 0 else 'no epoch-to-epoch rise')
  if n < m.steady_epochs:
    numbers += f'; only {n} epochs logged'
  passed = drop > 0 and rises.max() <= m.steady_max_rise * drop
  return [Check('1. total loss decreases steadily', rule, numbers, bool(passed))]



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
        failed.append(f'{split} {t} {fmt(values[0])} -> {fmt(values[-1])}')
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
             f'val {fmt(val[last])} vs train {fmt(train[last])}')
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
  numbers = (f'{len(steps)} logged values, lr {fmt(lr.min(), 3)}..{fmt(lr.max(), 3)}; '
             f'largest relative error {err[i]:.2e} at step {steps[i]} '
             f'(logged {fmt(lr[i], 5)}, scheduled {fmt(expected[i], 5)})')
  return [Check(item, rule, numbers, bool(err.max() <= rtol))]


def check_baselines(run):
  m = run.config.monitor
  test, out = run.test, []
  for k, (head, key, better) in enumerate(HEAD_CHECKS):
    item = f'7{"abcdefg"[k]}. {head} beats its trivial baseline'
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
    out.append(Check(item, rule, f'{fmt(value)} vs baseline {fmt(base)}', bool(passed)))
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
      f'{k} = {fmt(run.test[k], 3)}' for k in metrics)
  return [Check(item, rule, numbers, not found)]


def run_checks(run):
  """Every checklist item of `run`, and the detector warnings replayed epoch by epoch."""
  warnings = monitors.replay(run.config, run.rows)
  checks = (check_steady_decrease(run) + check_component_shares(run)
            + check_components_improve(run) + check_val_follows_train(run)
            + check_no_plateau(run, warnings) + check_learning_rate(run)
            + check_baselines(run) + check_no_collapse(run) + generation.check(run))
  return checks, warnings

