"""Metrics against hand-computed values, baselines, saved predictions (jaxtrain/evaluation.py)
and the collapse / plateau / LR detectors (jaxtrain/monitors.py)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from configs import convergence
from jaxtrain import evaluation
from jaxtrain import monitors
import fakes  # tests/fakes.py


def standardise(name, units):
  mean, sd = fakes.AffineNormalizer.STATS[name]
  return (np.asarray(units, np.float64) - mean) / sd


# ----------------------------------------------------------------------------------------------
# Small arrays, values computed by hand.

def test_binary_auc_by_hand_and_against_sklearn():
  assert evaluation.binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  # Ties count half: positives {1, 2} vs negative {1}: (0.5 + 1) / 2.
  assert evaluation.binary_auc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)
  assert evaluation.binary_auc([3.0, 3.0, 3.0, 3.0], [0, 1, 0, 1]) == pytest.approx(0.5)
  assert np.isnan(evaluation.binary_auc([0.1, 0.2], [1, 1]))
  rng = np.random.default_rng(0)
  y = rng.random(300) < 0.3
  s = np.round(rng.normal(size=300) + y, 1)  # Rounded: many ties.
  assert evaluation.binary_auc(s, y) == pytest.approx(skm.roc_auc_score(y, s))


def test_binary_f1_by_hand():
  # TP 2, FP 1, FN 1: 2*2 / (4 + 1 + 1).
  assert evaluation.binary_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(4 / 6)
  assert evaluation.binary_f1([0, 0], [0, 0]) == 0.0


def test_class_scores_by_hand():
  true, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 0]
  cm = evaluation.confusion_matrix(true, pred, 5)
  np.testing.assert_array_equal(cm[:3, :3], [[2, 1, 0], [1, 1, 0], [1, 0, 0]])
  assert cm.sum() == 6 and cm[3:].sum() == 0
  s = evaluation.class_scores(cm)
  assert s['accuracy'] == pytest.approx(0.5)
  # Recalls 2/3, 1/2, 0 over the three classes present.
  assert s['balanced_accuracy'] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
  # F1: 2*2/(3+4), 2*1/(2+2), 0/(1+0).
  assert s['macro_f1'] == pytest.approx((4 / 7 + 0.5 + 0.0) / 3)
  assert s['recall_0'] == pytest.approx(2 / 3) and s['recall_2'] == 0.0
  assert 'recall_3' not in s  # Absent from the truth: undefined, left out.
  assert s['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(true, pred))
  assert s['macro_f1'] == pytest.approx(skm.f1_score(true, pred, average='macro'))


def test_r2_pearson_snr_spread_by_hand():
  assert evaluation.r2_score([1, 2, 3, 5], [1, 2, 3, 4]) == pytest.approx(1 - 1 / 5)
  assert evaluation.r2_score([2.5] * 4, [1, 2, 3, 4]) == pytest.approx(0.0)
  assert np.isnan(evaluation.r2_score([1, 2], [3, 3]))
  true = np.array([[1.0, -1.0, 1.0, -1.0], [0.0, 1.0, 2.0, 3.0]])
  pred = np.array([[0.5, -0.5, 0.5, -0.5], [3.0, 2.0, 1.0, 0.0]])
  np.testing.assert_allclose(evaluation.rowwise_pearson(pred, true), [1.0, -1.0])
  # A constant reconstruction has no r: it scores 0, not NaN.
  np.testing.assert_allclose(evaluation.rowwise_pearson(np.zeros((1, 4)), true[:1]), [0.0])
  # Half-amplitude reconstruction: error power 1/4 of the signal's: 10 log10(4) dB.
  assert evaluation.rowwise_snr_db(pred[:1], true[:1])[0] == pytest.approx(10 * np.log10(4))
  assert evaluation.rowwise_snr_db(np.zeros((1, 4)), true[:1])[0] == pytest.approx(0.0)
  # Spread across recordings: per-sample sd over rows, RMS over samples.
  x = np.array([[0.0, 0.0], [2.0, 4.0]])
  assert evaluation.across_recordings_std(x) == pytest.approx(np.sqrt((1 + 4) / 2))
  assert evaluation.across_recordings_std(np.ones((5, 3))) == 0.0


def _small_split():
  """Six recordings, hand-chosen targets in units, and the train baselines."""
  split = {
      'signal': np.array([[1.0, -1.0, 1.0, -1.0]] * 6),
      'static': np.zeros((6, 4)),
      'peak_mask': np.array([1, 1, 1, 0, 1, 0], np.float32),
      'peak_latency': standardise('peak_latency', [6.0, 7.0, 8.0, 7.8, 9.0, 7.8]),
      'peak_amplitude': standardise('peak_amplitude', [0.1, 0.2, 0.3, 0.17, 0.4, 0.17]),
      'label': np.array([0, 0, 0, 1, 2, 0]),
      'threshold': standardise('threshold', [10.0, 20.0, 30.0, 24.0, 60.0, 24.0]),
      'threshold_mask': np.array([1, 1, 1, 0, 1, 0], np.float32),
  }
  split['threshold'][split['threshold_mask'] == 0] = 0.0
  train = dict(split, peak_mask=np.array([1, 1, 1, 1, 0, 0], np.float32),
               label=np.array([0, 0, 1, 1, 1, 2]),
               threshold_mask=np.array([1, 1, 1, 1, 1, 1], np.float32))
  train['threshold'] = standardise('threshold', [10.0, 20.0, 30.0, 40.0, 50.0, 25.0])
  return split, train


def test_compute_baselines_in_units():
  _, train = _small_split()
  b = evaluation.compute_baselines(train, fakes.AffineNormalizer())
  assert b['class_majority'] == 1
  np.testing.assert_allclose(b['class_shares'], [2 / 6, 3 / 6, 1 / 6, 0, 0])
  assert b['peak_exist_majority'] == 1 and b['peak_present_share'] == pytest.approx(4 / 6)
  assert b['peak_latency_median_ms'] == pytest.approx(np.median([6.0, 7.0, 8.0, 7.8]))
  assert b['threshold_median_db'] == pytest.approx(27.5)


def _small_preds(split):
  """Hand-chosen predictions for `_small_split`'s six rows (errors given in the test)."""
  lat_pred = np.array([6.4, 7.0, 9.2, 5.0, 9.6, 7.0])  # errors 0.4, 0, 1.2, -, 0.6 on present
  thr_pred = np.array([14.0, 20.0, 41.0, 0.0, 57.0, 0.0])  # errors 4, 0, 11, -, 3 on known
  logits = np.full((6, 5), -1.0)
  logits[np.arange(6), [0, 0, 1, 1, 2, 2]] = 1.0
  return {
      'x0_pred': split['signal'] * 0.5,
      't': np.zeros(6, np.int32),
      # Logit > 0 is present; 0.3 counts as present (the original's "> 0.5" would not).
      'peak_exist': np.array([0.3, 2.0, -1.0, -2.0, 1.0, 0.4]),
      'peak_latency': np.stack([standardise('peak_latency', lat_pred), np.zeros(6)], 1),
      'peak_amplitude': np.stack([split['peak_amplitude'], np.zeros(6)], 1),
      'class_logits': logits,
      'threshold': np.stack([standardise('threshold', thr_pred), np.zeros(6)], 1),
  }


