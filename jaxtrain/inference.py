"""A trained model, loaded from its workdir in one place, and its readings of recordings.

  trained = inference.load('runs/demo')              # best checkpoint; or step=1234
  out = trained.read(signal, static)                 # [N, 200] trace, [N, 4] statics in units
  out['threshold_db'], out['v_latency_ms'], out['class_prob'], ...

A workdir holds what this needs: `config.json` (the run's config), `normalizer.json` (the
training split's standardisation of the statics and targets; runs written before that file
existed have it in `run_info.json`) and `checkpoints/` (orbax, `params` item: the moving
average of the parameters when the run kept one, `training.ema_decay`). A config saved
before a key existed gets the key's default from configs/default.py (logged); a config with a
key this version does not know, or a checkpoint whose parameters do not fit the model that
config builds, is refused with `IncompatibleRunError` naming the keys or parameters.
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxtrain import checkpoint
from jaxtrain import data
from jaxtrain import losses
from jaxtrain import models

RUN_INFO_FILE = 'run_info.json'
CLASS_NAMES = data.CLASS_NAMES
BATCH_SIZE = 256  # Recordings per compiled call; the last batch is padded to this size.


class IncompatibleRunError(checkpoint.IncompatibleCheckpointError):
  """The workdir lacks a file the model needs, or was written by an incompatible version."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A run's model with the parameters of one checkpoint, ready to read recordings."""
  workdir: str
  step: int  # The checkpoint (optimizer updates done).
  config: ml_collections.ConfigDict
  model: object  # models.HierarchicalUNet
  params: dict
  normalizer: data.Normalizer

  def read(self, signal, static):
    """The task heads' readings of recordings, in clinical units.

    Args:
      signal: [N, 200] traces in any unit (each is standardised on its own, as in training).
      static: [N, 4] age (yr), intensity (dB), rate (/s), FMP, in units.

    Returns:
      dict of [N] float64 arrays (class_prob [N, K]): see `readings`.
    """
    z, _, _ = data.standardize_traces(signal)
    return self.read_standardized(z, self.normalizer.standardize('static', static))

  def read_standardized(self, z, static_z):
    """`read` for per-trace standardised traces z [N, 200] and standardised statics [N, 4]."""
    outputs = [jax.device_get(_heads(self.model, self.params, *batch))
               for batch in padded_batches(np.asarray(z, np.float32),
                                           np.asarray(static_z, np.float32))]
    merged = {k: np.concatenate([o[k] for o in outputs])[:len(z)] for k in outputs[0]}
    return readings(merged, self.normalizer, self.config)


@functools.partial(jax.jit, static_argnums=0)
def _heads(model, params, x, static):
  """The task heads on clean traces (diffusion step 0, no dropout): x [B, L], static [B, 4]."""
  out = model.apply({'params': params}, x, static, jnp.zeros(x.shape[0], jnp.int32), train=False)
  return {k: v for k, v in out.items() if k != 'signal'}


def padded_batches(x, static):
  """(x, static) in batches of BATCH_SIZE rows; the last one zero-padded, so one compile."""
  for lo in range(0, len(x), BATCH_SIZE):
    part_x, part_s = x[lo:lo + BATCH_SIZE], static[lo:lo + BATCH_SIZE]
    pad = BATCH_SIZE - len(part_x)
    yield (np.pad(part_x, ((0, pad), (0, 0))), np.pad(part_s, ((0, pad), (0, 0))))


def readings(outputs, normalizer, config):
  """Head outputs (standardised, logits) -> readings in units.

  Args:
    outputs: model outputs over N rows: 'peak_exist' [N] logit; 'peak_latency',
      'peak_amplitude', 'threshold' [N, 2] (standardised location, log-scale); 'class_logits'
      [N, K].
    normalizer: the run's `data.Normalizer`.
    config: the run's config (a threshold trained with the Huber loss has no spread: NaN).

  Returns:
    dict: 'class_prob' [N, K], 'class_pred' [N] int; 'v_probability'; 'v_latency_ms',
    'v_latency_sd_ms'; 'v_amplitude_uv', 'v_amplitude_sd_uv'; 'threshold_db',
    'threshold_sd_db' (each [N]). A spread is the predicted distribution's sd, in the unit.
  """
  logits = np.asarray(outputs['class_logits'], np.float64)
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  out = {'class_prob': prob, 'class_pred': prob.argmax(1),
         'v_probability': 1 / (1 + np.exp(-np.asarray(outputs['peak_exist'], np.float64)))}
  peak = losses.peak_nll(config)
  # The threshold's 'nll' loss is always the Gaussian's.
  for name, key, unit, likelihood in (('v_latency', 'peak_latency', 'ms', peak),
                                      ('v_amplitude', 'peak_amplitude', 'uv', peak),
                                      ('threshold', 'threshold', 'db',
                                       losses.PEAK_NLLS['gaussian'])):
    location_z, log_scale = np.asarray(outputs[key], np.float64).T
    out[f'{name}_{unit}'] = normalizer.to_units(key, location_z)
    out[f'{name}_sd_{unit}'] = (likelihood.sd_per_scale * np.exp(log_scale)
                                * normalizer.stats[key][1])
  if config.loss.threshold_loss != 'nll':  # Its log-scale was never trained.
    out['threshold_sd_db'] = np.full(len(prob), np.nan)
  return out


