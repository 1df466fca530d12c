"""Recordings as a plain CSV file, one per row, for `python -m jaxtrain.predict`.

Each row holds 204 comma-separated numbers:

  age, intensity, rate, fmp, s0, s1, ..., s199

  age        patient age in years (the original stored unknown ages as 0, like newborns);
  intensity  stimulus level in dB nHL;
  rate       stimuli per second;
  fmp        the Fmp F-ratio of the averaged response;
  s0..s199   the 200 samples of the averaged trace, in µV (any unit works: the model
             standardises each trace on its own, as in training).

The first line may be a header; it is recognised by a non-numeric first field, and its first
four names must be age, intensity, rate, fmp (any case). Blank lines are ignored. A row with
another number of fields, a missing (empty) or non-numeric value, NaN or infinity is malformed:
`read` names each one by its line number (1-based, the header counted), and fails or skips it.
"""

import csv
import logging
import math

import numpy as np

STATIC_COLUMNS = ('age', 'intensity', 'rate', 'fmp')


class BadRowError(ValueError):
  """Rows of the CSV are malformed; the message names them by line number."""


def read(path, length, on_bad_record):
  """Reads the recordings of a CSV file.

  Args:
    path: the file.
    length: samples per trace (200).
    on_bad_record: 'fail' (raise listing every malformed row) or 'skip' (log them, drop them).

  Returns:
    (static f64 [N, 4] in units, signal f64 [N, length], line int64 [N]: the file line of
    each recording).

  Raises:
    BadRowError: malformed rows with on_bad_record='fail', or a header that does not match.
  """
  if on_bad_record not in ('fail', 'skip'):
    raise ValueError(f"on_bad_record must be 'fail' or 'skip', not {on_bad_record!r}.")
  rows, lines, problems = [], [], []
  with open(path, newline='') as f:
    for line, fields in enumerate(csv.reader(f), start=1):
      if not any(field.strip() for field in fields):
        continue
      if line == 1 and not _is_number(fields[0]):
        _check_header(fields, path)
        continue
      values, problem = _parse(fields, length)
      if problem is None:
        rows.append(values)
        lines.append(line)
      else:
        problems.append(f'line {line}: {problem}')
  if problems:
    listing = '; '.join(problems[:20]) + (f'; ... ({len(problems)} in all)'
                                          if len(problems) > 20 else '')
    if on_bad_record == 'fail':
      raise BadRowError(f'{path}: {len(problems)} malformed row(s), nothing predicted: '
                        f'{listing}. Fix them, or skip them (--on_bad_record=skip).')
    logging.warning('%s: skipped %d malformed row(s): %s.', path, len(problems), listing)
  table = np.asarray(rows, np.float64).reshape(len(rows), len(STATIC_COLUMNS) + length)
  return table[:, :len(STATIC_COLUMNS)], table[:, len(STATIC_COLUMNS):], np.asarray(lines)


def _is_number(text):
  try:
    float(text)
  except ValueError:
    return False
  return True


def _check_header(fields, path):
  names = tuple(f.strip().lower() for f in fields[:len(STATIC_COLUMNS)])
  if names != STATIC_COLUMNS:
    raise BadRowError(f'{path}: line 1 is a header whose first columns are {list(names)}; '
                      f'expected {list(STATIC_COLUMNS)} and then the samples.')


def _field_name(i):
  return STATIC_COLUMNS[i] if i < len(STATIC_COLUMNS) else f'sample {i - len(STATIC_COLUMNS)}'


def _parse(fields, length):
  """(values [4 + length], None) of a row, or (None, the first problem found)."""
  expected = len(STATIC_COLUMNS) + length
  if len(fields) != expected:
    samples = f' and {length} samples' if length else ''
    return None, f'{len(fields)} fields, expected {expected} (age, intensity, rate, fmp{samples})'
  values = []
  for i, field in enumerate(fields):
    text = field.strip()
    if not text:
      return None, f'{_field_name(i)} is missing'
    try:
      value = float(text)
    except ValueError:
      return None, f'{_field_name(i)} is {text!r}, not a number'
    if not math.isfinite(value):
      return None, f'{_field_name(i)} is {text}'
    values.append(value)
  return values, None
