"""The dataset as a plain .npz file: fast to read, no pickle (`allow_pickle=False`).

Written once from the original pickle by `python -m jaxtrain.data.convert`; read by
`data.source='npz'`. Holds the record arrays in units (as `original_pickle.to_records` returns
them) and a JSON string 'meta' describing where they came from.
"""

import json

import numpy as np

RECORD_KEYS = ('signal', 'static', 'peak_mask', 'peak_latency', 'peak_amplitude', 'label',
               'threshold', 'threshold_mask', 'patient_id')
OPTIONAL_KEYS = ('clean',)


def write(path, records, meta):
  """Writes the record arrays and the JSON-able `meta` dict to `path` (uncompressed)."""
  arrays = {k: records[k] for k in RECORD_KEYS + OPTIONAL_KEYS if k in records}
  with open(path, 'wb') as f:  # A file object keeps numpy from appending '.npz' to the name.
    np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def read(path):
  """Reads (records, meta) from a file written by `write`."""
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in RECORD_KEYS if k not in f.files]
    if missing:
      raise ValueError(f'{path}: not a jaxtrain dataset file; missing arrays {missing}.')
    records = {k: f[k] for k in RECORD_KEYS + OPTIONAL_KEYS if k in f.files}
    meta = json.loads(str(f['meta'])) if 'meta' in f.files else {}
  n = len(records['label'])
  bad = [k for k, v in records.items() if len(v) != n]
  if bad:
    raise ValueError(f'{path}: arrays {bad} do not have the {n} rows of the labels.')
  return records, meta
