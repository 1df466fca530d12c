"""Per-task metrics in clinical units, each beside its trivial baseline, and saved predictions.

A collapsed head must be visible, so every metric comes with the value a trivial predictor gets
on the same rows (`<name>@baseline`): the zero trace for the signal, the TRAIN majority class for
the classifier and for wave-V existence, the TRAIN median latency / amplitude / threshold for
the regressions. The baseline goes through the same code as the model, so the two are
comparable by construction.

Conventions:
  * `preds` are the per-example outputs of `losses.loss_fn` (padding removed): 'x0_pred'
    [N, 200], 't' [N], 'peak_exist' [N] logit, 'peak_latency' / 'peak_amplitude' /
    'threshold' [N, 2] (standardised mean, log-scale), 'class_logits' [N, K].
  * Wave V is predicted present where its logit is > 0 (probability > 0.5).
  * Regressions are scored only where the target exists (peak_mask, threshold_mask), after
    converting column 0 with `normalizer.to_units`.
  * Signals are per-trace z-scored, so signal metrics have no unit.
  * A metric that is undefined on a split (e.g. AUC with one class present) is NaN; a task with
    no scorable rows (no wave V, no known threshold) has no metrics at all.
  * The hearing threshold is also scored per patient (`patient_thresholds`): a threshold is a
    property of the patient, and a clinician reads it from the patient's whole intensity series.
"""

import os

import numpy as np

# Class index -> name, in the original's LabelEncoder order (see the batch contract).
CLASS_NAMES = ('NORMAL', 'NOROPATI', 'SNIK', 'TOTAL', 'ITIK')
# Error bands of the "share within" metrics, in each target's unit.
LATENCY_BANDS_MS = (0.5, 1.0)
AMPLITUDE_BANDS_UV = (0.05, 0.1)
THRESHOLD_BANDS_DB = (5.0, 10.0)
# Per-recording SNR is capped here when a reconstruction is exact (division by zero).
_MAX_SNR_DB = 120.0


# ----------------------------------------------------------------------------------------------
# Plain metric functions on small arrays (numpy only; no scikit-learn in jaxtrain/).

