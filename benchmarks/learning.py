"""Learning benchmark: our model beside a gradient-boosting reference, on the same test split.

  python -m benchmarks.learning                                   # demo preset, 2038 patients
  python -m benchmarks.learning --preset test --patients 40 --workdir /tmp/learning_try
  python -m benchmarks.learning --dataset original --epochs 40 --seed 7 --workdir runs/lo
  python -m benchmarks.learning --patients 2038 --epochs 7 --set training.warmup_epochs=1 \
      --set training.restart_epochs=6 --workdir runs/full   # the README's 45-minute runs

For each dataset (`--dataset native`, `original` or `both`):
  * native: the built-in synthetic set (`config.data.source='synthetic'`, `--patients`
    patients, the config's generator seed);
  * original: the same simulator (generator seed `--seed`) written as a joblib pickle in the
    ORIGINAL's layout (reference section 5.2: statics z-scored by a StandardScaler fit on all
    records, traces z-scored per recording, a LabelEncoder of the Turkish class names, and the
    original's synthetic 'combined' threshold of section 5.1 in place of the simulator's), then
    read back with `config.data.source='pickle'`.
It trains `configs/convergence.py:<preset>` with `train.train_and_evaluate` (timed, wall
seconds, compiling and the test evaluation included) in `<workdir>/<dataset>`, fits
scikit-learn's histogram gradient boosting on the same training split (statics + trace +
window statistics; each model grown until its validation loss stops improving, see
`_fit_head`), and prints per head the test metric of the trivial baseline (our evaluation's
'@baseline'), the reference and ours. Our run compiles its own steps (no compilation cache),
so that both datasets' wall times include compiling. `<workdir>/learning.json` and
`<workdir>/learning.md` hold the same, for the README.

scikit-learn and joblib come from requirements-dev.txt; `jaxtrain/` never imports them.
"""

import argparse
import itertools
import json
import os
import sys
import time

from absl import logging
import joblib
import numpy as np
import sklearn
import threadpoolctl
from sklearn import ensemble
from sklearn import preprocessing

from configs import convergence
from jaxtrain import data
from jaxtrain import evaluation
from jaxtrain import train
from jaxtrain.data import synthetic

DATASETS = ('native', 'original')
ORIGINAL_SEED = 2026  # Generator seed of the original-layout file (independent of the config's).
# The original's LabelEncoder classes (sorted, so index k is jaxtrain's class k).
ORIGINAL_CLASS_NAMES = ('NORMAL', 'NÖROPATİ', 'SNİK', 'TOTAL', 'İTİK')
# 'combined' threshold (reference 5.1): class midpoints in dB, indexed by class number
# (NORMAL, NOROPATI, SNIK, TOTAL, ITIK), and its noise sd.
COMBINED_MID_DB = np.array([17.5, 65.0, 37.5, 77.5, 57.5])
COMBINED_NOISE_DB = 3.0
THRESHOLD_RANGE_DB = (0.0, 120.0)
# The reference grows CHUNK boosting stages at a time and stops when its best validation stage
# lies PATIENCE stages back (or at --gb_max_iter).
CHUNK, PATIENCE = 50, 50  # Each fit bins the data again: 1.7 s at 39k recordings.
WINDOW = 20  # Samples per window of the reference's window statistics (10 windows of 200).
# The table: metric key in `evaluation.compute_metrics`, label, +1 higher is better / -1 lower.
ROWS = (('class/balanced_accuracy', 'class balanced accuracy', +1),
        ('class/macro_f1', 'class macro-F1', +1),
        ('threshold/mae_db', 'threshold MAE (dB)', -1),
        ('threshold/patient_mae_db', 'threshold MAE per patient (dB)', -1),
        ('peak/latency_mae_ms', 'wave-V latency MAE (ms)', -1),
        ('peak/amplitude_mae_uv', 'wave-V amplitude MAE (uV)', -1),
        ('peak/exist_f1', 'wave-V existence F1', +1))


# ----------------------------------------------------------------------------------------------
# The original's file layout.

