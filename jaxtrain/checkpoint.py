"""Orbax checkpoints of a run in `workdir/checkpoints`: exact resume, best model, faults.

Step convention (the one place it is stated): checkpoints are taken only at optimizer-update
boundaries, and checkpoint `s` holds the state after optimizer update `s` (after the whole
epoch's bookkeeping when `s` ends an epoch); a run resumed from it continues with update
`s + 1`. Rows of metrics.jsonl with `step <= s` were written before checkpoint `s` was saved.

A checkpoint has three items:
  * `params`: the model parameters alone, so evaluation and fine-tuning read no optimizer state
    (their moving average when `training.ema_decay` > 0);
  * `train`: every other array of the loop (micro-step count, RNG key, the full optax state with
    the MultiSteps accumulator, AdamW moments, schedule count and applied learning rate, the
    logging-window and epoch loss accumulators, and, with a moving average of the parameters
    (`training.ema_decay` > 0), the raw parameters AdamW trains, under `params`);
  * `meta`: JSON of the host-side state (data position, early stopping, monitor history).
Epoch-end checkpoints carry the validation total as their orbax metric. Retention keeps the
latest `keep` checkpoints and, besides, the one with the lowest validation total.

Restores use abstract targets carrying the current mesh's sharding, so a checkpoint written on
N devices (or on a GPU or TPU) restores on M devices or on a CPU.
"""

import json
import math
import os
import shutil

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from configs import default

CHECKPOINT_DIR = 'checkpoints'
# Checkpoints that failed to restore are moved here, out of orbax's sight, so that the run can
# save their steps again and the evidence is kept.
CORRUPT_DIR = 'checkpoints_corrupt'
CONFIG_FILE = 'config.json'
VAL_METRIC = 'val_total'
METRICS_ITEM = 'metrics'  # Orbax keeps a step's metrics in <step>/metrics/metrics.
ITEMS = ('params', 'train', 'meta')
# Config keys that change the shapes of the saved arrays or what a saved data position means
# (a prefix ending in '.' covers its whole section). A run does not resume under a config that
# differs in one of them; other differences (epochs, logging, learning rate...) are logged.
STRUCTURAL_KEYS = ('model.', 'data.', 'training.batch_size', 'training.accumulation_steps')
# Keys that add arrays to the saved tree when nonzero: a run resumes under another nonzero
# value, not with the feature switched on or off. A config.json without one reads as its
# default, so each default must stay 0 (or go into PREDATING_VALUES as 0).
SWITCH_KEYS = ('training.ema_decay',)
# How the model computes, not what it holds: a run may resume under another value (e.g. on a
# CPU after a bfloat16 TPU run), and configs saved before these keys existed still resume.
NUMERICS_KEYS = ('model.dtype', 'model.s4_conv')
# Keys added with a default that trains differently: the value a config.json written before the
# key existed stands for (the run trained without the feature).
PREDATING_VALUES = {'loss.nll_beta': 0.0}
# Keys split off another key later: a config.json without one stands for the other's value.
PREDATING_SOURCES = {'model.head_dropout': 'model.dropout'}


class IncompatibleCheckpointError(ValueError):
  """A checkpoint whose parameters do not fit the model the config builds (another version)."""


def _val_total(metrics):
  """Ranking metric of a checkpoint: mid-epoch ones carry no validation total and rank last."""
  return metrics.get(VAL_METRIC, math.inf)


def _options(keep):
  policies = ocp.checkpoint_managers
  return ocp.CheckpointManagerOptions(
      # The training loop decides when to save (epoch ends, new best, timer, signals).
      save_decision_policy=policies.FixedIntervalPolicy(1),
      # The union: best-only retention would delete the newest checkpoint (orbax#526).
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(keep), policies.BestN(get_metric_fn=_val_total, reverse=True, n=1)]),
      # Not for retention (the policy above decides alone): without best_fn orbax keeps the
      # metrics in memory only, so after a restart BestN would not know the best checkpoint.
      best_fn=_val_total, best_mode='min',
      enable_async_checkpointing=True, cleanup_tmp_directories=True)


