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
  """Writes a file in the original layout with joblib.dump and real scikit-learn objects.

  Returns the raw static parameters [N, 4] (units) that were z-scored into the file.
  """
  joblib = pytest.importorskip('joblib')
  preprocessing = pytest.importorskip('sklearn.preprocessing')
  rng = np.random.default_rng(0)
  n = n_patients * per_patient
  raw_static = np.stack([rng.integers(0, 5, n), 5 * rng.integers(0, 21, n),
                         np.full(n, 33.1), rng.gamma(1., 2., n)], axis=1).astype(np.float64)
  scaler = preprocessing.StandardScaler().fit(raw_static)
  names = np.array(['NORMAL', 'NÖROPATİ', 'SNİK', 'TOTAL', 'İTİK'], dtype=object)
  encoder = preprocessing.LabelEncoder().fit(names[rng.integers(0, 5, 50)].tolist() + list(names))
  records = []
  for i in range(n):
    signal = rng.standard_normal(200)
    has_v = bool(i % 4)
    record = {
        'patient_id': 1000 + i // per_patient,
        'static_params': scaler.transform(raw_static[i:i + 1])[0],
        'signal': (signal - signal.mean()) / signal.std(),
        'v_peak': np.array([7.5 + 0.01 * i, 0.2]) if has_v else np.zeros(2),
        'v_peak_mask': np.array([has_v, has_v]),
        'target': np.int64((i // per_patient) % 5),
    }
    if i % 5:
      record['clinical_threshold'] = np.float64(20 + i % 50)
    records.append(record)
  if edit:
    edit(records)
  obj = {'data': records, 'scaler': scaler, 'label_encoder': encoder,
         'metadata': {'version': 'ultimate_v1', 'fortran': np.asfortranarray(
             np.arange(12.).reshape(3, 4)), 'big_endian': np.arange(5, dtype='>f8')},
         'has_clinical_thresholds': True, 'threshold_method': 'combined'}
  joblib.dump(obj, path)
  return raw_static
