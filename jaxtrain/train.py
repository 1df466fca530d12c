"""Training and evaluation: `create_train_state`, `train_step`, `eval_step`, `train_and_evaluate`.

One jitted step per optimizer update, over a 1-D device mesh: it takes the update's
`training.accumulation_steps` micro-batches stacked ([k, B, ...], each micro-batch split on the
`data` axis), averages their gradients inside the call and runs clip + AdamW once; the state is
replicated and donated, and XLA inserts the gradient all-reduce, so the same code runs on one
CPU, on 8 simulated CPU devices, on a GPU, on a TPU chip or on a TPU slice.

Conventions:
  * a micro-step consumes one global micro-batch of `training.batch_size` samples;
    `TrainState.step` counts micro-steps;
  * an optimizer update ("step" in every log) is `training.accumulation_steps` micro-steps,
    one call of `train_step`; an epoch is a whole number of updates (leftover micro-batches of
    the training split are not used that epoch, so no gradient crosses an epoch boundary);
  * the RNG of micro-step s is fold_in(state.rng, s): a pure function of (seed, s).

Checkpoints (jaxtrain/checkpoint.py, which states the step convention) are saved at the end of
every `checkpoint.save_every_epochs`-th epoch, at every new best validation total, at the end,
every `checkpoint.checkpoint_every_minutes` at the next update boundary, and on SIGTERM/SIGINT;
`train_and_evaluate` on a workdir that has them resumes exactly where the last one was taken.
"""

import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
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

from jaxtrain import checkpoint
from jaxtrain import data
from jaxtrain import distributed
from jaxtrain import evaluation
from jaxtrain import losses
from jaxtrain import models
from jaxtrain import monitors
from jaxtrain import optim
from jaxtrain import report
from jaxtrain import writers

