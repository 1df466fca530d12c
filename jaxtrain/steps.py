"""The step functions: `create_train_state`, `train_step`, `eval_step`, and the loss metrics
they fill.

One jitted step per optimizer update, over a 1-D device mesh: it takes the update's
`training.accumulation_steps` micro-batches stacked ([k, B, ...], each micro-batch split on the
`data` axis), averages their gradients inside the call and runs clip + AdamW once; the state is
replicated and donated, and XLA inserts the gradient all-reduce, so the same code runs on one
CPU, on 8 simulated CPU devices, on a GPU, on a TPU chip or on a TPU slice (jaxtrain/trainer.py
compiles and calls them).

Conventions:
  * a micro-step consumes one global micro-batch of `training.batch_size` samples;
    `TrainState.step` counts micro-steps;
  * an optimizer update ("step" in every log) is `training.accumulation_steps` micro-steps,
    one call of `train_step`; an epoch is a whole number of updates (leftover micro-batches of
    the training split are not used that epoch, so no gradient crosses an epoch boundary);
  * the RNG of micro-step s is fold_in(state.rng, s): a pure function of (seed, s).
"""

import functools
from typing import Any

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import losses
from jaxtrain import optim

# Loss components, in the order they are reported; config.loss.weights names 'class'
# 'classification'.
TERMS, WEIGHT_KEYS = losses.TERMS, losses.WEIGHT_KEYS


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 []: micro-steps done.
  params: Any
  opt_state: optax.MultiStepsState
  rng: jax.Array  # uint32 [2]: base key of the per-micro-step keys.
  # Exponential moving average of `params` when training.ema_decay > 0, else None. Where it
  # exists, evaluation, the best checkpoint and inference use it (`eval_params`).
  ema_params: Any = None

  @property
  def eval_params(self):
    """The parameters to evaluate and save for use: the moving average where there is one."""
    return self.params if self.ema_params is None else self.ema_params


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


def empty_loss_metrics():
  """LossMetrics with no examples (every sum and count 0, no non-finite step)."""
  zero = jnp.zeros((), jnp.float32)
  return loss_metrics({t: (zero, zero) for t in TERMS})


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
                    rng=step_rng, ema_params=initial_ema(config, params))


def initial_ema(config, params):
  """The moving average at the start of training: a copy of `params` (its own buffers, as the
  step donates both), or None when training.ema_decay is 0."""
  decay = config.training.ema_decay
  if not 0 <= decay < 1:
    raise ValueError(f'training.ema_decay must be in [0, 1), got {decay}.')
  return jax.tree.map(jnp.copy, params) if decay > 0 else None


def ema_rate(decay, updates):
  """The weight of the previous average in the average after optimizer update `updates` (n,
  1-based), the new parameters having the rest: decay (1 - decay^(n-1)) / (1 - decay^n). The
  average is then the mean of the n updates' parameters weighted by decay^(n - i), the
  initialisation weighing nothing (Adam's bias correction applied to the average; 0 at n = 1,
  tending to `decay`)."""
  n = updates.astype(jnp.float32)
  return decay * (1 - decay ** (n - 1)) / (1 - decay ** n)


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
  """`training.accumulate_with`, checked: one of ACCUMULATION_MODES, where 'auto' is 'loop' on a
  CPU and 'vmap' on a GPU or TPU. Measured at convergence sizes (bfloat16 on the H100): on the
  2-core CPU 'loop' 24.7 s per update against 139 s for 'scan' (XLA:CPU runs its while-loop
  slowly; 'vmap' there needed over 16 GB of host memory); on one H100 'vmap' 0.065 s per update
  (5.9 GB of GPU memory, 139 s to compile) against 0.136 s for 'scan' (141 s) and 0.194 s for
  'loop' (72 s): one dispatch per update, 4,719 kernels against 'loop''s 23,842."""
  mode = config.training.accumulate_with
  if mode == 'auto':
    mode = 'loop' if jax.default_backend() == 'cpu' else 'vmap'
  if mode not in ACCUMULATION_MODES:
    raise ValueError(f'Unknown training.accumulate_with {mode!r}; expected \'auto\' or one of '
                     f'{ACCUMULATION_MODES}.')
  return mode


def _all_finite(tree):
  # One reduction over the leaves concatenated, which XLA fuses: a reduction per leaf was 2 ops
  # per leaf (convergence sizes: 4,970 against 3,758 fusions in the micro-batch program, 5,660
  # against 3,839 in the optimizer's; concatenating their flags instead keeps all of them).
  # Each leaf is cast to float32 first, exactly for (b)float16 and integers, so that none is
  # cast to another leaf's narrower dtype.
  return jnp.all(jnp.isfinite(jnp.concatenate(
      [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])))


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
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      rate = ema_rate(config.training.ema_decay, (state.step + k) // k)
      ema = optax.incremental_update(params, ema, 1 - rate)
    return state.replace(step=state.step + k, params=params, opt_state=opt_state, ema_params=ema)

  # One conditional over the whole state, not a select per leaf (which multiplied the compile
  # time): a bad update skips the optimizer entirely.
  new_state = jax.lax.cond(ok, apply, lambda state: state, state)
  summed = {t: (jnp.sum(s), jnp.sum(c)) for t, (s, c) in terms.items()}
  update_metrics = loss_metrics(summed, state.step + first, bad[first])
  return new_state, window.merge(update_metrics), epoch_acc.merge(update_metrics)


def loop_micro_step(grad_sum, params, kernels, rng, step, batches, i, *, model, config,
                    class_weights):
  """Micro-step `i` of an update under accumulate_with='loop': adds the `micro_gradient` of
  batches[i] to `grad_sum` (donated), with the key `train_step` gives it."""
  batch = jax.tree.map(lambda x: x[i], batches)
  grads, terms, bad = micro_gradient(params, kernels, batch, _micro_batch_rng(rng, step, i),
                                     model=model, config=config, class_weights=class_weights)
  return jax.tree.map(jnp.add, grad_sum, grads), terms, bad


def loop_mean_gradient(params, grad_sum, *, model, config):
  """The update's mean parameter gradient from the host loop's `grad_sum` (not donated: its
  kernel half has no output of its shape to reuse, and XLA would warn on every run)."""
  k = config.training.accumulation_steps
  return kernel_pullback(params, jax.tree.map(lambda g: g / k, grad_sum), model=model,
                         config=config)


def loop_apply(state, window, epoch_acc, grads, terms, grads_bad, *, tx, config):
  """`apply_update` after the host loop: terms and grads_bad are lists over the k steps."""
  terms = jax.tree.map(lambda *xs: jnp.stack(xs), *terms)
  return apply_update(state, window, epoch_acc, grads, terms, jnp.stack(grads_bad), tx=tx,
                      config=config)


def eval_step(params, batch, rng, *, model, config, class_weights):
  """Loss terms and per-example predictions of `batch` in inference mode (no dropout)."""
  _, (terms, preds) = losses.loss_fn(params, model, batch, rng, config, class_weights,
                                     train=False)
  return loss_metrics(terms), preds