def test_compute_metrics_by_hand():
  split, train = _small_split()
  norm = fakes.AffineNormalizer()
  baselines = evaluation.compute_baselines(train, norm)
  preds = _small_preds(split)
  m = evaluation.compute_metrics(preds, split, norm, baselines)
  assert m['signal/mse'] == pytest.approx(0.25) and m['signal/mse@baseline'] == pytest.approx(1.0)
  assert m['signal/pearson_r'] == pytest.approx(1.0)
  assert m['signal/pearson_r@baseline'] == 0.0
  assert m['signal/snr_db'] == pytest.approx(10 * np.log10(4))
  assert 'signal/clean_mse' not in m
  # Existence: pred [1,1,0,0,1,1] vs true [1,1,1,0,1,0]: 4 of 6 right, TP 3 FP 1 FN 1.
  assert m['peak/exist_accuracy'] == pytest.approx(4 / 6)
  assert m['peak/exist_f1'] == pytest.approx(6 / 8)
  assert m['peak/exist_auc'] == pytest.approx(skm.roc_auc_score([1, 1, 1, 0, 1, 0],
                                                                preds['peak_exist']))
  assert m['peak/exist_accuracy@baseline'] == pytest.approx(4 / 6)  # Always "present".
  assert m['peak/exist_auc@baseline'] == pytest.approx(0.5)
  # Latency on the 4 present rows: |err| 0.4, 0, 1.2, 0.6.
  assert m['peak/latency_mae_ms'] == pytest.approx(2.2 / 4)
  assert m['peak/latency_within_0.5ms'] == pytest.approx(2 / 4)
  assert m['peak/latency_within_1ms'] == pytest.approx(3 / 4)
  median = baselines['peak_latency_median_ms']
  assert m['peak/latency_mae_ms@baseline'] == pytest.approx(
      np.mean(np.abs(np.array([6.0, 7.0, 8.0, 9.0]) - median)))
  assert m['peak/latency_pred_std_ms@baseline'] == 0.0
  assert m['peak/latency_pred_mean_ms@baseline'] == pytest.approx(median)
  assert m['peak/amplitude_mae_uv'] == pytest.approx(0.0)
  # Class: true [0,0,0,1,2,0], pred [0,0,1,1,2,2].
  assert m['class/accuracy'] == pytest.approx(4 / 6)
  assert m['class/balanced_accuracy'] == pytest.approx((2 / 4 + 1 + 1) / 3)
  assert m['class/macro_f1'] == pytest.approx(skm.f1_score([0, 0, 0, 1, 2, 0], [0, 0, 1, 1, 2, 2],
                                                           average='macro'))
  assert m['class/recall_0'] == pytest.approx(0.5)
  # Train majority is class 1: right on 1 of 6; balanced 1/3 (recall 1 for class 1 only).
  assert m['class/accuracy@baseline'] == pytest.approx(1 / 6)
  assert m['class/balanced_accuracy@baseline'] == pytest.approx(1 / 3)
  assert m['class/top_pred_share@baseline'] == 1.0
  # Threshold on the 4 known rows: |err| 4, 0, 11, 3; true 10, 20, 30, 60 (mean 30).
  assert m['threshold/mae_db'] == pytest.approx(18 / 4)
  assert m['threshold/rmse_db'] == pytest.approx(np.sqrt((16 + 0 + 121 + 9) / 4))
  assert m['threshold/r2'] == pytest.approx(1 - 146 / (400 + 100 + 0 + 900))
  assert m['threshold/within_5db'] == pytest.approx(3 / 4)
  assert m['threshold/within_10db'] == pytest.approx(3 / 4)
  assert m['threshold/pred_std_db'] == pytest.approx(np.std([14.0, 20.0, 41.0, 57.0]))
  assert m['threshold/true_std_db'] == pytest.approx(np.std([10.0, 20.0, 30.0, 60.0]))
  assert m['threshold/mae_db@baseline'] == pytest.approx(np.mean([17.5, 7.5, 2.5, 32.5]))
  assert m['threshold/r2@baseline'] <= 0.0
  assert 'threshold/patient_mae_db' not in m  # No patient_id in the split.
  assert all(isinstance(v, float) for v in m.values())