def combined_threshold(label, z_intensity, present, latency_ms, noise_db):
  """The original's synthetic 'combined' clinical threshold (reference section 5.1), dB.

  Args:
    label: int [N] class numbers (jaxtrain order).
    z_intensity: [N] the intensity as the original's StandardScaler z-scored it.
    present: bool [N] wave V labelled.
    latency_ms: [N] wave-V latency (ignored where absent).
    noise_db: [N] the N(0, 3^2) term, drawn by the caller.

  Returns:
    float64 [N]: mid[class] + 15 tanh(z) + (V ? -8 + clip(2 (lat - 5.5), -5, 10) : +12) + noise,
    clipped to [0, 120].
  """
  wave_term = np.where(present, -8.0 + np.clip(2.0 * (np.asarray(latency_ms) - 5.5), -5., 10.),
                       12.0)
  thr = COMBINED_MID_DB[label] + 15.0 * np.tanh(z_intensity) + wave_term + noise_db
  return np.clip(thr, *THRESHOLD_RANGE_DB).astype(np.float64)


def original_records(patient_id, raw_static, signal, v_peak, present, label):
  """Records in the original's layout (section 5.2), without 'clinical_threshold'.

  Args:
    patient_id: int [N].
    raw_static: [N, 4] statics in units (age yr, intensity dB, rate /s, FMP).
    signal: [N, 200] traces (any scale: each is z-scored here, as the original did).
    v_peak: [N, 2] [latency ms, amplitude uV], 0.0 where absent.
    present: bool [N] wave V labelled (both mask bits, as in the original's data).
    label: int [N] class numbers (jaxtrain order = the LabelEncoder's sorted order).

  Returns:
    (records: list of N dicts, the StandardScaler fit on ALL raw statics (the original's
    leak, which the reader undoes), the LabelEncoder of `ORIGINAL_CLASS_NAMES`).
  """
  scaler = preprocessing.StandardScaler().fit(raw_static)
  z_static = scaler.transform(raw_static)
  # Object dtype, as pandas gave the original's encoder (classes_ is then an object array).
  names = np.array(ORIGINAL_CLASS_NAMES, dtype=object)
  encoder = preprocessing.LabelEncoder().fit(names)
  target = encoder.transform(names[np.asarray(label)]).astype(np.int64)
  z_signal, _, _ = data.standardize_traces(signal)
  records = [{'patient_id': int(patient_id[i]),
              'static_params': z_static[i].astype(np.float64),
              'signal': z_signal[i].astype(np.float64),
              'v_peak': np.asarray(v_peak[i], np.float64),
              'v_peak_mask': np.array([present[i], present[i]], bool),
              'target': target[i]} for i in range(len(target))]
  return records, scaler, encoder


def dump_original(path, records, scaler, encoder, metadata):
  """Writes the original's top-level dict with joblib.dump (uncompressed, as it did)."""
  obj = {'data': records, 'scaler': scaler, 'label_encoder': encoder, 'metadata': metadata,
         'has_clinical_thresholds': True, 'threshold_method': 'combined'}
  joblib.dump(obj, path)


def write_original(path, num_patients, seed):
  """Simulates `num_patients` patients and writes them in the original's layout to `path`.

  Returns:
    The simulator's records (dict of [N, ...] arrays in units, see `synthetic.generate`) and
    'combined_threshold' f64 [N]: the thresholds written to the file.
  """
  sim = synthetic.generate(num_patients, 25.5, 0.1, seed)
  present = sim['peak_mask'] > 0.5
  v_peak = np.stack([sim['peak_latency'], sim['peak_amplitude']], 1).astype(np.float64)
  raw_static = sim['static'].astype(np.float64)
  records, scaler, encoder = original_records(sim['patient_id'], raw_static, sim['signal'],
                                              v_peak, present, sim['label'])
  # The threshold formula reads the intensity as the original's scaler z-scored it.
  noise = np.random.default_rng(seed).normal(0., COMBINED_NOISE_DB, len(records))
  thr = combined_threshold(sim['label'], scaler.transform(raw_static)[:, 1], present,
                           sim['peak_latency'], noise)
  for record, value in zip(records, thr):
    record['clinical_threshold'] = np.float64(value)
  dump_original(path, records, scaler, encoder,
                {'version': 'ultimate_v1', 'source': f'jaxtrain synthetic, seed {seed}'})
  return {**sim, 'combined_threshold': thr}


# ----------------------------------------------------------------------------------------------
# The gradient-boosting reference.

