"""The learning-rate schedule and the accumulated AdamW chain (jaxtrain/optim.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import convergence
from jaxtrain import models
from jaxtrain import optim

SPE = 7  # Optimizer updates per epoch: odd, so epoch boundaries fall between updates' halves.


def _config(t_mult, lr=1e-3, eta_min=1e-6, warmup=3, t0=5, epochs=60):
  config = convergence.get_config('test')
  t = config.training
  t.learning_rate, t.min_learning_rate, t.warmup_epochs = lr, eta_min, warmup
  t.restart_epochs, t.restart_mult, t.num_epochs = t0, t_mult, epochs
  return config


def torch_reference(update, config):
  """PyTorch's CosineAnnealingWarmRestarts (closed form of its docs) stepped with fractional
  epochs after a linear warm-up from 0.1 x lr, in float64."""
  t = config.training
  epoch = update / SPE
  if epoch < t.warmup_epochs:
    return t.learning_rate * (0.1 + 0.9 * epoch / t.warmup_epochs)
  e, t0, mult = epoch - t.warmup_epochs, t.restart_epochs, t.restart_mult
  if e < t0:
    t_cur, t_i = e, t0
  elif mult == 1:
    t_cur, t_i = e % t0, t0
  else:
    n = int(math.log(e / t0 * (mult - 1) + 1, mult))
    t_cur, t_i = e - t0 * (mult**n - 1) / (mult - 1), t0 * mult**n
  return t.min_learning_rate + (t.learning_rate - t.min_learning_rate) * (
      1 + math.cos(math.pi * t_cur / t_i)) / 2


@pytest.mark.parametrize('t_mult', [1, 2])
def test_schedule_matches_torch_warm_restarts_every_update(t_mult):
  config = _config(t_mult)
  fn = optim.create_learning_rate_fn(config, SPE)
  updates = np.arange(config.training.num_epochs * SPE)
  got = np.asarray(jax.vmap(fn)(jnp.asarray(updates)))
  want = np.array([torch_reference(u, config) for u in updates])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize('t_mult,restart_epochs', [(1, [5, 10, 15, 20]), (2, [5, 15, 35])])
def test_schedule_at_warmup_end_restarts_and_cycle_ends(t_mult, restart_epochs):
  config = _config(t_mult)
  t = config.training
  fn = optim.create_learning_rate_fn(config, SPE)
  lr = lambda update: float(fn(update))
  assert lr(0) == pytest.approx(0.1 * t.learning_rate)
  warm_end = t.warmup_epochs * SPE
  assert lr(warm_end - 1) < t.learning_rate
  assert lr(warm_end) == pytest.approx(t.learning_rate)
  previous = warm_end
  for since in restart_epochs:  # Epochs after warm-up at which a new cycle starts.
    start = (t.warmup_epochs + since) * SPE
    assert lr(start) == pytest.approx(t.learning_rate), since
    # The update before a restart is the bottom of the previous cycle: its minimum, and
    # within one update's cosine step of eta_min.
    cycle = [lr(u) for u in range(previous, start)]
    assert lr(start - 1) == min(cycle), since
    assert t.min_learning_rate < lr(start - 1) < 0.01 * t.learning_rate, since
    previous = start


def test_convergence_schedule_numbers():
  """The convergence config: 1e-6 at update 0, 1e-5 after 3 epochs, 1e-8 + at 18, restart."""
  config = convergence.get_config()
  fn = optim.create_learning_rate_fn(config, 304)
  assert float(fn(0)) == pytest.approx(1e-6)
  assert float(fn(3 * 304)) == pytest.approx(1e-5)
  assert float(fn((3 + 7.5) * 304)) == pytest.approx((1e-5 + 1e-8) / 2, rel=1e-4)
  assert float(fn(18 * 304 - 1)) < 1.1e-8
  assert float(fn(18 * 304)) == pytest.approx(1e-5)


def _toy_problem():
  params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}

  def loss(p, x):
    return jnp.sum((x @ p['dense']['kernel'] + p['dense']['bias'])**2)

  return params, loss


def test_parameters_change_only_every_kth_micro_step():
  config = _config(1)
  config.training.accumulation_steps = 8
  tx = optim.create_optimizer(config, SPE)
  params, loss = _toy_problem()
  state = tx.init(params)
  changed = []
  for i in range(24):
    x = jnp.full((4, 3), 0.1 * (i + 1))
    grads = jax.grad(loss)(params, x)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    changed.append(bool(jnp.any(new['dense']['kernel'] != params['dense']['kernel'])))
    params = new
  assert changed == [(i + 1) % 8 == 0 for i in range(24)]
  assert int(optim.update_count(state)) == 3


def test_clip_acts_on_the_averaged_gradient_and_lr_is_recorded():
  """Eight micro-gradients +g and -g average to 0: clipping each one first would not."""
  config = _config(1, warmup=0)
  config.training.accumulation_steps, config.training.weight_decay = 2, 0.0
  config.training.grad_clip_norm = 1e-3
  tx = optim.create_optimizer(config, SPE)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  g = {'w': jnp.full((2, 2), 5.0)}
  _, state = tx.update(g, state, params)
  updates, state = tx.update(jax.tree.map(lambda x: -x, g), state, params)
  np.testing.assert_allclose(updates['w'], 0.0, atol=1e-12)
  fn = optim.create_learning_rate_fn(config, SPE)
  assert float(optim.applied_learning_rate(state)) == pytest.approx(float(fn(0)))


def test_decoupled_weight_decay_on_kernels_only():
  """With a zero gradient, AdamW's step is the decay alone: p <- p (1 - lr wd), as in torch."""
  config = _config(1, warmup=0, lr=0.1)
  config.training.accumulation_steps, config.training.weight_decay = 1, 0.5
  tx = optim.create_optimizer(config, SPE)
  params, _ = _toy_problem()
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['dense']['kernel'], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new['dense']['bias'], 1.0)


