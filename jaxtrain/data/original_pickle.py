"""Reads the original project's dataset file safely, without joblib or scikit-learn.

The original wrote `ultimate_dataset_with_clinical_thresholds.pkl` with `joblib.dump`
(uncompressed; reference section 5.2). That is a pickle stream in which every numpy array is
replaced by a `joblib.numpy_pickle.NumpyArrayWrapper` record (subclass, shape, order, dtype,
allow_mmap, numpy_array_alignment_bytes) whose BUILD opcode ends a pickle frame; the array's
raw bytes follow right after it in the file, outside the pickle opcodes: one byte giving the
length of the alignment padding, that many padding bytes (joblib >= 1.2 aligns to 16), then the
data in the wrapper's order. Object arrays (e.g. the LabelEncoder's `classes_`) are instead a
complete nested pickle stream at that place.

`load` reads that format through a restricted `pickle.Unpickler`: its `find_class` admits only
numpy array and scalar reconstruction, plain-data builtins, and the wrapper, StandardScaler and
LabelEncoder classes, which come back as stand-ins that keep their state as plain data. Any
other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) is refused with
`UnsafePickleError` before it is looked up, so nothing from the file runs. The reader never
offers `peek` to the unpickler, so the file position after a wrapper's BUILD is exactly where
its array bytes start.

`to_records` then checks every record (missing field, wrong length, NaN, class out of range)
and returns the dataset in physical units: the static parameters are un-scaled with the file's
StandardScaler (fit on all the original's data, a leak we undo; reference pitfall 16) so they
can be standardised on the training split alone. The original stored missing ages as 0, the
same as newborns; the file cannot tell them apart. Records without `clinical_threshold` get
threshold_mask 0 (a threshold is never made up from the class).
"""

import builtins
import logging
import math
import os
import pickle
import unicodedata

import numpy as np

from jaxtrain.data import synthetic

SIGNAL_LENGTH = synthetic.SIGNAL_LENGTH
REQUIRED_FIELDS = ('patient_id', 'static_params', 'signal', 'v_peak', 'v_peak_mask', 'target')
SHAPES = {'static_params': (4,), 'signal': (SIGNAL_LENGTH,), 'v_peak': (2,), 'v_peak_mask': (2,)}


class UnsafePickleError(pickle.UnpicklingError):
  """The file asks for a global outside the allow-list (it could run code when loaded)."""


class BadRecordError(ValueError):
  """A record of the file is malformed; the message names its index and field."""


class SklearnState:
  """Plain-data stand-in for a pickled scikit-learn estimator: `.state` is its __dict__."""

  def __init__(self):
    self.state = {}

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f'{type(self).__name__} state is not a dict.')
    self.state = state


class StandardScalerState(SklearnState):
  """sklearn.preprocessing.StandardScaler, as data (mean_, scale_, ...)."""


class LabelEncoderState(SklearnState):
  """sklearn.preprocessing.LabelEncoder, as data (classes_)."""


class _ArrayWrapper:
  """Stand-in for joblib's NumpyArrayWrapper; BUILD reads the array bytes that follow it.

  `unpickler` is set on a per-load subclass; after BUILD, `.array` holds the array.
  """
  unpickler = None

  def __setstate__(self, state):
    self.array = self.unpickler.read_wrapped_array(state)


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # multiarray._reconstruct
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # multiarray.scalar
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
_NUMPY_CORE = ('numpy.core', 'numpy._core')  # numpy 1.x and 2.x module names.
_ALLOWED = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    **{(f'{core}.multiarray', '_reconstruct'): _NUMPY_RECONSTRUCT for core in _NUMPY_CORE},
    **{(f'{core}.multiarray', 'scalar'): _NUMPY_SCALAR for core in _NUMPY_CORE},
    **{(f'{core}.numeric', '_frombuffer'): _NUMPY_FROMBUFFER for core in _NUMPY_CORE},
    **{('builtins', name): getattr(builtins, name)  # Plain data, no code.
       for name in ('set', 'frozenset', 'complex', 'bytearray', 'slice')},
    ('sklearn.preprocessing._data', 'StandardScaler'): StandardScalerState,
    ('sklearn.preprocessing.data', 'StandardScaler'): StandardScalerState,  # scikit-learn < 0.22
    ('sklearn.preprocessing._label', 'LabelEncoder'): LabelEncoderState,
    ('sklearn.preprocessing.label', 'LabelEncoder'): LabelEncoderState,
}


