"""Gaussian diffusion maths: the cosine noise schedule, noising, and the three parametrisations.

Steps are t = 0..T: t = 0 is the clean trace (alpha_bar = 1, what the task heads see) and
t = 1..T are the noise levels the denoiser trains on,
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I).
The denoiser predicts one of (config.diffusion.prediction)
  'eps': eps;   'x0': x0;   'v': sqrt(abar_t) eps - sqrt(1 - abar_t) x0  (unit variance at all t).
"""

import numpy as np
import jax
import jax.numpy as jnp

PREDICTIONS = ('eps', 'x0', 'v')
COSINE_OFFSET = 0.008  # s of the cosine schedule (Nichol & Dhariwal 2021).
MAX_BETA = 0.999  # Betas are clipped here so the last steps stay finite.


def cosine_alphas_cumprod(num_timesteps):
  """abar_t for t = 0..T of the cosine schedule, [T + 1] float32 with abar_0 = 1.

  f(u) = cos^2((u + s) / (1 + s) * pi / 2); beta_t = min(1 - f(t/T) / f((t-1)/T), 0.999);
  abar_t = prod_{i <= t} (1 - beta_i).
  """
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2)**2
  betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
  return np.concatenate([[1.0], np.cumprod(1.0 - betas)]).astype(np.float32)


def sample_timesteps(rng, batch_size, num_timesteps):
  """Uniform noise levels t in 1..T: [batch_size] int32."""
  return jax.random.randint(rng, (batch_size,), 1, num_timesteps + 1, dtype=jnp.int32)


def _coefficients(alphas_cumprod, t):
  """sqrt(abar_t), sqrt(1 - abar_t) as [B, 1] for traces [B, L]."""
  abar = jnp.asarray(alphas_cumprod)[t][:, None]
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def q_sample(alphas_cumprod, x0, t, noise):
  """x_t [B, L] from x0 [B, L], t [B], noise [B, L]."""
  signal_coef, noise_coef = _coefficients(alphas_cumprod, t)
  return signal_coef * x0 + noise_coef * noise


def prediction_target(alphas_cumprod, x0, noise, t, prediction):
  """What the denoiser should output for x_t, [B, L], in the `prediction` parametrisation."""
  if prediction == 'eps':
    return noise
  if prediction == 'x0':
    return x0
  if prediction == 'v':
    signal_coef, noise_coef = _coefficients(alphas_cumprod, t)
    return signal_coef * noise - noise_coef * x0
  raise ValueError(f'Unknown diffusion.prediction {prediction!r}; expected one of {PREDICTIONS}.')


def predict_x0(alphas_cumprod, x_t, output, t, prediction):
  """The clean-trace estimate [B, L] implied by the denoiser output for x_t.

  For 'eps' this divides by sqrt(abar_t), which is 5e-5 at t = T: the estimate is
  then very noisy (one reason 'v' is the default).
  """
  signal_coef, noise_coef = _coefficients(alphas_cumprod, t)
  if prediction == 'eps':
    return (x_t - noise_coef * output) / signal_coef
  if prediction == 'x0':
    return output
  if prediction == 'v':
    return signal_coef * x_t - noise_coef * output
  raise ValueError(f'Unknown diffusion.prediction {prediction!r}; expected one of {PREDICTIONS}.')
