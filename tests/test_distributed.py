"""Multi-process runs and the accelerator guard (jaxtrain/distributed.py, main.py).

The expensive part is one scenario set, run once per module as subprocesses of main.py (through
test_checkpoint's fault-installing driver) on the tiny preset, sharing a persistent
compilation cache; two processes meet on 127.0.0.1 as a two-host run would:
  * `single`: one process, the reference;
  * `stopped`: two processes; the second sends itself SIGTERM once its 2nd update is
    dispatched; then both are started again and finish;
  * `killed`: two processes; the second SIGKILLs itself once its 2nd update is dispatched.
Every process runs under a hard timeout: a hung one is killed and fails its test.
"""

import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from jaxtrain import distributed
from test_checkpoint import _DRIVER
from test_checkpoint import _env
from test_checkpoint import _latest
from test_checkpoint import _rows
from test_checkpoint import ROOT

EPOCHS = 2  # The tiny preset: 3 updates per epoch, 6 in all.
# The mid-epoch save timer is per process; epoch ends and signals are the saves tested here.
FLAGS = ('--config=configs/convergence.py:test', f'--config.training.num_epochs={EPOCHS}',
         '--config.checkpoint.checkpoint_every_minutes=0')
TIMEOUT_S = 300  # Per group of processes: compiles included, on a loaded 2-core machine.
# How long the survivor of a killed process may take to exit. JAX's heartbeat timeout (100 s)
# would be the bound without exit_after_failure; it exits within seconds.
EXIT_BOUND_S = 30
INFO_LINE = re.compile(r'^I\d{4} ', re.MULTILINE)  # An absl INFO line.


def _free_ports(n):
  """`n` distinct ports free now on every interface, below Linux's ephemeral range (32768+).

  The coordinator binds its port a second or two after the choice, while the processes of
  another group open connections: a port from the ephemeral range could be handed to one of
  those meanwhile (a collision seen on CI, where both groups then hung).
  """
  rng, ports = np.random.default_rng(), []
  while len(ports) < n:
    port = int(rng.integers(20000, 32768))
    with socket.socket(socket.AF_INET6) as s:  # Dual-stack, as the service's [::] bind.
      try:
        s.bind(('::', port))
      except OSError:
        continue
    if port not in ports:
      ports.append(port)
  return ports


