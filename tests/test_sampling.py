"""The diffusion samplers (jaxtrain/sampling.py): an oracle denoiser, the DDPM posterior, the
clipping rule, and the real (untrained) `:test` model for shapes, seeds and guidance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import convergence
from jaxtrain import diffusion
from jaxtrain import models
from jaxtrain import sampling
from jaxtrain.data import synthetic

T = 1000
ALPHAS = diffusion.cosine_alphas_cumprod(T)


def _clean_traces(n=6):
  """Noise-free synthetic traces, each standardised like a training trace: [n, 200]."""
  clean = synthetic.generate(4, n / 4, 0.1, seed=3)['clean'][:n].astype(np.float64)
  return ((clean - clean.mean(1, keepdims=True)) / clean.std(1, keepdims=True)).astype(
      np.float32)


@dataclasses.dataclass(frozen=True)
class Oracle:
  """A denoiser that knows the clean traces (its params) and returns the true target."""
  prediction: str

  def __call__(self, x0, x_t, static, t, uncond):
    abar = jnp.asarray(ALPHAS)[t][:, None]
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    return eps if self.prediction == 'eps' else jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0


@pytest.mark.parametrize('prediction, eta, clip', [('eps', 0.0, True), ('v', 0.0, False),
                                                   ('v', 0.7, True)])
def test_ddim_with_the_true_noise_recovers_the_clean_trace(prediction, eta, clip):
  x0 = _clean_traces()
  static = np.zeros((len(x0), 4), np.float32)
  got = sampling.sample(Oracle(prediction), jnp.asarray(x0), static, jax.random.PRNGKey(0),
                        alphas_cumprod=jnp.asarray(ALPHAS), prediction=prediction, length=200,
                        num_steps=25, eta=eta, clip=clip)
  assert np.abs(np.asarray(got) - x0).max() < 1e-3


def test_timestep_pairs_descend_to_zero():
  t, s = sampling.timestep_pairs(T, 7)
  assert t[0] == T and s[-1] == 0 and (s < t).all() and (t[1:] == s[:-1]).all()
  t, s = sampling.timestep_pairs(5, 5)
  assert t.tolist() == [5, 4, 3, 2, 1] and s.tolist() == [4, 3, 2, 1, 0]
  with pytest.raises(ValueError, match='num_steps'):
    sampling.timestep_pairs(T, T + 1)


@pytest.mark.parametrize('t, s', [(500, 499), (700, 350), (40, 0)])
def test_eta_one_step_is_the_ddpm_posterior(t, s):
  """Ho et al. 2020 eq. 7 with the stride's beta = 1 - abar_t / abar_s."""
  rng = np.random.default_rng(0)
  x0, x_t, z = rng.normal(size=(3, 2, 200))
  a_t, a_s = float(ALPHAS[t]), float(ALPHAS[s])
  beta = 1 - a_t / a_s
  mean = (np.sqrt(a_s) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x_t)
  sd = np.sqrt(beta * (1 - a_s) / (1 - a_t))
  got = sampling.denoising_step(x_t, x0, a_t, a_s, 1.0, z)
  np.testing.assert_allclose(got, mean + sd * z, rtol=1e-5, atol=1e-5)


def test_clip_projects_onto_standardised_traces():
  x0 = _clean_traces()
  np.testing.assert_allclose(sampling.clip_standardized(jnp.asarray(x0)), x0, atol=1e-5)
  blurred = 0.3 * x0 + 2.0  # An early estimate: offset and too flat.
  np.testing.assert_allclose(sampling.clip_standardized(jnp.asarray(blurred)), 0.3 * x0,
                             atol=1e-5)
  overshoot = sampling.clip_standardized(jnp.asarray(4.0 * x0))
  np.testing.assert_allclose(overshoot, x0, atol=1e-5)


def test_ddpm_takes_no_other_eta():
  with pytest.raises(ValueError, match='DDPM is the eta = 1 step'):
    sampling.sample(Oracle('v'), jnp.zeros((1, 200)), np.zeros((1, 4), np.float32),
                    jax.random.PRNGKey(0), alphas_cumprod=jnp.asarray(ALPHAS), prediction='v',
                    length=200, method='ddpm', eta=0.5)


@pytest.fixture(scope='module')
def tiny_model():
  config = convergence.get_config('test')
  model = models.create_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 200)), jnp.zeros((1, 4)),
                               jnp.zeros((1,), jnp.int32))['params']
  static = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  return sampling.ModelDenoiser(model), params, static


def _draw(denoise, params, static, seed, **kwargs):
  return np.asarray(sampling.sample(
      denoise, params, static, jax.random.PRNGKey(seed), alphas_cumprod=jnp.asarray(ALPHAS),
      prediction='v', length=200, num_steps=4, **kwargs))


@pytest.mark.parametrize('method', sampling.METHODS)
def test_sampler_shapes_and_determinism(tiny_model, method):
  denoise, params, static = tiny_model
  a = _draw(denoise, params, static, 0, method=method)
  assert a.shape == (5, 200) and np.isfinite(a).all()
  np.testing.assert_array_equal(a, _draw(denoise, params, static, 0, method=method))
  assert np.abs(a - _draw(denoise, params, static, 1, method=method)).max() > 1e-2
  assert np.abs(a[0] - a[1]).max() > 1e-2  # Each row draws its own noise.


@dataclasses.dataclass(frozen=True)
class Unconditional:
  """The model with every row on its null condition: the unconditional sampler."""
  denoise: sampling.ModelDenoiser

  def __call__(self, params, x, static, t, uncond):
    return self.denoise(params, x, static, t, jnp.ones_like(uncond))


def test_guidance_scale_zero_is_the_unconditional_sampler(tiny_model):
  denoise, params, static = tiny_model
  unconditional = _draw(Unconditional(denoise), params, static, 0, guidance_scale=1.0)
  guided_zero = _draw(denoise, params, static, 0, guidance_scale=0.0)
  np.testing.assert_allclose(guided_zero, unconditional, atol=1e-5)
  conditional = _draw(denoise, params, static, 0, guidance_scale=1.0)
  assert np.abs(conditional - unconditional).max() > 1e-3  # The condition matters.