class _Reader:
  """The file, without `peek`: the C unpickler then reads exactly the bytes it consumes."""

  def __init__(self, f):
    self.read, self.readinto, self.readline = f.read, f.readinto, f.readline
    self._f = f
    self._size = os.fstat(f.fileno()).st_size

  def read_exactly(self, n):
    if n > self._size - self._f.tell():
      raise pickle.UnpicklingError(f'Array of {n} bytes runs past the end of the file.')
    return self._f.read(n)


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles the original's joblib file, admitting only the globals in `_ALLOWED`."""

  def __init__(self, reader, source):
    super().__init__(reader)
    self._reader, self._source = reader, source
    self._wrapper = type('NumpyArrayWrapper', (_ArrayWrapper,), {'unpickler': self})

  def find_class(self, module, name):
    if (module, name) == ('joblib.numpy_pickle', 'NumpyArrayWrapper'):
      return self._wrapper
    found = _ALLOWED.get((module, name))
    if found is None:
      raise UnsafePickleError(
          f"{self._source}: refusing to load the global '{module}.{name}'. The original "
          'dataset holds only numpy arrays, plain Python data and scikit-learn '
          'StandardScaler/LabelEncoder state; anything else could run code when loaded, so '
          'nothing from this file was executed.')
    return found

  def read_wrapped_array(self, state):
    """Reads the bytes of the array that a NumpyArrayWrapper `state` describes."""
    dtype, shape, order = state.get('dtype'), state.get('shape'), state.get('order', 'C')
    if (state.get('subclass') is not np.ndarray or not isinstance(dtype, np.dtype)
        or not isinstance(shape, tuple) or order not in ('C', 'F')
        or not all(isinstance(d, int) and d >= 0 for d in shape)):
      raise pickle.UnpicklingError(f'{self._source}: malformed joblib array record {state!r}.')
    if dtype.hasobject:  # A nested pickle stream, read with the same restrictions.
      array = RestrictedUnpickler(self._reader, self._source).load()
      if not isinstance(array, np.ndarray):
        raise pickle.UnpicklingError(f'{self._source}: object array record is not an array.')
      return array
    if state.get('numpy_array_alignment_bytes') is not None:
      self._reader.read_exactly(self._reader.read_exactly(1)[0])
    count = math.prod(shape)
    data = self._reader.read_exactly(count * dtype.itemsize)
    array = np.frombuffer(data, dtype=dtype, count=count)
    array = array.reshape(shape[::-1]).T if order == 'F' else array.reshape(shape)
    return array.astype(dtype.newbyteorder('='), copy=False)


def load(path):
  """Unpickles a joblib file of the original's layout safely; arrays come back as ndarrays.

  Raises:
    UnsafePickleError: the file references a global outside the allow-list.
  """
  with open(path, 'rb') as f:
    if f.read(1) != pickle.PROTO:  # Protocol 2+ pickles start with PROTO; joblib's
      raise pickle.UnpicklingError(  # compressed files start with a compressor's magic.
          f'{path}: not an uncompressed joblib pickle of protocol 2 or later (compressed '
          'with joblib.dump(..., compress=...)? The original wrote it uncompressed).')
    f.seek(0)
    obj = RestrictedUnpickler(_Reader(f), path).load()
  return _unwrap(obj)


