"""Building blocks of the hierarchical U-Net. Features are channels-last, [B, L, C].

Every block that can be switched to training takes `train`; dropout then draws from the
'dropout' rng stream. Length changes are reshapes plus dense layers (space-to-depth down,
sub-pixel up): XLA:CPU's ConvTranspose backward is 20-40x slower than these.

Mixed precision: `dtype` is the compute dtype of the dense, convolution and attention layers
(bfloat16 on accelerators); parameters stay float32. Norms are left at flax's default, which
reduces and returns float32, so the residual stream and the norms stay in float32 and only
the matmuls and convolutions run in `dtype`. Attention takes its softmax in float32.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtrain.models import s4

# FiLM projections start small so the condition modulates features by about 10-20 % at init.
FILM_INIT = nn.initializers.variance_scaling(0.1, 'fan_in', 'normal')


def sinusoidal_embedding(positions, dim, max_period=10_000.0):
  """Transformer-style sinusoidal embedding: [N] -> [N, dim] (cosines then sines)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = positions.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def group_norm(x):
  """GroupNorm of [B, L, C] over time and channel groups; at most 8 groups, dividing C."""
  return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]))(x)


class FiLM(nn.Module):
  """Feature-wise linear modulation by the condition vector: x * (1 + scale) + shift."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    """x [B, L, C], cond [B, D] -> [B, L, C]."""
    params = nn.Dense(2 * x.shape[-1], kernel_init=FILM_INIT, dtype=self.dtype)(nn.gelu(cond))
    scale, shift = jnp.split(params[:, None, :], 2, axis=-1)
    return x * (1.0 + scale) + shift


class ResBlock(nn.Module):
  """Pre-norm residual block of two width-3 convolutions, FiLM-conditioned in between.

  Attributes:
    channels: output channels (a 1x1 projection matches the residual when they change).
    dropout: dropout rate before the second convolution.
    dtype: compute dtype of the convolutions.
  """
  channels: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond, train):
    """x [B, L, Cin], cond [B, D] -> [B, L, channels]."""
    h = nn.Conv(self.channels, (3,), dtype=self.dtype)(nn.gelu(group_norm(x)))
    h = FiLM(self.dtype)(group_norm(h), cond)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h))
    h = nn.Conv(self.channels, (3,), dtype=self.dtype)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels, name='residual', dtype=self.dtype)(x)
    return x + h


class S4Block(nn.Module):
  """Pre-norm residual S4D block: x + Dropout(GLU(Dense(GELU(S4D(LN(x)))))).

  Attributes:
    d_state: S4D modes per channel and direction.
    dropout: dropout rate.
    conv: how S4D applies its kernels, 'fft', 'matmul' or 'mixed' (see s4.S4D).
    dtype: compute dtype of the dense layer and of the matmul convolution.
  """
  d_state: int
  dropout: float
  conv: str = 'fft'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    """[B, L, C] -> [B, L, C]."""
    h = nn.gelu(s4.S4D(self.d_state, bidirectional=True, conv=self.conv, dtype=self.dtype)(
        nn.LayerNorm()(x)))
    h = nn.glu(nn.Dense(2 * x.shape[-1], dtype=self.dtype)(h), axis=-1)
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class TransformerBlock(nn.Module):
  """Pre-norm decoder block: self-attention, cross-attention to `memory`, feed-forward (4x).

  Attributes:
    n_heads: attention heads (must divide the channel count).
    dropout: dropout rate on attention weights and on each residual branch.
    dtype: compute dtype of the projections and attention products.
  """
  n_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory, train):
    """x [B, L, C] attends to itself and to memory [B, M, C] -> [B, L, C]."""
    channels = x.shape[-1]
    drop = nn.Dropout(self.dropout, deterministic=not train)

    def attention(name):
      return nn.MultiHeadDotProductAttention(
          num_heads=self.n_heads, dropout_rate=self.dropout, deterministic=not train, name=name,
          dtype=self.dtype, attention_fn=functools.partial(nn.dot_product_attention,
                                                           force_fp32_for_softmax=True))

    h = nn.LayerNorm()(x)
    x = x + drop(attention('self_attention')(h, h))
    x = x + drop(attention('cross_attention')(nn.LayerNorm()(x), nn.LayerNorm()(memory)))
    h = nn.gelu(nn.Dense(4 * channels, dtype=self.dtype)(nn.LayerNorm()(x)))
    return x + drop(nn.Dense(channels, dtype=self.dtype)(h))


class Downsample(nn.Module):
  """Halves the length: pairs of time steps are stacked (space-to-depth) and projected."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, L, C] -> [B, L/2, channels] (L even)."""
    batch, length, channels = x.shape
    return nn.Dense(self.channels, dtype=self.dtype)(x.reshape(batch, length // 2, 2 * channels))


class Upsample(nn.Module):
  """Doubles the length by sub-pixel projection: each step emits two steps' channels."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, L, C] -> [B, 2L, channels]."""
    batch, length, _ = x.shape
    out = nn.Dense(2 * self.channels, dtype=self.dtype)(x)
    return out.reshape(batch, 2 * length, self.channels)
