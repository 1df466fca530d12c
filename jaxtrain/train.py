"""Training and evaluation: `create_train_state`, `train_step`, `eval_step`, `train_and_evaluate`.

One jitted step over a 1-D device mesh: the batch is split on the `data` axis, the state is
replicated and donated, and XLA inserts the gradient all-reduce, so the same code runs on one
CPU, on 8 simulated CPU devices, on a GPU and on an 8-core TPU.

Conventions:
  * a micro-step consumes one global micro-batch of `training.batch_size` samples;
    `TrainState.step` counts micro-steps;
  * an optimizer update ("step" in every log) happens every `training.accumulation_steps`
    micro-steps; an epoch is a whole number of updates (leftover micro-batches of the
    training split are not used that epoch, so no gradient crosses an epoch boundary);
  * the RNG of micro-step s is fold_in(state.rng, s): a pure function of (seed, s).
"""

import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import data
from jaxtrain import evaluation
from jaxtrain import losses
from jaxtrain import models
from jaxtrain import monitors
from jaxtrain import optim
from jaxtrain import report
from jaxtrain import writers

# Loss components, in the order they are reported; config.loss.weights names 'class'
# 'classification'.
TERMS = ('signal', 'peak_exist', 'peak_latency', 'peak_amplitude', 'class', 'threshold')
WEIGHT_KEYS = {'class': 'classification'}


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 []: micro-steps done.
  params: Any
  opt_state: optax.MultiStepsState
  rng: jax.Array  # uint32 [2]: base key of the per-micro-step keys.


@flax.struct.dataclass
class FirstNonFinite(clu_metrics.Metric):
  """The first micro-step whose loss terms or gradients were not finite, and which were.

  `step` is -1 while every step was finite; `bad` [len(TERMS) + 1] flags the terms and, last,
  the gradients of that step.
  """
  step: jax.Array
  bad: jax.Array

  @classmethod
  def empty(cls):
    return cls(step=jnp.array(-1, jnp.int32), bad=jnp.zeros(len(TERMS) + 1, bool))

  def merge(self, other):
    keep = self.step >= 0
    return type(self)(step=jnp.where(keep, self.step, other.step),
                      bad=jnp.where(keep, self.bad, other.bad))

  def compute(self):
    return self.step


@flax.struct.dataclass
class LossMetrics(clu_metrics.Collection):
  """Sums and counts of every loss component, so any window's mean is exact."""
  signal: clu_metrics.Average
  peak_exist: clu_metrics.Average
  peak_latency: clu_metrics.Average
  peak_amplitude: clu_metrics.Average
  threshold: clu_metrics.Average
  nonfinite: FirstNonFinite
  class_: clu_metrics.Average  # 'class' is a Python keyword.


def _field(term):
  return 'class_' if term == 'class' else term


def loss_metrics(terms, step=None, bad=None):
  """LossMetrics of one batch from the loss terms {name: (sum, count)}."""
  fields = {_field(k): clu_metrics.Average(total=s, count=c) for k, (s, c) in terms.items()}
  nonfinite = FirstNonFinite.empty()
  if step is not None:
    nonfinite = FirstNonFinite(step=jnp.where(bad.any(), step, -1).astype(jnp.int32), bad=bad)
  return LossMetrics.empty().replace(nonfinite=nonfinite, **fields)


def summarize(collection, weights):
  """Host dict {'loss/<term>': mean, 'loss/total': sum_k w_k mean_k} of a LossMetrics.

  A component with no examples in the window (e.g. no wave V) is NaN and left out of the total.
  """
  host = jax.device_get(collection)
  out = {}
  for term in TERMS:
    avg = getattr(host, _field(term))
    out[f'loss/{term}'] = float(avg.total / avg.count) if avg.count > 0 else float('nan')
  out['loss/total'] = sum(weights[term] * out[f'loss/{term}'] for term in TERMS
                          if np.isfinite(out[f'loss/{term}']))
  return out