def binary_auc(scores, positive):
  """ROC AUC of `scores` [N] for the boolean labels `positive` [N] (Mann-Whitney, ties count
  half). NaN when only one class is present."""
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  n_pos, n_neg = positive.sum(), (~positive).sum()
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  # Rank of each distinct score (1-based), averaged over its ties.
  mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
  rank_sum = mean_rank[inverse][positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_f1(pred, true):
  """F1 of the positive class for boolean arrays [N] (0 when there is no positive at all)."""
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  tp = np.sum(pred & true)
  denom = 2 * tp + np.sum(pred & ~true) + np.sum(~pred & true)
  return float(2 * tp / denom) if denom else 0.0


def confusion_matrix(true, pred, n_classes):
  """int64 [K, K]: rows are true classes, columns predicted classes."""
  cm = np.zeros((n_classes, n_classes), np.int64)
  np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
  return cm


def class_scores(cm):
  """Accuracy, balanced accuracy, macro-F1 and per-class recall of a confusion matrix.

  Balanced accuracy averages recall over the classes present in the truth; macro-F1 averages
  F1 over the classes present in the truth or the predictions (scikit-learn's conventions);
  recall is given only for classes present in the truth.
  """
  cm = np.asarray(cm, np.float64)
  support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
  present = support > 0
  recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
  f1_denom = support + predicted
  f1 = np.divide(2 * hits, f1_denom, out=np.zeros_like(hits), where=f1_denom > 0)
  out = {'accuracy': hits.sum() / cm.sum(),
         'balanced_accuracy': recall[present].mean(),
         'macro_f1': f1[f1_denom > 0].mean()}
  out.update({f'recall_{k}': recall[k] for k in np.flatnonzero(present)})
  return {k: float(v) for k, v in out.items()}


def r2_score(pred, true):
  """Coefficient of determination 1 - SS_res / SS_tot (about the mean of `true`); NaN when
  `true` is constant. A constant prediction scores <= 0."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  ss_tot = np.sum((true - true.mean()) ** 2)
  return float(1.0 - np.sum((true - pred) ** 2) / ss_tot) if ss_tot > 0 else float('nan')


def rowwise_pearson(pred, true):
  """Pearson r of each row of `pred` [N, T] with the same row of `true` [N, T] -> [N].

  A row where either trace is constant has no defined r; it scores 0 (no linear agreement),
  so a constant reconstruction cannot hide behind NaN.
  """
  a = pred - pred.mean(1, keepdims=True)
  b = true - true.mean(1, keepdims=True)
  denom = np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))
  return np.divide(np.sum(a * b, 1), denom, out=np.zeros(len(a)), where=denom > 0)


def rowwise_snr_db(pred, true):
  """SNR of each reconstruction, 10 log10(sum y^2 / sum (y - y_hat)^2) -> [N] (the zero trace
  scores 0 dB; an exact one is capped at 120 dB)."""
  power = np.sum(true * true, 1)
  err = np.sum((true - pred) ** 2, 1)
  ratio = np.divide(power, err, out=np.full(len(power), 10 ** (_MAX_SNR_DB / 10)),
                    where=err > 0)
  return np.minimum(10 * np.log10(np.maximum(ratio, 1e-300)), _MAX_SNR_DB)


def across_recordings_std(x):
  """Spread of traces `x` [N, T] across recordings: RMS over the T samples of the per-sample
  standard deviation over the N rows. 0 when every recording gets the same trace."""
  return float(np.sqrt(np.mean(np.var(x, axis=0))))


# ----------------------------------------------------------------------------------------------
# Task metrics. Each takes predictions and targets in units and returns {name: float}; the
# baseline goes through the same function.

def _signal_metrics(pred, target, prefix):
  """[N, T] traces -> MSE, MAE, mean per-recording Pearson r and SNR (dB), prediction spread."""
  err = pred - target
  return {f'{prefix}mse': float(np.mean(err * err)),
          f'{prefix}mae': float(np.mean(np.abs(err))),
          f'{prefix}pearson_r': float(np.mean(rowwise_pearson(pred, target))),
          f'{prefix}snr_db': float(np.mean(rowwise_snr_db(pred, target))),
          f'{prefix}pred_std': across_recordings_std(pred)}


def _exist_metrics(logit, present):
  """Wave-V existence from logits [N] (> 0 = present) against booleans [N]."""
  pred = logit > 0
  share_present = float(np.mean(pred))
  return {'peak/exist_accuracy': float(np.mean(pred == present)),
          'peak/exist_f1': binary_f1(pred, present),
          'peak/exist_auc': binary_auc(logit, present),
          'peak/exist_top_pred_share': max(share_present, 1.0 - share_present)}


def _regression_metrics(pred, true, prefix, unit, bands):
  """MAE, RMSE, R^2, share of |error| <= each band, the predictions' mean and spread, for
  [M] arrays.

  Names are `<prefix>mae_<unit>`, `<prefix>within_<band><unit>`, ... (e.g.
  'peak/latency_within_0.5ms', 'threshold/within_10db').
  """
  err = np.abs(pred - true)
  out = {f'{prefix}mae_{unit}': float(np.mean(err)),
         f'{prefix}rmse_{unit}': float(np.sqrt(np.mean(err * err))),
         f'{prefix}r2': r2_score(pred, true)}
  out.update({f'{prefix}within_{b:g}{unit}': float(np.mean(err <= b)) for b in bands})
  # Diagnostics: the baseline's mean is its constant (the train median).
  out[f'{prefix}pred_mean_{unit}'] = float(np.mean(pred))
  # A constant prediction has spread exactly 0 (np.std leaves rounding noise).
  out[f'{prefix}pred_std_{unit}'] = float(np.std(pred)) if np.ptp(pred) > 0 else 0.0
  return out


def _class_metrics(logits_or_labels, true, n_classes):
  """Class metrics of predicted labels (argmax of [N, K] logits, or labels [N])."""
  pred = logits_or_labels
  if pred.ndim == 2:
    pred = pred.argmax(1)
  out = {f'class/{k}': v for k, v in
         class_scores(confusion_matrix(true, pred, n_classes)).items()}
  out['class/top_pred_share'] = float(np.bincount(pred, minlength=n_classes).max() / len(pred))
  return out


def patient_thresholds(patient_id, pred_db, log_scale, true_db, known):
  """One threshold per patient from all of the patient's recordings in a split.

  The estimate is the precision-weighted mean of the per-recording predictions (weights
  exp(-2 log_scale), the model's own Gaussian variances): recordings far from the threshold,
  where the trace says little, count less. Every recording votes, whether or not its label is
  known. The patient's label is the mean of its known per-recording labels (the original's
  threshold label varies from recording to recording; the synthetic one does not).

  Args:
    patient_id: [N] ints; pred_db: [N] predicted threshold (dB); log_scale: [N] predicted
      log-scale (any units: only ratios within a patient matter); true_db: [N] label (dB, any
      value where unknown); known: [N] bool, the label exists.

  Returns:
    (estimate [P], label [P]) in dB for the P patients with at least one known label, in the
    order of their ids.
  """
  patient_id = np.asarray(patient_id)
  ids, row_patient = np.unique(patient_id, return_inverse=True)
  log_scale = np.asarray(log_scale, np.float64)
  # Relative to each patient's most confident recording, so that exp cannot overflow.
  most_confident = np.full(len(ids), np.inf)
  np.minimum.at(most_confident, row_patient, log_scale)
  rel = log_scale - most_confident[row_patient]
  weight = np.exp(-2.0 * rel)
  estimate = (np.bincount(row_patient, weight * np.asarray(pred_db, np.float64), len(ids))
              / np.bincount(row_patient, weight, len(ids)))
  known = np.asarray(known, bool)
  n_known = np.bincount(row_patient, known, len(ids))
  label_sum = np.bincount(row_patient, np.where(known, np.asarray(true_db, np.float64), 0.0),
                          len(ids))
  has_label = n_known > 0
  return estimate[has_label], label_sum[has_label] / n_known[has_label]


# ----------------------------------------------------------------------------------------------
# Public API.

def _units(normalizer, name, x):
  return np.asarray(normalizer.to_units(name, np.asarray(x, np.float64)), np.float64)


def compute_baselines(train_split, normalizer):
  """The trivial predictors, fitted on the TRAIN split only.

  Args:
    train_split: dict of [N] arrays with 'label', 'peak_mask', 'peak_latency',
      'peak_amplitude', 'threshold', 'threshold_mask' (standardised targets).
    normalizer: has `.to_units(name, x)`.

  Returns:
    JSON-able dict: 'class_majority' (int), 'class_shares' (list, one per class),
    'peak_exist_majority' (1 = present), 'peak_present_share', 'peak_latency_median_ms',
    'peak_amplitude_median_uv', 'threshold_median_db' (NaN when the train split has no such
    target), 'signal' ('zero': the all-zero trace).
  """
  labels = np.asarray(train_split['label'], np.int64)
  shares = np.bincount(labels, minlength=len(CLASS_NAMES)) / len(labels)
  present = np.asarray(train_split['peak_mask']) > 0.5
  known = np.asarray(train_split['threshold_mask']) > 0.5

  def median(name, rows):
    values = _units(normalizer, name, np.asarray(train_split[name])[rows])
    return float(np.median(values)) if len(values) else float('nan')

  return {'class_majority': int(shares.argmax()),
          'class_shares': [float(s) for s in shares],
          'peak_exist_majority': int(present.mean() >= 0.5),
          'peak_present_share': float(present.mean()),
          'peak_latency_median_ms': median('peak_latency', present),
          'peak_amplitude_median_uv': median('peak_amplitude', present),
          'threshold_median_db': median('threshold', known),
          'signal': 'zero'}


def _task_metrics(p, split, n_classes):
  """Every task's metrics for unit-space predictions `p` (see `_unit_predictions`)."""
  present = split['peak_mask'] > 0.5
  known = split['threshold_mask'] > 0.5
  out = _signal_metrics(p['x0_pred'], split['signal'], 'signal/')
  if 'clean' in split:
    out.update(_signal_metrics(p['x0_pred'], split['clean'], 'signal/clean_'))
  out.update(_exist_metrics(p['peak_exist'], present))
  if present.any():
    out.update(_regression_metrics(p['latency'][present], p['latency_true'][present],
                                   'peak/latency_', 'ms', LATENCY_BANDS_MS))
    out.update(_regression_metrics(p['amplitude'][present], p['amplitude_true'][present],
                                   'peak/amplitude_', 'uv', AMPLITUDE_BANDS_UV))
  out.update(_class_metrics(p['class'], split['label'], n_classes))
  if known.any():
    out.update(_regression_metrics(p['threshold'][known], p['threshold_true'][known],
                                   'threshold/', 'db', THRESHOLD_BANDS_DB))
    if 'patient_id' in split:
      estimate, label = patient_thresholds(split['patient_id'], p['threshold'],
                                           p['threshold_log_scale'], p['threshold_true'], known)
      out.update(_regression_metrics(estimate, label, 'threshold/patient_', 'db',
                                     THRESHOLD_BANDS_DB))
      out['threshold/patients'] = float(len(label))
  return out


def _unit_predictions(preds, split, normalizer):
  """Model predictions and targets in units: traces [N, T], logits, ms, uV, dB."""
  return {'x0_pred': np.asarray(preds['x0_pred'], np.float64),
          'peak_exist': np.asarray(preds['peak_exist'], np.float64),
          'latency': _units(normalizer, 'peak_latency', np.asarray(preds['peak_latency'])[:, 0]),
          'amplitude': _units(normalizer, 'peak_amplitude',
                              np.asarray(preds['peak_amplitude'])[:, 0]),
          'class': np.asarray(preds['class_logits'], np.float64),
          'threshold': _units(normalizer, 'threshold', np.asarray(preds['threshold'])[:, 0]),
          'threshold_log_scale': np.asarray(preds['threshold'], np.float64)[:, 1],
          'latency_true': _units(normalizer, 'peak_latency', split['peak_latency']),
          'amplitude_true': _units(normalizer, 'peak_amplitude', split['peak_amplitude']),
          'threshold_true': _units(normalizer, 'threshold', split['threshold'])}


def _baseline_predictions(model, baselines):
  """The trivial predictors in the layout of `_unit_predictions` (targets kept)."""
  n = len(model['peak_exist'])
  const = lambda v: np.full(n, v, np.float64)
  base = dict(model)
  base['x0_pred'] = np.zeros_like(model['x0_pred'])
  # Any logit of the right sign predicts the majority; a constant scores AUC 0.5.
  base['peak_exist'] = const(1.0 if baselines['peak_exist_majority'] else -1.0)
  base['latency'] = const(baselines['peak_latency_median_ms'])
  base['amplitude'] = const(baselines['peak_amplitude_median_uv'])
  base['class'] = np.full(n, baselines['class_majority'], np.int64)
  base['threshold'] = const(baselines['threshold_median_db'])
  base['threshold_log_scale'] = const(0.0)
  return base


def _target_spreads(p, split):
  """Standard deviations of the targets, for the collapse detector's spread ratios."""
  present = split['peak_mask'] > 0.5
  known = split['threshold_mask'] > 0.5
  out = {'signal/true_std': across_recordings_std(split['signal'])}
  if present.any():
    out['peak/latency_true_std_ms'] = float(np.std(p['latency_true'][present]))
    out['peak/amplitude_true_std_uv'] = float(np.std(p['amplitude_true'][present]))
  if known.any():
    out['threshold/true_std_db'] = float(np.std(p['threshold_true'][known]))
  return out


def compute_metrics(preds, split, normalizer, baselines):
  """Per-task metrics of `preds` on `split`, each beside its trivial baseline.

  Args:
    preds: `loss_fn` predictions concatenated over the eval batches, padding removed, rows
      aligned with `split` (see the module docstring).
    split: dict of [N, ...] arrays in the batch format ('clean' optional).
    normalizer: has `.to_units(name, x)`.
    baselines: `compute_baselines` of the train split.

  Returns:
    Flat {name: float}: 'signal/mse', 'signal/mae', 'signal/pearson_r', 'signal/snr_db',
    'signal/pred_std' (and 'signal/clean_*' when 'clean' is in split); 'peak/exist_accuracy',
    'peak/exist_f1', 'peak/exist_auc', 'peak/exist_top_pred_share'; 'peak/latency_{mae,rmse}_ms',
    'peak/latency_r2', 'peak/latency_within_{0.5,1}ms', 'peak/latency_pred_{mean,std}_ms', the same
    for 'peak/amplitude_*_uv' (bands 0.05, 0.1 uV); 'class/accuracy',
    'class/balanced_accuracy', 'class/macro_f1', 'class/recall_<k>', 'class/top_pred_share';
    'threshold/{mae,rmse}_db', 'threshold/r2', 'threshold/within_{5,10}db',
    'threshold/pred_{mean,std}_db'; when split has 'patient_id', the same per patient
    ('threshold/patient_mae_db', ..., see `patient_thresholds`) and 'threshold/patients' (their
    number). Each of these also as '<name>@baseline'. Besides, target spreads
    without baseline: 'signal/true_std', 'peak/latency_true_std_ms',
    'peak/amplitude_true_std_uv', 'threshold/true_std_db'.
  """
  split = {k: np.asarray(v) for k, v in split.items()}
  n_classes = np.asarray(preds['class_logits']).shape[1]
  model = _unit_predictions(preds, split, normalizer)
  out = _task_metrics(model, split, n_classes)
  base = _task_metrics(_baseline_predictions(model, baselines), split, n_classes)
  out.update({f'{k}@baseline': v for k, v in base.items()})
  out.update(_target_spreads(model, split))
  return out


def save_predictions(path, preds, split, normalizer):
  """Writes the test predictions the report reads, in units, to the .npz file `path`.

  Arrays (N rows): 'signal', 'x0_pred' [N, T] (and 'clean' when in split), 't' [N];
  'static' [N, 4] in units (age yr, intensity dB, rate /s, FMP); 'peak_present' bool,
  'peak_exist_logit'; 'latency_true_ms', 'latency_pred_ms', 'amplitude_true_uv',
  'amplitude_pred_uv' (true values NaN where there is no wave V); 'label', 'class_pred',
  'class_logits' [N, K]; 'threshold_known' bool, 'threshold_true_db' (NaN where unknown),
  'threshold_pred_db'; 'patient_id' when in split. Besides: 'confusion' [K, K] (rows true)
  and 'class_names' [K].
  """
  split = {k: np.asarray(v) for k, v in split.items()}
  p = _unit_predictions(preds, split, normalizer)
  present = split['peak_mask'] > 0.5
  known = split['threshold_mask'] > 0.5
  class_pred = p['class'].argmax(1)
  n_classes = p['class'].shape[1]
  out = {'signal': split['signal'].astype(np.float32),
         'x0_pred': p['x0_pred'].astype(np.float32),
         't': np.asarray(preds['t']),
         'static': _units(normalizer, 'static', split['static']).astype(np.float32),
         'peak_present': present,
         'peak_exist_logit': p['peak_exist'].astype(np.float32),
         'latency_true_ms': np.where(present, p['latency_true'], np.nan),
         'latency_pred_ms': p['latency'],
         'amplitude_true_uv': np.where(present, p['amplitude_true'], np.nan),
         'amplitude_pred_uv': p['amplitude'],
         'label': split['label'].astype(np.int64),
         'class_pred': class_pred,
         'class_logits': p['class'].astype(np.float32),
         'confusion': confusion_matrix(split['label'], class_pred, n_classes),
         'class_names': np.asarray(CLASS_NAMES[:n_classes]),
         'threshold_known': known,
         'threshold_true_db': np.where(known, p['threshold_true'], np.nan),
         'threshold_pred_db': p['threshold']}
  if 'clean' in split:
    out['clean'] = split['clean'].astype(np.float32)
  if 'patient_id' in split:
    out['patient_id'] = split['patient_id']
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, **out)
