"""The hierarchical U-Net: S4 encoder, S4 bottleneck, attention decoder, multi-task heads.

  x [B, 200] -> pad to a multiple of 2**n_levels (208 for 4 levels) -> stem conv
  encoder level i (length L/2**i, C_i = min(base * 2**i, max_channels)): ResBlock,
      n_s4_layers x S4Block -> skip_i;
      space-to-depth down to the next level
  bottleneck (length L/2**n_levels): ResBlock, n_s4_layers x S4Block, ResBlock
  decoder level i (deepest first): sub-pixel up, concat skip_i, ResBlock, n_s4_layers x S4Block;
      at the shortest level at least `attention_min_length` long (52 for 4 levels, 50 for 3,
      100 for 2), also n_transformer_layers x (self-attention, cross-attention to skip_i, FFN)
  crop back to [B, 200, C_0] -> heads, all from these per-time-step features (the threshold
      head also reads the class and wave-V heads' answers, without gradient to them).

Every ResBlock is FiLM-conditioned on cond = time embedding(t) + static embedding, so the
timestep and the four static parameters reach every level. In training, the static embedding
of a sample with t > 0 is replaced by a learned null condition at rate `cond_drop_rate`
(classifier-free guidance); clean inputs (t = 0, the task heads' pass) keep their condition.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models import heads
from jaxtrain.models import layers
from jaxtrain.models import s4


class Conditioning(nn.Module):
  """cond [B, dim] = MLP(sinusoidal(t)) + MLP(static or the learned null condition).

  Attributes:
    dim: condition width.
    cond_drop_rate: training-time rate of the null condition for samples with t > 0.
    dtype: compute dtype of the MLPs.
  """
  dim: int
  cond_drop_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, static, t, train, uncond=None):
    """static [B, S], t [B] int, uncond [B] bool or None -> [B, dim].

    Rows with `uncond` True get the null condition (classifier-free guidance at sampling).
    """
    time = layers.sinusoidal_embedding(t, self.dim // 4)
    dense = functools.partial(nn.Dense, self.dim, dtype=self.dtype)
    time = dense()(nn.gelu(dense()(time)))
    cond = dense()(nn.gelu(dense()(static)))
    null = self.param('null_condition', nn.initializers.normal(0.02), (self.dim,))
    if train and self.cond_drop_rate > 0:
      drop = jax.random.bernoulli(self.make_rng('condition'), self.cond_drop_rate, t.shape)
      cond = jnp.where((drop & (t > 0))[:, None], null, cond)
    if uncond is not None:
      cond = jnp.where(uncond[:, None], null, cond)
    return time + cond


class EncoderLevel(nn.Module):
  """ResBlock to `channels`, then S4 blocks: [B, L, Cin] -> [B, L, channels]."""
  channels: int
  n_s4_layers: int
  d_state: int
  dropout: float
  s4_conv: str = 'fft'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, cond, train):
    h = layers.ResBlock(self.channels, self.dropout, self.dtype)(h, cond, train)
    for _ in range(self.n_s4_layers):
      h = layers.S4Block(self.d_state, self.dropout, self.s4_conv, self.dtype)(h, train)
    return h


class Bottleneck(nn.Module):
  """ResBlock, S4 blocks, ResBlock at the shortest length: [B, l, C] -> [B, l, C]."""
  n_s4_layers: int
  d_state: int
  dropout: float
  s4_conv: str = 'fft'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, cond, train):
    channels = h.shape[-1]
    h = layers.ResBlock(channels, self.dropout, self.dtype)(h, cond, train)
    for _ in range(self.n_s4_layers):
      h = layers.S4Block(self.d_state, self.dropout, self.s4_conv, self.dtype)(h, train)
    return layers.ResBlock(channels, self.dropout, self.dtype)(h, cond, train)


class DecoderLevel(nn.Module):
  """Fuses the skip, then S4 blocks and (optionally) attention blocks.

  [B, L, C] upsampled features and skip [B, L, C] -> [B, L, C].
  """
  n_s4_layers: int
  d_state: int
  n_transformer_layers: int
  n_heads: int
  dropout: float
  s4_conv: str = 'fft'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skip, cond, train):
    channels = h.shape[-1]
    h = layers.ResBlock(channels, self.dropout, self.dtype)(
        jnp.concatenate([h, skip], axis=-1), cond, train)
    for _ in range(self.n_s4_layers):
      h = layers.S4Block(self.d_state, self.dropout, self.s4_conv, self.dtype)(h, train)
    for _ in range(self.n_transformer_layers):
      h = layers.TransformerBlock(self.n_heads, self.dropout, self.dtype)(h, skip, train)
    return h


class HierarchicalUNet(nn.Module):
  """Multi-task denoiser. Sizes: see `config.model` in configs/default.py.

  `s4_conv` ('fft', 'matmul' or 'mixed') is how the S4D layers convolve; `dtype` is the compute
  dtype (float32 or bfloat16; parameters are float32 either way, and every output is float32).
  """
  n_classes: int
  base_channels: int
  max_channels: int
  n_levels: int
  n_s4_layers: int
  d_state: int
  n_transformer_layers: int
  n_heads: int
  dropout: float
  cond_drop_rate: float
  attention_min_length: int
  head_dropout: float  # Dropout on the pooled task heads' hidden layer.
  s4_conv: str = 'fft'
  dtype: Any = jnp.float32
  head_gradient_scale: float = 1.0  # Multiplies the gradient the pooled heads send the trunk.

  def level_channels(self, level):
    return min(self.base_channels * 2**level, self.max_channels)

  @property
  def head_hidden(self):
    """Width of the pooled heads' layers."""
    return 2 * self.base_channels

  def padded_length(self, length):
    """The trace length padded to a multiple of 2**n_levels (208 for 200 and 4 levels)."""
    factor = 2**self.n_levels
    return -(-length // factor) * factor

  def s4_kernels(self, params, length):
    """The S4D kernels of every layer, each at its level's length, as the s4.KERNELS collection.

    `apply({'params': params, s4.KERNELS: kernels}, x [B, length], ...)` then equals
    `apply({'params': params}, ...)` without computing a kernel: the train step computes them
    once per optimizer update, not once per micro-batch, and pulls their gradient back to the
    S4D parameters once.
    """
    padded = self.padded_length(length)
    level_of = {'bottleneck': self.n_levels}
    level_of.update({f'{part}_{level}': level for part in ('enc', 'dec')
                     for level in range(self.n_levels)})
    layers = {(name,) + path: (layer, padded // 2**level)
              for name, level in level_of.items()
              for path, layer in s4.find_layers(params[name]).items()}
    kernels = {}
    for path, layer_kernels in s4.stacked_kernels(layers).items():
      scope = kernels
      for name in path:
        scope = scope.setdefault(name, {})
      scope.update(layer_kernels)
    return kernels

  @nn.compact
  def __call__(self, x, static, t, train=False, uncond=None):
    """Denoiser output and task predictions.

    Args:
      x: [B, signal_length] trace (noised at step t; clean at t = 0).
      static: [B, static_dim] standardised static parameters.
      t: [B] int32 diffusion step (0 = clean).
      train: dropout and condition dropout on ('dropout', 'condition' rng streams).
      uncond: optional [B] bool; True rows use the learned null condition instead of `static`.

    Returns:
      dict: 'signal' [B, L]; 'peak_exist' [B] logit; 'peak_latency', 'peak_amplitude',
      'threshold' [B, 2] (location, log_scale) in standardised units; 'class_logits' [B, n_classes].
    """
    length = x.shape[1]
    padded = self.padded_length(length)
    dtype, s4_conv = self.dtype, self.s4_conv
    cond = Conditioning(4 * self.base_channels, self.cond_drop_rate, dtype, name='condition')(
        static, t, train, uncond)

    h = jnp.pad(x, ((0, 0), (0, padded - length)))[..., None]
    h = nn.Conv(self.base_channels, (7,), name='stem', dtype=dtype)(h)
    skips = []
    for level in range(self.n_levels):
      h = EncoderLevel(self.level_channels(level), self.n_s4_layers, self.d_state, self.dropout,
                       s4_conv, dtype, name=f'enc_{level}')(h, cond, train)
      skips.append(h)
      h = layers.Downsample(self.level_channels(min(level + 1, self.n_levels - 1)), dtype,
                            name=f'down_{level}')(h)
    h = Bottleneck(self.n_s4_layers, self.d_state, self.dropout, s4_conv, dtype,
                   name='bottleneck')(h, cond, train)
    # Attention runs at one decoder level, the shortest one at least attention_min_length
    # long: coarse enough to be cheap (its cost grows as length**2), fine enough to resolve
    # the waves. S4 carries global context at every other level.
    attention_level = max([level for level in range(self.n_levels)
                           if padded // 2**level >= self.attention_min_length], default=0)
    for level in reversed(range(self.n_levels)):
      h = layers.Upsample(self.level_channels(level), dtype, name=f'up_{level}')(h)
      n_attention = self.n_transformer_layers if level == attention_level else 0
      h = DecoderLevel(self.n_s4_layers, self.d_state, n_attention, self.n_heads, self.dropout,
                       s4_conv, dtype, name=f'dec_{level}')(h, skips[level], cond, train)
    features = h[:, :length]  # [B, L, C_0]

    head_features = (features if self.head_gradient_scale == 1.0
                     else heads.scale_gradient(features, self.head_gradient_scale))

    def pooled(name, n_out, evidence=None):
      head = heads.PooledHead(n_out, self.head_hidden, self.head_dropout, dtype,
                              name=heads.module_name(name))
      return head(head_features, x, static, train, evidence)

    def located(name, evidence=None):  # (location, bounded log-scale) [B, 2].
      out = pooled(name, 2, evidence)
      return jnp.stack([out[:, 0], heads.bounded_log_scale(out[:, 1])], axis=-1)

    exist, class_logits = pooled('exist', 1)[:, 0], pooled('class', self.n_classes)
    latency, amplitude = located('latency'), located('amplitude')
    # The hearing threshold follows from the class and from where wave V is found (present or
    # not at this intensity, how late): its head reads those answers as well as the trace.
    evidence = jnp.concatenate([nn.softmax(class_logits), nn.sigmoid(exist)[:, None], latency,
                                amplitude], axis=-1)
    return {
        'signal': heads.SignalHead(dtype, name='signal_head')(features),
        'peak_exist': exist,
        'peak_latency': latency,
        'peak_amplitude': amplitude,
        'class_logits': class_logits,
        'threshold': located('threshold', evidence),
    }
