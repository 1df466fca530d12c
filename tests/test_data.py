"""Tests of jaxtrain.data: synthetic generator, safe pickle loader, splits, pipeline."""

import json
import logging
import os
import pickle
import subprocess
import warnings

import jax
import numpy as np
import pytest

from configs import default
from jaxtrain import data
from jaxtrain.data import convert
from jaxtrain.data import original_pickle
from jaxtrain.data import splits
from jaxtrain.data import synthetic
import fakes  # tests/fakes.py

NORMAL, NOROPATI, SNIK, TOTAL, ITIK = range(5)


@pytest.fixture(scope='module')
def full():
  """The default-size synthetic set (2038 patients, about 52k recordings)."""
  return synthetic.generate(2038, 25.5, 0.1, seed=0)


def _config(**data_overrides):
  config = default.get_config()
  config.data.synthetic.num_patients = 120
  for key, value in data_overrides.items():
    setattr(config.data, key, value)
  return config


# --------------------------------------------------------------------------- synthetic data


def test_size_and_class_shares(full):
  n = len(full['label'])
  assert abs(n - 2038 * 25.5) <= 1
  assert len(np.unique(full['patient_id'])) == 2038
  shares = np.bincount(full['label'], minlength=5) / n * 100
  target = [79.7, 0.8, 10.6, 3.3, 5.6]
  np.testing.assert_allclose(shares, target, atol=1.0)
  for key, value in full.items():
    assert len(value) == n, key


def test_per_class_wave_v_and_threshold(full):
  label, present = full['label'], full['peak_mask'] > 0.5
  # Real V presence by class (8.1): NORMAL 79.8, NOROPATI 26.6, SNIK 62.9, TOTAL 2.2, ITIK 71.8.
  ranges = {NORMAL: (75, 85), NOROPATI: (10, 45), SNIK: (56, 70), TOTAL: (0, 6), ITIK: (64, 80)}
  for k, (lo, hi) in ranges.items():
    assert lo <= 100 * present[label == k].mean() <= hi, k
  assert 70 <= 100 * present.mean() <= 80
  # Real V latency 7.83 +- 1.71 ms in 4.8..18.47; amplitude 0.174 +- 0.157 uV.
  latency = full['peak_latency'][present]
  assert 7.0 <= latency.mean() <= 8.6 and 1.0 <= latency.std() <= 2.2
  assert latency.min() >= 4.8 and latency.max() <= 18.5
  assert np.all(full['peak_latency'][~present] == 0)
  assert np.all(full['peak_amplitude'][~present] == 0)
  assert 0.1 <= full['peak_amplitude'][present].mean() <= 0.3
  # Thresholds per class (section 7.2 / 5.1 ranges).
  ranges = {NORMAL: (5, 25), NOROPATI: (40, 90), SNIK: (30, 65), TOTAL: (90, 120),
            ITIK: (40, 70)}
  for k, (lo, hi) in ranges.items():
    assert lo <= full['threshold'][label == k].mean() <= hi, k
  assert np.all(full['threshold_mask'] == 1)


def test_physiology(full):
  label, present = full['label'], full['peak_mask'] > 0.5
  intensity = full['static'][:, 1]
  sl = intensity - full['threshold']
  # V exists exactly at and above the true threshold (neuropathy aside).
  cochlear = label != NOROPATI
  np.testing.assert_array_equal(present[cochlear], sl[cochlear] >= 0)
  # Latency-intensity: V latency falls with level.
  normal = present & (label == NORMAL)
  assert np.corrcoef(intensity[normal], full['peak_latency'][normal])[0, 1] < -0.5
  # A conductive loss shifts the whole latency-intensity curve by the air-bone gap: V is later
  # at the same stimulus level, but not at the same sensation level.
  itik = present & (label == ITIK)
  loud = (intensity >= 60) & (intensity <= 80)
  latency = full['peak_latency']
  assert latency[itik & loud].mean() > latency[normal & loud].mean() + 1.0
  mid = (sl >= 20) & (sl <= 40)
  assert abs(latency[itik & mid].mean() - latency[normal & mid].mean()) < 0.3
  # Amplitude grows with sensation level.
  assert np.corrcoef(sl[normal], full['clean'][normal].std(axis=1))[0, 1] > 0.3
  # Without a wave V, a TOTAL trace holds no response past the first 3 ms (artefact only).
  silent = (label == TOTAL) & ~present
  assert np.abs(full['clean'][silent][:, 30:]).max() < 1e-3