def _group(workdir, cache, processes, port=None, **faults_of_last):
  """Runs main.py in `processes` processes of one run; the last one gets `faults_of_last`.

  A run of several processes meets at 127.0.0.1:`port`.

  Returns:
    [(exit code, output, seconds from start to exit)] per process; exit code None for a
    process killed at the timeout.
  """
  cmd = [sys.executable, '-c', _DRIVER, *FLAGS, f'--workdir={workdir}']
  logs, procs = [], []
  for i in range(processes):
    flags = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
              f'--process_id={i}'] if processes > 1 else [])
    faults = faults_of_last if i == processes - 1 else {}
    logs.append(tempfile.TemporaryFile('w+'))
    procs.append(subprocess.Popen(cmd + flags, cwd=ROOT, env=_env(cache, **faults),
                                  stdout=logs[-1], stderr=subprocess.STDOUT))
  start, ends = time.monotonic(), [None] * processes
  while None in ends and time.monotonic() - start < TIMEOUT_S:
    time.sleep(0.2)
    ends = [e if e is not None or p.poll() is None else time.monotonic() - start
            for e, p in zip(ends, procs)]
  results = []
  for proc, log, end in zip(procs, logs, ends):
    if end is None:
      proc.kill()
    proc.wait()
    log.seek(0)
    results.append((proc.returncode if end is not None else None, log.read(), end))
    log.close()
  return results


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs the scenarios of the module docstring; returns their workdirs and outputs."""
  base = tmp_path_factory.mktemp('distributed')
  # Shared with test_notebook, whose one-process run compiles the same step as `single`.
  cache = (os.environ.get('JAX_COMPILATION_CACHE_DIR')
           or str(tmp_path_factory.getbasetemp() / 'jax_cache'))
  single, stopped, killed = (str(base / name) for name in ('single', 'stopped', 'killed'))
  ports = _free_ports(3)  # Distinct: two groups run at a time.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(_group, single, cache, 1)
    legs = [_group(stopped, cache, 2, ports[0], signal_at='2:SIGTERM')]
    reference = reference.result()
    kill = pool.submit(_group, killed, cache, 2, ports[1], signal_at='2:SIGKILL')
    legs.append(_group(stopped, cache, 2, ports[2]))
    kill = kill.result()
  return dict(single=single, stopped=stopped, single_out=reference[0], legs=legs,
              killed_out=kill)


def _ok(result):
  code, out, _ = result
  assert code == 0, out[-3000:]
  return out


def test_sigterm_to_one_process_saves_the_same_update_in_both_and_exits_cleanly(runs):
  first, second = (_ok(r) for r in runs['legs'][0])
  # Process 1 got the signal once its update 2 was dispatched: both stop at that boundary.
  for out in (first, second):
    assert 'Stopped by SIGTERM on process 1; checkpoint 2 saved' in out
  resumed = _ok(runs['legs'][1][0])
  assert 'Resuming from checkpoint 2 ' in resumed
  _ok(runs['legs'][1][1])


def test_two_processes_resumed_end_with_the_single_process_parameters(runs, trainer):
  _ok(runs['single_out'])
  single, pair = _latest(runs['single'], trainer), _latest(runs['stopped'], trainer)
  assert single[0] == pair[0] == EPOCHS * trainer.steps_per_epoch
  flat = lambda params: np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
  start, p1, p2 = (flat(jax.device_get(p))
                   for p in (trainer.init_state().params, single[1], pair[1]))
  # The all-reduce over two processes sums in another order than one device: the runs differ
  # by rounding (measured: 2e-4 of the distance trained), not by data (that would be order 1).
  assert np.linalg.norm(p2 - p1) < 1e-2 * np.linalg.norm(p1 - start)
  rows_single, rows_pair = _rows(runs['single']), _rows(runs['stopped'])
  key = lambda r: (r['step'], r['epoch'], r['split'], r['scope'])
  assert [key(r) for r in rows_pair] == [key(r) for r in rows_single]
  for a, b in zip(rows_pair, rows_single):
    np.testing.assert_allclose(a['loss/total'], b['loss/total'], rtol=1e-3)


def test_only_process_zero_logs(runs):
  first, second = (out for _, out, _ in runs['legs'][1])
  assert re.search(r'^I\d{4} .*\[train window\]', first, re.MULTILINE)
  # Process 1 logs nothing at INFO after joining (JAX's own connection line comes before).
  after_join = second.split('Connecting to JAX distributed service')[-1]
  assert not INFO_LINE.search(after_join), after_join[:2000]


def test_killing_one_process_ends_the_other_with_a_clear_error_in_bounded_time(runs):
  (code, out, end), (killed_code, _, killed_end) = runs['killed_out']
  assert killed_code == -9
  assert code == 1, out[-3000:]
  assert 'Process 0 of 2 stopped' in out and 'another process died' in out
  assert end - killed_end < EXIT_BOUND_S


def test_a_cpu_only_run_that_requires_an_accelerator_stops_at_once(tmp_path):
  workdir = tmp_path / 'run'
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/convergence.py:test', f'--workdir={workdir}',
       '--config.require_accelerator=True'], cwd=ROOT, env=_env(str(tmp_path / 'cache')),
      capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert 'backend cpu: 1 device(s)' in out.stderr  # The device line comes first.
  assert 'found only a CPU' in out.stderr and 'JAX_PLATFORMS=cpu' in out.stderr
  assert not workdir.exists()  # Stopped before anything was created or compiled.
  assert time.monotonic() - start < 60


@pytest.mark.parametrize('hardware, cause, fix', [
    ('tpu', 'libtpu', 'pip install -U "jax[tpu]"'),
    ('gpu', 'CUDA', 'pip install -U "jax[cuda12]"'),
    (None, 'no GPU or TPU', 'require_accelerator=False')])
def test_accelerator_error_names_the_cause_and_the_fix(hardware, cause, fix):
  message = distributed.accelerator_error(hardware, '', '0.7.2')
  assert 'JAX 0.7.2 found only a CPU' in message and cause in message and fix in message


def test_one_process_agrees_with_itself_without_a_collective():
  assert distributed.agreed_stop('SIGTERM') == 'SIGTERM'
  assert distributed.agreed_stop(None) is None
  assert distributed.any_process(True) is True and distributed.any_process(False) is False


@pytest.mark.parametrize('backend, platform, tunables, advised', [
    ('cpu', 'linux', '', True),
    ('cpu', 'linux', 'glibc.malloc.arena_max=2', True),
    ('cpu', 'linux', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', False),
    ('gpu', 'linux', '', False),
    ('cpu', 'darwin', '', False)])
def test_only_linux_cpu_runs_without_2mb_pages_are_advised_to_use_them(backend, platform, tunables,
                                                                       advised):
  advice = distributed.cpu_page_advice(backend, platform, tunables)
  assert (advice is not None) == advised
  if advised:
    assert 'GLIBC_TUNABLES' in advice and distributed.HUGE_PAGES in advice
