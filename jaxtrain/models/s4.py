"""S4D: a diagonal state-space layer (Gu et al. 2022, "On the parameterization and
initialization of diagonal state space models").

Each of the H channels is a linear state-space model with N complex diagonal modes,
  x'(s) = A x(s) + B u(s),  y(s) = 2 Re(C x(s)) + D u(s),   A = -exp(log_a_real) + i a_imag,
discretised with zero-order hold at a learned step dt = exp(log_dt) (B = 1 is folded into C).
Its impulse response is the convolution kernel
  K[h, l] = 2 Re( sum_n C[h,n] (exp(dt A[h,n]) - 1) / A[h,n] * exp(dt A[h,n] l) ),  l = 0..L-1,
computed from the parameters (in float32, whatever the compute dtype) and applied
either by FFT convolution in O(L log L) or as one matmul with the kernel's Toeplitz matrix in
O(L^2). The matmul form suits TPUs, where FFTs and complex arithmetic are slow next to
matmuls and our lengths are short (L <= 208); FFT suits CPUs and GPUs.
The bidirectional layer adds a second, independent kernel applied anti-causally (to the future
samples), so the denoiser sees the whole trace.

The kernels depend on the parameters only, not on the input: a train step that runs several
micro-batches on the same parameters computes them once (`stacked_kernels`) and hands them to
every micro-batch in the variable collection KERNELS, which an S4D layer reads instead of
computing its own.
"""

import collections
from collections.abc import Mapping
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# S4D-Lin initialisation: the learned step size starts log-uniform in [DT_MIN, DT_MAX].
DT_MIN = 1e-3
DT_MAX = 1e-1
DIRECTIONS = ('forward', 'backward')  # Causal and (bidirectional layers only) anti-causal.
KERNELS = 's4_kernels'  # Variable collection of precomputed kernels, {direction: [H, L]}.
# conv='mixed': layers at most this long convolve by matmul, longer ones by FFT. The FFT's fixed
# costs (padding to 2L, transposes, three transforms) outweigh an L x L matmul at short lengths:
# the convergence-size update on the 2-core CPU took 17.30 s all by FFT, 16.46-16.56 s with this
# bound (levels of 52, 26 and 13 steps by matmul) and 16.82 s with 128 (104 steps too).
MATMUL_MAX_LENGTH = 64