def read_only_options():
  """For another run's checkpoints: nothing is created, saved, cleaned up or deleted."""
  return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def _checkpoint_dir(path):
  """`path/checkpoints` when `path` is a workdir, else `path` itself (a checkpoint directory)."""
  inner = os.path.join(path, CHECKPOINT_DIR)
  return inner if os.path.isdir(inner) else path


def abstract_tree(shapes, sharding):
  """ShapeDtypeStructs of `shapes` (e.g. from `jax.eval_shape`) placed with `sharding`."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


class Checkpoints:
  """The CheckpointManager of one run, with fallback past checkpoints that fail to restore."""

  def __init__(self, workdir, keep):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if os.path.isdir(self.directory):
      half_written = ocp.path.step.tmp_checkpoints(self.directory)
      if half_written:
        logging.warning('Ignoring half-written checkpoint(s) in %s (a save was interrupted): %s.',
                        self.directory, ', '.join(sorted(half_written)))
      for step in _steps_with_unreadable_metrics(self.directory):
        logging.error('Checkpoint %d in %s has an unreadable metrics file; moving it to %s.',
                      step, self.directory, CORRUPT_DIR)
        self._move_aside(step)
    self.manager = ocp.CheckpointManager(self.directory, options=_options(keep),
                                         item_names=ITEMS)

  @property
  def steps(self):
    return self.manager.all_steps()

  def save(self, step, params, train, meta, val_total=None):
    """Starts an asynchronous save of checkpoint `step`; returns after the device-to-host copy.

    Args:
      step: optimizer updates done.
      params: parameter pytree.
      train: pytree of the other arrays of the loop.
      meta: JSON-able dict.
      val_total: the epoch's validation total (epoch ends only; ranks the best checkpoint).
    """
    self.manager.wait_until_finished()  # Never two saves in flight.
    finite = val_total is not None and math.isfinite(val_total)
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)), metrics={VAL_METRIC: val_total} if finite else {})

  def restore_latest(self, abstract_params, abstract_train):
    """The newest checkpoint that restores, as (step, params, train, meta); None when none does.

    A checkpoint that fails to restore (truncated or missing file, bad JSON) is reported and
    moved to `workdir/checkpoints_corrupt`, and the one before it is tried.

    Raises:
      IncompatibleCheckpointError: the parameters saved are not this model's, or the `train`
        item holds other entries than this config saves (nothing moved).
    """
    for step in sorted(self.steps, reverse=True):
      check_saved_params(self.manager, step, abstract_params)
      check_saved_train(self.manager, step, abstract_train)
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train=ocp.args.StandardRestore(abstract_train), meta=ocp.args.JsonRestore()))
        return step, out.params, out.train, out.meta
      except Exception as e:  # pylint: disable=broad-except
        logging.error('Checkpoint %d in %s does not restore (%s: %s); moving it to %s and '
                      'trying the previous one.', step, self.directory, type(e).__name__,
                      str(e)[:500], CORRUPT_DIR)
        self._move_aside(step)
        self.manager.reload()
    return None

  def _move_aside(self, step):
    """Moves checkpoint `step` to `workdir/checkpoints_corrupt`, where orbax does not look."""
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, CORRUPT_DIR, str(step))
      shutil.rmtree(target, ignore_errors=True)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')

  def best_params(self, abstract_params):
    """(step, params) of the checkpoint with the lowest validation total; None if none has one."""
    return _restore_best_params(self.manager, abstract_params)

  def close(self):
    """Waits for the save in flight to commit, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def _steps_with_unreadable_metrics(directory):
  """Steps whose orbax metrics file does not parse: the manager reads them all when it starts
  and would fail, leaving no checkpoint to fall back to."""
  bad = []
  for step in ocp.path.step.checkpoint_steps(directory):
    path = os.path.join(directory, str(step), METRICS_ITEM, METRICS_ITEM)
    try:
      if os.path.exists(path):
        with open(path) as f:
          json.load(f)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
      bad.append(step)
  return bad


