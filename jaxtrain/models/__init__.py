"""Models: `create_model(config)` builds the multi-task hierarchical U-Net from `config.model`."""

from jaxtrain.models.unet import HierarchicalUNet


def create_model(config):
  """The HierarchicalUNet with the sizes in `config.model` (see configs/default.py).

  Use: `model.init(rng, x [B, L], static [B, 4], t [B] int32, train=False)`, then
  `model.apply({'params': p}, x, static, t, train=True, rngs={'dropout': k1, 'condition': k2})`.
  """
  m = config.model
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
      cond_drop_rate=m.cond_drop_rate,
      attention_min_length=m.attention_min_length)
