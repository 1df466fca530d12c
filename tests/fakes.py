"""Fake predictors shared by the evaluation and report tests."""

import numpy as np


class AffineNormalizer:
  """Stand-in for the data normalizer: units = mean + sd * x."""
  STATS = {'peak_latency': (7.8, 1.7), 'peak_amplitude': (0.17, 0.15), 'threshold': (24.0, 21.0),
           'static': (np.array([5.0, 60.0, 30.0, 0.5]), np.array([3.0, 20.0, 10.0, 0.2]))}

  def to_units(self, name, x):
    mean, sd = self.STATS[name]
    return mean + sd * np.asarray(x)


def predictions(split, rng, collapsed, x0_reference='signal', x0_noise=0.3):
  """loss_fn-style `preds` for `split` (without 't'): the truth plus noise, or constants.

  Args:
    split: dict of the batch format for N rows.
    rng: numpy Generator (draws in a fixed order, so callers stay reproducible).
    collapsed: True for constant outputs, the original's failure.
    x0_reference: the split key the healthy reconstruction is noised from.
    x0_noise: sd of the reconstruction's noise.
  """
  n = len(split['label'])
  if collapsed:
    return {'x0_pred': np.zeros((n, 200)), 'peak_exist': np.full(n, 1.5),
            'peak_latency': np.zeros((n, 2)), 'peak_amplitude': np.zeros((n, 2)),
            'class_logits': np.tile([2.0, 0, 0, 0, 0], (n, 1)),
            'threshold': np.full((n, 2), -0.3)}
  noisy = lambda x: np.stack([x + 0.3 * rng.normal(size=n), np.zeros(n)], 1)
  return {'x0_pred': split[x0_reference] + x0_noise * rng.normal(size=(n, 200)),
          'peak_exist': 3 * (split['peak_mask'] - 0.5) + rng.normal(size=n),
          'peak_latency': noisy(split['peak_latency']),
          'peak_amplitude': noisy(split['peak_amplitude']),
          'class_logits': 3 * np.eye(5)[split['label']] + rng.normal(size=(n, 5)),
          'threshold': noisy(split['threshold'])}