def test_v_at_labelled_latency(full):
  """The clean trace peaks at the labelled V latency (sample period 0.1 ms)."""
  rows = np.flatnonzero((full['peak_mask'] > 0.5) & (full['label'] == NORMAL)
                        & (full['static'][:, 1] >= 60))[:500]
  index = np.rint(full['peak_latency'][rows] / 0.1).astype(int)
  window = np.arange(-5, 6)
  local = full['clean'][rows[:, None], index[:, None] + window]
  assert np.mean(np.abs(window[local.argmax(axis=1)]) <= 1) > 0.95


def test_statics_noise_and_fmp(full):
  static = full['static']
  age, intensity, rate, fmp = static.T
  assert np.median(age) == 0 and 1.5 <= age.mean() <= 4 and np.all(age == np.floor(age))
  assert np.all(intensity % 5 == 0) and intensity.min() >= 0 and intensity.max() <= 100
  assert 38 <= intensity.mean() <= 50
  assert set(np.unique(rate)) <= set(synthetic.RATES.astype(np.float32))
  assert 32.5 <= rate.mean() <= 35
  # Real FMP: median 0.76, 20 % above 3; SNR (8.1 definition) median about 9 dB.
  assert 0.5 <= np.median(fmp) <= 1.1 and 12 <= 100 * np.mean(fmp > 3) <= 30
  snr = synthetic.snr_db(full['signal'])
  assert 7.5 <= np.median(snr) <= 11
  # FMP is tied to the response's true SNR, var(clean) / var(noise).
  true_snr = full['clean'].var(axis=1) / (full['signal'] - full['clean']).var(axis=1)
  rank = lambda x: np.argsort(np.argsort(x))
  assert np.corrcoef(rank(fmp), rank(true_snr))[0, 1] > 0.3


def test_deterministic_per_seed():
  a = synthetic.generate(30, 10, 0.1, seed=1)
  b = synthetic.generate(30, 10, 0.1, seed=1)
  c = synthetic.generate(30, 10, 0.1, seed=2)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['signal'], c['signal'])
  assert not np.array_equal(a['label'], c['label'])


def test_small_sets_keep_every_class():
  small = synthetic.generate(24, 25, 0.1, seed=0)
  assert set(np.unique(small['label'])) == set(range(5))


# --------------------------------------------------------------------------- splits


def test_split_disjoint_by_patient_and_stratified(full):
  rows = splits.split_patients(full['patient_id'], full['label'], (0.75, 0.15, 0.10), 42, 5)
  all_rows = np.concatenate(list(rows.values()))
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(full['label'])))
  patients = {name: set(full['patient_id'][r]) for name, r in rows.items()}
  assert not patients['train'] & patients['val']
  assert not patients['train'] & patients['test']
  assert not patients['val'] & patients['test']
  ids, plabel = splits.patient_labels(full['patient_id'], full['label'], 5)
  for name, ratio in zip(splits.SPLITS, (0.75, 0.15, 0.10)):
    in_split = np.isin(ids, list(patients[name]))
    for k in range(5):
      expected = ratio * np.sum(plabel == k)
      assert abs(np.sum(in_split & (plabel == k)) - expected) <= 1, (name, k)
  again = splits.split_patients(full['patient_id'], full['label'], (0.75, 0.15, 0.10), 42, 5)
  other = splits.split_patients(full['patient_id'], full['label'], (0.75, 0.15, 0.10), 7, 5)
  np.testing.assert_array_equal(rows['test'], again['test'])
  assert not np.array_equal(rows['test'], other['test'])


def test_patient_label_is_mode():
  ids, plabel = splits.patient_labels(np.array([5, 5, 5, 9, 9]), np.array([2, 2, 0, 3, 1]), 5)
  np.testing.assert_array_equal(ids, [5, 9])
  np.testing.assert_array_equal(plabel, [2, 1])  # A tie goes to the lower class.


