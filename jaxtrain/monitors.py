"""Collapse and plateau detectors, run every epoch in training and replayed by the report.

They look for the failures that the original run hid behind a falling total loss:
  * collapse: a head whose predictions barely vary across recordings (prediction sd below
    `monitor.min_spread_ratio` x the targets' sd), or a classifier (hearing-loss class, wave-V
    existence) that gives one answer for more than `monitor.max_class_share` of recordings;
  * plateau: a loss component (or the total) of the train or val split that has not improved
    on its earlier best by `training.early_stopping_min_delta` for `monitor.plateau_epochs`
    epochs;
  * a learning rate that never changed although the config schedules warm-up or decay.

A `Monitor` reports each finding once, the epoch it starts; it reports it again only if it
went away and came back.
"""

import math

# Loss components as they appear in metrics.jsonl ('loss/<term>'), plus the total.
LOSS_KEYS = ('loss/total', 'loss/signal', 'loss/peak_exist', 'loss/peak_latency',
             'loss/peak_amplitude', 'loss/class', 'loss/threshold')
# (head, unit, metric of the predictions' spread, metric of the targets' spread).
SPREAD_METRICS = (
    ('signal reconstruction', '', 'signal/pred_std', 'signal/true_std'),
    ('wave-V latency', 'ms', 'peak/latency_pred_std_ms', 'peak/latency_true_std_ms'),
    ('wave-V amplitude', 'uV', 'peak/amplitude_pred_std_uv', 'peak/amplitude_true_std_uv'),
    ('threshold', 'dB', 'threshold/pred_std_db', 'threshold/true_std_db'),
)
# (head, metric: share of recordings given the most frequent answer).
ONE_CLASS_METRICS = (
    ('hearing-loss classifier', 'class/top_pred_share'),
    ('wave-V existence', 'peak/exist_top_pred_share'),
)