def test_patient_threshold_weights_confident_recordings_and_averages_known_labels():
  # Patient 5: predictions 40 (sd e^0) and 70 (sd e^1: weight e^-2); labels 30 and 50.
  # Patient 2: one recording, label unknown: no score. Patient 9: a recording 120 dB off with a
  # huge log-scale (weight e^-100 relative) must not move its estimate.
  estimate, label = evaluation.patient_thresholds(
      patient_id=[5, 2, 9, 5, 9], pred_db=[40.0, 0.0, 20.0, 70.0, 140.0],
      log_scale=[0.0, 0.0, -3.0, 1.0, 47.0], true_db=[30.0, 99.0, 25.0, 50.0, 0.0],
      known=[True, False, True, True, False])
  w = np.exp(-2.0)
  np.testing.assert_allclose(estimate, [(40 + 70 * w) / (1 + w), 20.0])
  np.testing.assert_allclose(label, [40.0, 25.0])


def test_patient_threshold_metrics_beside_their_baseline():
  split, train = _small_split()
  split['patient_id'] = np.array([1, 1, 2, 2, 3, 3])
  norm = fakes.AffineNormalizer()
  baselines = evaluation.compute_baselines(train, norm)  # Train median 27.5 dB.
  m = evaluation.compute_metrics(_small_preds(split), split, norm, baselines)
  # Patients (labels from known rows 10, 20 | 30 | 60): estimates 17, 20.5, 28.5.
  assert m['threshold/patients'] == 3.0
  assert m['threshold/patient_mae_db'] == pytest.approx(np.mean([2.0, 9.5, 31.5]))
  assert m['threshold/patient_mae_db@baseline'] == pytest.approx(np.mean([12.5, 2.5, 32.5]))
  assert 'threshold/patient_within_5db' in m


