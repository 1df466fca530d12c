"""The learning benchmark's parts (no model training): the original-layout writer, the
gradient-boosting reference and the comparison table."""

import json

import numpy as np
import pytest

from benchmarks import learning  # Needs scikit-learn and joblib (requirements-dev.txt).
from configs import default
from jaxtrain import data
from jaxtrain import evaluation


def test_combined_threshold_formula():
  # NORMAL at the mean intensity with V at 5.5 ms; TOTAL without V at a high level; NORMAL
  # clipped at 0; NOROPATI clipped at 120 by its noise.
  thr = learning.combined_threshold(
      label=np.array([0, 3, 0, 1]), z_intensity=np.array([0., 50., -50., 50.]),
      present=np.array([True, False, True, True]), latency_ms=np.array([5.5, 0., 0., 20.]),
      noise_db=np.array([0., 0., 0., 50.]))
  np.testing.assert_allclose(thr, [17.5 - 8., 77.5 + 15. + 12., 0., 120.])


def test_original_layout_round_trips_through_the_pickle_reader(tmp_path):
  path = str(tmp_path / 'original.pkl')
  sim = learning.write_original(path, num_patients=8, seed=3)
  config = default.get_config()
  config.data.source, config.data.path = 'pickle', path
  records, info = data.load_records(config.data)

  n = len(sim['label'])
  assert len(records['label']) == n and info['skipped_records'] == 0
  assert info['class_names'] == list(learning.ORIGINAL_CLASS_NAMES)
  assert info['threshold_method'] == 'combined'
  np.testing.assert_array_equal(records['label'], sim['label'])
  np.testing.assert_array_equal(records['patient_id'], sim['patient_id'])
  np.testing.assert_allclose(records['static'], sim['static'], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(records['peak_mask'], sim['peak_mask'])
  np.testing.assert_allclose(records['peak_latency'], sim['peak_latency'], rtol=1e-6)
  np.testing.assert_allclose(records['peak_amplitude'], sim['peak_amplitude'], rtol=1e-6)
  # The same traces, each z-scored on its own.
  np.testing.assert_allclose(records['signal'].mean(1), 0., atol=1e-5)
  np.testing.assert_allclose(records['signal'].std(1), 1., atol=1e-4)
  assert evaluation.rowwise_pearson(records['signal'], sim['signal']).min() > 0.9999

  # Every recording has the 'combined' threshold: in [0, 120], and where the formula's fixed
  # part lies well inside, that part plus N(0, 3^2) (the intensity z-scored over all records).
  thr = records['threshold']
  assert records['threshold_mask'].all() and thr.min() >= 0. and thr.max() <= 120.
  intensity = sim['static'][:, 1].astype(np.float64)
  z = (intensity - intensity.mean()) / intensity.std()
  present = sim['peak_mask'] > 0.5
  fixed = (np.array([17.5, 65., 37.5, 77.5, 57.5])[sim['label']] + 15. * np.tanh(z)
           + np.where(present, -8. + np.clip(2. * (sim['peak_latency'] - 5.5), -5., 10.), 12.))
  inside = (fixed > 15.) & (fixed < 105.)
  assert inside.sum() > 100
  noise = thr[inside] - fixed[inside]
  assert np.abs(noise).max() < 15. and 2.5 < noise.std() < 3.5 and abs(noise.mean()) < 0.6


def _known_answer_dataset(n_patients=100, per_patient=6):
  """A dataset whose targets follow from the inputs: the class from the age, wave V (present
  above 30 dB) a bump in the trace at a latency set by class and intensity, its amplitude by
  the intensity, the threshold by the class."""
  rng = np.random.default_rng(1)
  n = n_patients * per_patient
  patient = np.repeat(np.arange(n_patients), per_patient)
  label = patient % 5
  age = 10. * label + rng.uniform(0., 5., n)
  intensity = rng.uniform(0., 100., n)
  present = intensity > 30.
  latency = 5. + label + 0.03 * (100. - intensity)
  amplitude = 0.005 * intensity
  t = np.arange(200) * 0.1
  bump = np.exp(-0.5 * ((t[None, :] - latency[:, None]) / 0.3) ** 2)
  signal = 0.05 * rng.standard_normal((n, 200)) + (present * amplitude)[:, None] * bump
  records = {
      'signal': signal.astype(np.float32),
      'static': np.stack([age, intensity, np.full(n, 33.1), rng.gamma(1., 1., n)],
                         1).astype(np.float32),
      'peak_mask': present.astype(np.float32),
      'peak_latency': np.where(present, latency, 0.).astype(np.float32),
      'peak_amplitude': np.where(present, amplitude, 0.).astype(np.float32),
      'label': label.astype(np.int32),
      'threshold': (15. + 10. * label).astype(np.float32),
      'threshold_mask': np.ones(n, np.float32),
      'patient_id': (patient + 1).astype(np.int64),
  }
  return data.build_dataset(records, {'source': 'test'}, default.get_config().data)


def test_reference_beats_the_trivial_baseline_where_the_answer_is_known():
  ds = _known_answer_dataset()
  pred, info = learning.fit_reference(ds, max_iter=100, seed=0, threads=1)
  gb = learning.score(pred, ds.test, ds.normalizer)

  base = evaluation.compute_baselines(ds.train, ds.normalizer)
  n = len(ds.test['label'])
  median = lambda name, key: np.full(n, ds.normalizer.standardize(name, base[key]))
  trivial = learning.score({'label': np.full(n, base['class_majority']),
                            'peak_mask': np.full(n, bool(base['peak_exist_majority'])),
                            'peak_latency': median('peak_latency', 'peak_latency_median_ms'),
                            'peak_amplitude': median('peak_amplitude', 'peak_amplitude_median_uv'),
                            'threshold': median('threshold', 'threshold_median_db')},
                           ds.test, ds.normalizer)
  assert trivial['class/balanced_accuracy'] == pytest.approx(0.2)
  assert gb['class/balanced_accuracy'] > 0.9 and gb['class/macro_f1'] > 0.9
  assert gb['peak/exist_f1'] > max(0.95, trivial['peak/exist_f1'])
  for key in ('peak/latency_mae_ms', 'peak/amplitude_mae_uv', 'threshold/mae_db',
              'threshold/patient_mae_db'):
    assert gb[key] < 0.5 * trivial[key], key
  assert set(info['heads']) == {'class', 'peak_exist', 'peak_latency', 'peak_amplitude',
                                'threshold'}
  assert all(1 <= h['stage'] <= h['stages'] <= 100 for h in info['heads'].values())


def test_table_gives_ours_minus_gb_and_the_better_side():
  ours = {'class/balanced_accuracy': 0.6, 'class/balanced_accuracy@baseline': 0.2,
          'threshold/mae_db': 5.0, 'threshold/mae_db@baseline': 9.0,
          'peak/exist_f1': 0.9, 'peak/exist_f1@baseline': 0.8,
          'peak/latency_mae_ms': 0.3, 'peak/latency_mae_ms@baseline': 1.2}
  gb = {'class/balanced_accuracy': 0.5, 'threshold/mae_db': 4.0, 'peak/exist_f1': 0.9,
        'peak/latency_mae_ms': 0.5, 'threshold/patient_mae_db': 3.0}
  rows = learning.table_rows(ours, gb)
  by = {r['metric']: r for r in rows}
  assert list(by) == ['class/balanced_accuracy', 'threshold/mae_db', 'peak/latency_mae_ms',
                      'peak/exist_f1']  # The order of ROWS; no patient row without ours.
  assert by['class/balanced_accuracy']['ours_minus_gb'] == pytest.approx(0.1)
  assert by['class/balanced_accuracy']['better'] == 'ours'  # Higher is better.
  assert by['threshold/mae_db']['ours_minus_gb'] == pytest.approx(1.0)
  assert by['threshold/mae_db']['better'] == 'GB'  # Lower is better.
  assert by['peak/latency_mae_ms']['ours_minus_gb'] == pytest.approx(-0.2)
  assert by['peak/latency_mae_ms']['better'] == 'ours'
  assert by['peak/exist_f1']['better'] == 'tie'

  with_patient = learning.table_rows({**ours, 'threshold/patient_mae_db': 2.0}, gb)
  assert {r['metric']: r['better'] for r in with_patient}['threshold/patient_mae_db'] == 'ours'

  entry = {'description': 'test data', 'preset': 'test', 'epochs': 2,
           'sizes': {'recordings': {'train': 30, 'val': 6, 'test': 4},
                     'patients': {'train': 3, 'val': 1, 'test': 1}},
           'timing': {'ours_train_s': 12.0, 'gb_fit_s': 1.5, 'gb_total_s': 2.0}, 'rows': rows}
  md = learning.markdown({'native': entry})
  assert '| class balanced accuracy | 0.2 | 0.5 | 0.6 | +0.1 | ours |' in md
  assert '| threshold MAE (dB) | 9 | 4 | 5 | +1 | GB |' in md
  assert '| wave-V latency MAE (ms) | 1.2 | 0.5 | 0.3 | -0.2 | ours |' in md
  assert 'Recordings train / val / test: 30 / 6 / 4; patients 3 / 1 / 1' in md
  assert json.loads(json.dumps(entry))['rows'] == rows


def test_set_overrides_a_config_key_in_its_type_and_refuses_a_typo():
  config = default.get_config()
  learning.set_key(config, 'training.warmup_epochs=1')
  learning.set_key(config, 'training.learning_rate=3e-4')
  assert config.training.warmup_epochs == 1 and isinstance(config.training.warmup_epochs, int)
  assert config.training.learning_rate == 3e-4
  for bad in ('training.warmup_epoch=1', 'training.warmup_epochs', 'trainng.seed=1'):
    with pytest.raises(SystemExit, match='config key'):
      learning.set_key(config, bad)
  for bad, message in (('training.warmup_epochs=1.5', 'is a int'),
                       ('require_accelerator=flase', 'is a bool')):
    with pytest.raises(SystemExit, match=message):
      learning.set_key(config, bad)
  learning.set_key(config, 'require_accelerator=True')
  assert config.require_accelerator is True