def features(split):
  """The reference's inputs of a split.

  Args:
    split: dict with 'static' [N, 4] (standardised) and 'signal' [N, 200] (z-scored per trace).

  Returns:
    f32 [N, 4 + 200 + 5 * 200 / WINDOW]: statics, trace samples, then per WINDOW-sample window
    its mean, sd, max, min and argmax (samples into the window). Trees split one feature at a
    time; the window summaries hand them the local size and timing of a wave at once.
  """
  signal = np.asarray(split['signal'], np.float32)
  windows = signal.reshape(len(signal), -1, WINDOW)  # [N, 10, WINDOW]
  stats = [windows.mean(2), windows.std(2), windows.max(2), windows.min(2),
           windows.argmax(2).astype(np.float32)]
  return np.concatenate([np.asarray(split['static'], np.float32), signal] + stats, axis=1)


def _log_loss(proba, y):
  """Mean -log of proba [M, K] at the true classes y [M] (the classifiers' training loss)."""
  return float(np.mean(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.))))


def _widen(proba, classes, n_classes):
  """proba [N, len(classes)] over the classes seen in train -> [N, n_classes], 0 elsewhere."""
  out = np.zeros((len(proba), n_classes))
  out[:, classes] = proba
  return out


def _fit_head(model, train, val, x_test, loss, n_classes=None):
  """Fits one boosting model on train, stopping on the validation split, and predicts test.

  sklearn < 1.7 takes no separate validation set for early stopping (it would hold out random
  TRAIN rows, one patient's recordings on both sides). So the model grows CHUNK stages at a
  time (warm start) until its best validation stage lies PATIENCE stages back or it has
  `model.max_iter`; the test prediction is that of the best stage, as our run keeps its
  checkpoint with the lowest validation loss.

  Args:
    model: an unfitted HistGradientBoosting{Classifier,Regressor} with early_stopping=False;
      its max_iter caps the stages.
    train, val: (x [M, F], y [M]): the rows of that split with a known target; classes are
      ints 0..K-1.
    x_test: [N, F] every test row.
    loss: fn(validation prediction, y_val) -> float, lower is better.
    n_classes: K for a classifier (the width of its probabilities), None for a regressor.

  Returns:
    (test prediction: probabilities [N, K] or values [N] (NaN without training rows),
     {'fit_s': seconds in `fit`, 'stage': the stage used (1-based), 'stages': stages grown}).
  """
  (x, y), (x_val, y_val) = train, val
  if n_classes is not None and len(np.unique(y)) < 2:  # Boosting needs two classes.
    return np.eye(n_classes)[np.full(len(x_test), int(y[0]))], {'fit_s': 0., 'stage': 0,
                                                                  'stages': 0}
  if not len(y):
    return np.full(len(x_test), np.nan), {'fit_s': 0., 'stage': 0, 'stages': 0}
  if n_classes is None:
    staged = model.staged_predict
  else:  # Probabilities over all K classes (the model's columns are the classes it saw).
    staged = lambda a: (_widen(p, model.classes_, n_classes)
                        for p in model.staged_predict_proba(a))
  cap = model.max_iter
  best_loss, best_stage, fit_s = np.inf, 0, 0.
  model.set_params(warm_start=True, max_iter=0)
  while model.max_iter < cap and model.max_iter - best_stage < PATIENCE:
    model.set_params(max_iter=min(model.max_iter + CHUNK, cap))
    start = time.perf_counter()
    model.fit(x, y)
    fit_s += time.perf_counter() - start
    if not len(y_val):  # No validation rows (a tiny split): every stage, the last one used.
      best_stage = model.max_iter
      continue
    for stage, p_val in enumerate(staged(x_val), 1):
      current = loss(p_val, y_val)
      if current < best_loss:
        best_loss, best_stage = current, stage
  pred = next(itertools.islice(staged(x_test), best_stage - 1, None))
  return pred, {'fit_s': fit_s, 'stage': best_stage, 'stages': int(model.n_iter_)}