def loss_weights(config):
  return {t: float(config.loss.weights[WEIGHT_KEYS.get(t, t)]) for t in TERMS}


def create_mesh():
  """1-D mesh over every device, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def create_train_state(config, model, tx, rng):
  """Initial TrainState: parameters from `model.init`, the optimizer state, the step key."""
  init_rng, step_rng = jax.random.split(rng)
  length, static_dim = config.model.signal_length, config.model.static_dim
  variables = model.init(init_rng, jnp.zeros((1, length)), jnp.zeros((1, static_dim)),
                         jnp.zeros((1,), jnp.int32), train=False)
  params = variables['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=step_rng)


def train_step(state, window, epoch_acc, batch, *, model, tx, config, class_weights):
  """One micro-step: gradient of the multi-task loss on `batch`, fed to the MultiSteps optimizer.

  Args:
    state: TrainState (donated).
    window, epoch_acc: LossMetrics of the current logging window and epoch (donated).
    batch: a global micro-batch (see jaxtrain.data), e.g. batch['signal'] [B, 200].

  Returns:
    (state, window, epoch_acc). A step whose loss or gradients are not finite, and every step
    after it, leaves the state unchanged; the host raises at its next logging point.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(losses.loss_fn, has_aux=True)
  (_, (terms, _)), grads = grad_fn(state.params, model, batch, rng, config, class_weights,
                                   train=True)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  term_bad = [~(jnp.isfinite(terms[t][0]) & jnp.isfinite(terms[t][1])) for t in TERMS]
  grads_bad = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  bad = jnp.stack(term_bad + [grads_bad])
  ok = ~bad.any() & (window.nonfinite.step < 0)
  new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
  step_metrics = loss_metrics(terms, state.step, bad)
  return new_state, window.merge(step_metrics), epoch_acc.merge(step_metrics)


def eval_step(params, batch, rng, *, model, config, class_weights):
  """Loss terms and per-example predictions of `batch` in inference mode (no dropout)."""
  _, (terms, preds) = losses.loss_fn(params, model, batch, rng, config, class_weights,
                                     train=False)
  return loss_metrics(terms), preds