# Loss components, in the order they are reported; config.loss.weights names 'class'
# 'classification'.
TERMS, WEIGHT_KEYS = losses.TERMS, losses.WEIGHT_KEYS


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
  # The initialisers draw from XLA's RngBitGenerator instead of threefry: threefry's ~500
  # calls (two per parameter leaf) made this one-off program compile for 28 s at the
  # convergence sizes on the 2-core CPU; the training streams (dropout, noise) stay threefry.
  init_key = jax.random.key(jax.random.bits(init_rng, dtype=jnp.uint32), impl='unsafe_rbg')
  length, static_dim = config.model.signal_length, config.model.static_dim
  variables = model.init(init_key, jnp.zeros((1, length)), jnp.zeros((1, static_dim)),
                         jnp.zeros((1,), jnp.int32), train=False)
  params = variables['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=step_rng)


def _micro_batch_rng(rng, step, i):
  """The key of micro-batch `i` of the update that starts at micro-step `step`."""
  return jax.random.fold_in(rng, step + i)


def _micro_batch_rngs(state, accumulation_steps):
  """[k] keys of the micro-steps of the next update (`_micro_batch_rng` of each)."""
  return jax.vmap(_micro_batch_rng, in_axes=(None, None, 0))(
      state.rng, state.step, jnp.arange(accumulation_steps))


def _train_loss(params, kernels, batch, rng, model, config, class_weights):
  """(total, terms) of one micro-batch in training mode, on the given S4D kernels."""
  total, (terms, _) = losses.loss_fn(params, model, batch, rng, config, class_weights,
                                     train=True, kernels=kernels)
  return total, terms


def update_kernels(params, *, model, config):
  """The S4D kernels of `params`, computed once per update for all its micro-batches.

  They depend on the parameters only; computing them in every micro-batch's forward and backward
  pass was 14 % of the convergence-size update's op time on the 2-core CPU."""
  return model.s4_kernels(params, config.model.signal_length)


def micro_gradient(params, kernels, batch, rng, *, model, config, class_weights):
  """Gradient of one micro-batch's loss in the parameters and in the update's S4D kernels:
  ((grads like `params`, grads like `kernels`), terms {name: (sum, count)}, grads_bad: the
  gradient is not finite). `kernel_pullback` turns a sum of them into a parameter gradient."""
  (_, terms), grads = jax.value_and_grad(_train_loss, argnums=(0, 1), has_aux=True)(
      params, kernels, batch, rng, model, config, class_weights)
  return grads, terms, ~_all_finite(grads)


def kernel_pullback(params, grads, *, model, config):
  """The parameter gradient of a `micro_gradient` pair (or their mean): the parameters' own
  part plus the kernels' part carried back through `update_kernels`, once per update."""
  param_grads, kernel_grads = grads
  _, pullback = jax.vjp(functools.partial(update_kernels, model=model, config=config), params)
  return jax.tree.map(jnp.add, param_grads, pullback(kernel_grads)[0])


def accumulate_gradients(params, batches, rngs, *, model, config, class_weights):
  """Mean gradient of the k micro-batches of one update, and their loss terms, in one call.

  `training.accumulate_with` picks how ('loop' does not come here: see `Trainer.train_update`):
  'scan' takes one micro-batch at a time (the activation memory of one); 'vmap' differentiates
  the mean loss of all k at once (k times that memory, k times larger kernels). Both give the
  mean of the per-micro-batch gradients, as MultiSteps accumulates them.

  Args:
    params: parameters.
    batches: the update's micro-batches, e.g. batches['signal'] [k, B, 200].
    rngs: [k] keys, one per micro-batch.

  Returns:
    (mean gradient like `params`, terms {name: (sum [k], count [k])}, grads_bad [k] bool: the
    micro-batches whose own gradient, in the parameters and the S4D kernels, was not finite;
    under 'vmap' only the mean gradient is known, so a non-finite one marks every
    micro-batch; `apply_update` also marks them all if only the pulled-back mean is not).
  """
  gradient = functools.partial(micro_gradient, model=model, config=config,
                               class_weights=class_weights)
  mode, k = accumulation_mode(config), rngs.shape[0]
  kernels = update_kernels(params, model=model, config=config)
  if mode == 'vmap':
    def mean_loss(p, kernels):
      totals, terms = jax.vmap(_train_loss, in_axes=(None, None, 0, 0, None, None, None))(
          p, kernels, batches, rngs, model, config, class_weights)
      return jnp.mean(totals), terms
    (_, terms), grads = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        params, kernels)
    grads_bad = jnp.broadcast_to(~_all_finite(grads), (k,))
  elif mode == 'scan':
    def body(grad_sum, inputs):
      grads, terms, bad = gradient(params, kernels, *inputs)
      return jax.tree.map(jnp.add, grad_sum, grads), (terms, bad)
    zeros = jax.tree.map(jnp.zeros_like, (params, kernels))
    grad_sum, (terms, grads_bad) = jax.lax.scan(body, zeros, (batches, rngs))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
  else:
    raise ValueError(f'accumulate_with={mode!r} runs its micro-batches from the host.')
  return kernel_pullback(params, grads, model=model, config=config), terms, grads_bad


ACCUMULATION_MODES = ('scan', 'vmap', 'loop')