def test_dataset_normalised_on_train():
  config = _config()
  records, info = data.load_records(config.data)
  ds = data.build_dataset(records, info, config.data)
  rows = splits.split_patients(records['patient_id'], records['label'], (0.75, 0.15, 0.10),
                               config.data.split_seed, 5)
  train = {k: v[rows['train']] for k, v in records.items()}
  present = train['peak_mask'] > 0.5
  norm = ds.normalizer
  np.testing.assert_allclose(norm.stats['static'][0], train['static'].astype(float).mean(0),
                             rtol=1e-6)
  np.testing.assert_allclose(norm.stats['peak_latency'][0],
                             train['peak_latency'][present].astype(float).mean(), rtol=1e-6)
  # Standardised targets come back in units; absent ones are 0.
  np.testing.assert_allclose(
      norm.to_units('peak_latency', ds.train['peak_latency'][present]),
      train['peak_latency'][present], atol=1e-4)
  np.testing.assert_allclose(norm.to_units('threshold', ds.train['threshold']),
                             train['threshold'], atol=1e-3)
  np.testing.assert_allclose(norm.to_units('static', ds.train['static']), train['static'],
                             atol=1e-3)
  assert np.all(ds.train['peak_latency'][~present] == 0)
  assert abs(ds.train['peak_latency'][present].mean()) < 1e-4
  # Per-trace z-score; 'clean' shares the trace's scaling.
  np.testing.assert_allclose(ds.train['signal'].mean(1), 0, atol=1e-5)
  np.testing.assert_allclose(ds.train['signal'].std(1), 1, atol=1e-4)
  raw = train['signal'][0] - train['clean'][0]
  scale = train['signal'][0].std()
  np.testing.assert_allclose((ds.train['signal'][0] - ds.train['clean'][0]) * scale, raw,
                             atol=1e-5)
  # JSON round trip of the normalizer and the info.
  again = data.Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
  np.testing.assert_allclose(again.to_units('static', np.ones(4)), norm.to_units('static',
                                                                                np.ones(4)))
  json.dumps(ds.info)
  counts = np.bincount(ds.train['label'], minlength=5)
  expected = len(ds.train['label']) / (5 * np.maximum(counts, 1))
  np.testing.assert_allclose(ds.class_weights, np.where(counts > 0, expected, 1), rtol=1e-6)
  assert ds.class_weights.dtype == np.float32
  assert sum(ds.info['rows'].values()) == len(records['label'])


# --------------------------------------------------------------------------- original pickle


def test_joblib_file_loads(tmp_path):
  joblib = pytest.importorskip('joblib')
  path = str(tmp_path / 'original.pkl')
  raw_static = fakes.original_pickle_file(path)
  ours = original_pickle.load(path)
  theirs = joblib.load(path)
  for a, b in zip(ours['data'], theirs['data']):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(ours['metadata']['fortran'], theirs['metadata']['fortran'])
  np.testing.assert_array_equal(ours['metadata']['big_endian'], np.arange(5.))
  np.testing.assert_array_equal(ours['scaler'].state['mean_'], theirs['scaler'].mean_)
  assert list(ours['label_encoder'].state['classes_']) == list(theirs['label_encoder'].classes_)

  records, meta = original_pickle.to_records(ours, 'fail', path)
  np.testing.assert_allclose(records['static'], raw_static, rtol=1e-5, atol=1e-5)
  n = len(raw_static)
  assert len(records['label']) == n and meta['skipped_records'] == 0
  np.testing.assert_array_equal(records['threshold_mask'], np.arange(n) % 5 != 0)
  assert np.all(records['threshold'][np.arange(n) % 5 == 0] == 0)  # Never invented.
  np.testing.assert_array_equal(records['peak_mask'], np.arange(n) % 4 != 0)
  assert meta['class_names'][1] == 'NÖROPATİ'