def fit_reference(ds, max_iter, seed, threads=0):
  """Fits the gradient-boosting reference on ds.train, stopping each model on ds.val.

  Args:
    ds: a `data.Dataset` (standardised splits, class_weights).
    max_iter: the most boosting stages per model.
    seed: random_state of every model.
    threads: OpenMP threads of the fits; 0: scikit-learn's default (every core). On a
      machine whose cores are busy with other work OpenMP's threads wait for each other
      (measured: 197 s against 8 s with 1 thread, 685 training recordings, 2 busy cores).

  Returns:
    (test predictions in the split's standardised space: 'label' int [N], 'peak_mask' bool
     [N], 'peak_latency', 'peak_amplitude', 'threshold' f64 [N];
     {'fit_s': seconds in the five fits, 'total_s': with features and stage choice,
      'heads': {head: {'fit_s', 'stage', 'stages'}}}).
  """
  with threadpoolctl.threadpool_limits(limits=threads or None, user_api='openmp'):
    return _fit_reference(ds, max_iter, seed)


def _fit_reference(ds, max_iter, seed):
  start = time.perf_counter()
  x = {name: features(getattr(ds, name)) for name in ('train', 'val', 'test')}

  def rows(name, target, mask=None):
    """(x [M, F], y [M]) of split `name` where `mask` marks the target known."""
    split = getattr(ds, name)
    keep = slice(None) if mask is None else np.asarray(split[mask]) > 0.5
    return x[name][keep], np.asarray(split[target])[keep]

  classifier = lambda: ensemble.HistGradientBoostingClassifier(
      max_iter=max_iter, early_stopping=False, random_state=seed)
  regressor = lambda: ensemble.HistGradientBoostingRegressor(
      max_iter=max_iter, early_stopping=False, random_state=seed)
  mse = lambda p, y: float(np.mean((p - y) ** 2))  # The regressors' training loss.
  pred, heads = {}, {}
  weight = np.asarray(ds.class_weights, np.float64)
  proba, heads['class'] = _fit_head(classifier(), rows('train', 'label'), rows('val', 'label'),
                                    x['test'], _log_loss, weight.size)
  # Our loss weighs the classes 'balanced' (n / (K n_k) on train). Here the weights enter at
  # the decision, argmax_k w_k p_k (the Bayes decision for the weighted loss), not in the fit:
  # weighted fits make scikit-learn bin every feature by weighted percentiles (9 s a fit at
  # 685 recordings and 254 features, where the whole unweighted fit takes 1 s).
  pred['label'] = (proba * weight).argmax(1)
  exist = lambda name: (x[name], (np.asarray(getattr(ds, name)['peak_mask']) > 0.5).astype(int))
  proba, heads['peak_exist'] = _fit_head(classifier(), exist('train'), exist('val'), x['test'],
                                         _log_loss, 2)
  pred['peak_mask'] = proba[:, 1] > 0.5  # As our head: present where its logit is > 0.
  for target, mask in data.splits.TARGETS.items():
    pred[target], heads[target] = _fit_head(regressor(), rows('train', target, mask),
                                            rows('val', target, mask), x['test'], mse)
  info = {'fit_s': sum(h['fit_s'] for h in heads.values()),
          'total_s': time.perf_counter() - start, 'heads': heads}
  return pred, info


def score(pred, split, normalizer):
  """The reference's test metrics, named as `evaluation.compute_metrics` names ours.

  Args:
    pred: `fit_reference` predictions [N] ('label', 'peak_mask', and the three regressions,
      standardised).
    split: the split's batch-format dict [N, ...] (standardised targets, masks, patient_id).
    normalizer: has `.to_units(name, x)`.

  Returns:
    {'class/balanced_accuracy', 'class/macro_f1', 'peak/exist_f1'; where the target is known
     in the split: 'peak/latency_mae_ms', 'peak/amplitude_mae_uv', 'threshold/mae_db',
     'threshold/patient_mae_db'}: floats.
  """
  split = {k: np.asarray(v) for k, v in split.items()}
  scores = evaluation.class_scores(evaluation.confusion_matrix(
      split['label'], pred['label'], len(evaluation.CLASS_NAMES)))
  present = split['peak_mask'] > 0.5
  out = {'class/balanced_accuracy': scores['balanced_accuracy'],
         'class/macro_f1': scores['macro_f1'],
         'peak/exist_f1': evaluation.binary_f1(pred['peak_mask'], present)}
  units = lambda name, v: np.asarray(normalizer.to_units(name, np.asarray(v, np.float64)))
  for key, name in (('peak/latency_mae_ms', 'peak_latency'),
                    ('peak/amplitude_mae_uv', 'peak_amplitude'), ('threshold/mae_db', 'threshold')):
    known = split[data.splits.TARGETS[name]] > 0.5
    if known.any():  # As in compute_metrics: scored where the target exists.
      out[key] = float(np.mean(np.abs(units(name, pred[name][known])
                                      - units(name, split[name][known]))))
  known = split['threshold_mask'] > 0.5
  if known.any():  # One threshold per patient, aggregated as our evaluation does; with equal
    # weights (log-scale 0), since the reference gives no per-recording confidence.
    estimate, label = evaluation.patient_thresholds(
        split['patient_id'], units('threshold', pred['threshold']), np.zeros(len(known)),
        units('threshold', split['threshold']), known)
    out['threshold/patient_mae_db'] = float(np.mean(np.abs(estimate - label)))
  return out


