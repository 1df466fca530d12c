"""Using a trained run: loading it (jaxtrain/inference.py), `python -m jaxtrain.predict` on the
input formats, `python -m jaxtrain.generate` and the generation-quality report, on a saved
`:test` run."""

import csv
import json
import logging
import os
import shutil
import types

import numpy as np
import pytest

from configs import convergence
from jaxtrain import data
from jaxtrain import generate
from jaxtrain import generation_quality
from jaxtrain import inference
from jaxtrain import predict
from jaxtrain import report
from jaxtrain.data import npz
from jaxtrain.data import plain_csv
import fakes  # tests/fakes.py


def _read_csv(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _write_plain_csv(path, static, signal, header=True, extra_rows=()):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(['age', 'intensity', 'rate', 'fmp'] + [f's{i}' for i in range(200)])
    for s, x in zip(static, signal):
      writer.writerow([repr(float(v)) for v in np.concatenate([s, x])])
    for row in extra_rows:
      writer.writerow(row)


def test_predict_cli_reproduces_the_runs_test_predictions(saved_test_run, tmp_path):
  config, workdir = saved_test_run
  test = data.split_records(config.data, ['test'])['test']
  saved = np.load(os.path.join(workdir, 'predictions', 'test.npz'))
  np.testing.assert_array_equal(test['patient_id'], saved['patient_id'])  # Same rows, order.
  npz.write(str(tmp_path / 'test.npz'), test, {})
  _write_plain_csv(tmp_path / 'test.csv', test['static'], test['signal'])
  logits = saved['class_logits'].astype(np.float64)
  expected = {'p_' + name: np.exp(logits[:, k]) / np.exp(logits).sum(1)
              for k, name in enumerate(inference.CLASS_NAMES)}
  expected.update(v_probability=1 / (1 + np.exp(-saved['peak_exist_logit'].astype(np.float64))),
                  v_latency_ms=saved['latency_pred_ms'], v_amplitude_uv=saved['amplitude_pred_uv'],
                  threshold_db=saved['threshold_pred_db'])
  for source in ('test.npz', 'test.csv'):
    out = tmp_path / f'{source}.predictions.csv'
    predict.main([f'--workdir={workdir}', f'--input={tmp_path / source}', f'--output={out}'])
    got = _read_csv(out)
    assert len(got['input_row']) == len(test['label'])
    worst = {k: float(np.abs(got[k].astype(np.float64) - v).max()) for k, v in expected.items()}
    assert max(worst.values()) < 1e-4, (source, worst)
    names = np.asarray(inference.CLASS_NAMES)[saved['class_pred']]
    np.testing.assert_array_equal(got['class'], names)
    for spread in ('v_latency_sd_ms', 'v_amplitude_sd_uv', 'threshold_sd_db'):
      assert (got[spread].astype(float) > 0).all(), spread
  # The npz rows are numbered by record index, the CSV rows by file line (header = line 1).
  np.testing.assert_array_equal(_read_csv(tmp_path / 'test.npz.predictions.csv')['input_row'],
                                np.arange(len(test['label'])).astype(str))
  np.testing.assert_array_equal(_read_csv(tmp_path / 'test.csv.predictions.csv')['input_row'],
                                np.arange(2, len(test['label']) + 2).astype(str))


def test_malformed_csv_rows_are_reported_by_line(saved_test_run, tmp_path, caplog):
  _, workdir = saved_test_run
  rng = np.random.default_rng(0)
  good = rng.normal(size=(3, 200))
  static = np.asarray([[1, 70, 33.1, 0.9], [0, 50, 33.1, 1.4], [4, 90, 21.1, 3.0]])
  row = lambda s, x: [str(v) for v in np.concatenate([s, x])]
  nan_row = row(static[0], good[0])
  nan_row[4 + 37] = 'nan'
  missing_fmp = row(static[1], good[1])
  missing_fmp[3] = ''
  bad = [row(static[0], good[0][:150]), nan_row, missing_fmp,
         row(static[2], good[2])[:-1] + ['abc']]
  path = tmp_path / 'mixed.csv'
  _write_plain_csv(path, static, good, extra_rows=bad)  # Lines 2-4 good, 5-8 bad.
  out = tmp_path / 'out.csv'
  with pytest.raises(plain_csv.BadRowError) as error:
    predict.main([f'--workdir={workdir}', f'--input={path}', f'--output={out}'])
  message = str(error.value)
  for expected in ('4 malformed row(s)', 'line 5: 154 fields, expected 204',
                   'line 6: sample 37 is nan', 'line 7: fmp is missing',
                   "line 8: sample 199 is 'abc', not a number"):
    assert expected in message, message
  assert not out.exists()
  with caplog.at_level(logging.WARNING):
    predict.main([f'--workdir={workdir}', f'--input={path}', f'--output={out}',
                  '--on_bad_record=skip'])
  assert 'skipped 4 malformed row(s)' in caplog.text and 'line 7: fmp is missing' in caplog.text
  got = _read_csv(out)
  np.testing.assert_array_equal(got['input_row'], ['2', '3', '4'])
  np.testing.assert_allclose(got['intensity_db'].astype(float), static[:, 1])


def test_predict_reads_the_original_pickle_and_names_bad_records(saved_test_run, tmp_path):
  _, workdir = saved_test_run
  path = str(tmp_path / 'original.pkl')
  raw_static = fakes.original_pickle_file(path, edit=lambda records: records[7].update(
      static_params=np.array([0., np.nan, 0., 0.])))
  out = tmp_path / 'out.csv'
  with pytest.raises(data.BadRecordError, match="record 7: field 'static_params'"):
    predict.main([f'--workdir={workdir}', f'--input={path}', f'--output={out}'])
  predict.main([f'--workdir={workdir}', f'--input={path}', f'--output={out}',
                '--on_bad_record=skip'])
  got = _read_csv(out)
  rows = got['input_row'].astype(int)
  np.testing.assert_array_equal(rows, np.delete(np.arange(len(raw_static)), 7))
  np.testing.assert_allclose(got['intensity_db'].astype(float), raw_static[rows, 1], atol=1e-4)
  assert got['patient_id'][0] == '1000'
  assert np.isfinite(got['threshold_db'].astype(float)).all()


def test_csv_header_must_name_the_statics(tmp_path):
  path = tmp_path / 'h.csv'
  path.write_text('intensity,age,rate,fmp\n' + ','.join(['1'] * 204) + '\n')
  with pytest.raises(plain_csv.BadRowError, match='line 1 is a header'):
    plain_csv.read(str(path), 200, 'fail')
  path.write_text(','.join(['1'] * 204) + '\n\n' + ','.join(['2'] * 204) + '\n')  # No header.
  static, signal, lines = plain_csv.read(str(path), 200, 'fail')
  assert signal.shape == (2, 200) and lines.tolist() == [1, 3] and static[1, 0] == 2


def _copy_run(workdir, tmp_path, edit_config=None):
  """A copy of the run's files (with `edit_config` applied to its config.json)."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('compilation_cache'))
  if edit_config is not None:
    path = os.path.join(copy, 'config.json')
    with open(path) as f:
      config = json.load(f)
    edit_config(config)
    with open(path, 'w') as f:
      json.dump(config, f)
  return copy


def test_load_fills_keys_added_later_and_uses_the_best_checkpoint(saved_test_run, tmp_path,
                                                                  caplog):
  config, workdir = saved_test_run
  copy = _copy_run(workdir, tmp_path,
                   lambda c: (c['model'].pop('dtype'), c['loss'].pop('nll_beta')))
  os.remove(os.path.join(copy, data.NORMALIZER_FILE))  # Older runs: run_info.json has it.
  with caplog.at_level(logging.INFO):
    trained = inference.load(copy)
  assert "predates the keys loss.nll_beta=0.0, model.dtype='auto'" in caplog.text
  assert trained.config.model.dtype == 'auto'
  assert trained.config.loss.nll_beta == 0.0  # What the run trained with, not the default.
  with open(os.path.join(workdir, data.NORMALIZER_FILE)) as f:
    assert trained.normalizer.to_dict() == json.load(f)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert trained.step in steps
  assert inference.load(copy, step=steps[0]).step == steps[0]
  with pytest.raises(FileNotFoundError, match='no checkpoint 99999'):
    inference.load(copy, step=99999)


@pytest.mark.parametrize('edit, message', [
    (lambda c: c['model'].update(gated_skips=True),
     'keys this version of jaxtrain does not know: model.gated_skips'),
    (lambda c: c['model'].update(base_channels=12),
     'the saved parameters do not fit the model built from the run'),
])
def test_incompatible_runs_are_refused(saved_test_run, tmp_path, edit, message):
  _, workdir = saved_test_run
  with pytest.raises(inference.IncompatibleRunError, match=message):
    inference.load(_copy_run(workdir, tmp_path, edit))


def test_workdir_without_its_files_is_refused(saved_test_run, tmp_path):
  _, workdir = saved_test_run
  copy = _copy_run(workdir, tmp_path)
  os.remove(os.path.join(copy, data.NORMALIZER_FILE))
  os.remove(os.path.join(copy, 'run_info.json'))
  with pytest.raises(inference.IncompatibleRunError, match='no normalizer.json'):
    inference.load(copy)
  with pytest.raises(inference.IncompatibleRunError, match='no config.json'):
    inference.load(str(tmp_path))


def test_generate_cli_writes_traces_with_conditions_and_readings(saved_test_run, tmp_path):
  _, workdir = saved_test_run
  conditions = tmp_path / 'conditions.csv'
  conditions.write_text('age,intensity,rate,fmp\n0,80,33.1,2.0\n3,30,33.1,0.6\n')
  paths = [tmp_path / name for name in ('a.npz', 'b.npz', 'c.npz')]
  for path, seed in zip(paths, (0, 0, 1)):
    generate.main([f'--workdir={workdir}', f'--conditions={conditions}', '--num=3',
                   '--steps=5', f'--seed={seed}', '--guidance=2', f'--output={path}'])
  a, b, c = (np.load(p) for p in paths)
  assert a['signal'].shape == (6, 200) and np.isfinite(a['signal']).all()
  np.testing.assert_array_equal(a['condition'], [0, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(a['static'][3], [3, 30, 33.1, 0.6], rtol=1e-6)
  np.testing.assert_allclose(a['signal'].mean(1), 0, atol=1e-5)  # Standardised traces.
  assert a['class_prob'].shape == (6, 5) and np.isfinite(a['threshold_db']).all()
  assert a['guidance_scale'] == 2 and a['num_steps'] == 5
  np.testing.assert_array_equal(a['signal'], b['signal'])  # Same seed, same traces.
  assert np.abs(a['signal'] - c['signal']).max() > 0.1
  with pytest.raises(ValueError, match='Missing --fmp'):
    generate.main([f'--workdir={workdir}', '--age=1', '--intensity=60', '--rate=33',
                   f'--output={tmp_path / "d.npz"}'])


def test_condition_clean_averages_the_nearest_train_recordings_at_the_intensity(monkeypatch):
  monkeypatch.setattr(generation_quality, 'CONDITION_NEIGHBOURS', 2)
  t = np.arange(200)
  bumps = np.exp(-0.5 * ((t - 20.0 * np.arange(1, 7)[:, None]) / 3.0) ** 2)  # [6, 200]
  # Ages 0, 1, 2, 10, 20 at 60 dB, and age 1.1 at 40 dB; rate and FMP equal.
  static = np.array([[a, level, 21.1, 1.0] for a, level in
                     ((0, 60), (1, 60), (2, 60), (10, 60), (20, 60), (1.1, 40))])
  train = {'static': static, 'clean': bumps, 'signal': 3.0 * bumps + 1.0}
  got = generation_quality.condition_clean(train, np.array([[1.4, 60.0, 21.1, 1.0]]))
  # Each clean trace in the unit of its recorded trace (z-scored with the recording's mean, sd).
  signal = train['signal']
  z = (bumps - signal.mean(1, keepdims=True)) / signal.std(1, keepdims=True)
  np.testing.assert_allclose(got[0], (z[1] + z[2]) / 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='No train recording at 80 dB'):
    generation_quality.condition_clean(train, np.array([[1.0, 80.0, 21.1, 1.0]]))


def test_generation_quality_lands_in_the_report(saved_test_run, tmp_path):
  _, workdir = saved_test_run
  copy = _copy_run(workdir, tmp_path)
  settings = generate.SamplerSettings(num_steps=3, seed=0)
  path = generation_quality.evaluate(copy, num=2, per_cell=1, settings=settings)
  samples = np.load(path)
  c = len(samples['label'])
  assert c > 0 and samples['generated'].shape == (c, 2, 200)
  assert (samples['latency_ms'] > 0).all()  # Conditions are recordings with a wave V.
  assert (np.std(samples['clean'], axis=1) > 0).all()
  assert samples['condition_clean'].shape == (c, 200)
  text = open(report.write_report(copy)).read()
  assert '| 9. generated traces match the clean ones (synthetic data) |' in text
  assert f'{c} conditions x 2 traces: mean r' in text
  assert os.path.exists(os.path.join(copy, 'report', 'generation_latency.png'))


def test_readings_give_each_distributions_sd():
  """The spread of a wave-V reading is exp(log-scale) x the unit's sd for a Gaussian head and
  sqrt(2) times that for a Laplace one (its sd); the threshold's stays Gaussian."""
  stats = {'peak_latency': (7.0, 1.5), 'peak_amplitude': (0.2, 0.1), 'threshold': (40.0, 20.0)}
  normalizer = types.SimpleNamespace(stats=stats,
                                     to_units=lambda key, z: z * stats[key][1] + stats[key][0])
  log_scale = np.log([0.5, 2.0])
  outputs = {key: np.stack([[0.0, 1.0], log_scale], -1) for key in stats}
  outputs.update(peak_exist=np.zeros(2), class_logits=np.zeros((2, 5)))
  config = convergence.get_config('test')
  gaussian = inference.readings(outputs, normalizer, config)
  config.loss.peak_nll = 'laplace'
  laplace = inference.readings(outputs, normalizer, config)
  np.testing.assert_allclose(gaussian['v_latency_ms'], [7.0, 8.5])
  np.testing.assert_allclose(gaussian['v_amplitude_sd_uv'], [0.05, 0.2])
  for name in ('v_latency_sd_ms', 'v_amplitude_sd_uv'):
    np.testing.assert_allclose(laplace[name], np.sqrt(2) * gaussian[name])
  np.testing.assert_allclose(laplace['threshold_sd_db'], gaussian['threshold_sd_db'])
  np.testing.assert_allclose(laplace['threshold_sd_db'], [10.0, 40.0])
