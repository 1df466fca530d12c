"""`train_and_evaluate`: the run of one config in one workdir, from start or resumed.

The epoch loop (jaxtrain/trainer.py runs each update), logging, validation, the monitor's
warnings, early stopping, the test at the end and the report.

Checkpoints (jaxtrain/checkpoint.py, which states the step convention) are saved at the end of
every `checkpoint.save_every_epochs`-th epoch, at every new best validation total, at the end,
every `checkpoint.checkpoint_every_minutes` at the next update boundary, and on SIGTERM/SIGINT;
`train_and_evaluate` on a workdir that has them resumes exactly where the last one was taken.
"""

import dataclasses
import json
import os
import signal
import threading
import time

from absl import logging
from clu import parameter_overview
import jax
import numpy as np

from jaxtrain import checkpoint
from jaxtrain import data
from jaxtrain import distributed
from jaxtrain import evaluation
from jaxtrain import monitors
from jaxtrain import optim
from jaxtrain import report
from jaxtrain import steps
from jaxtrain import trainer as trainer_lib
from jaxtrain import writers


class EarlyStopping:
  """Stops after `patience` epochs whose val total did not beat the best by `min_delta`."""

  def __init__(self, patience, min_delta, best=float('inf'), bad_epochs=0):
    self.patience, self.min_delta = patience, min_delta
    self.best, self.bad_epochs = best, bad_epochs

  def update(self, value):
    """Records an epoch's value; returns True when it is a new best."""
    if value < self.best - self.min_delta:
      self.best, self.bad_epochs = value, 0
      return True
    self.bad_epochs += 1
    return False

  @property
  def should_stop(self):
    return self.bad_epochs >= self.patience


def _write_run_files(config, workdir, trainer, num_params):
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, checkpoint.CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  info = {'steps_per_epoch': trainer.steps_per_epoch,
          'micro_batches_per_epoch': trainer.micro_per_epoch,
          'num_params': num_params, 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform, 'data': trainer.ds.info}
  with open(os.path.join(workdir, 'run_info.json'), 'w') as f:
    json.dump(info, f, indent=2, default=str)
  trainer.ds.normalizer.save(os.path.join(workdir, data.NORMALIZER_FILE))


def _plain(value):
  """A JSON-able Python number for the checkpoint's history (NaN stays NaN)."""
  return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass
class _Run:
  """Everything a checkpoint restores: the arrays of the loop and its host-side state.

  `epoch` is the epoch being trained (1-based) and `micro_batch` the micro-batches of it done;
  both are at an optimizer-update boundary whenever a checkpoint is taken.
  """
  state: steps.TrainState
  window: steps.LossMetrics  # Loss sums of the current logging window.
  epoch_acc: steps.LossMetrics  # Loss sums of the current epoch.
  epoch: int
  micro_batch: int
  stopper: EarlyStopping
  best_val: float  # Lowest validation total so far: a lower one is saved at once.
  history: list  # Train and val epoch rows, for the monitor.

  def update(self, steps_per_epoch, accumulation_steps):
    """Optimizer updates done."""
    return (self.epoch - 1) * steps_per_epoch + self.micro_batch // accumulation_steps

  def arrays(self):
    return checkpoint_arrays(self.state, self.window, self.epoch_acc)

  def meta(self):
    """The `meta` item of a checkpoint (JSON)."""
    return {'epoch': self.epoch, 'micro_batch': self.micro_batch,
            'early_stopping': {'best': self.stopper.best, 'bad_epochs': self.stopper.bad_epochs},
            'best_val': self.best_val, 'history': self.history}

  @classmethod
  def restored(cls, config, params, arrays, meta):
    t = config.training
    # With a moving average, the `params` item holds it and the `train` item the raw ones.
    state = steps.TrainState(step=arrays['step'], params=arrays.get('params', params),
                             opt_state=arrays['opt_state'], rng=arrays['rng'],
                             ema_params=params if 'params' in arrays else None)
    stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta,
                            **meta['early_stopping'])
    return cls(state, arrays['window'], arrays['epoch_metrics'], meta['epoch'],
               meta['micro_batch'], stopper, meta['best_val'], meta['history'])


def checkpoint_arrays(state, window, epoch_acc):
  """The `train` item of a checkpoint: every array of the training loop but `eval_params`
  (the `params` item).

  Args:
    state: TrainState (its `step`, `opt_state` and `rng` are taken, and its `params` when it
      has a moving average, which the `params` item then holds).
    window, epoch_acc: LossMetrics of the logging window and of the epoch.
  """
  arrays = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng,
            'window': window, 'epoch_metrics': epoch_acc}
  if state.ema_params is not None:
    arrays['params'] = state.params
  return arrays


