"""Optimizer and learning-rate schedule: AdamW behind a global-norm clip, accumulated with
MultiSteps.

Every schedule here is a function of the optimizer-update count (one update per
`training.accumulation_steps` micro-batches), never of the micro-batch count.

The optimizer is `MultiSteps(chain(clip, adamw))`, the task heads' AdamW updates multiplied by
`training.head_learning_rate_scale` (their learning rate is that multiple of the schedule's), and
its state is what checkpoints hold. The train step does not call `MultiSteps.update` once per
micro-batch, though: it averages the micro-batch gradients of a whole update itself and calls
`apply_accumulated`, which runs the inner chain once and leaves the state exactly as k
MultiSteps calls would.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain.models import heads


def _cycle_starts(t0, t_mult, horizon):
  """Start epochs of the SGDR cycles (since warm-up end) until past `horizon` epochs.

  Returns:
    float64 [C + 1]: starts of C cycles and the end of the last one.
  """
  starts, length = [0.0], float(t0)
  while starts[-1] <= horizon:
    starts.append(starts[-1] + length)
    length *= t_mult
  return np.asarray(starts)


def create_learning_rate_fn(config, steps_per_epoch):
  """Learning rate as a function of the optimizer-update count.

  Linear warm-up over `warmup_epochs` from 0.1 x `learning_rate` to `learning_rate`, then
  cosine warm restarts (SGDR) from `learning_rate` down to `min_learning_rate`; cycle i lasts
  `restart_epochs * restart_mult**i` epochs. Epochs are fractional (update / steps_per_epoch),
  so after the warm-up this equals PyTorch's CosineAnnealingWarmRestarts stepped with
  `epoch + i / steps_per_epoch`.

  Args:
    config: the run config (reads `config.training`).
    steps_per_epoch: optimizer updates per epoch.

  Returns:
    An optax schedule: int count -> learning rate.
  """
  t = config.training
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  if t.restart_epochs <= 0 or t.restart_mult < 1:
    raise ValueError('training.restart_epochs must be > 0 and training.restart_mult >= 1, got '
                     f'{t.restart_epochs} and {t.restart_mult}.')
  peak, floor, warmup = t.learning_rate, t.min_learning_rate, t.warmup_epochs
  # Cycle boundaries are precomputed on the host, so T_mult need not be an integer and the
  # boundaries are exact rather than recovered from a float logarithm.
  starts = jnp.asarray(_cycle_starts(t.restart_epochs, t.restart_mult, t.num_epochs),
                       jnp.float32)

  def schedule(count):
    epoch = jnp.asarray(count, jnp.float32) / steps_per_epoch
    warm = peak * (0.1 + 0.9 * epoch / max(warmup, 1e-12))
    since = jnp.maximum(epoch - warmup, 0.0)
    cycle = jnp.clip(jnp.searchsorted(starts, since, side='right') - 1, 0, len(starts) - 2)
    start, end = starts[cycle], starts[cycle + 1]
    progress = jnp.clip((since - start) / (end - start), 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(epoch < warmup, warm, cosine)

  return schedule


def decay_mask(params):
  """True for weight matrices and kernels (ndim >= 2): biases, norm scales and 1-D SSM
  parameters are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def task_head_mask(params):
  """True for the parameters of the pooled task heads (heads.TASKS), False elsewhere."""
  names = {heads.module_name(task) for task in heads.TASKS}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], 'key', None) in names, params)


def scale_task_heads(inner, scale):
  """`inner` with its updates of the task heads' parameters multiplied by `scale`.

  The state is `inner`'s own, so checkpoints and `applied_learning_rate` read the same at every
  scale. For AdamW the product is its step at `scale` x the learning rate, weight decay included.
  """
  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return jax.tree.map(lambda u, head: u * scale if head else u,
                        updates, task_head_mask(updates)), state

  return optax.GradientTransformation(inner.init, update)


def create_optimizer(config, steps_per_epoch):
  """MultiSteps(chain(clip_by_global_norm, adamw(schedule)), accumulation_steps).

  The clip sees the mean of the accumulated micro-batch gradients, and weight decay is
  decoupled and scaled by the learning rate, as in `torch.optim.AdamW`. AdamW is wrapped in
  `inject_hyperparams` so that the learning rate of the last applied update is part of the
  optimizer state (see `applied_learning_rate`), and in `scale_task_heads`: the task heads
  learn at `training.head_learning_rate_scale` x that rate.
  """
  t = config.training
  if t.accumulation_steps < 1:
    raise ValueError(f'training.accumulation_steps must be >= 1, got {t.accumulation_steps}.')
  if not t.head_learning_rate_scale > 0:
    raise ValueError('training.head_learning_rate_scale must be > 0, got '
                     f'{t.head_learning_rate_scale!r}.')
  adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
      learning_rate=create_learning_rate_fn(config, steps_per_epoch),
      b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
  inner = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm),
                      scale_task_heads(adamw, t.head_learning_rate_scale))
  return optax.MultiSteps(inner, every_k_schedule=t.accumulation_steps)


def apply_accumulated(tx, opt_state, mean_grads, params):
  """One optimizer update from the mean gradient of a whole accumulation window.

  Equivalent to `accumulation_steps` calls of `tx.update` (MultiSteps) on the window's
  micro-batch gradients, the last of which emits the update, but the inner chain (clip, AdamW)
  runs once instead of on every micro-batch.

  Args:
    tx: the `create_optimizer` MultiSteps.
    opt_state: its MultiStepsState at an update boundary (mini_step 0, zero accumulator).
    mean_grads: the mean of the window's micro-batch gradients, shaped like `params`.
    params: the parameters the gradients were taken at.

  Returns:
    (updates to add to `params`, the MultiStepsState after the update).
  """
  updates, inner_state = tx.inner_opt.update(mean_grads, opt_state.inner_opt_state, params)
  # mini_step stays 0 and the accumulator stays zero, as MultiSteps leaves them after emitting
  # an update: the fused step never fills them (they are kept for the checkpoint format).
  new_state = opt_state._replace(gradient_step=opt_state.gradient_step + 1,
                                 inner_opt_state=inner_state)
  return updates, new_state


def update_count(opt_state):
  """Optimizer updates applied so far (int32 scalar) of a `create_optimizer` state."""
  return opt_state.gradient_step


def applied_learning_rate(opt_state):
  """Learning rate of the last applied update (of update 0 before any)."""
  return opt_state.inner_opt_state[1].hyperparams['learning_rate']
