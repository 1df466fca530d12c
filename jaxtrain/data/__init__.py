"""ABR data: sources, patient-level split, training-split normalisation and batches.

  ds = data.load_dataset(config)   # reads config.data.*
  ds.train / ds.val / ds.test      # dict of [N, ...] arrays: the batch keys + 'patient_id'
  ds.normalizer.to_units('peak_latency', x)   # back to ms (µV, dB, static units)
  data.train_batches(ds.train, 16, seed=0, epoch=1)

Sources (`config.data.source`): 'synthetic' (the built-in physiological generator,
`synthetic.py`), 'pickle' (the original's joblib file at `config.data.path`, read without
running code from it, `original_pickle.py`) and 'npz' (that file converted once by
`python -m jaxtrain.data.convert`). Each gives records in units; `load_dataset` splits them by
patient, fits the standardisation on the training split and builds the batch format:

  signal f32 [N, 200] z-scored per trace; clean f32 [N, 200] (synthetic only) scaled with the
  same per-trace mean/sd; static f32 [N, 4] standardised; peak_mask f32 [N]; peak_latency,
  peak_amplitude f32 [N] standardised, 0 where absent; label i32 [N]; threshold f32 [N]
  standardised, 0 where unknown; threshold_mask f32 [N]; patient_id i64 [N].

A batch (`train_batches`, `eval_batches`) holds these keys but patient_id, [B, ...], and
mask f32 [B]: 1 for a recording, 0 for a padding row of the last evaluation batch.
"""

import dataclasses
import logging

import numpy as np

from jaxtrain.data import npz
from jaxtrain.data import original_pickle
from jaxtrain.data import splits
from jaxtrain.data import summary
from jaxtrain.data import synthetic
from jaxtrain.data.original_pickle import BadRecordError
from jaxtrain.data.original_pickle import UnsafePickleError
from jaxtrain.data.pipeline import eval_batches
from jaxtrain.data.pipeline import num_train_batches
from jaxtrain.data.pipeline import prefetch_to_device
from jaxtrain.data.pipeline import stack_updates
from jaxtrain.data.pipeline import train_batches
from jaxtrain.data.splits import Normalizer

__all__ = ['Dataset', 'load_dataset', 'load_records', 'build_dataset', 'Normalizer',
           'NORMALIZER_FILE', 'split_records', 'standardize_traces', 'train_batches',
           'num_train_batches', 'eval_batches', 'prefetch_to_device', 'stack_updates',
           'BadRecordError', 'UnsafePickleError']

NORMALIZER_FILE = 'normalizer.json'  # A run's training-split normaliser, in its workdir.
NUM_CLASSES = synthetic.NUM_CLASSES
CLASS_NAMES = synthetic.CLASS_NAMES
_MIN_TRACE_STD = 1e-8  # Flat traces are centred but not scaled (as the original did).


@dataclasses.dataclass
class Dataset:
  train: dict
  val: dict
  test: dict
  normalizer: Normalizer
  class_weights: np.ndarray  # f32 [5], 'balanced' n / (K n_k) on the train split.
  info: dict  # JSON-able: source, rows/patients/classes per split, summary statistics.


def load_dataset(config):
  """Loads `config.data.source`, splits it by patient and standardises it (train stats)."""
  records, info = load_records(config.data)
  return build_dataset(records, info, config.data)


def load_records(data_config):
  """Records in units (see `original_pickle.to_records`) and a JSON-able info dict."""
  source = data_config.source
  if source == 'synthetic':
    s = data_config.synthetic
    records = synthetic.generate(s.num_patients, s.recordings_per_patient, s.sample_period_ms,
                                 s.seed)
    return records, {'source': source, 'sample_period_ms': s.sample_period_ms,
                     'generator_seed': s.seed}
  if source == 'pickle':
    obj = original_pickle.load(_path(data_config))
    records, meta = original_pickle.to_records(obj, data_config.on_bad_record, data_config.path)
    # Name records by their index in the file, past the malformed ones that were skipped.
    index = np.setdiff1d(np.arange(meta['records_in_file']), meta['skipped_indices'])
  elif source == 'npz':
    records, meta = npz.read(_path(data_config))
    index = np.arange(len(records['label']))
  else:
    raise ValueError(f"config.data.source must be 'synthetic', 'pickle' or 'npz', not "
                     f'{source!r}.')
  records, meta['flat_traces'] = _flat_traces(records, index, data_config)
  return records, {'source': source, 'path': data_config.path, **meta}


