"""Patient-level stratified split, training-split normalisation and class weights.

A patient's recordings all go to one split, so no patient is in two (the recordings of one
patient are strongly correlated). The split is stratified on the patient label, the mode of the
patient's recording classes (ties go to the lower class number; reference section 5.3). Every
statistic that is fit (standardisation of the static parameters and of the regression targets,
class weights) is fit on the training split only (the original fit its scaler on all data;
reference pitfall 16).
"""

import json

import numpy as np

SPLITS = ('train', 'val', 'test')
TARGETS = {'peak_latency': 'peak_mask', 'peak_amplitude': 'peak_mask',
           'threshold': 'threshold_mask'}  # Regression target -> mask of its known values.
_MIN_STD = 1e-6  # A constant column is centred but not scaled.


def patient_labels(patient_id, label, num_classes):
  """The patients [P] (sorted ids) and their labels [P], the mode of their recordings' classes."""
  patients, inverse = np.unique(patient_id, return_inverse=True)
  counts = np.zeros((len(patients), num_classes), np.int64)
  np.add.at(counts, (inverse, label), 1)
  return patients, counts.argmax(axis=1)


def split_patients(patient_id, label, ratios, seed, num_classes):
  """Splits the recordings by patient, stratified on the patient label.

  Within each class the patients are shuffled (numpy Generator seeded with `seed`) and cut at
  the rounded cumulative ratios, so each split gets its share of every class.

  Args:
    patient_id: [N] patient of each recording.
    label: [N] class of each recording.
    ratios: (train, val, test) shares of the patients; they must sum to 1.
    seed: split seed.
    num_classes: number of classes.

  Returns:
    dict split name -> sorted row indices [n_split] into the N recordings.
  """
  ratios = np.asarray(ratios, np.float64)
  if ratios.shape != (3,) or (ratios < 0).any() or abs(ratios.sum() - 1.) > 1e-6:
    raise ValueError(f'Split ratios must be three non-negative shares summing to 1, got '
                     f'{ratios.tolist()}.')
  patients, patient_label = patient_labels(patient_id, label, num_classes)
  rng = np.random.default_rng(seed)
  assigned = np.empty(len(patients), np.int64)
  for k in range(num_classes):
    members = rng.permutation(np.flatnonzero(patient_label == k))
    cuts = np.floor(np.cumsum(ratios)[:-1] * len(members) + 0.5).astype(int)
    for split, part in enumerate(np.split(members, cuts)):
      assigned[part] = split
  row_split = assigned[np.searchsorted(patients, patient_id)]
  return {name: np.flatnonzero(row_split == i) for i, name in enumerate(SPLITS)}


class Normalizer:
  """Standardisation of the static parameters and the regression targets, fit on train.

  Names: 'static' ([..., 4]: age yr, intensity dB, rate /s, FMP), 'peak_latency' (ms),
  'peak_amplitude' (µV) and 'threshold' (dB). A target's statistics use only the rows where
  it is known (peak_mask / threshold_mask).
  """

  def __init__(self, stats):
    """stats: name -> (mean, std), floats, or [4] arrays for 'static'."""
    self.stats = {name: (np.asarray(mean, np.float64), np.asarray(std, np.float64))
                  for name, (mean, std) in stats.items()}

  @classmethod
  def fit(cls, records, rows):
    """Fits on the recordings `rows` of `records` (dict of arrays in units, as loaded)."""
    stats = {'static': _mean_std(records['static'][rows])}
    for name, mask in TARGETS.items():
      known = records[mask][rows] > 0.5
      stats[name] = _mean_std(records[name][rows][known])
    return cls(stats)

  def to_units(self, name, x):
    """Standardised values -> units (ms, µV, dB, or the 4 static units)."""
    mean, std = self.stats[name]
    return np.asarray(x) * std + mean

  def standardize(self, name, x):
    """Values in units -> standardised values."""
    mean, std = self.stats[name]
    return (np.asarray(x) - mean) / std

  def to_dict(self):
    """JSON-able {name: {'mean': ..., 'std': ...}}."""
    return {name: {'mean': mean.tolist(), 'std': std.tolist()}
            for name, (mean, std) in self.stats.items()}

  @classmethod
  def from_dict(cls, d):
    return cls({name: (v['mean'], v['std']) for name, v in d.items()})

  def save(self, path):
    """Writes `to_dict()` as JSON to `path`."""
    with open(path, 'w') as f:
      json.dump(self.to_dict(), f, indent=2)

  @classmethod
  def load(cls, path):
    """Reads a file written by `save`."""
    with open(path) as f:
      return cls.from_dict(json.load(f))


def _mean_std(x):
  """Column mean and std of x [n] or [n, d]; (0, 1) when x is empty."""
  x = np.asarray(x, np.float64)
  if x.shape[0] == 0:
    return np.zeros(x.shape[1:]), np.ones(x.shape[1:])
  std = x.std(axis=0)
  return x.mean(axis=0), np.where(std < _MIN_STD, 1., std)


def class_weights(label, num_classes):
  """'balanced' weights n / (K n_k) [K] f32; a class absent from `label` gets 1."""
  counts = np.bincount(label, minlength=num_classes).astype(np.float64)
  weights = len(label) / (num_classes * np.maximum(counts, 1.))
  return np.where(counts > 0, weights, 1.).astype(np.float32)