def _restore_best_params(manager, abstract_params):
  """(step, params) of the lowest-val-total checkpoint that restores, or None."""
  ranked = sorted((m[VAL_METRIC], step) for step in manager.all_steps()
                  if (m := manager.metrics(step)) is not None and VAL_METRIC in m)
  for _, step in ranked:
    check_saved_params(manager, step, abstract_params)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
      return step, out.params
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Best-checkpoint candidate %d in %s does not restore (%s: %s); trying the '
                    'next best.', step, manager.directory, type(e).__name__, str(e)[:500])
  return None


def leaf_shapes(tree):
  """{'a/b/c': shape} of a nested mapping of arrays, ShapeDtypeStructs or array metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def check_params_fit(saved, abstract_params, where):
  """Raises IncompatibleCheckpointError naming the parameters whose presence or shape differs.

  Args:
    saved: the checkpoint's parameter tree (arrays or orbax array metadata).
    abstract_params: the model's parameter ShapeDtypeStructs.
    where: the checkpoint, for the message.
  """
  have, want = leaf_shapes(saved), leaf_shapes(abstract_params)
  problems = [f'{k}: saved {have.get(k)}, model {want.get(k)}'
              for k in sorted(have.keys() | want.keys()) if have.get(k) != want.get(k)]
  if problems:
    shown = '; '.join(problems[:8]) + (f'; ... ({len(problems)} in all)'
                                       if len(problems) > 8 else '')
    raise IncompatibleCheckpointError(
        f'{where}: the saved parameters do not fit the model built from the run\'s config '
        f'(None: absent): {shown}. The checkpoint was written by an incompatible version of '
        'the model (e.g. before each task got its own head); nothing was changed on disk. Use '
        'a new --workdir, or the jaxtrain version that wrote it.')


def _saved_tree(where, item):
  """The metadata tree of `item` in the checkpoint directory `where`, or None when it is
  unreadable (the restore then reports the damage)."""
  try:
    # Read through the item's handler: a manager made with item names only (as ours are, for
    # the Composite saves) has no handler to give the metadata of an item it has not restored.
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / item)
  except Exception:  # pylint: disable=broad-except
    return None
  return getattr(saved, 'tree', saved)


def check_saved_train(manager, step, abstract_train):
  """Refuses checkpoint `step` when its `train` item's entries are not the ones this config
  saves: the raw `params` there, or not, is a moving average switched on or off (a resume the
  config check lets through only without a config.json). Without this the restore would fail
  and move a sound checkpoint aside as damaged."""
  where = os.path.join(str(manager.directory), str(step))
  saved = _saved_tree(where, 'train')
  if saved is None or set(saved) == set(abstract_train):
    return
  raise IncompatibleCheckpointError(
      f'{where}: its train item holds {sorted(saved)} and this config saves '
      f'{sorted(abstract_train)}; \'params\' there means a moving average of the parameters '
      '(training.ema_decay > 0). Resume with the training.ema_decay the run had, or use a new '
      '--workdir; nothing was changed on disk.')


def check_saved_params(manager, step, abstract_params):
  """`check_params_fit` on the parameter metadata saved in checkpoint `step` (skipped when it
  is unreadable: the restore then reports the damage)."""
  where = os.path.join(str(manager.directory), str(step))
  saved = _saved_tree(where, 'params')
  if saved is not None:
    check_params_fit(saved, abstract_params, where)


def load_best_params(path, abstract_params):
  """Parameters of the best checkpoint (lowest validation total) of a run, without its optimizer.

  Args:
    path: a run's workdir or its checkpoints directory.
    abstract_params: ShapeDtypeStructs of the parameters with the target sharding (see
      `abstract_tree`).

  Returns:
    (step, params).
  """
  directory = _checkpoint_dir(os.path.abspath(path))
  manager = ocp.CheckpointManager(directory, options=read_only_options(), item_names=ITEMS)
  try:
    found = _restore_best_params(manager, abstract_params)
  finally:
    manager.close()
  if found is None:
    raise FileNotFoundError(f'No restorable checkpoint with a validation total in {directory}.')
  return found


def flatten_config(tree, prefix=''):
  """{'a.b': leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_differences(saved, requested):
  """{dotted key: (saved value, requested value)} where two config dicts differ (None: absent)."""
  a, b = flatten_config(saved), flatten_config(requested)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def is_structural(key):
  if key in NUMERICS_KEYS:
    return False
  return any(key == k or (k.endswith('.') and key.startswith(k)) for k in STRUCTURAL_KEYS)


def switches(key, saved, requested):
  """Whether changing SWITCH_KEYS member `key` from `saved` to `requested` turns it on or off."""
  return key in SWITCH_KEYS and bool(saved) != bool(requested)


def config_as_dict(config):
  """The JSON form of a ConfigDict, as `config.json` holds it."""
  return json.loads(config.to_json_best_effort())


def _read_config(path):
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f)