def accumulation_mode(config):
  """`training.accumulate_with`, checked: one of ACCUMULATION_MODES, where 'auto' is 'scan' on
  a TPU (one dispatch per update) and 'loop' elsewhere. Measured at convergence sizes: on the
  2-core CPU 24.7 s per update against 139 s for 'scan' (XLA:CPU runs its while-loop slowly);
  on one H100 'loop' compiled in 67-72 s and ran 0.19-0.25 s per update, where 'scan' took
  190 s to compile."""
  mode = config.training.accumulate_with
  if mode == 'auto':
    mode = 'scan' if jax.default_backend() == 'tpu' else 'loop'
  if mode not in ACCUMULATION_MODES:
    raise ValueError(f'Unknown training.accumulate_with {mode!r}; expected \'auto\' or one of '
                     f'{ACCUMULATION_MODES}.')
  return mode


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state, window, epoch_acc, batches, *, model, tx, config, class_weights):
  """One optimizer update: the k = `training.accumulation_steps` micro-batches, then AdamW once.

  Equals k calls of the MultiSteps optimizer on the micro-batch gradients (same losses, keys,
  averaging and clip), in one dispatch, with the inner chain run once (optim.apply_accumulated).

  Args:
    state: TrainState at an update boundary (donated).
    window, epoch_acc: LossMetrics of the current logging window and epoch (donated).
    batches: the update's global micro-batches stacked, e.g. batches['signal'] [k, B, 200].

  Returns:
    (state, window, epoch_acc), see `apply_update`.
  """
  k = config.training.accumulation_steps
  grads, terms, grads_bad = accumulate_gradients(
      state.params, batches, _micro_batch_rngs(state, k), model=model, config=config,
      class_weights=class_weights)
  return apply_update(state, window, epoch_acc, grads, terms, grads_bad, tx=tx, config=config)