# ----------------------------------------------------------------------------------------------
# The table.

def table_rows(ours, gb):
  """The rows of the comparison, one per metric of `ROWS` that our run reports.

  Args:
    ours: our run's test metrics (`result['test']`: '<key>' and '<key>@baseline').
    gb: the reference's `score`.

  Returns:
    list of {'metric', 'label', 'trivial', 'gradient_boosting', 'ours', 'ours_minus_gb',
    'better' ('ours', 'GB', 'tie' or '' when a value is missing)}.
  """
  rows = []
  for key, label, direction in ROWS:
    if key not in ours:  # E.g. the patient-level threshold, where our evaluation has none.
      continue
    mine, theirs = float(ours[key]), float(gb.get(key, np.nan))
    diff = mine - theirs
    if not np.isfinite(diff):
      better = ''
    else:
      better = 'tie' if diff == 0 else ('ours' if direction * diff > 0 else 'GB')
    rows.append({'metric': key, 'label': label,
                 'trivial': float(ours.get(f'{key}@baseline', np.nan)),
                 'gradient_boosting': theirs, 'ours': mine, 'ours_minus_gb': diff,
                 'better': better})
  return rows


def _number(v, sign=False):
  return 'n/a' if not np.isfinite(v) else (f'{v:+.3g}' if sign else f'{v:.4g}')


def markdown(results):
  """Markdown of `results` ({dataset: `run_dataset` entry}): per dataset a line of sizes and
  wall times, then the table metric | trivial | gradient boosting | ours | ours - GB | better."""
  lines = []
  for name, entry in results.items():
    sizes, t = entry['sizes'], entry['timing']
    per_split = lambda kind: ' / '.join(str(sizes[kind][s]) for s in ('train', 'val', 'test'))
    lines += [f'### {name}: {entry["description"]}', '',
              f'Recordings train / val / test: {per_split("recordings")}; patients '
              f'{per_split("patients")}. Our training: {t["ours_train_s"]:.1f} s wall '
              f'({entry["epochs"]} epochs, preset {entry["preset"]!r}, compiling and the test '
              f'evaluation included); gradient boosting: {t["gb_fit_s"]:.1f} s fitting '
              f'({t["gb_total_s"]:.1f} s with features and stage choice).', '',
              '| metric | trivial | gradient boosting | ours | ours - GB | better |',
              '|---|---|---|---|---|---|']
    lines += [f'| {r["label"]} | {_number(r["trivial"])} | {_number(r["gradient_boosting"])} | '
              f'{_number(r["ours"])} | {_number(r["ours_minus_gb"], sign=True)} | '
              f'{r["better"]} |' for r in entry['rows']]
    lines.append('')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# The run.

def set_key(config, assignment):
  """Applies 'a.b=value' to `config`: the key must exist; the value takes its type."""
  key, sep, text = assignment.partition('=')
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node.get(part) if hasattr(node, 'get') else None
  if not sep or node is None or leaf not in node:
    raise SystemExit(f'--set {assignment!r}: expected KEY=VALUE with KEY a config key.')
  kind = type(node[leaf])
  if kind is bool:
    if text.lower() not in ('true', 'false'):
      raise SystemExit(f'--set {assignment!r}: {key} is a bool: true or false.')
    node[leaf] = text.lower() == 'true'
  else:
    try:
      node[leaf] = kind(text)
    except ValueError:
      raise SystemExit(f'--set {assignment!r}: {key} is a {kind.__name__}.') from None


