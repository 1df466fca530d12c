"""Size presets shared by the run configs: `demo` (a 2-core CPU in minutes) and `test` (seconds).

Both keep what makes a config itself: its optimizer chain, loss weights, accumulation and the
schedule's shape in epochs (warm-up, cycle length, T_mult). They shrink the model, the data and
the number of epochs, and, their activations being small, run an update's micro-batches at once
(`training.accumulate_with='vmap'`, the same update computed faster).
"""

PRESETS = ('demo', 'test')


def apply(config, preset):
  """Shrinks `config` in place to `preset` ('' or None leaves it as it is)."""
  if not preset:
    return config
  if preset not in PRESETS:
    raise ValueError(f'Unknown config preset {preset!r}; expected one of {PRESETS}.')
  model = config.model
  config.training.accumulate_with = 'vmap'
  if preset == 'demo':
    model.base_channels, model.n_levels, model.d_state = 16, 3, 16
    model.n_s4_layers, model.n_transformer_layers, model.n_heads = 1, 1, 4
    config.data.synthetic.num_patients = 160
    config.training.num_epochs = 20
  else:
    model.base_channels, model.n_levels, model.d_state = 8, 2, 8
    model.n_s4_layers, model.n_transformer_layers, model.n_heads = 1, 1, 2
    config.data.synthetic.num_patients = 24
    config.training.num_epochs = 2
    config.training.eval_batch_size = 32
    config.training.log_every_steps = 1  # The tiny split gives only a few updates per epoch.
  return config