def _describe(differences):
  return '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in differences.items())


def merge_config(base, override):
  """`base` with the leaves of `override` put in (nested dicts merged key by key)."""
  out = dict(base)
  for key, value in override.items():
    out[key] = merge_config(base[key], value) if isinstance(value, dict) else value
  return out


def absent_key_values(saved=None):
  """configs/default.py as a config.json dict, each key at the value a saved config that lacks
  it stands for: its default, or, where the default trains differently, PREDATING_VALUES', or
  the value in `saved` (a config.json dict) of its PREDATING_SOURCES key."""
  config = default.get_config()
  config.update_from_flattened_dict(PREDATING_VALUES)
  saved = flatten_config(saved or {})
  config.update_from_flattened_dict({k: saved[source] for k, source in PREDATING_SOURCES.items()
                                     if source in saved})
  return config_as_dict(config)


def check_resume_config(workdir, config):
  """Refuses to resume `workdir` under a config that changes the saved arrays (shapes, or a
  SWITCH_KEYS feature turned on or off) or the data position; logs harmless changes.

  A key the saved config lacks (added to jaxtrain after the run started) is harmless at its
  default value in configs/default.py, which by convention keeps the earlier behaviour; where
  it does not (PREDATING_VALUES, PREDATING_SOURCES), only at the value the run trained with.

  Raises:
    ValueError: listing the structural keys, and the SWITCH_KEYS switched on or off, whose
      values differ from the saved config.json.
  """
  saved = _read_config(workdir)
  if saved is None:
    return
  differences = config_differences(saved, config_as_dict(config))
  defaults = flatten_config(absent_key_values(saved))
  predating = PREDATING_VALUES.keys() | PREDATING_SOURCES.keys()
  # A key added after the run was saved behaves, at its default, as the run did without it
  # (the keys of `predating`: at the value the run trained with, checked below).
  structural = {k: v for k, v in differences.items() if is_structural(k)
                and not (v[0] is None and k in defaults and (v[1] == defaults[k]
                                                             or k in predating))}
  structural.update({k: v for k, v in differences.items()
                     if switches(k, defaults.get(k) if v[0] is None else v[0], v[1])})
  if structural:
    raise ValueError(
        f'{workdir} holds checkpoints of a run whose config differs in keys that change the '
        f'saved arrays or the data position, so it cannot resume under this config: '
        f'{_describe(structural)}. Use a new --workdir, or the saved values '
        f'({os.path.join(workdir, CONFIG_FILE)}).')
  changed = {k: (defaults[k], v[1]) for k, v in differences.items()
             if v[0] is None and k in predating and v[1] != defaults[k]}
  if changed:
    raise ValueError(
        f'{workdir} holds checkpoints of a run that predates {", ".join(changed)}, so it '
        f'trained as with {_describe(changed)}; resuming would change its loss midway. Resume '
        f'with {" ".join(f"--config.{k}={v[0]!r}" for k, v in changed.items())}, or use a new '
        f'--workdir.')
  if differences:
    logging.warning('Resuming %s under a config that differs from the saved one in: %s.',
                    workdir, _describe(differences))


def check_init_config(path, config):
  """Refuses `init_from=path` when that run's model config differs from this one's."""
  saved = _read_config(path)
  if saved is None:
    return
  # Keys added after that run was saved stand for what it did without them.
  model = merge_config(absent_key_values(saved), saved)['model']
  differences = config_differences(model, config_as_dict(config)['model'])
  if differences:
    raise ValueError(f'init_from={path}: its model config differs from this one: '
                     f'{_describe({"model." + k: v for k, v in differences.items()})}.')
