"""Save and restore time and on-disk size of the convergence-size training checkpoint.

  python -m benchmarks.checkpoint_io [--config=configs/convergence.py] [--repeats=3]

The state is what `train_and_evaluate` checkpoints for the config (full model sizes by
default): the parameters, the `train` item (MultiSteps accumulator, AdamW moments, schedule
state, step, RNG key, loss accumulators; the raw parameters besides when the config keeps a
moving average of them) and a small JSON `meta`, saved and restored with
`jaxtrain.checkpoint.Checkpoints` exactly as in training, replicated over the current mesh.
The shapes come from `jax.eval_shape` of the real initialisation, and every float buffer is
filled with random values as in a trained run (a fresh state's all-zero moments would compress
to almost nothing and understate the size and the time).
"""

import functools
import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

from jaxtrain import checkpoint
from jaxtrain import models
from jaxtrain import optim
from jaxtrain import steps
from jaxtrain import train

config_flags.DEFINE_config_file('config', 'configs/convergence.py', 'Config whose state to save.')
flags.DEFINE_integer('repeats', 3, 'Saves and restores timed (their median is reported).')
FLAGS = flags.FLAGS


def abstract_targets(config, sharding):
  """ShapeDtypeStructs of the checkpoint's (params, train item), placed with `sharding`."""
  model = models.create_model(config)
  tx = optim.create_optimizer(config, steps_per_epoch=1)  # Its length changes no shape.
  state = jax.eval_shape(functools.partial(steps.create_train_state, config, model, tx),
                         jax.random.PRNGKey(0))
  metrics = jax.eval_shape(steps.empty_loss_metrics)
  state, metrics = (checkpoint.abstract_tree(t, sharding) for t in (state, metrics))
  return state.eval_params, train.checkpoint_arrays(state, metrics, metrics)


def random_like(abstract, seed=0):
  """Device arrays of `abstract`'s shapes and shardings: standard normal floats, zero ints."""
  rng = np.random.default_rng(seed)

  def fill(s):
    if np.issubdtype(s.dtype, np.floating):
      value = rng.standard_normal(s.shape, dtype=np.float32).astype(s.dtype)
    else:
      value = np.zeros(s.shape, s.dtype)
    return jax.device_put(value, s.sharding)

  return jax.block_until_ready(jax.tree.map(fill, abstract))


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def disk_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _mb(n):
  return f'{n / 2**20:8.1f} MiB'


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per save.
  config = FLAGS.config
  mesh = steps.create_mesh()
  sharding = jax.NamedSharding(mesh, jax.P())
  abstract_params, abstract_arrays = abstract_targets(config, sharding)
  params, arrays = random_like(abstract_params), random_like(abstract_arrays, seed=1)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'{n_params:,} parameters on {jax.device_count()} {jax.devices()[0].platform} device(s); '
        f'in memory: params {_mb(nbytes(params))}, train item {_mb(nbytes(arrays))}')
  workdir = tempfile.mkdtemp(prefix='checkpoint_io_')
  ckpt = checkpoint.Checkpoints(workdir, keep=1)
  blocking, total, restore, restore_params = [], [], [], []
  try:
    for step in range(1, FLAGS.repeats + 1):
      start = time.perf_counter()
      ckpt.save(step, params, arrays, {'epoch': 1, 'micro_batch': 0}, val_total=float(-step))
      blocking.append(time.perf_counter() - start)
      ckpt.manager.wait_until_finished()
      total.append(time.perf_counter() - start)
      start = time.perf_counter()
      jax.block_until_ready(ckpt.restore_latest(abstract_params, abstract_arrays)[1:3])
      restore.append(time.perf_counter() - start)
      start = time.perf_counter()
      jax.block_until_ready(checkpoint.load_best_params(workdir, abstract_params)[1])
      restore_params.append(time.perf_counter() - start)
    step_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(FLAGS.repeats))
    sizes = {item: disk_bytes(os.path.join(step_dir, item)) for item in checkpoint.ITEMS}
  finally:
    ckpt.close()
    shutil.rmtree(workdir)
  print(f'median of {FLAGS.repeats} (all runs in brackets)')
  for name, times in (('save, blocking part', blocking), ('save, total (until committed)', total),
                      ('restore, full (params + train + meta)', restore),
                      ('restore, best params only', restore_params)):
    print(f'  {name:40s} {statistics.median(times):6.2f} s  '
          f'({", ".join(f"{t:.2f}" for t in times)})')
  print('on disk: ' + ', '.join(f'{k} {_mb(v).strip()}' for k, v in sizes.items())
        + f'; checkpoint {_mb(sum(sizes.values())).strip()}')


if __name__ == '__main__':
  app.run(main)