def _abstract_targets(trainer):
  """Abstract (params, train item) of this run, replicated over the current mesh."""
  state = checkpoint.abstract_tree(trainer.abstract_state(), trainer.replicated)
  metrics = checkpoint.abstract_tree(jax.eval_shape(trainer.empty_metrics), trainer.replicated)
  return state.eval_params, checkpoint_arrays(state, metrics, metrics)


def _start(config, trainer, ckpt, abstract_params, abstract_arrays):
  """The run restored from the latest good checkpoint, or a fresh one (from `init_from`)."""
  had_checkpoints = bool(ckpt.steps)
  restored = ckpt.restore_latest(abstract_params, abstract_arrays)
  if restored is not None:
    step, params, arrays, meta = restored
    logging.info('Resuming from checkpoint %d in %s: epoch %d, micro-batch %d; training '
                 'continues with optimizer update %d%s.', step, ckpt.directory,
                 meta['epoch'], meta['micro_batch'], step + 1,
                 f' (init_from={config.init_from} applies to new runs only)'
                 if config.init_from else '')
    return _Run.restored(config, params, arrays, meta)
  if had_checkpoints:
    logging.warning('No checkpoint in %s restores: starting from scratch.', ckpt.directory)
  state = trainer.init_state()
  if config.init_from:
    checkpoint.check_init_config(config.init_from, config)
    step, params = checkpoint.load_best_params(config.init_from, abstract_params)
    state = state.replace(params=params, ema_params=steps.initial_ema(config, params))
    logging.info('Initialised the parameters from the best checkpoint (%d) of %s; the optimizer '
                 'starts fresh.', step, config.init_from)
  t = config.training
  return _Run(state, trainer.empty_metrics(), trainer.empty_metrics(), epoch=1, micro_batch=0,
              stopper=EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta),
              best_val=float('inf'), history=[])


def _replayed_monitor(config, history):
  """A Monitor that has seen the epochs of `history` (so it warns only about new findings)."""
  monitor = monitors.Monitor(config)
  for row in history:
    if row['split'] == 'val':
      monitor.check(row['epoch'], [r for r in history if r['epoch'] <= row['epoch']], row)
  return monitor


