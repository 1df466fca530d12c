"""Tests of the diffusion maths and the multi-task loss, on the 'test' preset model."""

import copy
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import convergence
from jaxtrain import diffusion
from jaxtrain import losses
from jaxtrain import models

BATCH = 16
CLASS_WEIGHTS = jnp.array([0.25, 24.9, 1.885, 6.06, 3.553], jnp.float32)  # the original's
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
WEIGHT_NAMES = tuple(losses.WEIGHT_KEYS.get(k, k) for k in losses.TERMS)


def fast_jit(fun, *args):
  """`fun` compiled for these example arguments with fast (unoptimised) XLA passes."""
  return jax.jit(fun).lower(*args).compile(compiler_options=FAST_COMPILE)


def make_batch(seed=0, batch=BATCH, n_padding=2):
  """A realistic batch: z-scored noisy traces, standardised targets, the last rows padding."""
  rng = np.random.default_rng(seed)
  time = np.arange(200) / 200
  latency = rng.normal(size=batch)
  wave = np.exp(-((time[None] - 0.4 - 0.05 * latency[:, None]) / 0.02)**2)
  signal = wave + 0.5 * rng.normal(size=(batch, 200))
  signal = (signal - signal.mean(1, keepdims=True)) / signal.std(1, keepdims=True)
  peak_mask = (rng.random(batch) < 0.75).astype(np.float32)
  threshold_mask = (rng.random(batch) < 0.9).astype(np.float32)
  mask = np.ones(batch, np.float32)
  mask[batch - n_padding:] = 0.0
  batch = {
      'signal': signal, 'static': rng.normal(size=(batch, 4)),
      'peak_mask': peak_mask, 'peak_latency': latency * peak_mask,
      'peak_amplitude': rng.normal(size=batch) * peak_mask,
      'label': rng.choice(5, size=batch, p=[0.8, 0.01, 0.1, 0.04, 0.05]),
      'threshold': rng.normal(size=batch) * threshold_mask, 'threshold_mask': threshold_mask,
      'mask': mask}
  return {k: jnp.asarray(v, jnp.int32 if k == 'label' else jnp.float32)
          for k, v in batch.items()}


def with_weights(config, weights):
  """A copy of config whose loss weights are `weights` [6] (in TERMS order; may be traced)."""
  config = copy.deepcopy(config)
  config.loss.weights = ml_collections.ConfigDict(dict(zip(WEIGHT_NAMES, weights)))
  return config


def eval_loss(config, model, params, class_weights=CLASS_WEIGHTS):
  """Compiled (params, batch, class_weights) -> loss_fn(..., train=False), key 1."""
  run = lambda p, b, w: losses.loss_fn(p, model, b, jax.random.key(1), config, w, train=False)
  return fast_jit(run, params, make_batch(), class_weights)


@pytest.fixture(scope='module')
def setup():
  """(config, model, params, grad_fn, eval_fn), compiled for the default batch shapes:
  grad_fn(params, weights [6], batch) -> value_and_grad of loss_fn(train=True), key 7;
  eval_fn(params, batch, class_weights) -> loss_fn(train=False), key 1."""
  config = convergence.get_config('test')
  model = models.create_model(config)
  batch = make_batch()
  init = functools.partial(model.init, train=False)
  args = (jax.random.key(0), batch['signal'], batch['static'], jnp.zeros(BATCH, jnp.int32))
  params = fast_jit(init, *args)(*args)['params']

  def grad_fn(params, weights, batch):
    loss = lambda p: losses.loss_fn(p, model, batch, jax.random.key(7), with_weights(
        config, weights), CLASS_WEIGHTS, train=True)
    return jax.value_and_grad(loss, has_aux=True)(params)

  weights = jnp.ones(len(WEIGHT_NAMES))
  return (config, model, params, fast_jit(grad_fn, params, weights, batch),
          eval_loss(config, model, params))


def term_means(terms):
  return {k: float(s / max(float(c), 1.0)) for k, (s, c) in terms.items()}


def test_cosine_schedule():
  abar = diffusion.cosine_alphas_cumprod(1000)
  assert abar.shape == (1001,) and abar[0] == 1.0
  assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 1e-5
  betas = 1 - abar[1:] / abar[:-1]
  assert betas.max() <= 0.999 + 1e-6 and betas.min() > 0
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)**2
  np.testing.assert_allclose(abar[500], f(0.5) / f(0.0), rtol=1e-5)


