"""The multi-task loss: denoising plus wave-V, class and threshold supervision.

One model call on the concatenation [x_t; x0] with steps [t; 0] gives both passes at the
cost of one forward-backward on 2B rows: the denoiser output is read from the noised half,
the task heads from the clean half (at large t the trace is pure noise, so heads supervised
there learn nothing). Every component is a (sum, count) pair over the batch; padding rows
(mask 0) and rows without the label (peak_mask, threshold_mask 0) count in neither.
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtrain import diffusion
from jaxtrain.models import s4

TERMS = ('signal', 'peak_exist', 'peak_latency', 'peak_amplitude', 'class', 'threshold')
# config.loss.weights key of each term (the rest are named as the term).
WEIGHT_KEYS = {'class': 'classification'}


def gaussian_nll(mean, log_scale, target):
  """Per-example Gaussian negative log-likelihood, [B] (log-scale bounded by the model)."""
  z = (target - mean) * jnp.exp(-log_scale)
  return 0.5 * z**2 + log_scale + 0.5 * math.log(2 * math.pi)


def laplace_nll(mean, log_scale, target):
  """Per-example Laplace negative log-likelihood, [B]: scale b = exp(log_scale). Its location
  is the conditional median, which a mean absolute error rewards (the Gaussian's is the mean,
  which a squared error rewards); they differ where the targets are skewed."""
  return jnp.abs(target - mean) * jnp.exp(-log_scale) + log_scale + math.log(2.0)


class Likelihood(NamedTuple):
  """A wave-V likelihood: its per-example NLL(location, log_scale, target) [B], and the sd of
  the distribution per unit of its scale exp(log_scale)."""
  nll: Callable
  sd_per_scale: float


# config.loss.peak_nll: the likelihood of the wave-V latency and amplitude terms (a Laplace
# distribution of scale b has sd sqrt(2) b).
PEAK_NLLS = {'gaussian': Likelihood(gaussian_nll, 1.0),
             'laplace': Likelihood(laplace_nll, math.sqrt(2.0))}


def peak_nll(config):
  """The Likelihood that `config.loss.peak_nll` names."""
  if config.loss.peak_nll not in PEAK_NLLS:
    raise ValueError(f'Unknown loss.peak_nll {config.loss.peak_nll!r}; expected one of '
                     f'{tuple(PEAK_NLLS)}.')
  return PEAK_NLLS[config.loss.peak_nll]


def beta_nll_weights(log_scale, mask, beta):
  """Per-example weights stop_gradient(sigma^(2 beta)), scaled to mean 1 over `mask`, [B].

  A plain Gaussian NLL moves the mean by (mean - target) / sigma^2, so a recording the head
  finds hard (a late, faint wave V) gets a large sigma and almost no pull on the mean: it is
  left underfit (Seitzer et al. 2022, beta-NLL). Weighting by sigma^(2 beta) gives a pull of
  (mean - target) / sigma^(2 - 2 beta): beta 0 is the plain NLL, 0.5 the same magnitude |z|
  for every recording of a micro-batch (the L1-like middle), 1 the squared error's. Rescaling
  the weights to mean 1 over the micro-batch's labelled rows keeps the term's share of the
  trunk's gradient as the user weighted it; the optimum of sigma is unchanged.
  """
  weights = jax.lax.stop_gradient(jnp.exp(2.0 * beta * log_scale))
  total, count = _masked(weights, mask)
  mean = total / jnp.maximum(count, 1.0)
  return jnp.where(mean > 0, weights / mean, 1.0)


def nll_term(prediction, target, mask, beta, nll_fn=gaussian_nll):
  """(sum, count) of the NLL (`nll_fn`, Gaussian by default) of prediction [B, 2] (location,
  log-scale) against target [B] over mask [B], differentiated as the beta-NLL.

  The value is the plain NLL, so the reported term, the best-checkpoint choice and the
  report's checks mean the same at every beta and batch size; only the gradient is weighted.
  For the Laplace NLL the location's pull is sign(error) / b, weighted to sign(error) b^(2 beta
  - 1): at beta 0.5 every labelled recording pulls its location equally hard.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'config.loss.nll_beta must lie in [0, 1], got {beta!r}.')
  mean, log_scale = prediction[:, 0], prediction[:, 1]
  nll = nll_fn(mean, log_scale, target)
  weighted = beta_nll_weights(log_scale, mask, beta) * nll
  return _masked(jax.lax.stop_gradient(nll) + weighted - jax.lax.stop_gradient(weighted), mask)


def huber(error, delta):
  """Per-example Huber loss: quadratic within delta, linear beyond, [B]."""
  abs_error = jnp.abs(error)
  quadratic = jnp.minimum(abs_error, delta)
  return 0.5 * quadratic**2 + delta * (abs_error - quadratic)


def focal_loss(logits, labels, alpha, gamma, class_weights):
  """Per-example class-weighted focal loss w[y] alpha (1 - p_y)^gamma (-log p_y), [B].

  Args:
    logits: [B, K]; labels: [B] int; class_weights: [K] (ones for unweighted).
  """
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  return class_weights[labels] * alpha * (-jnp.expm1(log_p))**gamma * -log_p


