"""Models: `create_model(config)` builds the multi-task hierarchical U-Net from `config.model`."""

import jax
import jax.numpy as jnp

from jaxtrain.models.unet import HierarchicalUNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
S4_CONVS = ('fft', 'matmul', 'mixed')


def _resolve(config, key, choices, auto):
  """`config.model.<key>`, with 'auto' replaced by `auto[backend]` (else `auto['other']`)."""
  name = config.model[key]
  if name == 'auto':
    name = auto.get(jax.default_backend(), auto['other'])
  if name not in choices:
    raise ValueError(f"Unknown model.{key} {config.model[key]!r}; expected 'auto' or one of "
                     f'{tuple(choices)}.')
  return name


def compute_dtype(config):
  """The compute dtype: `model.dtype`, where 'auto' is float32 on a CPU, bfloat16 on a GPU or
  TPU."""
  return DTYPES[_resolve(config, 'dtype', DTYPES, {'cpu': 'float32', 'other': 'bfloat16'})]


def s4_conv(config):
  """How the S4D layers convolve: `model.s4_conv`, where 'auto' is the Toeplitz matmul on a TPU
  (its FFT is slow next to its matmuls) and 'mixed' elsewhere (see s4.S4D)."""
  return _resolve(config, 's4_conv', S4_CONVS, {'tpu': 'matmul', 'other': 'mixed'})


def create_model(config):
  """The HierarchicalUNet with the sizes in `config.model` (see configs/default.py), its heads
  sending the trunk `training.head_gradient_scale` x their gradient.

  Use: `model.init(rng, x [B, L], static [B, 4], t [B] int32, train=False)`, then
  `model.apply({'params': p}, x, static, t, train=True, rngs={'dropout': k1, 'condition': k2})`.
  """
  m = config.model
  head_gradient_scale = config.training.head_gradient_scale
  if not head_gradient_scale >= 0:
    raise ValueError(f'training.head_gradient_scale must be >= 0, got {head_gradient_scale!r}.')
  return HierarchicalUNet(
      n_classes=m.n_classes,
      base_channels=m.base_channels,
      max_channels=m.max_channels,
      n_levels=m.n_levels,
      n_s4_layers=m.n_s4_layers,
      d_state=m.d_state,
      n_transformer_layers=m.n_transformer_layers,
      n_heads=m.n_heads,
      dropout=m.dropout,
      head_dropout=m.head_dropout,
      cond_drop_rate=m.cond_drop_rate,
      attention_min_length=m.attention_min_length,
      s4_conv=s4_conv(config),
      dtype=compute_dtype(config),
      head_gradient_scale=head_gradient_scale)
