"""Applies a trained model to recordings: class, threshold and wave V with their spreads.

  python -m jaxtrain.predict --workdir=runs/demo --input=recordings.csv --output=out.csv
      [--checkpoint=STEP] [--on_bad_record=fail|skip] [--format=csv|pickle|npz]

Input (the format from the file name, or --format): the original's joblib pickle (read by the
safe loader, `jaxtrain/data/original_pickle.py`), a dataset .npz (`python -m
jaxtrain.data.convert`), or a plain CSV, one recording per row (`jaxtrain/data/plain_csv.py`:
age, intensity, rate, fmp, then the 200 samples; an optional header). A malformed recording
(wrong length, NaN, a missing static value) is reported by its number and either fails the run
(default) or is skipped (--on_bad_record=skip); it is never predicted.

Output CSV, one row per recording predicted:
  input_row            CSV: the file line; pickle / npz: the record index (0-based);
  patient_id           pickle / npz only;
  age_yr, intensity_db, rate_per_s, fmp       the recording's statics, as read;
  p_<CLASS>            probability of each hearing-loss class; class: the most probable;
  threshold_db, threshold_sd_db               hearing threshold and its predicted sd;
  v_probability        probability that the trace has a wave V;
  v_latency_ms, v_latency_sd_ms, v_amplitude_uv, v_amplitude_sd_uv   wave V if present.
"""

import argparse
import csv
import dataclasses
import logging
import os

import numpy as np

from jaxtrain import inference
from jaxtrain.data import npz
from jaxtrain.data import original_pickle
from jaxtrain.data import plain_csv

FORMATS = {'.csv': 'csv', '.pkl': 'pickle', '.pickle': 'pickle', '.joblib': 'pickle',
           '.npz': 'npz'}
STATIC_NAMES = ('age_yr', 'intensity_db', 'rate_per_s', 'fmp')
READING_COLUMNS = ('threshold_db', 'threshold_sd_db', 'v_probability', 'v_latency_ms',
                   'v_latency_sd_ms', 'v_amplitude_uv', 'v_amplitude_sd_uv')


@dataclasses.dataclass
class Recordings:
  """Recordings to predict, in units, and where each came from in the input."""
  static: np.ndarray  # [N, 4] age yr, intensity dB, rate /s, FMP.
  signal: np.ndarray  # [N, L].
  input_row: np.ndarray  # [N] int: CSV line, or record index.
  patient_id: np.ndarray | None  # [N] int, pickle and npz only.


def input_format(path, name=None):
  """'csv', 'pickle' or 'npz': `name` if given, else from the file extension."""
  if name:
    return name
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f'{path}: cannot tell the format from {ext!r}; pass --format=csv, pickle '
                     'or npz.')
  return FORMATS[ext]


def read_recordings(path, fmt, length, on_bad_record):
  """The recordings of `path` in format `fmt`; malformed ones fail the read or are dropped."""
  if fmt == 'csv':
    static, signal, lines = plain_csv.read(path, length, on_bad_record)
    return Recordings(static, signal, lines, None)
  if fmt == 'pickle':
    records, meta = original_pickle.to_records(original_pickle.load(path), on_bad_record, path)
    rows = np.setdiff1d(np.arange(meta['records_in_file']), meta['skipped_indices'])
  elif fmt == 'npz':
    records, _ = npz.read(path)
    rows = _check_npz(records, path, length, on_bad_record)
    records = {k: v[rows] for k, v in records.items()}
  else:
    raise ValueError(f"Unknown input format {fmt!r}; expected 'csv', 'pickle' or 'npz'.")
  return Recordings(records['static'], records['signal'], rows, records['patient_id'])


def _check_npz(records, path, length, on_bad_record):
  """Indices of the npz records with finite statics and traces of `length` samples."""
  if records['signal'].shape[1:] != (length,) or records['static'].shape[1:] != (4,):
    raise ValueError(f'{path}: traces {records["signal"].shape[1:]} and statics '
                     f'{records["static"].shape[1:]}; the model takes ({length},) and (4,).')
  bad = ~(np.isfinite(records['static']).all(1) & np.isfinite(records['signal']).all(1))
  if bad.any():
    listing = ', '.join(str(i) for i in np.flatnonzero(bad)[:20])
    message = (f'{path}: {int(bad.sum())} record(s) with NaN or infinite statics or samples '
               f'(indices {listing}{", ..." if bad.sum() > 20 else ""})')
    if on_bad_record == 'fail':
      raise original_pickle.BadRecordError(message + '; nothing predicted.')
    logging.warning('%s; skipped.', message)
  return np.flatnonzero(~bad)


def write_predictions(path, recordings, readings):
  """Writes one CSV row per recording (columns: see the module docstring)."""
  header = ['input_row'] + (['patient_id'] if recordings.patient_id is not None else [])
  header += [*STATIC_NAMES, *(f'p_{name}' for name in inference.CLASS_NAMES), 'class',
             *READING_COLUMNS]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for i in range(len(recordings.input_row)):
      row = [int(recordings.input_row[i])]
      if recordings.patient_id is not None:
        row.append(int(recordings.patient_id[i]))
      row += [_num(v) for v in recordings.static[i]]
      row += [_num(p) for p in readings['class_prob'][i]]
      row.append(inference.CLASS_NAMES[readings['class_pred'][i]])
      row += [_num(readings[k][i]) for k in READING_COLUMNS]
      writer.writerow(row)


def _num(x):
  """9 significant digits: every float32 (the model's precision) reads back unchanged."""
  return format(float(x), '.9g')


def predict(workdir, input_path, output_path, *, checkpoint=None, on_bad_record='fail',
            fmt=None):
  """Reads `input_path`, predicts with the run in `workdir`, writes `output_path`.

  Returns:
    (Recordings, readings): what was predicted and the readings (`TrainedModel.read`).
  """
  trained = inference.load(workdir, checkpoint)
  recordings = read_recordings(input_path, input_format(input_path, fmt),
                               trained.config.model.signal_length, on_bad_record)
  if not len(recordings.input_row):
    raise ValueError(f'{input_path}: no recording to predict.')
  readings = trained.read(recordings.signal, recordings.static)
  write_predictions(output_path, recordings, readings)
  logging.info('Predicted %d recordings of %s with checkpoint %d of %s: %s.',
               len(recordings.input_row), input_path, trained.step, workdir, output_path)
  return recordings, readings


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='The training run to use.')
  parser.add_argument('--input', required=True, help='Recordings: .csv, .pkl or .npz.')
  parser.add_argument('--output', required=True, help='The CSV of predictions to write.')
  parser.add_argument('--checkpoint', type=int, default=None,
                      help='Checkpoint step to use (default: the best by validation loss).')
  parser.add_argument('--on_bad_record', choices=('fail', 'skip'), default='fail',
                      help='Malformed recordings: fail the run (listing them), or skip them.')
  parser.add_argument('--format', choices=('csv', 'pickle', 'npz'), default=None,
                      help='Input format (default: from the file extension).')
  args = parser.parse_args(argv)
  inference.setup_logging()
  predict(args.workdir, args.input, args.output, checkpoint=args.checkpoint,
          on_bad_record=args.on_bad_record, fmt=args.format)


if __name__ == '__main__':
  main()
