"""Where metrics go: the console, TensorBoard event files (tensorboardX, no TensorFlow) and
`workdir/metrics.jsonl`, one JSON object a line. Only process 0 writes.
"""

import json
import math
import os

from absl import logging
import jax
import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'


def _plain(value):
  """A JSON-able Python scalar (NaN and inf become None, which JSON can hold)."""
  value = value.item() if isinstance(value, (np.generic, np.ndarray, jax.Array)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_metrics(workdir):
  """Rows of `workdir/metrics.jsonl` as dicts (empty list when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _rewind(path, step):
  """Drops the rows of metrics.jsonl that a run resumed from update `step` writes again.

  Those are the rows after `step` and the test rows, so that the file ends as an uninterrupted
  run's; a last line torn by a kill goes too.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row['step'] <= step and row['split'] != 'test':
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) < len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)
    logging.info('Dropped %d rows of %s written after step %d; they will be written again.',
                 len(lines) - len(kept), path, step)


class MetricWriter:
  """Writes one row of metrics to the console, TensorBoard and metrics.jsonl at once.

  TensorBoard tags are `<split>/<name>` for window rows and `<split>_epoch/<name>` for epoch
  rows, all on the optimizer-update axis, so epoch means never share a curve with window means.
  """

  def __init__(self, workdir, resume_step=0):
    """Appends to the workdir's metrics; a run resumed after update `resume_step` first drops
    what it will write again (rows and TensorBoard events after that step, and test rows)."""
    self._active = jax.process_index() == 0
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step:
      _rewind(path, resume_step)
    self._jsonl = open(path, 'a')
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                          purge_step=resume_step + 1 if resume_step else None)

  def write(self, step, epoch, split, scope, scalars, console_extra=''):
    """Writes `scalars` (name -> number) measured at optimizer update `step` of `epoch`."""
    if not self._active:
      return
    row = {'step': int(step), 'epoch': int(epoch), 'split': split, 'scope': scope}
    row.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    prefix = split if scope == 'window' else f'{split}_epoch'
    for name, value in row.items():
      if name not in ('step', 'epoch', 'split', 'scope') and value is not None:
        # TensorBoard tags allow no '@': 'class/accuracy@baseline' -> 'class/accuracy_baseline'.
        self._tb.add_scalar(f'{prefix}/{name.replace("@", "_")}', value, int(step))
    losses = ' '.join(f'{k[5:]}={v:.4g}' for k, v in row.items()
                      if k.startswith('loss/') and v is not None)
    lr = f' lr={row["lr"]:.3e}' if row.get('lr') is not None else ''
    logging.info('[%s %s] epoch %d step %d: %s%s%s', split, scope, epoch, step, losses, lr,
                 console_extra)

  def text(self, tag, text, step=0):
    """A text note in TensorBoard (e.g. the parameter overview)."""
    if self._active:
      self._tb.add_text(tag, text, step)

  def flush(self):
    if self._active:
      self._jsonl.flush()
      self._tb.flush()

  def close(self):
    if self._active:
      self._jsonl.close()
      self._tb.close()
      self._active = False