def apply_update(state, window, epoch_acc, grads, terms, grads_bad, *, tx, config):
  """The optimizer update from the mean gradient of its k micro-batches, behind the NaN guard.

  Args:
    state, window, epoch_acc: as in `train_step` (donated).
    grads: mean gradient like state.params; terms: {name: (sum [k], count [k])};
    grads_bad: [k] bool, see `accumulate_gradients`.

  Returns:
    (state, window, epoch_acc). An update with a non-finite loss term or gradient in any
    micro-batch, and every update after it, leaves the state unchanged; the first bad
    micro-step is recorded in the metrics and the host raises at its next logging point.
  """
  k = config.training.accumulation_steps
  # A mean gradient that is not finite although every micro-batch's was (it overflowed, or the
  # kernels' pullback did) is no one micro-batch's fault: it marks them all.
  grads_bad = jnp.where(grads_bad.any(), grads_bad, ~_all_finite(grads))
  terms_bad = jnp.stack([~(jnp.isfinite(terms[t][0]) & jnp.isfinite(terms[t][1]))
                         for t in TERMS], axis=-1)  # [k, T]
  bad = jnp.concatenate([terms_bad, grads_bad[:, None]], axis=-1)  # [k, T + 1]
  # The first micro-batch with a non-finite loss term names the culprit; without one, the
  # first with a non-finite gradient (under 'vmap', every micro-batch shares the mean's flag).
  rows_bad = terms_bad.any(axis=-1)
  first = jnp.where(rows_bad.any(), jnp.argmax(rows_bad), jnp.argmax(grads_bad))
  ok = ~bad.any() & (window.nonfinite.step < 0)

  def apply(state):
    updates, opt_state = optim.apply_accumulated(tx, state.opt_state, grads, state.params)
    return state.replace(step=state.step + k, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  # One conditional over the whole state, not a select per leaf (which multiplied the compile
  # time): a bad update skips the optimizer entirely.
  new_state = jax.lax.cond(ok, apply, lambda state: state, state)
  summed = {t: (jnp.sum(s), jnp.sum(c)) for t, (s, c) in terms.items()}
  update_metrics = loss_metrics(summed, state.step + first, bad[first])
  return new_state, window.merge(update_metrics), epoch_acc.merge(update_metrics)


def _loop_micro_step(grad_sum, params, kernels, rng, step, batches, i, *, model, config,
                     class_weights):
  """Micro-step `i` of an update under accumulate_with='loop': adds the `micro_gradient` of
  batches[i] to `grad_sum` (donated), with the key `train_step` gives it."""
  batch = jax.tree.map(lambda x: x[i], batches)
  grads, terms, bad = micro_gradient(params, kernels, batch, _micro_batch_rng(rng, step, i),
                                     model=model, config=config, class_weights=class_weights)
  return jax.tree.map(jnp.add, grad_sum, grads), terms, bad


def _loop_mean_gradient(params, grad_sum, *, model, config):
  """The update's mean parameter gradient from the host loop's `grad_sum` (not donated: its
  kernel half has no output of its shape to reuse, and XLA would warn on every run)."""
  k = config.training.accumulation_steps
  return kernel_pullback(params, jax.tree.map(lambda g: g / k, grad_sum), model=model,
                         config=config)


def _loop_apply(state, window, epoch_acc, grads, terms, grads_bad, *, tx, config):
  """`apply_update` after the host loop: terms and grads_bad are lists over the k steps."""
  terms = jax.tree.map(lambda *xs: jnp.stack(xs), *terms)
  return apply_update(state, window, epoch_acc, grads, terms, jnp.stack(grads_bad), tx=tx,
                      config=config)


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
    self.mode = accumulation_mode(config)  # Fail before any compile on a mistyped mode.
    if t.compile_workers < 1:
      raise ValueError(f'training.compile_workers must be >= 1, got {t.compile_workers}.')
    self.micro_per_epoch, self.steps_per_epoch = micro_batches_per_epoch(config, dataset)
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P('data'))
    # An update's micro-batches [k, B, ...]: each micro-batch is split over the devices.
    self.update_sharding = jax.NamedSharding(self.mesh, jax.P(None, 'data'))
    self.weights = loss_weights(config)
    self.model = models.create_model(config)
    self.tx = optim.create_optimizer(config, self.steps_per_epoch)
    class_weights = jnp.asarray(dataset.class_weights, jnp.float32)
    self._train = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, config=config,
                          class_weights=class_weights),
        in_shardings=(self.replicated, self.replicated, self.replicated, self.update_sharding),
        out_shardings=self.replicated, donate_argnums=(0, 1, 2))
    if self.mode == 'loop':  # k + 4 dispatches per update instead of one.
      self._loop_kernels = jax.jit(
          functools.partial(update_kernels, model=self.model, config=config),
          out_shardings=self.replicated)
      self._loop_micro = jax.jit(
          functools.partial(_loop_micro_step, model=self.model, config=config,
                            class_weights=class_weights),
          in_shardings=(self.replicated,) * 5 + (self.update_sharding, self.replicated),
          out_shardings=self.replicated, donate_argnums=0)
      # The kernels' pullback is a program of its own so that it compiles beside the others
      # (`compile_train`): inside the optimizer's it made that one the longest to compile.
      self._loop_mean_gradient = jax.jit(
          functools.partial(_loop_mean_gradient, model=self.model, config=config),
          out_shardings=self.replicated)
      # The mean gradient is not donated: every output already reuses a buffer of the state or
      # the metrics, so XLA could not use it and warned on every run.
      self._loop_apply = jax.jit(
          functools.partial(_loop_apply, tx=self.tx, config=config),
          out_shardings=self.replicated, donate_argnums=(0, 1, 2))
      self._zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree),
                                 out_shardings=self.replicated)
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
    """The initial TrainState, replicated over the mesh.

    Built by one jitted program on the host's CPU where JAX has one, then copied to the mesh:
    that program (an initialiser per parameter leaf) took 153 s to compile and run for one
    H100 at the convergence sizes, against about 20 s on two CPU cores. Every backend then
    starts from the same parameters.
    """
    key = jax.random.PRNGKey(self.config.seed)
    cpu = _host_init_device(self.mesh)
    if cpu is None:
      return jax.jit(self._create_state, out_shardings=self.replicated)(key)
    host = jax.device_get(jax.jit(self._create_state)(jax.device_put(key, cpu)))
    return _replicate(host, self.replicated)

  def abstract_state(self):
    """Shapes and dtypes of `init_state()`'s TrainState, without building it."""
    return jax.eval_shape(self._create_state, jax.random.PRNGKey(self.config.seed))

  def _create_state(self, key):
    return create_train_state(self.config, self.model, self.tx, key)

  def empty_metrics(self):
    # Built by a jitted function so that every leaf is its own buffer: the step donates them.
    return self._empty_metrics()

  def _compiled(self, name, fn, *args):
    """AOT-compiles `fn` for `args` once and times it; later shapes must match exactly."""
    if name not in self.compile_seconds:
      start = time.perf_counter()
      compiled = fn.lower(*args).compile()
      self.compile_seconds[name] = time.perf_counter() - start
      _return_freed_host_memory()
      setattr(self, f'_{name}_compiled', compiled)
      logging.info('Compiled %s step in %.1f s.', name, self.compile_seconds[name])
    return getattr(self, f'_{name}_compiled')

  def train_batches(self, epoch, start):
    """The epoch's updates from micro-batch `start` (a multiple of k): [k, B, ...] each."""
    t = self.config.training
    batches = data.train_batches(
        self.ds.train, t.batch_size, seed=self.config.seed, epoch=epoch, start=start,
        process_index=jax.process_index(), process_count=jax.process_count())
    limited = (b for _, b in zip(range(self.micro_per_epoch - start), batches))
    return data.prefetch_to_device(data.stack_updates(limited, t.accumulation_steps),
                                   self.update_sharding)

  def _train_programs(self, state, window, epoch_acc, batches):
    """{name: (jitted function, example arguments)} of the programs one update runs."""
    if self.mode != 'loop':
      return {'train': (self._train, (state, window, epoch_acc, batches))}

    def shaped(fn, *args):  # The abstract output of fn(*args), as the step will place it.
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=self.replicated),
                          jax.eval_shape(fn, *args))

    kernels = shaped(self._loop_kernels, state.params)
    grad_sum = shaped(self._zeros_like, (state.params, kernels))
    micro = (grad_sum, state.params, kernels, state.rng, state.step, batches, np.int32(0))
    _, terms, bad = shaped(self._loop_micro, *micro)
    mean = (state.params, grad_sum)
    k = self.config.training.accumulation_steps
    apply = (state, window, epoch_acc, shaped(self._loop_mean_gradient, *mean), [terms] * k,
             [bad] * k)
    return {'train_kernels': (self._loop_kernels, (state.params,)),
            'train_micro': (self._loop_micro, micro),
            'train_mean_gradient': (self._loop_mean_gradient, mean),
            'train_apply': (self._loop_apply, apply)}

  def compile_train(self, state, window, epoch_acc, batches):
    """AOT-compiles the programs of one update once, `training.compile_workers` at a time in
    threads (XLA releases the interpreter while it compiles); `compile_seconds['train']` is
    the wall time."""
    if 'train' in self.compile_seconds:
      return
    start = time.perf_counter()
    lowered = {name: fn.lower(*args) for name, (fn, args)
               in self._train_programs(state, window, epoch_acc, batches).items()}
    workers = min(self.config.training.compile_workers, len(lowered))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for name, compiled in zip(lowered, pool.map(lambda lower: lower.compile(),
                                                  lowered.values())):
        setattr(self, f'_{name}_compiled', compiled)
    self.compile_seconds['train'] = time.perf_counter() - start
    _return_freed_host_memory()
    logging.info('Compiled the train step (%d programs) in %.1f s.', len(lowered),
                 self.compile_seconds['train'])

  def train_update(self, state, window, epoch_acc, batches):
    """One optimizer update on the stacked micro-batches `batches`: one dispatch, or under
    accumulate_with='loop' one per micro-batch and four around them (the S4D kernels, the
    zero gradient sum, the kernels' pullback, the optimizer)."""
    self.compile_train(state, window, epoch_acc, batches)
    if self.mode != 'loop':
      return self._train_compiled(state, window, epoch_acc, batches)
    kernels = self._train_kernels_compiled(state.params)
    grad_sum, terms, grads_bad = self._zeros_like((state.params, kernels)), [], []
    for i in range(self.config.training.accumulation_steps):
      grad_sum, micro_terms, bad = self._train_micro_compiled(
          grad_sum, state.params, kernels, state.rng, state.step, batches, np.int32(i))
      terms.append(micro_terms)
      grads_bad.append(bad)
    grads = self._train_mean_gradient_compiled(state.params, grad_sum)
    return self._train_apply_compiled(state, window, epoch_acc, grads, terms, grads_bad)

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