def test_clean_signal_metrics_when_clean_present():
  split, train = _small_split()
  split['clean'] = split['signal'] * 0.5
  baselines = evaluation.compute_baselines(train, fakes.AffineNormalizer())
  preds = {'x0_pred': split['clean'], 't': np.zeros(6), 'peak_exist': np.ones(6),
           'peak_latency': np.zeros((6, 2)), 'peak_amplitude': np.zeros((6, 2)),
           'class_logits': np.zeros((6, 5)), 'threshold': np.zeros((6, 2))}
  m = evaluation.compute_metrics(preds, split, fakes.AffineNormalizer(), baselines)
  assert m['signal/clean_mse'] == pytest.approx(0.0)
  assert m['signal/clean_mse@baseline'] == pytest.approx(0.25)
  assert m['signal/clean_snr_db'] == pytest.approx(120.0)  # Exact: capped.


def test_save_predictions_in_units(tmp_path):
  split, _ = _small_split()
  split['patient_id'] = np.arange(6, dtype=np.int64)
  preds = {'x0_pred': split['signal'], 't': np.arange(6), 'peak_exist': np.ones(6),
           'peak_latency': np.stack([split['peak_latency'], np.zeros(6)], 1),
           'peak_amplitude': np.zeros((6, 2)),
           'class_logits': np.eye(5)[[0, 0, 0, 0, 2, 0]],
           'threshold': np.stack([split['threshold'], np.zeros(6)], 1)}
  path = tmp_path / 'predictions' / 'test.npz'
  evaluation.save_predictions(str(path), preds, split, fakes.AffineNormalizer())
  p = np.load(path)
  np.testing.assert_allclose(p['latency_true_ms'], [6.0, 7.0, 8.0, np.nan, 9.0, np.nan])
  np.testing.assert_allclose(p['latency_pred_ms'][p['peak_present']], [6.0, 7.0, 8.0, 9.0])
  np.testing.assert_allclose(p['threshold_true_db'], [10, 20, 30, np.nan, 60, np.nan])
  np.testing.assert_allclose(p['static'][0], [5.0, 60.0, 30.0, 0.5])
  assert p['confusion'][1, 0] == 1 and p['confusion'].sum() == 6
  assert list(p['class_names']) == list(evaluation.CLASS_NAMES)
  assert p['signal'].shape == (6, 4) and 'clean' not in p


# ----------------------------------------------------------------------------------------------
# Detectors: each fires on a constructed collapsed run and stays quiet on a healthy one.

def _monitor_config():
  config = convergence.get_config('test')
  config.training.early_stopping_min_delta = 1e-6
  return config


def _rows(n_epochs, collapsed):
  """Epoch rows of a healthy run (every loss falls, LR warms up and decays) or of a collapsed
  one (losses flat after epoch 1, like the original's val latency NLL 2.9434; LR constant)."""
  rows = []
  for e in range(1, n_epochs + 1):
    for split, scale in (('train', 1.0), ('val', 1.05)):
      loss = 0.5 + np.exp(-e / 4.0) if not collapsed else (3.0 if e == 1 else 2.9434)
      row = {'step': 10 * e, 'epoch': e, 'split': split, 'scope': 'epoch',
             'lr': 1e-4 if collapsed else 1e-4 * (0.1 + 0.9 * min(e / 3, 1)) * 0.97 ** e}
      row.update({k: scale * loss for k in monitors.LOSS_KEYS})
      rows.append(row)
  return rows


def _eval_metrics(collapsed, seed=0):
  """compute_metrics of a healthy (truth + noise) or collapsed (constant) predictor."""
  rng = np.random.default_rng(seed)
  n = 400
  split = {'signal': rng.normal(size=(n, 200)), 'static': np.zeros((n, 4)),
           'peak_mask': (rng.random(n) < 0.75).astype(np.float32),
           'peak_latency': rng.normal(size=n), 'peak_amplitude': rng.normal(size=n),
           'label': rng.choice(5, n, p=[0.6, 0.1, 0.1, 0.1, 0.1]),
           'threshold': rng.normal(size=n), 'threshold_mask': np.ones(n, np.float32)}
  preds = fakes.predictions(split, rng, collapsed)
  preds['t'] = np.zeros(n, np.int32)
  baselines = evaluation.compute_baselines(split, fakes.AffineNormalizer())
  return evaluation.compute_metrics(preds, split, fakes.AffineNormalizer(), baselines)


