"""Diffusion samplers for standardised traces: DDPM and DDIM, with classifier-free guidance.

  x0 = sampling.sample(denoise, params, static, rng, alphas_cumprod=..., prediction='v',
                       length=200, method='ddim', num_steps=50, eta=0., guidance_scale=2.)

`denoise(params, x_t [B, L], static [B, S], t [B] int32, uncond [B] bool) -> [B, L]` is the
denoiser output in the run's parametrisation (`config.diffusion.prediction`); rows with
`uncond` True use the model's learned null condition. `ModelDenoiser(model)` wraps a
HierarchicalUNet.

Steps. `num_steps` noise levels T = t_1 > ... > t_S >= 1, evenly spaced, each step going to the
next (the last to t = 0, the clean trace). At each step the clean-trace estimate x0_hat is
formed, clipped (below), and x_s drawn from
  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s),
with eps_hat the noise that x0_hat implies for x_t (Song et al. 2021). eta = 0 is the
deterministic DDIM; eta = 1 makes the step the DDPM posterior q(x_s | x_t, x0_hat) (mean and
variance of Ho et al. 2020, for any stride), so 'ddpm' is this step with eta = 1.

Guidance. out = out_null + w (out_cond - out_null): w = 1 is the conditional model alone (one
pass), w = 0 the unconditional one, w > 1 pushes the samples towards their condition.

Clipping. The training traces are z-scored one by one: each has mean 0 and standard deviation 1.
The original clamped x0_hat to [-1, 1] (its defect 18), which cuts every wave peak of such a
trace (peaks reach 3-5 sd). Here x0_hat is projected onto the convex hull of that set instead:
its mean is removed and, if its standard deviation exceeds 1, it is scaled down to 1. A blurred
early estimate (sd < 1) is left alone; an overshooting one cannot run away.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import diffusion

METHODS = ('ddim', 'ddpm')


def timestep_pairs(num_timesteps, num_steps):
  """(t, s) int32 [num_steps] each: the noise level of each step and the one it goes to.

  t runs from num_timesteps down, evenly spaced; s is the next t, and 0 after the last.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in 1..{num_timesteps} (the schedule\'s steps), got '
                     f'{num_steps}.')
  levels = np.round(np.linspace(num_timesteps, 0, num_steps + 1)).astype(np.int32)
  return levels[:-1], levels[1:]


def clip_standardized(x0):
  """Projects clean-trace estimates x0 [B, L] onto {mean 0, sd <= 1} row by row."""
  centred = x0 - x0.mean(axis=-1, keepdims=True)
  sd = jnp.sqrt(jnp.mean(centred**2, axis=-1, keepdims=True))
  return centred / jnp.maximum(sd, 1.0)


def guided_output(denoise, params, x, static, t, guidance_scale):
  """Denoiser output [B, L] under classifier-free guidance of scale w (see the module doc)."""
  batch = x.shape[0]
  if guidance_scale == 1.0:  # The conditional model alone: one pass of B rows.
    return denoise(params, x, static, t, jnp.zeros(batch, bool))
  out = denoise(params, jnp.concatenate([x, x]), jnp.concatenate([static, static]),
                jnp.concatenate([t, t]),
                jnp.concatenate([jnp.zeros(batch, bool), jnp.ones(batch, bool)]))
  cond, null = out[:batch], out[batch:]
  return null + guidance_scale * (cond - null)


def denoising_step(x_t, x0_hat, abar_t, abar_s, eta, noise):
  """x_s [B, L] from x_t [B, L] and the clean estimate x0_hat [B, L] (scalars abar_t, abar_s)."""
  eps_hat = (x_t - jnp.sqrt(abar_t) * x0_hat) / jnp.sqrt(1.0 - abar_t)
  variance = eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_s - variance, 0.0))
  return jnp.sqrt(abar_s) * x0_hat + direction * eps_hat + jnp.sqrt(variance) * noise


def _resolve_eta(method, eta):
  if method == 'ddim':
    return 0.0 if eta is None else float(eta)
  if method == 'ddpm':
    if eta not in (None, 1.0):
      raise ValueError(f'eta={eta} is a DDIM setting; DDPM is the eta = 1 step. Use '
                       "method='ddim' for another eta.")
    return 1.0
  raise ValueError(f'Unknown sampler {method!r}; expected one of {METHODS}.')


@functools.partial(jax.jit, static_argnames=('denoise', 'prediction', 'length', 'method',
                                             'num_steps', 'eta', 'guidance_scale', 'clip'))
def sample(denoise, params, static, rng, *, alphas_cumprod, prediction, length, method='ddim',
           num_steps=50, eta=None, guidance_scale=1.0, clip=True):
  """Draws one trace per row of `static`: x0 [B, length], a pure function of its arguments.

  Args:
    denoise: the denoiser (see the module docstring); hashable (it is a static argument).
    params: its parameters (any pytree).
    static: [B, S] standardised conditions.
    rng: PRNG key; the same key gives the same traces.
    alphas_cumprod: [T + 1] abar_t of the training schedule (`diffusion.cosine_alphas_cumprod`).
    prediction: 'eps', 'x0' or 'v', what `denoise` outputs.
    length: trace length L.
    method: 'ddim' or 'ddpm'.
    num_steps: denoising steps (1..T).
    eta: DDIM stochasticity (None: 0); 'ddpm' takes None or 1.
    guidance_scale: classifier-free guidance scale w.
    clip: project each x0 estimate with `clip_standardized`.
  """
  eta = _resolve_eta(method, eta)
  num_timesteps = alphas_cumprod.shape[0] - 1
  t_levels, s_levels = timestep_pairs(num_timesteps, num_steps)
  batch = static.shape[0]
  init_rng, step_rng = jax.random.split(rng)
  x_init = jax.random.normal(init_rng, (batch, length), jnp.float32)

  def step(x, inputs):
    index, t_level, s_level = inputs
    t = jnp.full((batch,), t_level, jnp.int32)
    out = guided_output(denoise, params, x, static, t, guidance_scale)
    x0_hat = diffusion.predict_x0(alphas_cumprod, x, out, t, prediction)
    if clip:
      x0_hat = clip_standardized(x0_hat)
    noise = jax.random.normal(jax.random.fold_in(step_rng, index), x.shape, x.dtype)
    x = denoising_step(x, x0_hat, alphas_cumprod[t_level], alphas_cumprod[s_level], eta, noise)
    return x, None

  x0, _ = jax.lax.scan(step, x_init, (jnp.arange(num_steps), t_levels, s_levels))
  return x0


@dataclasses.dataclass(frozen=True)
class ModelDenoiser:
  """The `denoise` function of a HierarchicalUNet (inference mode): its 'signal' output.

  Hashable by the model's fields, so `sample` compiles once per model and settings.
  """
  model: object

  def __call__(self, params, x, static, t, uncond):
    return self.model.apply({'params': params}, x, static, t, train=False,
                            uncond=uncond)['signal']