def _masked(values, mask):
  """(sum, count) of per-example `values` [B] over `mask` [B]; masked rows contribute 0."""
  return jnp.sum(jnp.where(mask > 0, values, 0.0) * mask), jnp.sum(mask)


def class_weight_vector(config, class_weights):
  """[n_classes] weights of the focal loss: the train split's 'balanced' ones, or ones."""
  if config.loss.class_weights == 'none':
    return jnp.ones((config.model.n_classes,), jnp.float32)
  if config.loss.class_weights == 'balanced':
    if class_weights is None:
      raise ValueError("config.loss.class_weights='balanced' needs the train split's weights.")
    return jnp.asarray(class_weights, jnp.float32)
  raise ValueError(f'Unknown loss.class_weights {config.loss.class_weights!r}.')


def _threshold_term(config, prediction, target, mask):
  if config.loss.threshold_loss == 'nll':
    return nll_term(prediction, target, mask, config.loss.nll_beta)
  if config.loss.threshold_loss == 'huber':
    return _masked(huber(prediction[:, 0] - target, config.loss.huber_delta), mask)
  raise ValueError(f'Unknown loss.threshold_loss {config.loss.threshold_loss!r}.')


def total_loss(terms, config):
  """sum_k weight_k * sum_k / max(count_k, 1), weights from config.loss.weights."""
  weights = config.loss.weights
  return sum(weights[WEIGHT_KEYS.get(k, k)] * s / jnp.maximum(c, 1.0)
             for k, (s, c) in terms.items())


def loss_fn(params, model, batch, rng, config, class_weights, train, kernels=None):
  """The multi-task loss of one batch.

  Args:
    params: model parameters.
    model: the module from `models.create_model(config)`.
    batch: dict of the batch format (jaxtrain/data/__init__.py, module docstring), [B, ...].
    rng: one key; split here for t, noise, dropout and condition dropout.
    config: the run's ConfigDict (reads diffusion.*, loss.*, model.n_classes).
    class_weights: [n_classes] 'balanced' weights of the train split (ignored for 'none').
    train: dropout and condition dropout on.
    kernels: optional S4D kernels of `params` (`model.s4_kernels`), used instead of computing
      them; the loss is then differentiable in them.

  Returns:
    (total, (terms, preds)): terms {name: (sum, count)} for TERMS; preds: heads on the clean
    trace ('peak_exist' [B], 'peak_latency', 'peak_amplitude', 'threshold' [B, 2],
    'class_logits' [B, K]) and the denoiser's 'x0_pred' [B, L] at its step 't' [B].
  """
  t_rng, noise_rng, dropout_rng, condition_rng = jax.random.split(rng, 4)
  x0, mask = batch['signal'], batch['mask']
  batch_size = x0.shape[0]
  alphas_cumprod = diffusion.cosine_alphas_cumprod(config.diffusion.num_timesteps)
  prediction = config.diffusion.prediction

  t = diffusion.sample_timesteps(t_rng, batch_size, config.diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(alphas_cumprod, x0, t, noise)
  rngs = {'dropout': dropout_rng, 'condition': condition_rng} if train else None
  variables = {'params': params} if kernels is None else {'params': params, s4.KERNELS: kernels}
  out = model.apply(
      variables, jnp.concatenate([x_t, x0]),
      jnp.concatenate([batch['static'], batch['static']]),
      jnp.concatenate([t, jnp.zeros_like(t)]), train=train, rngs=rngs)
  denoised = out['signal'][:batch_size]
  heads = {k: v[batch_size:] for k, v in out.items() if k != 'signal'}

  target = diffusion.prediction_target(alphas_cumprod, x0, noise, t, prediction)
  peak_mask = mask * batch['peak_mask']
  peak = functools.partial(nll_term, mask=peak_mask, beta=config.loss.nll_beta,
                           nll_fn=peak_nll(config).nll)
  terms = {
      'signal': _masked(jnp.mean((denoised - target)**2, axis=-1), mask),
      'peak_exist': _masked(
          optax.sigmoid_binary_cross_entropy(heads['peak_exist'], batch['peak_mask']), mask),
      'peak_latency': peak(heads['peak_latency'], batch['peak_latency']),
      'peak_amplitude': peak(heads['peak_amplitude'], batch['peak_amplitude']),
      'class': _masked(
          focal_loss(heads['class_logits'], batch['label'], config.loss.focal_alpha,
                     config.loss.focal_gamma, class_weight_vector(config, class_weights)), mask),
      'threshold': _threshold_term(config, heads['threshold'], batch['threshold'],
                                   mask * batch['threshold_mask']),
  }
  preds = dict(heads, x0_pred=diffusion.predict_x0(alphas_cumprod, x_t, denoised, t, prediction),
               t=t)
  return total_loss(terms, config), (terms, preds)