def _unwrap(obj):
  """Replaces the array wrappers in dicts, lists, tuples and estimator states by their arrays."""
  if isinstance(obj, _ArrayWrapper):
    return obj.array
  if isinstance(obj, dict):
    return {k: _unwrap(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_unwrap(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_unwrap(v) for v in obj)
  if isinstance(obj, SklearnState):
    obj.state = _unwrap(obj.state)
  return obj


def _fold(name):
  """'NÖROPATİ' -> 'NOROPATI': the class names without diacritics, upper case."""
  return unicodedata.normalize('NFKD', str(name)).encode('ascii', 'ignore').decode().upper()


def to_records(obj, on_bad_record, source=''):
  """Checks the records of a loaded file and converts them to the dataset's arrays.

  Args:
    obj: the top-level dict returned by `load`.
    on_bad_record: 'fail' (raise on the first malformed record) or 'skip' (drop and count).
    source: the file name, for messages.

  Returns:
    (records, meta): records is a dict of arrays over the N good records: 'signal' f32
    [N, 200] (as stored: z-scored per trace), 'static' f32 [N, 4] in units (age yr,
    intensity dB, rate /s, FMP), 'peak_mask', 'peak_latency' (ms), 'peak_amplitude' (µV),
    'threshold' (dB), 'threshold_mask' f32 [N], 'label' i32 [N], 'patient_id' i64 [N]; meta
    a JSON-able dict (counts of records, skipped ones by field, class names, ...).

  Raises:
    BadRecordError: a malformed record with on_bad_record='fail', or a malformed top level.
  """
  if on_bad_record not in ('fail', 'skip'):
    raise ValueError(f"data.on_bad_record must be 'fail' or 'skip', not {on_bad_record!r}.")
  if not isinstance(obj, dict) or not isinstance(obj.get('data'), list):
    raise BadRecordError(f"{source}: the top level must be a dict with a list 'data'.")
  mean, scale = _scaler(obj.get('scaler'), source)
  class_names = _class_names(obj.get('label_encoder'), source)
  data = obj['data']
  n = len(data)
  arrays = {name: np.zeros((n,) + shape, np.float64) for name, shape in SHAPES.items()}
  scalars = {name: np.zeros(n, np.float64)
             for name in ('patient_id', 'target', 'clinical_threshold')}
  has_threshold = np.zeros(n, bool)
  problems = {}  # index -> (field, problem); the first problem of each record.
  for i, record in enumerate(data):
    problem = _fill(record, i, arrays, scalars, has_threshold)
    if problem is not None:
      problems[i] = problem
      if on_bad_record == 'fail':
        break
  # Vectorised value checks on the fields that passed the shape checks.
  checks = [(name, ~np.isfinite(arrays[name]).all(axis=1), 'contains NaN or Inf')
            for name in ('static_params', 'signal')]
  checks.append(('v_peak', ~(np.isfinite(arrays['v_peak']) | (arrays['v_peak_mask'] < 0.5)).all(
      axis=1), 'is NaN or Inf where v_peak_mask marks it valid'))
  checks.append(('target', (scalars['target'] < 0) | (scalars['target'] >= len(class_names)),
                 f'class out of range 0..{len(class_names) - 1}'))
  checks.append(('clinical_threshold', has_threshold & ~np.isfinite(scalars['clinical_threshold']),
                 'is NaN or Inf'))
  for field, bad, problem in checks:
    for i in np.flatnonzero(bad):
      problems.setdefault(int(i), (field, problem))
  if problems and on_bad_record == 'fail':
    i = min(problems)
    field, problem = problems[i]
    raise BadRecordError(
        f"{source}: record {i}: field '{field}' {problem}. Fix the file, or set "
        "config.data.on_bad_record='skip' to drop malformed records.")
  keep = np.setdiff1d(np.arange(n), np.fromiter(problems, int, len(problems)))
  by_field = {}
  for field, _ in problems.values():
    by_field[field] = by_field.get(field, 0) + 1
  if problems:
    first = ', '.join(f"record {i} field '{f}' {p}" for i, (f, p) in sorted(problems.items())[:3])
    logging.warning('%s: skipped %d malformed records of %d (by field: %s); first: %s.',
                    source, len(problems), n, by_field, first)

  mask = arrays['v_peak_mask'][keep] > 0.5
  present = mask.all(axis=1)
  v_peak = arrays['v_peak'][keep]
  records = {
      'signal': arrays['signal'][keep].astype(np.float32),
      'static': (arrays['static_params'][keep] * scale + mean).astype(np.float32),
      'peak_mask': present.astype(np.float32),
      'peak_latency': np.where(present, v_peak[:, 0], 0.).astype(np.float32),
      'peak_amplitude': np.where(present, v_peak[:, 1], 0.).astype(np.float32),
      'label': scalars['target'][keep].astype(np.int32),
      'threshold': np.where(has_threshold[keep], scalars['clinical_threshold'][keep],
                            0.).astype(np.float32),
      'threshold_mask': has_threshold[keep].astype(np.float32),
      'patient_id': scalars['patient_id'][keep].astype(np.int64),
  }
  meta = {
      'file': str(source),
      'records_in_file': n,
      'skipped_records': len(problems),
      'skipped_by_field': by_field,
      'skipped_indices': sorted(problems),
      'class_names': class_names,
      'v_peak_mask_disagreements': int(np.sum(mask[:, 0] != mask[:, 1])),
      'threshold_known': int(has_threshold[keep].sum()),
      'threshold_method': str(obj.get('threshold_method', '')),
      'metadata_version': str((obj.get('metadata') or {}).get('version', '')),
  }
  if meta['threshold_method'] == 'combined':
    logging.warning("%s: the thresholds are the original's synthetic 'combined' formula, a "
                    'function of the class, the intensity and the V labels (reference pitfall '
                    '15); threshold metrics on them measure that formula.', source)
  return records, meta


def _fill(record, i, arrays, scalars, has_threshold):
  """Copies record i into the arrays; returns (field, problem) for a malformed one, else None."""
  if not isinstance(record, dict):
    return ('<record>', f'is a {type(record).__name__}, not a dict')
  for field in REQUIRED_FIELDS:
    if field not in record:
      return (field, 'is missing')
  for field, shape in SHAPES.items():
    value = record[field]
    if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype.kind not in 'biuf':
      got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
      return (field, f'has shape {got}, expected a numeric array of shape {shape}')
    arrays[field][i] = value
  for field in ('patient_id', 'target'):
    value = _integer(record[field])
    if value is None:
      return (field, f'is {record[field]!r}, expected an integer')
    scalars[field][i] = value
  threshold = record.get('clinical_threshold')
  if threshold is not None:
    if not isinstance(threshold, (int, float, np.integer, np.floating)) or isinstance(
        threshold, bool):
      return ('clinical_threshold', f'is {threshold!r}, expected a number')
    scalars['clinical_threshold'][i] = float(threshold)
    has_threshold[i] = True
  return None


def _integer(value):
  """An int from an int, numpy integer or integral finite float; None otherwise."""
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
    return int(value)
  return None


def _scaler(scaler, source):
  """(mean [4], scale [4]) that undo the file's StandardScaler on the static parameters."""
  if not isinstance(scaler, StandardScalerState):
    raise BadRecordError(f"{source}: 'scaler' is missing or not a StandardScaler; it is "
                         'needed to recover the static parameters in their units.')
  state = scaler.state
  mean = state.get('mean_') if state.get('with_mean', True) else None
  scale = state.get('scale_') if state.get('with_std', True) else None
  mean = np.zeros(4) if mean is None else np.asarray(mean, np.float64)
  scale = np.ones(4) if scale is None else np.asarray(scale, np.float64)
  if mean.shape != (4,) or scale.shape != (4,) or not np.isfinite(mean).all() or not np.isfinite(
      scale).all():
    raise BadRecordError(f"{source}: field 'scaler' has mean_/scale_ {mean}/{scale}, "
                         'expected 4 finite values each.')
  return mean, scale


def _class_names(encoder, source):
  """The LabelEncoder's classes, checked against the class order jaxtrain uses."""
  if not isinstance(encoder, LabelEncoderState):
    raise BadRecordError(f"{source}: 'label_encoder' is missing or not a LabelEncoder.")
  names = [str(c) for c in np.asarray(encoder.state.get('classes_', []), dtype=object)]
  if [_fold(c) for c in names] != list(synthetic.CLASS_NAMES):
    raise BadRecordError(f"{source}: field 'label_encoder' has classes {names}, expected "
                         f'{list(synthetic.CLASS_NAMES)} (up to diacritics) in this order.')
  return names