@pytest.mark.parametrize('prediction', diffusion.PREDICTIONS)
def test_x0_recovered_from_the_target(prediction):
  abar = diffusion.cosine_alphas_cumprod(1000)
  keys = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(keys[0], (64, 200))
  noise = jax.random.normal(keys[1], (64, 200))
  # eps divides by sqrt(abar_t) (5e-5 at t = T): check it where that stays well-conditioned.
  t = diffusion.sample_timesteps(keys[2], 64, 900 if prediction == 'eps' else 1000)
  x_t = diffusion.q_sample(abar, x0, t, noise)
  target = diffusion.prediction_target(abar, x0, noise, t, prediction)
  np.testing.assert_allclose(diffusion.predict_x0(abar, x_t, target, t, prediction), x0,
                             atol=2e-3)
  if prediction == 'v':
    assert abs(float(jnp.var(target)) - 1.0) < 0.05  # unit variance at every t


def test_terms_match_predictions_and_contract(setup):
  config, model, params, _, eval_fn = setup
  batch = make_batch()
  total, (terms, preds) = eval_fn(params, batch, CLASS_WEIGHTS)
  assert set(terms) == set(losses.TERMS)
  real, peaks = batch['mask'], batch['mask'] * batch['peak_mask']
  assert float(terms['signal'][1]) == float(real.sum())
  assert float(terms['peak_latency'][1]) == float(peaks.sum())
  assert float(terms['threshold'][1]) == float((real * batch['threshold_mask']).sum())
  weights = config.loss.weights
  expected_total = sum(weights[WEIGHT_NAMES[i]] * m
                       for i, m in enumerate(term_means(terms)[k] for k in losses.TERMS))
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)

  shapes = {k: v.shape for k, v in preds.items()}
  assert shapes == {'peak_exist': (BATCH,), 'peak_latency': (BATCH, 2),
                    'peak_amplitude': (BATCH, 2), 'class_logits': (BATCH, 5),
                    'threshold': (BATCH, 2), 'x0_pred': (BATCH, 200), 't': (BATCH,)}
  assert int(preds['t'].min()) >= 1 and int(preds['t'].max()) <= 1000
  # The heads are those of the clean trace at t = 0.
  apply = lambda p, x, c: model.apply({'params': p}, x, c, jnp.zeros(BATCH, jnp.int32))
  clean = fast_jit(apply, params, batch['signal'], batch['static'])(
      params, batch['signal'], batch['static'])
  for key in ('peak_exist', 'peak_latency', 'class_logits', 'threshold'):
    np.testing.assert_allclose(preds[key], clean[key], rtol=1e-4, atol=1e-5)
  # Terms recomputed from the predictions.
  nll = losses.gaussian_nll(preds['peak_latency'][:, 0], preds['peak_latency'][:, 1],
                            batch['peak_latency'])
  np.testing.assert_allclose(terms['peak_latency'][0], jnp.sum(nll * peaks), rtol=1e-5)
  bce = optax.sigmoid_binary_cross_entropy(preds['peak_exist'], batch['peak_mask'])
  np.testing.assert_allclose(terms['peak_exist'][0], jnp.sum(bce * real), rtol=1e-5)


def test_initial_components_are_order_one(setup):
  config, _, params, grad_fn, eval_fn = setup
  batch = make_batch(seed=3)
  weights = np.array([config.loss.weights[k] for k in WEIGHT_NAMES])
  for _, (terms, _) in (eval_fn(params, batch, CLASS_WEIGHTS), grad_fn(params, weights, batch)[0]):
    for name, value in term_means(terms).items():
      assert 0.01 <= value <= 20, (name, value)


def test_zeroing_a_weight_removes_exactly_its_gradient(setup):
  _, _, params, grad_fn, _ = setup
  batch = make_batch()
  base = np.array([1.0, 0.3, 0.2, 0.01, 0.8, 0.05])
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  full = flat(grad_fn(params, base, batch)[1])
  for i, name in enumerate(losses.TERMS):
    (_, (terms, _)), without = grad_fn(params, base * (np.arange(6) != i), batch)
    alone = flat(grad_fn(params, np.eye(6)[i], batch)[1])
    contribution = full - flat(without)
    assert np.linalg.norm(alone) > 0, name
    np.testing.assert_allclose(contribution, base[i] * alone, atol=1e-6 * np.abs(full).max(),
                               err_msg=name)
    assert float(terms[name][1]) > 0


