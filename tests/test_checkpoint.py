"""Checkpoints (jaxtrain/checkpoint.py and their use in jaxtrain/train.py) on the tiny preset.

The expensive part is one scenario set, run once per module as subprocesses of main.py that
share a persistent JAX compilation cache (so a restart traces but does not recompile):
  * `reference`: an uninterrupted 3-epoch run;
  * `chain`: the same run, killed with SIGKILL mid-accumulation, stopped with SIGTERM, killed
    with SIGKILL in the middle of a checkpoint save, and resumed each time (the last leg under
    a harmlessly different config); it must end bitwise equal to `reference`;
  * `nan`: a run whose epoch-2 data turns NaN;
  * `eight`: a checkpoint written on 8 simulated CPU devices (restored here, on 1).
Independent subprocesses run two at a time (the machine has 2 cores).
"""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import convergence
from jaxtrain import checkpoint
from jaxtrain import inference
from jaxtrain import optim
from jaxtrain import train
from jaxtrain import trainer as trainer_lib
from jaxtrain import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
# The tiny preset has 24 micro-batches = 3 updates of 8 per epoch. A save at every update
# boundary (the timer always expired) makes every kill resume mid-epoch.
FLAGS = ('--config=configs/convergence.py:test',
         '--config.checkpoint.checkpoint_every_minutes=1e-9',
         '--config.checkpoint.save_every_epochs=1', '--config.checkpoint.keep=2')
TIMING_KEYS = ('steps_per_sec',)

# Runs main.py after installing the faults named in the environment:
#   JT_SIGNAL_AT="N:SIG"  sends SIG to itself once its N-th optimizer update is dispatched (so
#                         SIGKILL lands while that update runs);
#   JT_KILL_IN_SAVE=N     SIGKILLs itself inside the N-th orbax commit (4 per checkpoint: the
#                         3 items, then the step directory), i.e. with a checkpoint half-written;
#   JT_NAN_AT="E:B"       makes micro-batch B (0-based) of epoch E all NaN.
_DRIVER = r'''
import os, runpy, signal, sys
import numpy as np
from orbax.checkpoint._src.path import atomicity
from jaxtrain import data, trainer

if os.environ.get('JT_SIGNAL_AT'):
  at, name = os.environ['JT_SIGNAL_AT'].split(':')
  update, calls = trainer.Trainer.train_update, [0]
  def train_update(self, *args):
    out = update(self, *args)
    calls[0] += 1
    if calls[0] == int(at):
      os.kill(os.getpid(), getattr(signal, name))
    return out
  trainer.Trainer.train_update = train_update

if os.environ.get('JT_KILL_IN_SAVE'):
  finalize, commits = atomicity.AtomicRenameTemporaryPath.finalize, [0]
  async def killing_finalize(self, *args, **kwargs):
    commits[0] += 1
    if commits[0] == int(os.environ['JT_KILL_IN_SAVE']):
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize

if os.environ.get('JT_NAN_AT'):
  nan_epoch, nan_batch = map(int, os.environ['JT_NAN_AT'].split(':'))
  batches = data.train_batches
  def nan_batches(split, batch_size, *, epoch, start=0, **kwargs):
    for i, b in enumerate(batches(split, batch_size, epoch=epoch, start=start, **kwargs), start):
      if (epoch, i) == (nan_epoch, nan_batch):
        b = dict(b, signal=np.full_like(b['signal'], np.nan))
      yield b
  data.train_batches = nan_batches

sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
'''

# Saves a checkpoint of the run's shapes, replicated over 8 devices, filled with random values
# (cheaper than initialising the model there: nothing is compiled).
_SAVE_ON_EIGHT = r'''
import sys
import jax
import numpy as np
from configs import convergence
from jaxtrain import checkpoint, data, train, trainer as trainer_lib
assert jax.device_count() == 8
config = convergence.get_config('test')
trainer = trainer_lib.Trainer(config, sys.argv[1], data.load_dataset(config))
abstract_params, abstract_arrays = train._abstract_targets(trainer)
rng = np.random.default_rng(0)
def fill(s):
  return jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding)
params, arrays = jax.tree.map(fill, abstract_params), jax.tree.map(fill, abstract_arrays)
assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
ckpt = checkpoint.Checkpoints(sys.argv[1], keep=1)
ckpt.save(7, params, arrays, {'devices': 8})
ckpt.close()
np.savez(sys.argv[2], *jax.tree.leaves(jax.device_get((params, arrays))))
'''