def setup_logging():
  """INFO messages of the command-line tools, without orbax's per-restore INFO lines."""
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------
# Loading.

def load(workdir, step=None):
  """The model of the run in `workdir`, with the parameters of its best or a named checkpoint.

  Args:
    workdir: a training run's directory.
    step: checkpoint to load; None for the best one (lowest validation total).

  Raises:
    IncompatibleRunError: a file is missing, the config has keys this version does not know,
      or the checkpoint's parameters do not fit the model the config builds.
    FileNotFoundError: the workdir or the requested checkpoint does not exist.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such run directory.')
  config = load_config(workdir)
  normalizer = load_normalizer(workdir)
  model = models.create_model(config)
  abstract = _abstract_params(config, model)
  step, params = _restore_params(workdir, step, abstract)
  logging.info('Loaded %s: checkpoint %d.', workdir, step)
  return TrainedModel(workdir, step, config, model, params, normalizer)


def load_config(workdir):
  """The run's config.json over configs/default.py: keys it lacks get their default (logged),
  or the value a run without them trained with (checkpoint.PREDATING_VALUES, or the saved value
  of the key in checkpoint.PREDATING_SOURCES).

  Raises:
    IncompatibleRunError: no config.json, or keys configs/default.py does not define.
  """
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.exists(path):
    raise IncompatibleRunError(f'{workdir}: no {checkpoint.CONFIG_FILE}; not a jaxtrain run '
                               'directory (train.py writes it when a run starts).')
  with open(path) as f:
    saved = json.load(f)
  defaults = checkpoint.absent_key_values(saved)
  saved_flat, default_flat = checkpoint.flatten_config(saved), checkpoint.flatten_config(defaults)
  unknown = sorted(saved_flat.keys() - default_flat.keys())
  if unknown:
    raise IncompatibleRunError(
        f'{path} has keys this version of jaxtrain does not know: {", ".join(unknown)}. It was '
        'written by another version; load it with the jaxtrain version that trained it.')
  filled = sorted(default_flat.keys() - saved_flat.keys())
  if filled:
    logging.info('%s predates the keys %s: using their defaults from configs/default.py, or '
                 'what a run without them did (checkpoint.PREDATING_VALUES, '
                 'checkpoint.PREDATING_SOURCES).',
                 path, ', '.join(f'{k}={default_flat[k]!r}' for k in filled))
  return ml_collections.ConfigDict(checkpoint.merge_config(defaults, saved))


def load_normalizer(workdir):
  """The run's training-split normaliser (normalizer.json, else run_info.json's data section)."""
  path = os.path.join(workdir, data.NORMALIZER_FILE)
  if os.path.exists(path):
    return data.Normalizer.load(path)
  info_path = os.path.join(workdir, RUN_INFO_FILE)
  if os.path.exists(info_path):
    with open(info_path) as f:
      stats = json.load(f).get('data', {}).get('normalizer')
    if stats is not None:
      return data.Normalizer.from_dict(stats)
  raise IncompatibleRunError(
      f'{workdir}: no {data.NORMALIZER_FILE} and no normaliser in {RUN_INFO_FILE}; the model reads '
      'statics standardised with its training split, so it cannot be used without them.')


def _abstract_params(config, model):
  """ShapeDtypeStructs of the parameters `model` has under `config` (nothing is computed)."""
  length, static_dim = config.model.signal_length, config.model.static_dim
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, length)),
                         jnp.zeros((1, static_dim)), jnp.zeros((1,), jnp.int32)))['params']
  return checkpoint.abstract_tree(shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _restore_params(workdir, step, abstract):
  """(step, params) of checkpoint `step` (None: the best) after checking the saved shapes."""
  directory = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise IncompatibleRunError(f'{workdir}: no {checkpoint.CHECKPOINT_DIR}/ directory; the run '
                               'saved no checkpoint yet.')
  manager = ocp.CheckpointManager(directory, options=checkpoint.read_only_options(),
                                  item_names=checkpoint.ITEMS)
  try:
    step = _pick_step(manager, step, directory)
    try:
      checkpoint.check_saved_params(manager, step, abstract)
    except checkpoint.IncompatibleCheckpointError as e:
      raise IncompatibleRunError(str(e)) from None
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params
  finally:
    manager.close()
  return step, params


def _pick_step(manager, step, directory):
  steps = manager.all_steps()
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'{directory}: no checkpoint {step}; it has {sorted(steps)}.')
    return step
  ranked = sorted((m[checkpoint.VAL_METRIC], s) for s in steps
                  if (m := manager.metrics(s)) is not None and checkpoint.VAL_METRIC in m)
  if not ranked:
    raise IncompatibleRunError(f'{directory}: no checkpoint with a validation total (steps '
                               f'{sorted(steps)}); name one with step=.')
  return ranked[0][1]