def test_masked_peak_losses_with_no_peaks(setup):
  _, _, params, grad_fn, _ = setup
  batch = make_batch()
  batch['peak_mask'] = jnp.zeros(BATCH)
  batch['peak_latency'] = batch['peak_amplitude'] = jnp.zeros(BATCH)
  (total, (terms, _)), grads = grad_fn(params, jnp.ones(6), batch)
  for name in ('peak_latency', 'peak_amplitude'):
    assert float(terms[name][0]) == 0.0 and float(terms[name][1]) == 0.0
  assert bool(jnp.isfinite(total))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_padding_rows_do_not_count(setup):
  config, model, params, _, eval_fn = setup
  batch = make_batch()
  changed = dict(batch)
  for key in ('signal', 'static', 'peak_latency', 'threshold'):
    changed[key] = batch[key].at[-2:].set(5.0)
  changed['label'] = batch['label'].at[-2:].set(1)
  for (s1, c1), (s2, c2) in zip(eval_fn(params, batch, CLASS_WEIGHTS)[1][0].values(),
                                eval_fn(params, changed, CLASS_WEIGHTS)[1][0].values()):
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    assert float(c1) == float(c2)


def test_focal_loss_applies_alpha_gamma_and_class_weights():
  logits = jax.random.normal(jax.random.key(0), (32, 5))
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 5)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(losses.focal_loss(logits, labels, 1.0, 0.0, jnp.ones(5)), ce,
                             rtol=1e-5)
  p = jnp.exp(-ce)
  np.testing.assert_allclose(
      losses.focal_loss(logits, labels, 0.75, 2.5, CLASS_WEIGHTS),
      CLASS_WEIGHTS[labels] * 0.75 * (1 - p)**2.5 * ce, rtol=1e-4)


@pytest.mark.parametrize('option', ['class_weights', 'threshold_loss'])
def test_loss_options(setup, option):
  """class_weights: 'balanced' applies the given weights, 'none' ignores them; threshold_loss
  'huber' is Huber on the predicted mean."""
  config, model, params, _, eval_fn = setup
  batch = make_batch()
  config = copy.deepcopy(config)
  if option == 'class_weights':
    focal = lambda preds, w: jnp.sum(batch['mask'] * losses.focal_loss(
        preds['class_logits'], batch['label'], 0.75, 2.5, w))
    terms, preds = eval_fn(params, batch, CLASS_WEIGHTS)[1]
    np.testing.assert_allclose(terms['class'][0], focal(preds, CLASS_WEIGHTS), rtol=1e-5)
    config.loss.class_weights = 'none'
    terms, preds = eval_loss(config, model, params)(params, batch, CLASS_WEIGHTS)[1]
    np.testing.assert_allclose(terms['class'][0], focal(preds, jnp.ones(5)), rtol=1e-5)
  else:
    config.loss.threshold_loss, config.loss.huber_delta = 'huber', 0.5
    terms, preds = eval_loss(config, model, params)(params, batch, CLASS_WEIGHTS)[1]
    error = jnp.abs(preds['threshold'][:, 0] - batch['threshold'])
    huber = jnp.where(error < 0.5, 0.5 * error**2, 0.5 * (error - 0.25))
    weight = batch['mask'] * batch['threshold_mask']
    np.testing.assert_allclose(terms['threshold'][0], jnp.sum(huber * weight), rtol=1e-5)