def _number(value):
  """A finite float, or None for a missing value (NaN is logged as null)."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def collapse_findings(metrics, min_spread_ratio, max_class_share):
  """Collapsed heads in one evaluation's metrics (see `evaluation.compute_metrics`).

  Returns:
    {key: message} for each collapsed head; heads whose metrics are absent are skipped.
  """
  found = {}
  for head, unit, pred_key, true_key in SPREAD_METRICS:
    pred, true = _number(metrics.get(pred_key)), _number(metrics.get(true_key))
    if pred is not None and true is not None and true > 0 and pred < min_spread_ratio * true:
      unit_ = f' {unit}' if unit else ''
      found[f'spread:{pred_key}'] = (
          f'collapse: the {head} predictions have a spread of {pred:.3g}{unit_} across '
          f'recordings ({pred_key}), below {min_spread_ratio:g} x the targets\' '
          f'{true:.3g}{unit_}: nearly the same output for every recording.')
  for head, key in ONE_CLASS_METRICS:
    share = _number(metrics.get(key))
    if share is not None and share > max_class_share:
      found[f'one_class:{key}'] = (
          f'collapse: the {head} gives the same answer for {share:.1%} of recordings ({key}), '
          f'above the limit of {max_class_share:.0%}.')
  return found


def epoch_series(rows, split, key, last_epoch):
  """[(epoch, value)] of `key` in the epoch rows of `split` up to `last_epoch`, by epoch.

  Window rows are skipped (rows without 'scope' count as epoch rows); a repeated epoch (a
  resumed run) keeps its last row; missing and non-finite values are left out.
  """
  by_epoch = {}
  for row in rows:
    if (row.get('split') == split and row.get('scope', 'epoch') == 'epoch'
        and row['epoch'] <= last_epoch):
      by_epoch[row['epoch']] = _number(row.get(key))
  return [(e, v) for e, v in sorted(by_epoch.items()) if v is not None]


def plateau_findings(rows, epoch, patience, min_delta):
  """Loss keys of the train and val epoch rows that have not beaten their earlier best by
  `min_delta` in their last `patience` epochs (up to `epoch`).

  Returns:
    {key: message}.
  """
  found = {}
  for split in ('train', 'val'):
    for key in LOSS_KEYS:
      series = epoch_series(rows, split, key, epoch)
      if len(series) <= patience:
        continue
      earlier, recent = series[:-patience], series[-patience:]
      best_epoch, best = min(earlier, key=lambda ev: ev[1])
      if min(v for _, v in recent) > best - min_delta:
        found[f'plateau:{split}:{key}'] = (
            f'plateau: {split} {key} has not improved by {min_delta:g} for {patience} epochs '
            f'(best {best:.5g} at epoch {best_epoch}; epoch {series[-1][0]}: '
            f'{series[-1][1]:.5g}).')
  return found


def constant_lr_findings(rows, epoch, scheduled):
  """A learning rate that is the same in every epoch row up to `epoch` (two or more).

  Args:
    rows: metrics.jsonl rows (any split) with 'lr'.
    epoch: the current epoch.
    scheduled: whether the config's schedule changes the rate at all.

  Returns:
    {key: message} (empty or one entry).
  """
  series = [ev for split in ('train', 'val') for ev in epoch_series(rows, split, 'lr', epoch)]
  epochs = {e for e, _ in series}
  if not scheduled or len(epochs) < 2:
    return {}
  low, high = min(v for _, v in series), max(v for _, v in series)
  if high - low <= 1e-6 * abs(high):
    return {'lr': (f'learning rate: constant at {high:.4g} for {len(epochs)} epochs although '
                   'the config schedules warm-up and cosine restarts; the schedule is not '
                   'being applied.')}
  return {}


class Monitor:
  """Runs every detector once per epoch and returns the findings that are new this epoch."""

  def __init__(self, config):
    m, t = config.monitor, config.training
    self.min_spread_ratio = m.min_spread_ratio
    self.max_class_share = m.max_class_share
    self.patience = m.plateau_epochs
    self.min_delta = t.early_stopping_min_delta
    # A schedule with no warm-up and eta_min == peak is legitimately constant.
    self.scheduled = t.warmup_epochs > 0 or t.min_learning_rate != t.learning_rate
    self._active = set()

  def findings(self, epoch, history_rows, metrics):
    """{key: message} of every detector that fires now (stateless)."""
    found = collapse_findings(metrics, self.min_spread_ratio, self.max_class_share)
    found.update(plateau_findings(history_rows, epoch, self.patience, self.min_delta))
    found.update(constant_lr_findings(history_rows, epoch, self.scheduled))
    return found

  def check(self, epoch, history_rows, metrics):
    """Warnings that start at `epoch`.

    Args:
      epoch: 1-based epoch just finished.
      history_rows: epoch rows so far (metrics.jsonl rows, this epoch's included), each with
        'epoch', 'split' and the 'loss/*' and 'lr' values.
      metrics: this epoch's validation metrics (`evaluation.compute_metrics`).

    Returns:
      list of warning strings (the caller logs them).
    """
    found = self.findings(epoch, history_rows, metrics)
    new = [message for key, message in found.items() if key not in self._active]
    self._active = set(found)
    return new


def replay(config, rows):
  """Runs a fresh `Monitor` over a finished run's metrics.jsonl rows, epoch by epoch.

  Returns:
    [(epoch, warning)] in order, as training would have logged them.
  """
  monitor = Monitor(config)
  epoch_rows = [r for r in rows if r.get('scope', 'epoch') == 'epoch'
                and r.get('split') in ('train', 'val')]
  val = {r['epoch']: r for r in epoch_rows if r['split'] == 'val'}
  out = []
  for epoch in sorted({r['epoch'] for r in epoch_rows}):
    history = [r for r in epoch_rows if r['epoch'] <= epoch]
    out.extend((epoch, w) for w in monitor.check(epoch, history, val.get(epoch, {})))
  return out
