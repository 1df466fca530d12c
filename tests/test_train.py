"""The training loop end to end on the tiny `:test` preset (jaxtrain/train.py, main.py flags)."""

import concurrent.futures
import json
import os
import subprocess
import sys

from absl import flags
import jax
import ml_collections
import numpy as np
import pytest

from configs import convergence
from jaxtrain import monitors
from jaxtrain import optim
from jaxtrain import steps
from jaxtrain import train
from jaxtrain import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*overrides, config='configs/convergence.py:test'):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['main.py', f'--config={os.path.join(ROOT, config)}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  return value + '_x'


def test_every_config_key_can_be_overridden_on_the_command_line():
  leaves = dict(_leaves(convergence.get_config('test')))
  assert len(leaves) > 40
  for key, value in leaves.items():
    new = _changed(value)
    config = _parse(f'--config.{key}={new}')
    got = config
    for part in key.split('.'):
      got = got[part]
    assert got == new and type(got) is type(value), key


def test_misspelled_key_is_refused_with_its_name():
  with pytest.raises(Exception, match='learning_ratee'):
    _parse('--config.training.learning_ratee=3e-5')


def test_presets_keep_the_optimizer_schedule_and_weights():
  full = convergence.get_config()
  for preset in ('demo', 'test'):
    small = convergence.get_config(preset)
    assert small.loss.weights.to_dict() == full.loss.weights.to_dict()
    for key in ('accumulation_steps', 'grad_clip_norm', 'weight_decay', 'warmup_epochs',
                'restart_epochs', 'restart_mult', 'min_learning_rate', 'b1', 'b2', 'eps'):
      assert small.training[key] == full.training[key], (preset, key)
  with pytest.raises(ValueError, match='preset'):
    convergence.get_config('tiny')


def test_compilation_cache_goes_to_the_workdir_unless_one_is_set(tmp_path):
  config = convergence.get_config('test')
  workdir = str(tmp_path)
  expected = os.path.join(workdir, 'compilation_cache')
  assert train.compilation_cache_dir(config, workdir, None) == (expected, True)
  assert train.compilation_cache_dir(config, workdir, '/set') == ('/set', False)
  config.compilation_cache_dir = '/abs/cache'
  assert train.compilation_cache_dir(config, workdir, None) == ('/abs/cache', True)
  config.compilation_cache_dir = ''
  assert train.compilation_cache_dir(config, workdir, None) == (None, False)


def test_early_stopping_honours_patience_and_min_delta():
  stopper = train.EarlyStopping(patience=2, min_delta=0.1)
  assert stopper.update(1.0)  # First value is a new best.
  assert not stopper.update(0.95)  # Better, but by less than min_delta: not an improvement.
  assert not stopper.should_stop
  assert not stopper.update(0.93)
  assert stopper.should_stop and stopper.best == 1.0
  stopper = train.EarlyStopping(patience=2, min_delta=0.1)
  stopper.update(1.0)
  stopper.update(2.0)
  assert stopper.update(0.85) and stopper.bad_epochs == 0


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """Three epochs of the test preset, with compile events counted at every epoch end."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = convergence.get_config('test')
  config.training.num_epochs = 3
  compiles, per_epoch = [], []
  # A program is compiled, or loaded from the persistent compilation cache (which other tests
  # may have filled): count both.
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if 'backend_compile' in event else None)
  jax.monitoring.register_event_listener(
      lambda event, **kw: compiles.append(event) if event.endswith('/cache_hits') else None)
  original = monitors.Monitor.check

  def check(self, epoch, history, metrics):
    per_epoch.append((self, len(compiles)))
    return original(self, epoch, history, metrics)

  monitors.Monitor.check = check
  try:
    result = train.train_and_evaluate(config, workdir)
  finally:
    monitors.Monitor.check = original
  # The report then replays the run with Monitors of its own: keep the training one's calls.
  training_monitor = per_epoch[0][0]
  return config, workdir, result, [n for m, n in per_epoch if m is training_monitor]


def test_no_recompilation_after_the_first_epoch(tiny_run):
  *_, per_epoch = tiny_run
  assert len(per_epoch) == 3
  assert per_epoch[0] > 0
  assert per_epoch[1] == per_epoch[0] and per_epoch[2] == per_epoch[0], per_epoch


def test_metrics_file_rows_are_means_and_totals_are_weighted_sums(tiny_run):
  config, workdir, _, _ = tiny_run
  rows = writers.read_metrics(workdir)
  info = json.load(open(os.path.join(workdir, 'run_info.json')))
  spe = info['steps_per_epoch']
  weights = steps.loss_weights(config)
  keys = [f'loss/{t}' for t in steps.TERMS]
  for row in rows:
    assert {'step', 'epoch', 'split', 'loss/total', *keys} <= set(row), row
    expected = sum(weights[t] * row[f'loss/{t}'] for t in steps.TERMS)
    assert row['loss/total'] == pytest.approx(expected, rel=1e-6)
  window = [r for r in rows if r['split'] == 'train' and r['scope'] == 'window']
  every = config.training.log_every_steps
  assert [r['step'] for r in window] == list(range(every, 3 * spe + 1, every))
  schedule = optim.create_learning_rate_fn(config, spe)
  for r in window:  # The LR of the update that ended the window.
    assert r['lr'] == pytest.approx(float(schedule(r['step'] - 1)), rel=1e-5)
  epochs = [r for r in rows if r['split'] == 'train' and r['scope'] == 'epoch']
  val = [r for r in rows if r['split'] == 'val']
  test = [r for r in rows if r['split'] == 'test']
  assert [r['epoch'] for r in epochs] == [1, 2, 3] == [r['epoch'] for r in val]
  assert [r['step'] for r in val] == [spe, 2 * spe, 3 * spe] and len(test) == 1
  if spe % every == 0:  # Equal windows partition the epoch: the epoch mean is their mean.
    for r in epochs:
      mine = [w['loss/signal'] for w in window if (w['step'] - 1) // spe + 1 == r['epoch']]
      assert r['loss/signal'] == pytest.approx(np.mean(mine), rel=1e-5)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


_DEVICES_SCRIPT = r'''
import sys
from absl import logging
from configs import convergence
from jaxtrain import train
logging.set_verbosity(logging.INFO)  # The train step's compile line names its programs.
config = convergence.get_config('test')
config.training.num_epochs = 1
config.training.accumulate_with = sys.argv[2]
if len(sys.argv) > 3:
  config.training.batch_size = int(sys.argv[3])
try:
  train.train_and_evaluate(config, sys.argv[1])
except ValueError as e:
  print('REFUSED:', e)
'''


def _run_on(devices, workdir, *args):
  env = dict(os.environ, XLA_FLAGS=(f'{os.environ.get("XLA_FLAGS", "")} '
                        f'--xla_force_host_platform_device_count={devices}'),
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT, workdir, *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout + out.stderr


def test_eight_devices_accumulating_by_vmap_give_the_one_device_loop_losses(tmp_path):
  """8 devices with the fused 'vmap' update ('auto' on a TPU v5e-8) against 1 with the host
  loop ('auto' on a CPU): the same losses, so both the mesh and the fusion keep the update."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Both compile at once.
    runs = [pool.submit(_run_on, n, str(tmp_path / d), mode)
            for n, d, mode in ((1, 'one', 'loop'), (8, 'eight', 'vmap'))]
    logs = [run.result() for run in runs]
  # 'loop' runs four programs per update (kernels, micro-batch, pullback, optimizer), 'vmap' one.
  assert 'Compiled the train step (4 programs)' in logs[0]
  assert 'Compiled the train step (1 programs)' in logs[1]
  one, eight = (writers.read_metrics(str(tmp_path / d)) for d in ('one', 'eight'))
  assert len(one) == len(eight) > 2
  for a, b in zip(one, eight):
    for key in a:
      if key.startswith('loss/') and a[key] is not None:
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a['split'], a['step'], key)


def test_batch_that_does_not_divide_the_devices_is_refused(tmp_path):
  out = _run_on(8, str(tmp_path / 'bad'), 'auto', '12')
  assert 'REFUSED: training.batch_size=12 does not divide evenly over 8 devices' in out