def test_beta_nll_pulls_every_recording_by_its_z_score():
  """beta 0.5: the mean's gradient is |z| (mean-1 weights aside) whatever sigma, so a hard
  recording (sigma 10x) pulls as hard as an easy one with the same z; beta 0 is the plain NLL,
  whose pull falls as 1/sigma^2. The weights average 1 over the mask (padding excluded, even
  when NaN), carry no gradient of their own, and the term's value stays the plain NLL."""
  log_scale = jnp.log(jnp.array([0.1, 1.0, 5.0]))
  target = jnp.zeros(3)
  mask = jnp.array([1.0, 1.0, 0.0])
  z = jnp.array([2.0, 0.5, 1.0])
  mean = z * jnp.exp(log_scale)
  term = lambda m, s, beta, mask=mask: losses.nll_term(
      jnp.stack([m, s], axis=-1), target, mask, beta)

  weights = losses.beta_nll_weights(log_scale, mask, 0.5)
  np.testing.assert_allclose(weights[:2], [2 * 0.1 / 1.1, 2 * 1.0 / 1.1], rtol=1e-6)
  # d/dmean = w z / sigma, d/dlog_scale = w (1 - z^2): sigma^(2 beta) is not differentiated.
  pull = jax.grad(lambda m: term(m, log_scale, 0.5)[0])(mean)
  np.testing.assert_allclose(pull, weights * z / jnp.exp(log_scale) * mask, rtol=1e-5)
  np.testing.assert_allclose(pull[:2] * jnp.exp(log_scale[:2]) / weights[:2] / z[:2], 1.0,
                             rtol=1e-5)
  spread = jax.grad(lambda s: term(mean, s, 0.5)[0])(log_scale)
  np.testing.assert_allclose(spread, weights * (1 - z**2) * mask, rtol=1e-5, atol=1e-7)
  plain_pull = jax.grad(lambda m: term(m, log_scale, 0.0)[0])(mean)
  np.testing.assert_allclose(plain_pull[:2], z[:2] / jnp.exp(log_scale[:2]), rtol=1e-5)
  plain = jnp.sum(losses.gaussian_nll(mean, log_scale, target) * mask)
  for beta in (0.0, 0.5, 1.0):
    np.testing.assert_allclose(term(mean, log_scale, beta)[0], plain, rtol=1e-6)

  nan_padding = log_scale.at[2].set(jnp.nan)
  np.testing.assert_allclose(losses.beta_nll_weights(nan_padding, mask, 0.5)[:2], weights[:2],
                             rtol=1e-6)
  none = jnp.zeros(3)
  total, count = term(mean, log_scale, 0.5, none)
  assert float(total) == 0.0 and float(count) == 0.0
  assert np.all(np.isfinite(jax.grad(lambda s: term(mean, s, 0.5, none)[0])(log_scale)))
  with pytest.raises(ValueError, match='nll_beta'):
    term(mean, log_scale, 1.5)


def test_laplace_peak_terms_locate_the_median_and_are_used_when_configured(setup):
  """loss.peak_nll='laplace': the wave-V terms are the Laplace NLL |e| / b + log 2b of the
  predictions, and over skewed targets the NLL's best constant location is their median
  (the Gaussian's: their mean); an unknown name is refused."""
  targets = jnp.array([0.0, 0.1, 0.2, 1.5, 3.0])  # Median 0.2, mean 0.96.
  mask = jnp.ones(5)

  def best_location(nll_fn):
    term = lambda m: losses.nll_term(jnp.stack([jnp.full(5, m), jnp.zeros(5)], -1), targets,
                                     mask, 0.0, nll_fn)[0]
    grid = jnp.linspace(-1.0, 3.0, 401)
    return float(grid[jnp.argmin(jax.vmap(term)(grid))])

  assert abs(best_location(losses.laplace_nll) - 0.2) < 0.011
  assert abs(best_location(losses.gaussian_nll) - float(targets.mean())) < 0.011
  # |2 - 1| / 0.5 + log(2 x 0.5) = 2.
  np.testing.assert_allclose(losses.laplace_nll(jnp.array([1.0]), jnp.log(jnp.array([0.5])),
                                                jnp.array([2.0])), [2.0], rtol=1e-6)
  # At beta 0.5 the weights b / mean(b) cancel the 1 / b of the pull: every recording's
  # location is pulled by sign(error) / mean(b), whatever its own scale b.
  scales = jnp.array([0.1, 1.0, 5.0])
  pull = jax.grad(lambda m: losses.nll_term(jnp.stack([m, jnp.log(scales)], -1), jnp.zeros(3),
                                            jnp.ones(3), 0.5, losses.laplace_nll)[0])
  np.testing.assert_allclose(pull(jnp.array([0.3, -2.0, 4.0])) * jnp.mean(scales),
                             [1.0, -1.0, 1.0], rtol=1e-5)

  config, model, params, _, _ = setup
  laplace = copy.deepcopy(config)
  laplace.loss.peak_nll = 'laplace'
  batch = make_batch()
  _, (terms, preds) = eval_loss(laplace, model, params)(params, batch, CLASS_WEIGHTS)
  peaks = batch['mask'] * batch['peak_mask']
  for key in ('peak_latency', 'peak_amplitude'):
    nll = losses.laplace_nll(preds[key][:, 0], preds[key][:, 1], batch[key])
    np.testing.assert_allclose(terms[key][0], jnp.sum(nll * peaks), rtol=1e-5)
  laplace.loss.peak_nll = 'laplacian'
  with pytest.raises(ValueError, match="Unknown loss.peak_nll 'laplacian'"):
    losses.peak_nll(laplace)
