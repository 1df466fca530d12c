"""Draws the traces that measure a run's generation quality on synthetic data.

  python -m jaxtrain.generation_quality --workdir=RUN [--checkpoint=STEP] [--num=32] \
      [--steps=50] [--sampler=ddim] [--guidance=1] [--per_cell=2] [--seed=0]

On synthetic data the clean (noise-free) trace of every recording is known. This takes
conditions from the run's test split (regenerated from its config): for each class and each
intensity of INTENSITIES_DB, up to `per_cell` recordings with a wave V. For each condition it
draws `num` traces with the recording's four statics, reads them with the model's task heads,
and saves `RUN/generation/samples.npz`.

A condition's four statics do not fix its clean trace: the simulator draws each patient's
traits (latency offset, threshold, class) beside them, and the model is conditioned on the
statics only. So the samples also hold the condition's expected clean trace, the mean over the
CONDITION_NEIGHBOURS train recordings at the same intensity nearest in standardised age, rate
and FMP; the generator's mean trace is an estimate of it. `jaxtrain.report.generation` computes
the metrics from it and puts them in the report and its checklist; this prints its summary at
the end.
"""

import argparse
import logging
import os

import numpy as np

from jaxtrain import data
from jaxtrain import generate
from jaxtrain import inference
from jaxtrain import sampling
from jaxtrain.report import generation as report_generation
from jaxtrain.report import run as report_run

INTENSITIES_DB = tuple(range(20, 101, 10))
# Train recordings averaged into a condition's expected clean trace. Its mean correlation with
# the recordings' own clean traces barely depends on the number: 0.559-0.569 for 8 to 256
# (each trace z-scored on its own; full native set, 47 conditions), 0.582 at 64 as here.
CONDITION_NEIGHBOURS = 64


def synthetic_splits(config):
  """The run's train and test splits, {name: records in units} with the clean traces
  (synthetic runs only)."""
  if config.data.source != 'synthetic':
    raise ValueError(f'Generation quality needs the clean traces of synthetic data; this run '
                     f"trained on data.source='{config.data.source}'.")
  return data.split_records(config.data, ['train', 'test'])


def select_conditions(records, per_cell, seed):
  """Rows of `records` with a wave V: up to `per_cell` per (class, intensity in INTENSITIES_DB),
  drawn with numpy seed `seed`; sorted by class, then intensity."""
  rng = np.random.default_rng(seed)
  present = records['peak_mask'] > 0.5
  chosen = []
  for k in range(data.NUM_CLASSES):
    for level in INTENSITIES_DB:
      rows = np.flatnonzero(present & (records['label'] == k)
                            & (records['static'][:, 1] == level))
      chosen.extend(rng.choice(rows, min(per_cell, len(rows)), replace=False).tolist())
  return np.asarray(chosen, np.int64)


def condition_clean(train, static):
  """Expected clean traces [C, L] of the conditions `static` [C, 4] (age, intensity, rate, FMP):
  per condition the mean of the CONDITION_NEIGHBOURS `train` recordings at its intensity
  nearest in age, rate and FMP (standardised by their train sd), each standardised with its
  recorded trace's mean and sd, the unit the model generates in."""
  _, mean, std = data.standardize_traces(train['signal'])
  clean = (train['clean'] - mean) / std
  scale = train['static'].std(axis=0) + 1e-12
  out = []
  for condition in np.asarray(static, np.float64):
    distance = np.sum(((train['static'] - condition) / scale)[:, [0, 2, 3]] ** 2, axis=1)
    distance[train['static'][:, 1] != condition[1]] = np.inf
    nearest = np.argsort(distance)[:CONDITION_NEIGHBOURS]
    if not np.isfinite(distance[nearest]).any():
      raise ValueError(f'No train recording at {condition[1]:g} dB to average a condition on.')
    out.append(clean[nearest[np.isfinite(distance[nearest])]].mean(axis=0))
  return np.asarray(out, np.float32)


def draw_samples(trained, records, rows, num, settings, train):
  """The arrays of generation/samples.npz for the conditions `rows` of `records`; `train`: the
  train split's records (for the conditions' expected clean traces)."""
  recorded, mean, std = data.standardize_traces(records['signal'][rows])
  out = generate.generate(trained, records['static'][rows], num, settings)
  c = len(rows)
  per_condition = lambda x: np.asarray(x).reshape((c, num) + np.shape(x)[1:])
  return {
      'static': records['static'][rows], 'label': records['label'][rows],
      'latency_ms': records['peak_latency'][rows], 'amplitude_uv': records['peak_amplitude'][rows],
      'threshold_db': records['threshold'][rows], 'recorded': recorded,
      'clean': ((records['clean'][rows] - mean) / std).astype(np.float32),
      'condition_clean': condition_clean(train, records['static'][rows]),
      'generated': per_condition(out['signal']),
      **{f'read_{k}': per_condition(out[k]) for k in (
          'v_probability', 'v_latency_ms', 'v_amplitude_uv', 'class_pred', 'threshold_db')},
      'time_ms': out['time_ms'], 'class_names': out['class_names'],
  }


def evaluate(workdir, *, checkpoint=None, num=32, per_cell=2, settings=None):
  """Draws and saves `workdir/generation/samples.npz`; returns its path."""
  settings = settings or generate.SamplerSettings()
  trained = inference.load(workdir, checkpoint)
  splits = synthetic_splits(trained.config)
  records = splits['test']
  rows = select_conditions(records, per_cell, settings.seed)
  if not len(rows):
    raise ValueError(f'{workdir}: the test split has no recording with a wave V at '
                     f'{INTENSITIES_DB} dB.')
  samples = draw_samples(trained, records, rows, num, settings, splits['train'])
  samples.update(checkpoint=trained.step, num=num, **settings.to_saved())
  path = os.path.join(workdir, report_run.GENERATION_SAMPLES)
  report_generation.save_samples(path, samples)
  logging.info('Generated %d traces for %d conditions with checkpoint %d: %s.',
               len(rows) * num, len(rows), trained.step, path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--checkpoint', type=int, default=None,
                      help='Checkpoint step (default: the best by validation loss).')
  parser.add_argument('--num', type=int, default=32, help='Traces per condition.')
  parser.add_argument('--per_cell', type=int, default=2,
                      help='Conditions per (class, intensity) cell.')
  parser.add_argument('--sampler', choices=sampling.METHODS, default='ddim')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--eta', type=float, default=None)
  parser.add_argument('--guidance', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  inference.setup_logging()
  settings = generate.SamplerSettings(args.sampler, args.steps, args.eta, args.guidance,
                                      True, args.seed)
  evaluate(args.workdir, checkpoint=args.checkpoint, num=args.num, per_cell=args.per_cell,
           settings=settings)
  for line in report_generation.summary_lines(report_run.load_generation_samples(args.workdir)):
    print(line)


if __name__ == '__main__':
  main()