class _StopRequest:
  """Turns SIGTERM and SIGINT into a request to save and stop at the next update boundary.

  The first signal restores the previous handlers, so a second one acts at once (e.g. Ctrl-C
  twice interrupts without saving).
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # Name of the signal received, e.g. 'SIGTERM'.
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    else:  # Python delivers signals to the main thread only.
      logging.warning('Training outside the main thread: SIGTERM/SIGINT will not save.')
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    logging.warning('%s received: finishing the current optimizer update, then saving a '
                    'checkpoint and stopping (send it again to stop at once, without saving).',
                    self.received)
    self._restore()

  def requested(self):
    """The signal that asks this run to save and stop, agreed by all processes (None: keep
    training), e.g. 'SIGTERM', or 'SIGTERM on process 1' in a multi-process run.

    Every process must call it at the same points of the loop: it is collective there.
    """
    return distributed.agreed_stop(self.received)

  def _restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def __exit__(self, *exc_info):
    self._restore()


class _Loop:
  """The epoch loop of one run: training, logging, validation, early stopping, saves."""

  def __init__(self, config, trainer, ckpt, writer, run, stop):
    self.config, self.trainer, self.ckpt, self.writer = config, trainer, ckpt, writer
    self.run, self.stop = run, stop
    self.monitor = _replayed_monitor(config, run.history)
    t = config.training
    self.total_steps = t.num_epochs * trainer.steps_per_epoch
    self.save_interval = config.checkpoint.checkpoint_every_minutes * 60.0
    self.last_save = self.window_start = time.monotonic()

  @property
  def update(self):
    return self.run.update(self.trainer.steps_per_epoch, self.config.training.accumulation_steps)

  def train(self):
    """Trains until the last epoch, early stopping or a stop request.

    Returns:
      The name of the signal that stopped training after saving a checkpoint, else None.
    """
    t, run = self.config.training, self.run
    while run.epoch <= t.num_epochs and not run.stopper.should_stop:
      for batches in self.trainer.train_batches(run.epoch, start=run.micro_batch):
        run.state, run.window, run.epoch_acc = self.trainer.train_update(
            run.state, run.window, run.epoch_acc, batches)
        run.micro_batch += t.accumulation_steps
        if self.update % t.log_every_steps == 0:
          self._log_window()
        stopping = self.stop.requested()  # Read once: a later signal waits for the next boundary.
        # The last update of an epoch saves after the epoch's bookkeeping (_end_epoch).
        if run.micro_batch < self.trainer.micro_per_epoch and (
            stopping or self._timer_expired()):
          self._save()
          if stopping:
            return stopping
      val_total, save_due = self._end_epoch()
      stopping = self.stop.requested()
      if save_due or stopping:
        self._save(val_total)
      if stopping:
        return stopping
    return None

  def _timer_expired(self):
    # Every process must take part in a save, so they agree on the clocks' verdict.
    return distributed.any_process(
        self.save_interval > 0 and time.monotonic() - self.last_save >= self.save_interval)

  def _log_window(self):
    t, run = self.config.training, self.run
    # Reading the window waits for its updates to finish: time the window after that, or the
    # rate would be how fast the host dispatched them.
    _check_finite(run.window, t.accumulation_steps)
    rate = t.log_every_steps / (time.monotonic() - self.window_start)
    scalars = steps.summarize(run.window, self.trainer.weights)
    scalars.update(lr=float(optim.applied_learning_rate(run.state.opt_state)),
                   steps_per_sec=rate)
    eta = (self.total_steps - self.update) / rate
    self.writer.write(self.update, run.epoch, 'train', 'window', scalars,
                      f' | {rate:.2f} steps/s, ETA {eta / 60:.1f} min')
    run.window, self.window_start = self.trainer.empty_metrics(), time.monotonic()

  def _end_epoch(self):
    """Epoch means, validation, monitor and early stopping of the epoch just trained.

    Returns:
      (the validation total, whether an epoch-end checkpoint is due).
    """
    t, run, epoch, update = self.config.training, self.run, self.run.epoch, self.update
    lr = float(optim.applied_learning_rate(run.state.opt_state))
    _check_finite(run.epoch_acc, t.accumulation_steps)
    train_scalars = steps.summarize(run.epoch_acc, self.trainer.weights)
    self.writer.write(update, epoch, 'train', 'epoch', dict(train_scalars, lr=lr))
    val_scalars, _ = self.trainer.evaluate(run.state.eval_params, 'val')
    self.writer.write(update, epoch, 'val', 'epoch', dict(val_scalars, lr=lr))
    for split, scalars in (('train', train_scalars), ('val', val_scalars)):
      row = dict(scalars, epoch=epoch, split=split, lr=lr)
      run.history.append({k: _plain(v) for k, v in row.items()})
    for warning in self.monitor.check(epoch, run.history, val_scalars):
      logging.warning('Epoch %d: %s', epoch, warning)
    val_total = val_scalars['loss/total']
    run.stopper.update(val_total)
    new_best = val_total < run.best_val  # Saved at once, so the best is never lost.
    run.best_val = min(run.best_val, val_total)
    if run.stopper.should_stop:
      logging.info('Early stopping after epoch %d: no val improvement of %g for %d epochs.',
                   epoch, t.early_stopping_min_delta, run.stopper.bad_epochs)
    run.epoch, run.micro_batch, run.epoch_acc = epoch + 1, 0, self.trainer.empty_metrics()
    save_due = (epoch % self.config.checkpoint.save_every_epochs == 0 or new_best
                or epoch == t.num_epochs or run.stopper.should_stop or self._timer_expired())
    return val_total, save_due

  def _save(self, val_total=None):
    """Saves checkpoint `update` (asynchronously), never after a non-finite step."""
    run, accumulation = self.run, self.config.training.accumulation_steps
    _check_finite(run.window, accumulation)
    _check_finite(run.epoch_acc, accumulation)
    self.ckpt.save(self.update, run.state.eval_params, run.arrays(), run.meta(), val_total)
    self.last_save = time.monotonic()


def _final_params(ckpt, run, abstract_params):
  """Parameters of the best checkpoint (lowest val total), else the last ones (`eval_params`)."""
  ckpt.manager.wait_until_finished()
  best = ckpt.best_params(abstract_params)
  if best is None:
    logging.warning('No checkpoint with a finite validation total: testing the last parameters.')
    return run.state.eval_params
  logging.info('Testing the parameters of the best checkpoint, %d.', best[0])
  return best[1]


def compilation_cache_dir(config, workdir, current):
  """The persistent compilation cache directory a run should use, and whether to set it.

  Args:
    config: reads `compilation_cache_dir` (relative to `workdir` unless absolute; '' = none).
    workdir: the run's directory.
    current: the directory already set for this process (JAX_COMPILATION_CACHE_DIR or an
      earlier run), or None. It is kept: JAX reads the setting once, at its first compilation.

  Returns:
    (directory or None, True when it must be set).
  """
  if current or not config.compilation_cache_dir:
    return current or None, False
  return os.path.join(os.path.abspath(workdir), config.compilation_cache_dir), True


def use_compilation_cache(config, workdir):
  """Points JAX's persistent compilation cache at the run's (see `compilation_cache_dir`), so
  a restarted run loads its compiled steps instead of compiling them again."""
  path, new = compilation_cache_dir(config, workdir, jax.config.jax_compilation_cache_dir)
  if new:
    jax.config.update('jax_compilation_cache_dir', path)
  if path:
    logging.info('Persistent compilation cache: %s%s.', path,
                 '' if new else ' (set for this process)')


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, evaluating on val every epoch and on test at the end.

  Resumes from the latest good checkpoint in `workdir/checkpoints` when there is one (see
  jaxtrain.checkpoint). SIGTERM or SIGINT saves a checkpoint at the next optimizer-update
  boundary and returns early; running the same call again continues the run.

  Returns:
    dict with the final TrainState ('state'), the best val total ('best_val'), the test scalars
    ('test'; None when stopped early by a signal), and 'stopped_by' (the name of the signal that
    stopped training, else None) with 'step', the last optimizer update.
  """
  use_compilation_cache(config, workdir)
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint.keep)
  writer = None
  try:
    if ckpt.steps:
      checkpoint.check_resume_config(workdir, config)
    ds = data.load_dataset(config)
    trainer = trainer_lib.Trainer(config, workdir, ds)
    t = config.training
    abstract_params, abstract_arrays = _abstract_targets(trainer)
    run = _start(config, trainer, ckpt, abstract_params, abstract_arrays)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(run.state.params))
    overview = parameter_overview.get_parameter_overview(run.state.params, include_stats=False)
    logging.info('Model: %d parameters.\n%s', num_params, overview)
    logging.info('%d devices; %d micro-batches of %d = %d optimizer updates per epoch.',
                 jax.device_count(), trainer.micro_per_epoch, t.batch_size,
                 trainer.steps_per_epoch)
    _write_run_files(config, workdir, trainer, num_params)
    writer = writers.MetricWriter(
        workdir, resume_step=run.update(trainer.steps_per_epoch, t.accumulation_steps))
    writer.text('parameters', f'{num_params} parameters\n\n```\n{overview}\n```')
    with _StopRequest() as stop:
      loop = _Loop(config, trainer, ckpt, writer, run, stop)
      try:
        stopped_by = loop.train()
      except FloatingPointError as e:
        ckpt.manager.wait_until_finished()
        raise FloatingPointError(
            f'{e} Latest checkpoint: {max(ckpt.steps, default="none")} in '
            f'{ckpt.directory}.') from None
    result = {'state': run.state, 'best_val': run.stopper.best, 'test': None,
              'stopped_by': stopped_by, 'step': loop.update}
    if not stopped_by:
      params = _final_params(ckpt, run, abstract_params)
      result['test'], test_preds = trainer.evaluate(params, 'test')
      writer.write(loop.update, run.epoch - 1, 'test', 'epoch', result['test'])
      if jax.process_index() == 0:
        evaluation.save_predictions(os.path.join(workdir, 'predictions', 'test.npz'),
                                    test_preds, ds.test, ds.normalizer)
  finally:
    ckpt.close()  # Waits for the save in flight: a process that exits now loses nothing.
    if writer is not None:
      writer.close()
  if stopped_by:
    logging.warning('Stopped by %s after optimizer update %d, saved as checkpoint %d in %s. To '
                    'resume, run the same command with the same workdir (%s).', stopped_by,
                    loop.update, loop.update, ckpt.directory, workdir)
    return result
  if jax.process_index() == 0:
    report.write_report(workdir)
  logging.info('Compile times: %s', {k: round(v, 2) for k, v in trainer.compile_seconds.items()})
  return result


def _check_finite(collection, accumulation_steps):
  """Raises FloatingPointError naming the step and terms of the first non-finite micro-step."""
  first = jax.device_get(collection.nonfinite)
  if first.step >= 0:
    names = [f'loss/{t}' for t, b in zip(steps.TERMS, first.bad[:-1]) if b]
    if first.bad[-1]:
      names.append('gradients')
    raise FloatingPointError(
        f'Non-finite values at micro-step {int(first.step)} (during optimizer update '
        f'{int(first.step) // accumulation_steps + 1}): {", ".join(names)}. Parameters were not '
        'updated by that optimizer update or any after it, and no checkpoint is written after '
        'it, so the latest checkpoint is the last good state.')