def test_bad_schedule_settings_are_refused():
  config = _config(1)
  config.training.restart_mult = 0
  with pytest.raises(ValueError, match='restart_mult'):
    optim.create_learning_rate_fn(config, SPE)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    optim.create_learning_rate_fn(_config(1), 0)


def test_task_heads_step_at_their_multiple_of_the_learning_rate():
  """Same gradient, same values: a task head's AdamW step (decay included) is the scale times
  the trunk's; the state and its recorded learning rate are the unscaled optimizer's."""
  config = _config(1, warmup=0, lr=0.01)
  config.training.accumulation_steps, config.training.weight_decay = 1, 0.5
  leaf = {'kernel': jnp.full((2, 3), 0.7), 'bias': jnp.full((3,), -0.2)}
  params = {'enc_0': leaf, 'signal_head': leaf, 'amplitude_head': leaf, 'class_head': leaf}
  grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
  steps = {}
  for scale in (1.0, 10.0):
    config.training.head_learning_rate_scale = scale
    tx = optim.create_optimizer(config, SPE)
    state = tx.init(params)
    steps[scale], state = tx.update(grads, state, params)
    assert float(optim.applied_learning_rate(state)) == pytest.approx(0.01)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  for name in params:
    factor = 10.0 if name in ('amplitude_head', 'class_head') else 1.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, factor * a, rtol=1e-6),
                 steps[1.0][name], steps[10.0][name])
  config.training.head_learning_rate_scale = 0.0
  with pytest.raises(ValueError, match='head_learning_rate_scale'):
    optim.create_optimizer(config, SPE)


def test_every_task_head_of_the_model_is_scaled():
  """Every pooled head the model builds is found by name, and nothing of the trunk or the
  signal head (a head added under another name would be left at the trunk's rate)."""
  model = models.create_model(convergence.get_config('test'))
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 200)), jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32))
  mask = optim.task_head_mask(params['params'])
  scaled = {name for name, sub in mask.items() if all(jax.tree.leaves(sub))}
  assert scaled == {name for name in mask if name.endswith('_head')} - {'signal_head'}
  assert len(scaled) == 5
  assert not any(any(jax.tree.leaves(sub)) for name, sub in mask.items() if name not in scaled)