def _replay(config, rows, metrics):
  """Warnings per epoch of one Monitor fed like train.py feeds it."""
  monitor = monitors.Monitor(config)
  out = {}
  for e in sorted({r['epoch'] for r in rows}):
    out[e] = monitor.check(e, [r for r in rows if r['epoch'] <= e], metrics)
  return out


def test_healthy_run_is_quiet():
  warnings = _replay(_monitor_config(), _rows(12, collapsed=False), _eval_metrics(False))
  assert all(not w for w in warnings.values()), warnings


def test_collapse_detectors_fire_once_at_onset():
  metrics = _eval_metrics(collapsed=True)
  warnings = _replay(_monitor_config(), _rows(3, collapsed=False), metrics)
  first = ' '.join(warnings[1])
  for key in ('signal/pred_std', 'peak/latency_pred_std_ms', 'peak/amplitude_pred_std_uv',
              'threshold/pred_std_db', 'class/top_pred_share', 'peak/exist_top_pred_share'):
    assert key in first, (key, first)
  assert not warnings[2] and not warnings[3]  # Still collapsed, already reported.


def test_one_class_classifier_fires_alone():
  config = _monitor_config()
  metrics = dict(_eval_metrics(collapsed=False), **{'class/top_pred_share': 0.97})
  found = monitors.Monitor(config).check(1, [], metrics)
  assert len(found) == 1 and 'hearing-loss classifier' in found[0] and '97.0%' in found[0]


def test_plateau_detector_fires_on_flat_component():
  config = _monitor_config()
  k = config.monitor.plateau_epochs
  rows = _rows(12, collapsed=False)
  for r in rows:  # The val latency NLL freezes after epoch 1 (original: 2.9434 for 7 epochs).
    if r['split'] == 'val':
      r['loss/peak_latency'] = 2.9434
  warnings = _replay(config, rows, _eval_metrics(False))
  fired = {e: w for e, w in warnings.items() if w}
  assert list(fired) == [k + 1], fired
  assert 'val loss/peak_latency' in fired[k + 1][0]
  assert 'best 2.9434 at epoch 1' in fired[k + 1][0]


def test_plateau_needs_min_delta_improvement():
  rows = _rows(12, collapsed=False)
  # Epochs 8-12 beat the best of 1-7 (0.674) by 0.124: not a plateau for 0.1, one for 0.2.
  assert not monitors.plateau_findings(rows, 12, 5, 0.1)
  found = monitors.plateau_findings(rows, 12, 5, 0.2)
  assert 'plateau:train:loss/total' in found and 'plateau:val:loss/signal' in found


def test_constant_lr_fires_on_collapsed_run_only():
  config = _monitor_config()
  warnings = _replay(config, _rows(3, collapsed=True), _eval_metrics(False))
  assert not warnings[1]
  assert len(warnings[2]) == 1 and 'learning rate: constant at 0.0001' in warnings[2][0]
  # A config that schedules a constant rate is not flagged.
  config.training.warmup_epochs = 0
  config.training.min_learning_rate = config.training.learning_rate
  assert not any(_replay(config, _rows(3, collapsed=True), _eval_metrics(False)).values())


def test_collapsed_run_fires_every_detector():
  config = _monitor_config()
  warnings = _replay(config, _rows(8, collapsed=True), _eval_metrics(collapsed=True))
  text = ' '.join(w for ws in warnings.values() for w in ws)
  assert 'collapse' in text and 'plateau' in text and 'learning rate' in text


def test_monitor_skips_window_rows_and_missing_values():
  rows = _rows(8, collapsed=False)
  rows.append({'step': 81, 'epoch': 8, 'split': 'train', 'scope': 'window', 'lr': 1.0,
               'loss/total': 99.0})
  for r in rows:
    r['loss/peak_latency'] = None  # Logged as null when no wave V was in the window.
  assert not monitors.Monitor(_monitor_config()).findings(8, rows, {})