def _flat_traces(records, index, data_config):
  """Finds the zero-variance (e.g. all-zero) traces, names them in one log line, and drops
  them if `data_config.drop_flat_traces`.

  Args:
    records: the loaded records.
    index: [N] the record number of each row in the file, for the log line.
    data_config: config.data.

  Returns:
    (records, JSON-able {'records': [file record numbers], 'dropped': bool}).
  """
  flat = np.flatnonzero(records['signal'].std(axis=1) <= _MIN_TRACE_STD)
  found = {'records': index[flat].tolist(), 'dropped': bool(data_config.drop_flat_traces)}
  if not flat.size:
    return records, found
  names = ', '.join(f'record {index[i]} (patient {records["patient_id"][i]})' for i in flat[:20])
  more = f' and {flat.size - 20} more' if flat.size > 20 else ''
  action = ('dropped (config.data.drop_flat_traces=True)' if found['dropped'] else
            'kept, centred but not scaled (config.data.drop_flat_traces=True drops them)')
  logging.warning('%s: %d zero-variance (flat) trace(s), %s: %s%s.', data_config.path,
                  flat.size, action, names, more)
  if found['dropped']:
    records = {k: np.delete(v, flat, axis=0) for k, v in records.items()}
  return records, found


def split_records(data_config, names):
  """{name: records} of the splits `names` (of 'train', 'val', 'test') of a config's data, in
  units as loaded, each in the order its rows have in `load_dataset`; the data is loaded once."""
  records, _ = load_records(data_config)
  ratios = (data_config.train_ratio, data_config.val_ratio, data_config.test_ratio)
  rows = splits.split_patients(records['patient_id'], records['label'], ratios,
                               data_config.split_seed, NUM_CLASSES)
  return {name: {k: v[rows[name]] for k, v in records.items()} for name in names}


def _path(data_config):
  if not data_config.path:
    raise ValueError(f"config.data.source='{data_config.source}' needs config.data.path.")
  return data_config.path


def build_dataset(records, info, data_config):
  """Splits records by patient, fits the normalizer on train and builds the three splits."""
  ratios = (data_config.train_ratio, data_config.val_ratio, data_config.test_ratio)
  rows = splits.split_patients(records['patient_id'], records['label'], ratios,
                               data_config.split_seed, NUM_CLASSES)
  normalizer = Normalizer.fit(records, rows['train'])
  parts = {name: _standardize(records, r, normalizer) for name, r in rows.items()}
  info = dict(info)
  info.update({
      'class_names': info.get('class_names', list(CLASS_NAMES)),
      'rows': {name: int(len(r)) for name, r in rows.items()},
      'patients': {name: int(len(np.unique(records['patient_id'][r])))
                   for name, r in rows.items()},
      'class_counts': {name: np.bincount(records['label'][r], minlength=NUM_CLASSES).tolist()
                       for name, r in rows.items()},
      'normalizer': normalizer.to_dict(),
      'summary': summary.summarize(records),
  })
  logging.info('Data %s: %d recordings of %d patients; rows %s.', info['source'],
               info['summary']['recordings'], info['summary']['patients'], info['rows'])
  return Dataset(train=parts['train'], val=parts['val'], test=parts['test'],
                 normalizer=normalizer,
                 class_weights=splits.class_weights(parts['train']['label'], NUM_CLASSES),
                 info=info)


def standardize_traces(signal):
  """Each trace z-scored on its own: (z f32 [N, L], mean [N, 1], std [N, 1]) of signal [N, L].

  A flat trace (std <= 1e-8) is centred but not scaled (as the original did).
  """
  signal = np.asarray(signal, np.float64)
  mean = signal.mean(axis=1, keepdims=True)
  std = signal.std(axis=1, keepdims=True)
  std = np.where(std > _MIN_TRACE_STD, std, 1.)
  return ((signal - mean) / std).astype(np.float32), mean, std


def _standardize(records, rows, normalizer):
  """The batch-format arrays of the recordings `rows` (see the module docstring)."""
  z, mean, std = standardize_traces(records['signal'][rows])
  out = {'signal': z}
  if 'clean' in records:
    out['clean'] = ((records['clean'][rows] - mean) / std).astype(np.float32)
  out['static'] = normalizer.standardize('static', records['static'][rows]).astype(np.float32)
  for name, mask_name in splits.TARGETS.items():
    mask = records[mask_name][rows].astype(np.float32)
    value = normalizer.standardize(name, records[name][rows])
    out[mask_name] = mask
    out[name] = np.where(mask > 0.5, value, 0.).astype(np.float32)
  out['label'] = records['label'][rows].astype(np.int32)
  out['patient_id'] = records['patient_id'][rows].astype(np.int64)
  return out
