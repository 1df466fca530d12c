"""Fakes shared by the tests: predictors (evaluation, report) and a file in the original's
pickle layout (data, predict)."""

import numpy as np
import pytest


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


def original_pickle_file(path, n_patients=40, per_patient=3, edit=None):
  """Writes a file in the original layout with joblib.dump and real scikit-learn objects
  (through the learning benchmark's writer), then `edit(records)` before the dump.

  Returns the raw static parameters [N, 4] (units) that were z-scored into the file.
  """
  pytest.importorskip('joblib')
  pytest.importorskip('sklearn.preprocessing')
  from benchmarks import learning  # Here: it needs scikit-learn, checked just above.
  rng = np.random.default_rng(0)
  n = n_patients * per_patient
  raw_static = np.stack([rng.integers(0, 5, n), 5 * rng.integers(0, 21, n),
                         np.full(n, 33.1), rng.gamma(1., 2., n)], axis=1).astype(np.float64)
  i = np.arange(n)
  has_v = i % 4 != 0
  v_peak = np.where(has_v[:, None], np.stack([7.5 + 0.01 * i, np.full(n, 0.2)], axis=1), 0.)
  records, scaler, encoder = learning.original_records(
      1000 + i // per_patient, raw_static, rng.standard_normal((n, 200)), v_peak, has_v,
      (i // per_patient) % 5)
  for k in np.flatnonzero(i % 5):
    records[k]['clinical_threshold'] = np.float64(20 + k % 50)
  if edit:
    edit(records)
  learning.dump_original(path, records, scaler, encoder, {
      'version': 'ultimate_v1', 'fortran': np.asfortranarray(np.arange(12.).reshape(3, 4)),
      'big_endian': np.arange(5, dtype='>f8')})
  return raw_static