def run_dataset(name, args):
  """Builds dataset `name`, fits the reference, trains ours; returns the JSON-able entry."""
  config = convergence.get_config(args.preset)
  if args.epochs:
    config.training.num_epochs = args.epochs
  config.data.synthetic.num_patients = args.patients
  for assignment in args.set:  # After --epochs and --patients: an explicit --set wins.
    set_key(config, assignment)
  # Each timed run compiles its own steps: a cache shared with the other dataset's run (or an
  # earlier benchmark) would take the compile out of one timing but not the other.
  config.compilation_cache_dir = ''
  workdir = os.path.join(args.workdir, name)
  if name == 'original':
    path = os.path.join(args.workdir, 'original.pkl')
    written = len(write_original(path, args.patients, args.seed)['label'])
    config.data.source, config.data.path = 'pickle', path
    description = (f"the simulator (seed {args.seed}) in the original's pickle layout, "
                   "'combined' thresholds")
  else:
    written = None
    description = f'built-in synthetic set (generator seed {config.data.synthetic.seed})'
  ds = data.load_dataset(config)
  loaded = sum(ds.info['rows'].values())
  if written is not None and (loaded != written or ds.info.get('skipped_records')):
    raise RuntimeError(f'{config.data.path}: wrote {written} recordings, loaded {loaded} '
                       f'({ds.info.get("skipped_records")} skipped).')
  logging.info('%s: fitting the gradient-boosting reference on %d recordings.', name,
               ds.info['rows']['train'])
  gb_pred, gb_info = fit_reference(ds, args.gb_max_iter, config.seed, args.gb_threads)
  gb = score(gb_pred, ds.test, ds.normalizer)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  train_s = time.perf_counter() - start
  if result['test'] is None:
    raise SystemExit(f'Training in {workdir} was stopped by {result["stopped_by"]}; no test '
                     'metrics.')
  return {'description': description, 'source': config.data.source,
          'preset': args.preset, 'epochs': int(config.training.num_epochs),
          'optimizer_updates': int(result['step']),
          'sizes': {'recordings': ds.info['rows'], 'patients': ds.info['patients']},
          'timing': {'ours_train_s': train_s, 'gb_fit_s': gb_info['fit_s'],
                     'gb_total_s': gb_info['total_s']},
          'gb_heads': gb_info['heads'],
          'rows': table_rows(result['test'], gb)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--dataset', choices=DATASETS + ('both',), default='both')
  parser.add_argument('--preset', choices=('demo', 'test'), default='demo',
                      help="configs/convergence.py preset (model size, epochs).")
  parser.add_argument('--epochs', type=int, default=0, help="0: the preset's.")
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Config override, e.g. training.warmup_epochs=1 (repeatable).')
  parser.add_argument('--patients', type=int, default=2038, help='Patients per dataset.')
  parser.add_argument('--seed', type=int, default=ORIGINAL_SEED,
                      help="Generator seed of the original-layout dataset.")
  parser.add_argument('--gb_max_iter', type=int, default=500,
                      help='The most boosting stages per reference model (stopped on val).')
  parser.add_argument('--gb_threads', type=int, default=0,
                      help="OpenMP threads of the reference's fits (0: every core).")
  parser.add_argument('--workdir', default='runs/learning')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO)
  names = DATASETS if args.dataset == 'both' else (args.dataset,)
  for name in names:  # Before any work: train_and_evaluate would resume an earlier run.
    checkpoints = os.path.join(args.workdir, name, 'checkpoints')
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
      raise SystemExit(f'{os.path.dirname(checkpoints)} already holds a run, which training '
                       'would resume instead of timing one from scratch: choose another '
                       '--workdir or remove it.')
  os.makedirs(args.workdir, exist_ok=True)
  results = {name: run_dataset(name, args) for name in names}
  table = markdown(results)
  print(table)
  command = ['python', '-m', 'benchmarks.learning'] + list(sys.argv[1:] if argv is None else argv)
  summary = {'command': ' '.join(command), 'sklearn': sklearn.__version__,
             'gb_max_iter': args.gb_max_iter, 'gb_threads': args.gb_threads,
             'patients': args.patients, 'datasets': results}
  with open(os.path.join(args.workdir, 'learning.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.workdir, 'learning.md'), 'w') as f:
    f.write(table)
  print(f'Wrote {os.path.join(args.workdir, "learning.json")} and learning.md.')


if __name__ == '__main__':
  main()