def test_pickle_and_npz_sources(tmp_path):
  path = str(tmp_path / 'original.pkl')
  fakes.original_pickle_file(path)
  ds = data.load_dataset(_config(source='pickle', path=path))
  assert ds.info['source'] == 'pickle' and 'clean' not in ds.train
  assert ds.info['threshold_method'] == 'combined'
  out = str(tmp_path / 'abr.npz')
  convert.main(['--input', path, '--output', out])
  from_npz = data.load_dataset(_config(source='npz', path=out))
  for name in splits.SPLITS:
    a, b = getattr(ds, name), getattr(from_npz, name)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


class _Payload:
  """Unpickling this would call `fn(*args)`."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize('make', [
    lambda marker: _Payload(os.system, f'touch {marker}'),
    lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
    lambda marker: _Payload(subprocess.call, ['touch', str(marker)]),
])
def test_code_payload_is_refused_without_running(tmp_path, make):
  marker = tmp_path / 'pwned'
  payload = make(marker)
  name = f'{payload.fn.__module__}.{payload.fn.__name__}'
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps({'data': [], 'x': payload}))
  with pytest.raises(data.UnsafePickleError, match=name.replace('.', r'\.')):
    original_pickle.load(str(path))
  assert not marker.exists()


def test_payload_inside_joblib_file_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'evil.pkl')
  fakes.original_pickle_file(path, edit=lambda records: records.append(
      {'signal': _Payload(os.system, f'touch {marker}')}))
  with pytest.raises(data.UnsafePickleError, match='system'):
    data.load_dataset(_config(source='pickle', path=path))
  assert not marker.exists()


def _set(index, field, value):
  def edit(records):
    if value is None:
      del records[index][field]
    else:
      records[index][field] = value
  return edit


@pytest.mark.parametrize('index,field,value,message', [
    (3, 'signal', None, 'missing'),
    (5, 'signal', np.zeros(199), 'shape'),
    (7, 'static_params', np.array([0., np.nan, 0., 0.]), 'NaN'),
    (9, 'target', np.int64(7), 'out of range'),
    (11, 'patient_id', float('nan'), 'integer'),
    (13, 'clinical_threshold', np.float64(np.inf), 'NaN or Inf'),
    (15, 'v_peak', np.array([np.nan, 0.2]), 'NaN or Inf where v_peak_mask'),
])
def test_malformed_record_reported_by_index_and_field(tmp_path, index, field, value, message):
  path = str(tmp_path / 'bad.pkl')
  fakes.original_pickle_file(path, edit=_set(index, field, value))
  with pytest.raises(data.BadRecordError, match=f"record {index}: field '{field}'.*{message}"):
    data.load_dataset(_config(source='pickle', path=path))


def test_skip_mode_counts_malformed_records(tmp_path, caplog):
  path = str(tmp_path / 'bad.pkl')

  def edit(records):
    for index, field, value in [(3, 'signal', None), (5, 'signal', np.zeros(199)),
                                (7, 'static_params', np.array([0., np.nan, 0., 0.])),
                                (9, 'target', np.int64(7))]:
      _set(index, field, value)(records)
  fakes.original_pickle_file(path, edit=edit)
  with caplog.at_level(logging.WARNING):
    ds = data.load_dataset(_config(source='pickle', path=path, on_bad_record='skip'))
  assert ds.info['skipped_records'] == 4
  assert ds.info['skipped_by_field'] == {'signal': 2, 'static_params': 1, 'target': 1}
  assert sum(ds.info['rows'].values()) == 120 - 4
  assert 'skipped 4 malformed records' in caplog.text and 'record 3' in caplog.text


@pytest.mark.parametrize('source', ['pickle', 'npz'])
def test_flat_traces_are_named_and_kept_or_dropped(tmp_path, caplog, source):
  path = str(tmp_path / 'flat.pkl')

  def edit(records):
    for index in (4, 17):  # The original's real file holds two all-zero traces.
      records[index]['signal'] = np.zeros(200)
  fakes.original_pickle_file(path, edit=edit)
  if source == 'npz':
    convert.main(['--input', path, '--output', str(tmp_path / 'flat.npz')])
    path = str(tmp_path / 'flat.npz')
  with caplog.at_level(logging.WARNING), warnings.catch_warnings():
    warnings.simplefilter('error')  # No numpy divide-by-zero warning from the summary.
    kept = data.load_dataset(_config(source=source, path=path))
  lines = [r.getMessage() for r in caplog.records if 'zero-variance' in r.getMessage()]
  assert len(lines) == 1
  assert '2 zero-variance (flat) trace(s), kept' in lines[0]
  assert 'record 4 (patient 1001), record 17 (patient 1005)' in lines[0]
  assert kept.info['flat_traces'] == {'records': [4, 17], 'dropped': False}
  assert sum(kept.info['rows'].values()) == 120
  dropped = data.load_dataset(_config(source=source, path=path, drop_flat_traces=True))
  assert sum(dropped.info['rows'].values()) == 118
  splits_ = [dropped.train, dropped.val, dropped.test]
  assert min(np.std(s['signal'], axis=1).min() for s in splits_) > 0.5


# --------------------------------------------------------------------------- pipeline


def _toy_split(n=103):
  return {'signal': np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 200), np.float32),
          'label': np.arange(n, dtype=np.int32) % 5,
          'peak_mask': np.ones(n, np.float32),
          'patient_id': np.arange(n, dtype=np.int64)}


def _rows(batches):
  return [b['signal'][:, 0].astype(int) for b in batches]


def test_train_batches_deterministic_and_resumable():
  split = _toy_split()
  assert data.num_train_batches(split, 10) == 10
  full_epoch = _rows(data.train_batches(split, 10, seed=3, epoch=2))
  assert len(full_epoch) == 10 and all(len(r) == 10 for r in full_epoch)
  seen = np.concatenate(full_epoch)
  assert len(np.unique(seen)) == 100  # No row twice; the remainder of 3 is dropped.
  again = _rows(data.train_batches(split, 10, seed=3, epoch=2))
  np.testing.assert_array_equal(full_epoch, again)
  assert not np.array_equal(full_epoch, _rows(data.train_batches(split, 10, seed=3, epoch=3)))
  assert not np.array_equal(full_epoch, _rows(data.train_batches(split, 10, seed=4, epoch=2)))
  resumed = _rows(data.train_batches(split, 10, seed=3, epoch=2, start=6))
  np.testing.assert_array_equal(resumed, full_epoch[6:])
  batch = next(data.train_batches(split, 10, seed=3, epoch=2))
  assert 'patient_id' not in batch and batch['mask'].tolist() == [1.] * 10


@pytest.mark.parametrize('count', [2, 4])
def test_process_slices_partition_the_global_batch(count):
  split = _toy_split()
  whole = _rows(data.train_batches(split, 8, seed=0, epoch=1))
  parts = [_rows(data.train_batches(split, 8, seed=0, epoch=1, start=2, process_index=i,
                                    process_count=count)) for i in range(count)]
  for b, global_rows in enumerate(whole[2:]):
    np.testing.assert_array_equal(np.concatenate([p[b] for p in parts]), global_rows)
  with pytest.raises(ValueError):
    next(data.train_batches(split, 10, seed=0, epoch=1, process_count=4))


@pytest.mark.parametrize('count', [1, 2])
def test_eval_batches_cover_every_row_once(count):
  split = _toy_split()
  per_process = [list(data.eval_batches(split, 20, process_index=i, process_count=count))
                 for i in range(count)]
  assert all(len(p) == 6 for p in per_process)  # ceil(103 / 20) for every process.
  rows, last_mask = [], None
  for b in range(6):
    batch = {k: np.concatenate([p[b][k] for p in per_process]) for k in per_process[0][b]}
    rows.append(batch['signal'][batch['mask'] > 0, 0].astype(int))
    last_mask = batch['mask']
    assert batch['signal'].shape == (20, 200)
  np.testing.assert_array_equal(np.concatenate(rows), np.arange(103))
  assert last_mask.sum() == 3


def test_prefetch_to_device():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  split = _toy_split()
  size = 4 * jax.device_count()
  host = list(data.eval_batches(split, size))
  device = list(data.prefetch_to_device(data.eval_batches(split, size), sharding, size=2))
  assert len(device) == len(host)
  for h, d in zip(host, device):
    assert isinstance(d['signal'], jax.Array) and d['signal'].sharding == sharding
    for key in h:
      np.testing.assert_array_equal(np.asarray(d[key]), h[key])
