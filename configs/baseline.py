"""The original's pre-fix configuration (config.yaml at 70a213b / config_optimized_v2), to compare.

  python main.py --config=configs/baseline.py:demo --workdir=runs/baseline-demo
"""

from configs import default
from configs import presets


def get_config(preset=''):
  config = default.get_config()
  t = config.training
  t.learning_rate, t.weight_decay, t.b1, t.b2 = 2e-4, 1e-4, 0.9, 0.95
  t.batch_size, t.accumulation_steps, t.grad_clip_norm = 48, 2, 0.5
  t.warmup_epochs, t.restart_epochs, t.restart_mult, t.min_learning_rate = 5, 30, 2, 5e-7
  t.num_epochs, t.log_every_steps = 300, 25
  t.early_stopping_patience, t.early_stopping_min_delta = 50, 1e-5
  w = config.loss.weights
  w.signal, w.peak_exist, w.peak_latency, w.peak_amplitude = 1.0, 0.8, 1.2, 1.2
  w.classification, w.threshold = 1.5, 1.0
  return presets.apply(config, preset)