def _env(cache_dir, devices=1, **faults):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             XLA_FLAGS=(f'{os.environ.get("XLA_FLAGS", "")} '
                        f'--xla_force_host_platform_device_count={devices}'), PYTHONPATH=ROOT)
  env.update({f'JT_{k.upper()}': str(v) for k, v in faults.items()})
  return env


def _run(args, env):
  out = subprocess.run([sys.executable, '-c', *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  return out.returncode, out.stdout + out.stderr


def _train(workdir, cache_dir, *flags, **faults):
  return _run([_DRIVER, *FLAGS, f'--workdir={workdir}', *flags], _env(cache_dir, **faults))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs the scenarios of the module docstring; returns their workdirs and outputs."""
  base = tmp_path_factory.mktemp('scenarios')
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(base / 'jax_cache')
  ref, chain, nan = (str(base / name) for name in ('reference', 'chain', 'nan'))
  epochs = f'--config.training.num_epochs={EPOCHS}'
  longer = f'--config.training.num_epochs={EPOCHS + 1}'  # The last leg brings it back to 3.
  legs = [  # (flags, faults) of each run of the chain.
      # Updates 1 and 2 done (saved), killed while update 3 runs.
      ((longer,), dict(signal_at='3:SIGKILL')),
      # Resumed at update 1 or 2 (the save of 2 may not have committed); SIGTERM in update 4/5.
      ((longer,), dict(signal_at='3:SIGTERM')),
      # 6th commit: the second checkpoint of this leg, with one of its 3 items committed.
      ((longer,), dict(kill_in_save=6)),
      ((epochs,), {}),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(_train, ref, cache, epochs)
    outputs = [_train(chain, cache, *legs[0][0], **legs[0][1])]
    reference = reference.result()
    side = [pool.submit(_train, nan, cache, epochs,
                        '--config.checkpoint.checkpoint_every_minutes=0', nan_at='2:5'),
            pool.submit(_run, [_SAVE_ON_EIGHT, str(base / 'eight'), str(base / 'eight.npz')],
                        _env(cache, devices=8))]
    outputs += [_train(chain, cache, *flags, **faults) for flags, faults in legs[1:]]
    side = [f.result() for f in side]
  return dict(base=base, reference=ref, chain=chain, nan=nan, eight=str(base / 'eight'),
              eight_arrays=str(base / 'eight.npz'), reference_out=reference, legs=outputs,
              nan_out=side[0], eight_out=side[1])


def _targets(trainer_):
  return train._abstract_targets(trainer_)  # pylint: disable=protected-access


def _latest(workdir, trainer_):
  ckpt = checkpoint.Checkpoints(workdir, keep=2)
  try:
    return ckpt.restore_latest(*_targets(trainer_))
  finally:
    ckpt.close()


def _same_bits(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.asarray(x).dtype == np.asarray(y).dtype and
             np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in writers.read_metrics(workdir)]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(runs, trainer):
  code, out = runs['reference_out']
  assert code == 0, out[-3000:]
  (c1, o1), (c2, o2), (c3, o3), (c4, o4) = runs['legs']
  assert c1 == -signal.SIGKILL, o1[-3000:]
  assert c2 == 0, o2[-3000:]
  assert 'Stopped by SIGTERM' in o2
  assert 'To resume, run the same command with the same --workdir' in o2
  assert f'--workdir={runs["chain"]}' in o2
  assert c3 == -signal.SIGKILL, o3[-3000:]
  assert c4 == 0, o4[-3000:]
  # Each leg resumed mid-epoch at an update boundary and said so.
  for out in (o2, o3, o4):
    assert 'Resuming from checkpoint' in out
  assert 'half-written checkpoint' in o4  # The save that SIGKILL interrupted.
  assert 'differs from the saved one in: training.num_epochs: 4 -> 3' in o4
  ref, chain = _latest(runs['reference'], trainer), _latest(runs['chain'], trainer)
  assert ref[0] == chain[0] == EPOCHS * trainer.steps_per_epoch
  assert _same_bits(ref[1], chain[1]), 'final parameters differ'
  assert _same_bits(ref[2], chain[2]), 'final optimizer state / step / rng / metrics differ'
  assert json.dumps(ref[3]) == json.dumps(chain[3])  # Host state (NaN-safe comparison).
  ref_rows, chain_rows = _rows(runs['reference']), _rows(runs['chain'])
  assert len(ref_rows) == EPOCHS * (trainer.steps_per_epoch + 2) + 1
  assert chain_rows == ref_rows


def test_sigterm_checkpoint_is_at_an_update_boundary_mid_epoch(runs):
  out = runs['legs'][1][1]
  step = int(out.split('Stopped by SIGTERM; checkpoint ')[1].split()[0])
  # The third update after the resume point (update 1 or 2) is update 4 or 5.
  assert step in (4, 5)
  assert f'Stopped by SIGTERM after optimizer update {step}' in out


def test_retention_keeps_latest_and_best(runs, trainer):
  steps = sorted(int(s) for s in os.listdir(os.path.join(runs['reference'], 'checkpoints')))
  rows = [r for r in writers.read_metrics(runs['reference']) if r['split'] == 'val']
  best = min(rows, key=lambda r: r['loss/total'])['step']
  last = EPOCHS * trainer.steps_per_epoch
  assert steps == sorted({best, last - 1, last})


def test_nan_stops_with_step_and_terms_and_leaves_the_last_good_checkpoint(runs, trainer):
  code, out = runs['nan_out']
  assert code != 0
  # Batch 5 of epoch 2 is micro-step 24 + 5 = 29, inside optimizer update 29 // 8 + 1 = 4.
  assert 'FloatingPointError: Non-finite values at micro-step 29 (during optimizer update 4)' in out
  assert 'loss/signal' in out and 'gradients' in out
  assert f'Latest checkpoint: {trainer.steps_per_epoch} in' in out
  step, params, _, meta = _latest(runs['nan'], trainer)
  assert step == trainer.steps_per_epoch and (meta['epoch'], meta['micro_batch']) == (2, 0)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_checkpoint_from_eight_devices_restores_on_one(runs, trainer):
  code, out = runs['eight_out']
  assert code == 0, out[-3000:]
  step, params, arrays, meta = _latest(runs['eight'], trainer)
  assert step == 7 and meta == {'devices': 8}
  expected = np.load(runs['eight_arrays'])
  leaves = jax.tree.leaves((params, arrays))
  assert len(leaves) == len(expected.files)
  for i, leaf in enumerate(leaves):
    assert leaf.sharding == trainer.replicated
    assert np.asarray(leaf).tobytes() == expected[f'arr_{i}'].tobytes()


@pytest.mark.parametrize('item', ['train', 'metrics'])
def test_truncated_latest_checkpoint_falls_back_to_the_previous(runs, trainer, tmp_path, caplog,
                                                                item):
  workdir = str(tmp_path / 'run')
  shutil.copytree(runs['reference'], workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  item_dir = os.path.join(workdir, 'checkpoints', str(steps[-1]), item)
  files = [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs]
  # The biggest array data file, or the metrics JSON.
  target = max(files, key=os.path.getsize) if item == 'train' else os.path.join(item_dir, item)
  with open(target, 'r+b') as f:
    f.truncate(os.path.getsize(target) // 2)
  caplog.set_level('ERROR')
  step, *_ = _latest(workdir, trainer)
  assert step == steps[-2]
  assert f'Checkpoint {steps[-1]} in' in caplog.text
  assert os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR)) == [str(steps[-1])]


def test_resume_under_a_shape_changing_config_is_refused(runs, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(runs['reference'], workdir)
  config = convergence.get_config('test')
  config.model.base_channels *= 2
  config.training.batch_size *= 2
  config.training.num_epochs = 7  # Harmless: not listed.
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'model.base_channels: 8 -> 16' in message and 'training.batch_size: 16 -> 32' in message
  assert 'num_epochs' not in message


def test_init_from_loads_only_the_best_parameters(runs, trainer, tmp_path):
  config = convergence.get_config('test')
  config.init_from = runs['reference']
  config.training.ema_decay = 0.9  # The average starts at the loaded parameters too.
  abstract_params, abstract_arrays = _targets(trainer)
  ckpt = checkpoint.Checkpoints(str(tmp_path / 'fresh'), keep=1)
  try:
    # pylint: disable-next=protected-access
    run = train._start(config, trainer, ckpt, abstract_params, abstract_arrays)
  finally:
    ckpt.close()
  best_step, best = checkpoint.load_best_params(runs['reference'], abstract_params)
  val = {r['step']: r['loss/total'] for r in writers.read_metrics(runs['reference'])
         if r['split'] == 'val'}
  assert best_step == min(val, key=val.get)
  assert _same_bits(run.state.params, best) and _same_bits(run.state.ema_params, best)
  assert int(run.state.step) == 0 and int(optim.update_count(run.state.opt_state)) == 0
  assert all(not np.asarray(m).any() for m in jax.tree.leaves(run.state.opt_state.acc_grads))
  config.model.n_heads = 4
  with pytest.raises(ValueError, match=r'model.n_heads: 2 -> 4'):
    checkpoint.check_init_config(runs['reference'], config)


def test_moving_average_is_saved_as_the_params_item_and_both_resume(trainer, tmp_path):
  """With training.ema_decay > 0 the `params` item (evaluation, the best checkpoint, inference,
  init_from) holds the average and the `train` item the raw parameters the optimizer trains."""
  config = convergence.get_config('test')
  config.training.ema_decay = 0.9
  trainer_ = trainer_lib.Trainer(config, str(tmp_path), trainer.ds)
  targets = _targets(trainer_)
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1)
  try:
    run = train._start(config, trainer_, ckpt, *targets)  # pylint: disable=protected-access
    assert _same_bits(run.state.params, run.state.ema_params)
    run.state = run.state.replace(
        ema_params=jax.tree.map(lambda p: p + 1, run.state.params))
    train._Loop(config, trainer_, ckpt, None, run, None)._save()  # pylint: disable=protected-access
    ckpt.manager.wait_until_finished()
    step, saved_params, _, _ = ckpt.restore_latest(*targets)
    resumed = train._start(config, trainer_, ckpt, *targets)  # pylint: disable=protected-access
    # Without the average (the config check passes this way only without a config.json): a
    # clear refusal, and the checkpoint stays where it is.
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match='training.ema_decay'):
      ckpt.restore_latest(*_targets(trainer))
    assert ckpt.steps == [0] and not os.path.exists(tmp_path / checkpoint.CORRUPT_DIR)
  finally:
    ckpt.close()
  assert step == 0 and _same_bits(saved_params, run.state.ema_params)
  assert _same_bits(resumed.state.params, run.state.params)
  assert _same_bits(resumed.state.ema_params, run.state.ema_params)


def test_best_checkpoint_survives_retention_and_restarts(tmp_path):
  """keep=1 with the best epoch first: later, worse and mid-epoch checkpoints never evict it,
  also after the manager is reopened (orbax must have written the metric to disk)."""
  params = {'w': np.arange(4, dtype=np.float32)}
  arrays = {'step': np.int32(0)}
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1)
  for step, val in ((1, 1.0), (2, None), (3, 2.0), (4, float('nan'))):
    ckpt.save(step, jax.tree.map(lambda p, s=step: p * s, params), arrays, {}, val)
  ckpt.close()
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1)
  assert ckpt.steps == [1, 4]
  ckpt.save(5, params, arrays, {}, 3.0)
  ckpt.close()
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1)
  assert ckpt.steps == [1, 5]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {'w': jax.ShapeDtypeStruct((4,), np.float32, sharding=device)}
  step, best = ckpt.best_params(abstract)
  ckpt.close()
  assert step == 1 and np.array_equal(best['w'], params['w'])


def test_checkpoint_of_another_architecture_is_refused_and_kept(tmp_path):
  """E.g. a run saved before each task got its own head: a clear error, nothing moved aside."""
  arrays = {'step': np.int32(0)}
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=2)
  ckpt.save(1, {'peak_head': {'w': np.ones(5, np.float32)}}, arrays, {}, 1.0)
  ckpt.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {'exist_head': {'w': jax.ShapeDtypeStruct((1,), np.float32, sharding=device)}}
  abstract_arrays = {'step': jax.ShapeDtypeStruct((), np.int32, sharding=device)}
  ckpt = checkpoint.Checkpoints(str(tmp_path), keep=2)
  message = r'exist_head/w: saved None, model \(1,\); peak_head/w: saved \(5,\), model None'
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=message):
    ckpt.restore_latest(abstract, abstract_arrays)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='nothing was changed'):
    ckpt.best_params(abstract)
  ckpt.close()
  assert checkpoint.Checkpoints(str(tmp_path), keep=2).steps == [1]
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


def test_config_differences_are_classified():
  saved = convergence.get_config('test')
  requested = convergence.get_config('test')
  requested.training.num_epochs = 50
  requested.training.log_every_steps = 3
  requested.data.synthetic.num_patients = 99
  requested.model.signal_length = 100
  diff = checkpoint.config_differences(checkpoint.config_as_dict(saved),
                                       checkpoint.config_as_dict(requested))
  assert set(diff) == {'training.num_epochs', 'training.log_every_steps',
                       'data.synthetic.num_patients', 'model.signal_length'}
  assert {k for k in diff if checkpoint.is_structural(k)} == {'data.synthetic.num_patients',
                                                               'model.signal_length'}
  assert checkpoint.is_structural('training.batch_size')
  assert not checkpoint.is_structural('training.batch_size_x')
  assert not checkpoint.is_structural('training.eval_batch_size')


def test_moving_average_resumes_under_another_decay_but_not_switched(tmp_path, caplog):
  config = convergence.get_config('test')
  saved = checkpoint.config_as_dict(config)
  del saved['training']['ema_decay']  # A run from before the key: it kept no average.
  with open(tmp_path / checkpoint.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  config.training.ema_decay = 0.98
  with pytest.raises(ValueError, match='training.ema_decay: None -> 0.98'):
    checkpoint.check_resume_config(str(tmp_path), config)
  saved['training']['ema_decay'] = 0.9
  with open(tmp_path / checkpoint.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  with caplog.at_level('WARNING'):
    checkpoint.check_resume_config(str(tmp_path), config)  # Another decay: the same tree.
  assert 'training.ema_decay: 0.9 -> 0.98' in caplog.text
  config.training.ema_decay = 0.0
  with pytest.raises(ValueError, match='training.ema_decay: 0.9 -> 0.0'):
    checkpoint.check_resume_config(str(tmp_path), config)


def test_config_saved_before_the_numerics_keys_still_resumes(tmp_path, caplog):
  """A config.json from before model.dtype, model.s4_conv, training.accumulate_with and
  compilation_cache_dir existed (their checkpoints hold the same arrays) is accepted, and the
  differences are logged; so is a run resumed in another dtype."""
  config = convergence.get_config('test')
  saved = checkpoint.config_as_dict(config)
  for section, key in (('model', 'dtype'), ('model', 's4_conv'), ('training', 'accumulate_with')):
    del saved[section][key]
  del saved['compilation_cache_dir']
  del saved['data']['synthetic']['sample_period_ms']  # A structural key, newer than the run.
  with open(tmp_path / checkpoint.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  config.model.dtype = 'bfloat16'
  with caplog.at_level('WARNING'):
    checkpoint.check_resume_config(str(tmp_path), config)
  assert "model.dtype: None -> 'bfloat16'" in caplog.text
  assert 'data.synthetic.sample_period_ms: None -> 0.1' in caplog.text  # Its default: harmless.
  config.data.synthetic.sample_period_ms = 0.05  # Not the default: the run did not do this.
  with pytest.raises(ValueError, match='sample_period_ms: None -> 0.05'):
    checkpoint.check_resume_config(str(tmp_path), config)


@pytest.mark.parametrize('key', sorted(checkpoint.PREDATING_VALUES))
def test_run_saved_before_a_key_that_trains_differently_resumes_only_as_it_trained(key, tmp_path):
  """A key whose default changes training (loss.nll_beta: 0.5): a config.json without the key
  trained as with PREDATING_VALUES' value (the plain NLL) and resumes only so, instead of
  changing its loss midway."""
  config = convergence.get_config('test')
  saved = checkpoint.config_as_dict(config)
  section, name = key.split('.')
  del saved[section][name]
  with open(tmp_path / checkpoint.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  value = checkpoint.PREDATING_VALUES[key]
  assert config[section][name] != value
  with pytest.raises(ValueError, match=re.escape(f'--config.{key}={value!r}')):
    checkpoint.check_resume_config(str(tmp_path), config)
  config[section][name] = value
  checkpoint.check_resume_config(str(tmp_path), config)


def test_run_saved_before_head_dropout_resumes_at_its_model_dropout(tmp_path):
  """model.head_dropout split off model.dropout: a config.json without it trained the heads at
  its model.dropout, resumes only so, initialises only such a model, and loads so."""
  config = convergence.get_config('test')
  config.model.dropout = 0.3
  saved = checkpoint.config_as_dict(config)
  del saved['model']['head_dropout']
  with open(tmp_path / checkpoint.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  assert config.model.head_dropout == 0.15
  with pytest.raises(ValueError, match=re.escape('--config.model.head_dropout=0.3')):
    checkpoint.check_resume_config(str(tmp_path), config)
  with pytest.raises(ValueError, match=re.escape('model.head_dropout: 0.3 -> 0.15')):
    checkpoint.check_init_config(str(tmp_path), config)
  config.model.head_dropout = 0.3
  checkpoint.check_resume_config(str(tmp_path), config)
  checkpoint.check_init_config(str(tmp_path), config)
  assert inference.load_config(str(tmp_path)).model.head_dropout == 0.3


def test_rewind_drops_rows_after_the_step_test_rows_and_a_torn_line(tmp_path):
  rows = [{'step': s, 'epoch': 1, 'split': split} for s, split in
          ((1, 'train'), (2, 'train'), (2, 'val'), (3, 'train'), (2, 'test'))]
  path = tmp_path / writers.METRICS_FILE
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 4, "ep')
  writers.MetricWriter(str(tmp_path), resume_step=2).close()
  assert writers.read_metrics(str(tmp_path)) == rows[:3]
