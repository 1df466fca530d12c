"""What the report reads from a workdir (`Run`), and the schedule and loss helpers that both
the checks and the figures use."""

import dataclasses
import importlib
import json
import math
import os

import ml_collections
import numpy as np

from jaxtrain import monitors

# Loss components in metrics.jsonl order; config.loss.weights names 'class' 'classification'.
TERMS = ('signal', 'peak_exist', 'peak_latency', 'peak_amplitude', 'class', 'threshold')
WEIGHT_KEYS = {'class': 'classification'}
# Traces drawn by `python -m jaxtrain.generation_quality` (see generation.py).
GENERATION_SAMPLES = os.path.join('generation', 'samples.npz')


@dataclasses.dataclass
class Check:
  """One checklist item: its rule, the numbers it was judged on, and the verdict."""
  item: str
  rule: str
  numbers: str
  passed: bool


@dataclasses.dataclass
class Run:
  """What the report reads from one workdir."""
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  info: dict
  rows: list
  preds: dict | None  # predictions/test.npz, None before the run has finished.
  generation: dict | None  # generation/samples.npz, None until generation_quality has run.

  @property
  def steps_per_epoch(self):
    return self.info['steps_per_epoch']

  @property
  def test(self):
    """Metrics of the last test row ({} when the run has none yet)."""
    rows = [r for r in self.rows if r.get('split') == 'test']
    return rows[-1] if rows else {}

  def series(self, split, key):
    """(epochs [E], values [E]) of an epoch-row key."""
    pairs = monitors.epoch_series(self.rows, split, key, math.inf)
    return np.asarray([e for e, _ in pairs], float), np.asarray([v for _, v in pairs], float)



def load_run(workdir):
  """Reads a workdir into a `Run`."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, 'run_info.json')) as f:
    info = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  path = os.path.join(workdir, 'predictions', 'test.npz')
  preds = dict(np.load(path)) if os.path.exists(path) else None
  name = os.path.basename(os.path.normpath(workdir))
  return Run(name, workdir, config, info, rows, preds, load_generation_samples(workdir))


def load_generation_samples(workdir):
  """The arrays of `workdir/generation/samples.npz`, or None when it does not exist."""
  path = os.path.join(workdir, GENERATION_SAMPLES)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return dict(f)


def fmt(x, digits=4):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return 'n/a'
  return f'{x:.{digits}g}'


def weight(config, term):
  return float(config.loss.weights[WEIGHT_KEYS.get(term, term)])


def restart_epochs(config):
  """Epoch boundaries (in completed epochs) where the schedule warms up or restarts.

  Returns:
    (warm-up end or None, [restart boundaries]) within `training.num_epochs`.
  """
  t = config.training
  warmup = float(t.warmup_epochs) if t.warmup_epochs > 0 else None
  restarts, boundary, length = [], float(t.warmup_epochs), float(t.restart_epochs)
  if t.restart_epochs <= 0 or t.restart_mult < 1:  # Not a valid schedule: nothing to mark.
    return warmup, restarts
  while boundary + length < t.num_epochs:
    boundary += length
    restarts.append(boundary)
    length *= t.restart_mult
  return warmup, restarts


def scheduled_learning_rate(config, steps_per_epoch, counts):
  """`jaxtrain.optim.create_learning_rate_fn` at the update counts [M] (float64 [M]).

  Imported lazily: the report needs neither JAX nor the optimizer for anything else.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  optim = importlib.import_module('jaxtrain.optim')
  fn = optim.create_learning_rate_fn(config, steps_per_epoch)
  values = jax.jit(jax.vmap(fn))(jnp.asarray(counts, jnp.int32))
  return np.asarray(values, np.float64)


def logged_learning_rate(run):
  """(steps [M], lr [M]) of every train row with an 'lr', one per step, by step."""
  by_step = {r['step']: r['lr'] for r in run.rows
             if r.get('split') == 'train' and r.get('lr') is not None}
  steps = np.asarray(sorted(by_step), np.int64)
  return steps, np.asarray([by_step[s] for s in steps], np.float64)



def component_shares(run, split):
  """(epochs [E], {term: |w_k L_k| / sum_j |w_j L_j| [E]}) over epochs with every term."""
  series = {t: dict(zip(*run.series(split, f'loss/{t}'))) for t in TERMS}
  epochs = sorted(set.intersection(*(set(s) for s in series.values())))
  weighted = np.asarray([[abs(weight(run.config, t) * series[t][e]) for t in TERMS]
                         for e in epochs]).reshape(len(epochs), len(TERMS))
  shares = weighted / np.maximum(weighted.sum(1, keepdims=True), 1e-30)
  return np.asarray(epochs), {t: shares[:, i] for i, t in enumerate(TERMS)}