def _replicate(host_tree, sharding):
  """Host arrays as global jax.Arrays of the replicated `sharding` (every process holds the
  same values, so each fills its own devices)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
      host_tree)


def _host_init_device(mesh):
  """The CPU device to build the initial state on when `mesh` is an accelerator's, else None
  (a CPU mesh, or JAX running without its CPU backend, e.g. JAX_PLATFORMS=tpu)."""
  if mesh.devices.flat[0].platform == 'cpu':
    return None
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return None


def _return_freed_host_memory():
  """Gives the compiler's freed scratch memory back to the OS.

  glibc keeps it otherwise, and the step's own buffers then stack on top: measured on the demo
  (2-core CPU), resident memory after the first updates 2.79 GB without, 1.93 GB with.
  """
  if sys.platform.startswith('linux'):
    try:
      ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # Not glibc (e.g. musl): nothing to give back this way.
      pass


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
  state: TrainState
  window: LossMetrics  # Loss sums of the current logging window.
  epoch_acc: LossMetrics  # Loss sums of the current epoch.
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
    state = TrainState(step=arrays['step'], params=params, opt_state=arrays['opt_state'],
                       rng=arrays['rng'])
    stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta,
                            **meta['early_stopping'])
    return cls(state, arrays['window'], arrays['epoch_metrics'], meta['epoch'],
               meta['micro_batch'], stopper, meta['best_val'], meta['history'])


def checkpoint_arrays(state, window, epoch_acc):
  """The `train` item of a checkpoint: every array of the training loop but the parameters.

  Args:
    state: TrainState (its `step`, `opt_state` and `rng` are taken).
    window, epoch_acc: LossMetrics of the logging window and of the epoch.
  """
  return {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng, 'window': window,
          'epoch_metrics': epoch_acc}


def _abstract_targets(trainer):
  """Abstract (params, train item) of this run, replicated over the current mesh."""
  state = checkpoint.abstract_tree(trainer.abstract_state(), trainer.replicated)
  metrics = checkpoint.abstract_tree(jax.eval_shape(trainer.empty_metrics), trainer.replicated)
  return state.params, checkpoint_arrays(state, metrics, metrics)


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
    state = state.replace(params=params)
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
    scalars = summarize(run.window, self.trainer.weights)
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
    train_scalars = summarize(run.epoch_acc, self.trainer.weights)
    self.writer.write(update, epoch, 'train', 'epoch', dict(train_scalars, lr=lr))
    val_scalars, _ = self.trainer.evaluate(run.state.params, 'val')
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
    self.ckpt.save(self.update, run.state.params, run.arrays(), run.meta(), val_total)
    self.last_save = time.monotonic()


def _final_params(ckpt, run, abstract_params):
  """Parameters of the best checkpoint (lowest val total), else the last ones."""
  ckpt.manager.wait_until_finished()
  best = ckpt.best_params(abstract_params)
  if best is None:
    logging.warning('No checkpoint with a finite validation total: testing the last parameters.')
    return run.state.params
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
    trainer = Trainer(config, workdir, ds)
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
    names = [f'loss/{t}' for t, b in zip(TERMS, first.bad[:-1]) if b]
    if first.bad[-1]:
      names.append('gradients')
    raise FloatingPointError(
        f'Non-finite values at micro-step {int(first.step)} (during optimizer update '
        f'{int(first.step) // accumulation_steps + 1}): {", ".join(names)}. Parameters were not '
        'updated by that optimizer update or any after it, and no checkpoint is written after '
        'it, so the latest checkpoint is the last good state.')