class Trainer:
  """Owns the mesh, the compiled steps and the writers of one run."""

  def __init__(self, config, workdir, dataset):
    self.config, self.workdir, self.ds = config, workdir, dataset
    t = config.training
    self.mesh = create_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name in ('batch_size', 'eval_batch_size'):
      size = t[name]
      if size % n_dev or size % n_proc:
        raise ValueError(
            f'training.{name}={size} does not divide evenly over {n_dev} devices in '
            f'{n_proc} process(es); use a multiple of {n_dev}.')
    self.micro_per_epoch, self.steps_per_epoch = micro_batches_per_epoch(config, dataset)
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P('data'))
    self.weights = loss_weights(config)
    self.model = models.create_model(config)
    self.tx = optim.create_optimizer(config, self.steps_per_epoch)
    class_weights = jnp.asarray(dataset.class_weights, jnp.float32)
    self._train = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, config=config,
                          class_weights=class_weights),
        in_shardings=(self.replicated, self.replicated, self.replicated, self.data_sharding),
        out_shardings=self.replicated, donate_argnums=(0, 1, 2))
    self._eval = jax.jit(
        functools.partial(eval_step, model=self.model, config=config,
                          class_weights=class_weights),
        in_shardings=(self.replicated, self.data_sharding, self.replicated),
        out_shardings=(self.replicated, self.data_sharding))
    self._empty_metrics = jax.jit(lambda: loss_metrics(_empty_terms()),
                                  out_shardings=self.replicated)
    self.compile_seconds = {}
    self.eval_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)
    self.baselines = evaluation.compute_baselines(dataset.train, dataset.normalizer)

  def init_state(self):
    init = jax.jit(functools.partial(create_train_state, self.config, self.model, self.tx),
                   out_shardings=self.replicated)
    return init(jax.random.PRNGKey(self.config.seed))

  def empty_metrics(self):
    # Built by a jitted function so that every leaf is its own buffer: the step donates them.
    return self._empty_metrics()

  def _compiled(self, name, fn, *args):
    """AOT-compiles `fn` for `args` once and times it; later shapes must match exactly."""
    if name not in self.compile_seconds:
      start = time.perf_counter()
      compiled = fn.lower(*args).compile()
      self.compile_seconds[name] = time.perf_counter() - start
      setattr(self, f'_{name}_compiled', compiled)
      logging.info('Compiled %s step in %.1f s.', name, self.compile_seconds[name])
    return getattr(self, f'_{name}_compiled')

  def train_batches(self, epoch, start):
    batches = data.train_batches(
        self.ds.train, self.config.training.batch_size, seed=self.config.seed, epoch=epoch,
        start=start, process_index=jax.process_index(), process_count=jax.process_count())
    limited = (b for _, b in zip(range(self.micro_per_epoch - start), batches))
    return data.prefetch_to_device(limited, self.data_sharding)

  def train_micro_step(self, state, window, epoch_acc, batch):
    step = self._compiled('train', self._train, state, window, epoch_acc, batch)
    return step(state, window, epoch_acc, batch)

  def evaluate(self, params, split_name):
    """Loss means and task metrics of a whole split; also returns the host predictions."""
    split = getattr(self.ds, split_name)
    batches = data.eval_batches(split, self.config.training.eval_batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    acc, outputs = None, []
    for i, batch in enumerate(data.prefetch_to_device(batches, self.data_sharding)):
      rng = jax.random.fold_in(self.eval_rng, i)
      step = self._compiled('eval', self._eval, params, batch, rng)
      batch_metrics, preds = step(params, batch, rng)
      acc = batch_metrics if acc is None else acc.merge(batch_metrics)
      outputs.append(preds)
    scalars = summarize(acc, self.weights)
    preds = _gather_rows(outputs, len(split['label']))
    scalars.update(evaluation.compute_metrics(preds, split, self.ds.normalizer, self.baselines))
    return scalars, preds


def _empty_terms():
  zero = jnp.zeros((), jnp.float32)
  return {t: (zero, zero) for t in TERMS}


def _gather_rows(outputs, n_rows):
  """Concatenates per-batch predictions on the host and drops the padding rows."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
  host = jax.device_get(outputs)
  return {k: np.concatenate([o[k] for o in host])[:n_rows] for k in host[0]}


def micro_batches_per_epoch(config, dataset):
  """(micro-batches, optimizer updates) per epoch; an epoch is a whole number of updates."""
  t = config.training
  n_batches = data.num_train_batches(dataset.train, t.batch_size)
  steps = n_batches // t.accumulation_steps
  if steps < 1:
    raise ValueError(
        f'The training split ({len(dataset.train["label"])} samples) is too small for one '
        f'optimizer update of batch_size={t.batch_size} x accumulation_steps='
        f'{t.accumulation_steps}.')
  return steps * t.accumulation_steps, steps


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
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  info = {'steps_per_epoch': trainer.steps_per_epoch,
          'micro_batches_per_epoch': trainer.micro_per_epoch,
          'num_params': num_params, 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform, 'data': trainer.ds.info}
  with open(os.path.join(workdir, 'run_info.json'), 'w') as f:
    json.dump(info, f, indent=2, default=str)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, evaluating on val every epoch and on test at the end.

  Returns:
    dict with the final TrainState ('state'), the best val total ('best_val') and the test
    scalars ('test').
  """
  ds = data.load_dataset(config)
  trainer = Trainer(config, workdir, ds)
  t = config.training
  state = trainer.init_state()
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
  logging.info('Model: %d parameters.\n%s', num_params, overview)
  logging.info('%d devices; %d micro-batches of %d = %d optimizer updates per epoch.',
               jax.device_count(), trainer.micro_per_epoch, t.batch_size,
               trainer.steps_per_epoch)
  _write_run_files(config, workdir, trainer, num_params)
  writer = writers.MetricWriter(workdir)
  writer.text('parameters', f'{num_params} parameters\n\n```\n{overview}\n```')
  monitor = monitors.Monitor(config)
  stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta)
  total_steps = t.num_epochs * trainer.steps_per_epoch
  best_params = None
  history = []
  window, epoch_acc = trainer.empty_metrics(), trainer.empty_metrics()
  window_start = time.perf_counter()
  try:
    for epoch in range(1, t.num_epochs + 1):
      for micro, batch in enumerate(trainer.train_batches(epoch, start=0)):
        state, window, epoch_acc = trainer.train_micro_step(state, window, epoch_acc, batch)
        done = (micro + 1) % t.accumulation_steps == 0
        update = (epoch - 1) * trainer.steps_per_epoch + (micro + 1) // t.accumulation_steps
        if done and update % t.log_every_steps == 0:
          now = time.perf_counter()
          rate = t.log_every_steps / (now - window_start)
          scalars = _check_finite(summarize(window, trainer.weights), window, t.accumulation_steps)
          scalars.update(lr=float(optim.applied_learning_rate(state.opt_state)),
                         steps_per_sec=rate)
          eta = (total_steps - update) / rate
          writer.write(update, epoch, 'train', 'window', scalars,
                       f' | {rate:.2f} steps/s, ETA {eta / 60:.1f} min')
          window, window_start = trainer.empty_metrics(), time.perf_counter()
      update = epoch * trainer.steps_per_epoch
      lr = float(optim.applied_learning_rate(state.opt_state))
      train_scalars = _check_finite(summarize(epoch_acc, trainer.weights), epoch_acc,
                                    t.accumulation_steps)
      writer.write(update, epoch, 'train', 'epoch', dict(train_scalars, lr=lr))
      val_scalars, _ = trainer.evaluate(state.params, 'val')
      writer.write(update, epoch, 'val', 'epoch', dict(val_scalars, lr=lr))
      history += [dict(train_scalars, epoch=epoch, split='train', lr=lr),
                  dict(val_scalars, epoch=epoch, split='val', lr=lr)]
      for warning in monitor.check(epoch, history, val_scalars):
        logging.warning('Epoch %d: %s', epoch, warning)
      if stopper.update(val_scalars['loss/total']):
        best_params = jax.tree.map(jnp.copy, state.params)
      epoch_acc = trainer.empty_metrics()
      if stopper.should_stop:
        logging.info('Early stopping after epoch %d: no val improvement of %g for %d epochs.',
                     epoch, t.early_stopping_min_delta, stopper.bad_epochs)
        break
    test_scalars, test_preds = trainer.evaluate(best_params, 'test')
    writer.write(update, epoch, 'test', 'epoch', test_scalars)
    if jax.process_index() == 0:
      evaluation.save_predictions(os.path.join(workdir, 'predictions', 'test.npz'),
                                  test_preds, ds.test, ds.normalizer)
  finally:
    writer.close()
  if jax.process_index() == 0:
    report.write_report(workdir)
  logging.info('Compile times: %s', {k: round(v, 2) for k, v in trainer.compile_seconds.items()})
  return {'state': state, 'best_val': stopper.best, 'test': test_scalars}


def _check_finite(scalars, collection, accumulation_steps):
  """Raises FloatingPointError naming the step and terms of the first non-finite micro-step."""
  first = jax.device_get(collection.nonfinite)
  if first.step >= 0:
    names = [f'loss/{t}' for t, b in zip(TERMS, first.bad[:-1]) if b]
    if first.bad[-1]:
      names.append('gradients')
    raise FloatingPointError(
        f'Non-finite values at micro-step {int(first.step)} (during optimizer update '
        f'{int(first.step) // accumulation_steps + 1}): {", ".join(names)}. Parameters were not updated from that '
        'micro-step on; the last checkpoint is the last good state.')
  return scalars