def s4d_kernel(log_dt, log_a_real, a_imag, c, length):
  """The S4D convolution kernel of each channel.

  The powers exp(dt A l) are not evaluated at every lag: with l = inner * j + i, they are
  exp(dt A i) exp(dt A inner j), so only inner + outer ~ 2 sqrt(L) complex exponentials per mode
  are taken, and the sum over modes becomes real batched matmuls per channel. Evaluating
  all L of them (a complex exp, with its special-case selects, over [H, N, L]) was 31 % of the
  convergence-size update on the 2-core CPU; this form has the same float32 error against a
  float64 evaluation (tested) and runs 4.5x faster forward and backward at H 384, N 96, L 200.

  Args:
    log_dt: [H] log step size.
    log_a_real: [H, N] log of minus the real part of A (so Re A < 0: every mode decays).
    a_imag: [H, N] imaginary part of A.
    c: [H, N] complex output matrix (B = 1 folded in).
    length: kernel length L.

  Returns:
    [H, L] float32 kernel K[h, l] (module docstring).
  """
  a = -jnp.exp(log_a_real) + 1j * a_imag
  dta = jnp.exp(log_dt)[:, None] * a
  coeff = c * (jnp.exp(dta) - 1.0) / a  # zero-order-hold input matrix times C
  inner = math.isqrt(max(length - 1, 0)) + 1
  outer = -(-length // inner)
  near = jnp.exp(dta[..., None] * jnp.arange(inner))  # [H, N, inner]: exp(dt A i)
  far = coeff[..., None] * jnp.exp(dta[..., None] * (inner * jnp.arange(outer)))  # [H, N, outer]
  # 2 Re(sum_n far near) = 2 sum_n (Re far Re near - Im far Im near): two real contractions
  # (25 % faster than one over the concatenated parts, 2N long).
  contract = functools.partial(jnp.einsum, 'hnj,hni->hji', precision=jax.lax.Precision.HIGHEST)
  kernel = 2.0 * (contract(far.real, near.real) - contract(far.imag, near.imag))
  return kernel.reshape(kernel.shape[0], outer * inner)[:, :length]


def layer_kernels(params, length):
  """{direction: [H, length]} kernels of one S4D layer from the parameters it declares."""
  return {d: s4d_kernel(params[f'{d}_log_dt'], params[f'{d}_log_a_real'], params[f'{d}_a_imag'],
                        params[f'{d}_c'][..., 0] + 1j * params[f'{d}_c'][..., 1], length)
          for d in DIRECTIONS if f'{d}_log_dt' in params}


def find_layers(params, path=()):
  """{path: the parameters of one S4D layer} for every S4D layer in the parameter tree `params`,
  path being the tuple of names that leads to it."""
  if f'{DIRECTIONS[0]}_log_dt' in params:
    return {path: params}
  found = {}
  for name, sub in params.items():
    if isinstance(sub, Mapping):
      found.update(find_layers(sub, path + (name,)))
  return found


def stacked_kernels(layers):
  """The kernels of many S4D layers, one `s4d_kernel` call per distinct length.

  A kernel is computed channel by channel, so layers of one length are one call on their
  channels concatenated: 5 calls of larger ops instead of 54 for the convergence model.

  Args:
    layers: {key: (the layer's parameters, its length L)}.

  Returns:
    {key: {direction: [H, L]}}, as `layer_kernels` of each.
  """
  by_length = collections.defaultdict(list)
  for key, (params, length) in layers.items():
    by_length[length] += [(key, d, params) for d in DIRECTIONS if f'{d}_log_dt' in params]
  kernels = collections.defaultdict(dict)
  for length, group in by_length.items():
    def stack(name, group=group):
      return jnp.concatenate([params[f'{d}_{name}'] for _, d, params in group])
    c = stack('c')
    kernel = s4d_kernel(stack('log_dt'), stack('log_a_real'), stack('a_imag'),
                        c[..., 0] + 1j * c[..., 1], length)
    ends = np.cumsum([params[f'{d}_log_dt'].shape[0] for _, d, params in group])
    for (key, d, _), part in zip(group, jnp.split(kernel, ends[:-1])):
      kernels[key][d] = part
  return dict(kernels)


def fft_conv(u, causal_kernel, anticausal_kernel=None):
  """Convolves each channel of `u` with its kernel, by FFT over 2L (no wrap-around).

  Args:
    u: [B, L, H] input.
    causal_kernel: [H, L]; y[i] += sum_{j<=i} k[i-j] u[j].
    anticausal_kernel: optional [H, L]; y[i] += sum_{j>=0} k[j] u[i+j+1] (strictly future
      samples, so the present sample is counted once, by the causal kernel).

  Returns:
    [B, L, H].
  """
  length = u.shape[1]
  kernel = jnp.pad(causal_kernel, ((0, 0), (0, length)))
  if anticausal_kernel is not None:
    # Lags -1..-L sit at the end of the circular 2L-kernel, reversed.
    kernel = kernel + jnp.pad(anticausal_kernel[:, ::-1], ((0, 0), (length, 0)))
  n = 2 * length
  u_f = jnp.fft.rfft(u, n=n, axis=1)
  k_f = jnp.fft.rfft(kernel, n=n, axis=1).T  # [n//2+1, H]
  return jnp.fft.irfft(u_f * k_f[None], n=n, axis=1)[:, :length].astype(u.dtype)


def toeplitz_conv(u, causal_kernel, anticausal_kernel=None, dtype=jnp.float32):
  """`fft_conv` as a matmul: y[b, i, h] = sum_j T[h, i, j] u[b, j, h], T the kernels' Toeplitz
  matrix, T[h, i, j] = causal[h, i - j] for i >= j, anticausal[h, j - i - 1] for j > i.

  Args:
    u: [B, L, H] input.
    causal_kernel, anticausal_kernel: [H, L] as in `fft_conv` (anticausal optional).
    dtype: dtype of the matmul operands; it accumulates in float32.

  Returns:
    [B, L, H] in u's dtype.
  """
  channels, length = causal_kernel.shape
  if anticausal_kernel is None:
    anticausal_kernel = jnp.zeros_like(causal_kernel)
  # by_lag[:, L-1+d] is the kernel at lag d = i - j, for d = -(L-1)..L-1.
  by_lag = jnp.concatenate([anticausal_kernel[:, :length - 1][:, ::-1], causal_kernel], axis=1)
  # Row i of T is by_lag[L-1+i-j] for j = 0..L-1, i.e. the reversed lags from L-1-i. Tiling the
  # reversed lags and re-reading them with a row stride one shorter than their length shifts
  # each row by one: slices and reshapes only, so the kernel gradient needs no scatter.
  reversed_lags = by_lag[:, ::-1]  # [H, 2L-1]
  tiled = jnp.tile(reversed_lags, (1, length))[:, length - 1:length - 1 + length * (2 * length - 2)]
  toeplitz = tiled.reshape(channels, length, 2 * length - 2)[:, :, :length]  # [H, L, L]
  y = jnp.einsum('hij,bjh->bih', toeplitz.astype(dtype), u.astype(dtype),
                 preferred_element_type=jnp.float32)
  return y.astype(u.dtype)


def _log_dt_init(key, shape):
  return jax.random.uniform(key, shape, minval=math.log(DT_MIN), maxval=math.log(DT_MAX))


def _a_imag_init(key, shape):
  del key  # S4D-Lin: A_n = -1/2 + i pi n, the same for every channel.
  return jnp.broadcast_to(math.pi * jnp.arange(shape[-1], dtype=jnp.float32), shape)


class S4D(nn.Module):
  """Diagonal state-space convolution over time, channel-wise: [B, L, H] -> [B, L, H].

  Attributes:
    d_state: N, complex diagonal modes per channel (and per direction).
    bidirectional: add an anti-causal kernel with its own parameters.
    conv: 'fft' (`fft_conv`, in float32), 'matmul' (`toeplitz_conv`, operands in `dtype`), or
      'mixed' ('matmul' up to MATMUL_MAX_LENGTH time steps, 'fft' above).
    dtype: compute dtype of the matmul convolution.
  """
  d_state: int
  bidirectional: bool = True
  conv: str = 'fft'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u):
    """[B, L, H] -> [B, L, H]; the kernels are KERNELS' (length L) where it holds them."""
    length, channels = u.shape[1], u.shape[2]
    directions = DIRECTIONS if self.bidirectional else DIRECTIONS[:1]
    params = {}
    for direction in directions:
      shape = (channels, self.d_state)
      params[f'{direction}_log_dt'] = self.param(f'{direction}_log_dt', _log_dt_init,
                                                 (channels,))
      params[f'{direction}_log_a_real'] = self.param(
          f'{direction}_log_a_real', nn.initializers.constant(math.log(0.5)), shape)
      params[f'{direction}_a_imag'] = self.param(f'{direction}_a_imag', _a_imag_init, shape)
      # Complex normal C with unit total variance, stored as (real, imag).
      params[f'{direction}_c'] = self.param(
          f'{direction}_c', nn.initializers.normal(math.sqrt(0.5)), shape + (2,))
    if self.has_variable(KERNELS, directions[0]):
      kernels = [self.get_variable(KERNELS, d) for d in directions]
      if kernels[0].shape != (channels, length):
        # The FFT would silently cut or zero-pad a kernel of another length.
        where = '/'.join(self.scope.path)
        raise ValueError(f'{where}: given S4D kernels of shape {kernels[0].shape} for an input '
                         f'of {length} steps and {channels} channels.')
    else:
      computed = layer_kernels(params, length)
      kernels = [computed[d] for d in directions]
    d = self.param('d', nn.initializers.normal(1.0), (channels,))
    conv = self.conv
    if conv == 'mixed':
      conv = 'matmul' if length <= MATMUL_MAX_LENGTH else 'fft'
    if conv == 'fft':
      y = fft_conv(u.astype(jnp.float32), *kernels)  # rfft takes no bfloat16.
    elif conv == 'matmul':
      y = toeplitz_conv(u, *kernels, dtype=self.dtype)
    else:
      raise ValueError(f"Unknown S4D convolution {self.conv!r}; expected 'fft', 'matmul' or "
                       "'mixed'.")
    return (y + d * u).astype(u.dtype)
