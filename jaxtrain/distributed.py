"""The processes and devices a run trains on: multi-process start, the accelerator check, and
the decisions every process must take together.

A multi-process run (several hosts, or several processes on one machine) runs the same program
in every process, in lock step: each feeds its slice of every global batch, the jitted steps
all-reduce across them, and every orbax save and restore is collective. A decision that
changes which collectives run next (save now, stop now) must therefore be the same in every
process: `agreed_stop` and `any_process` all-gather the local inputs of such decisions. Only
process 0 writes files other than checkpoints, and only it logs below ERROR.
"""

import os
import shutil
import signal
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# The install commands that give JAX its accelerator back, by the hardware found.
INSTALL = {'tpu': 'pip install -U "jax[tpu]"', 'gpu': 'pip install -U "jax[cuda12]"'}


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins this process to a multi-process run (`jax.distributed.initialize`).

  Must run before anything touches a JAX device. Arguments left None are found by JAX: the
  coordinator from JAX_COORDINATOR_ADDRESS, or all three from the cluster (Cloud TPU pod,
  Slurm, Open MPI, Kubernetes).
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  if jax.process_index() != 0:
    # Process 0 logs the run (its warnings included); the others report only their errors.
    logging.set_verbosity(logging.ERROR)


def describe_devices():
  """One line: backend, device kind and counts, JAX version, process."""
  device = jax.devices()[0]
  return (f'JAX {jax.__version__} backend {jax.default_backend()}: {jax.device_count()} '
          f'device(s) of kind {device.device_kind!r} ({jax.local_device_count()} local); '
          f'process {jax.process_index()} of {jax.process_count()}.')


HUGE_PAGES_KEY = 'glibc.malloc.hugetlb'  # The GLIBC_TUNABLES entry for transparent huge pages.
HUGE_PAGES = f'{HUGE_PAGES_KEY}=1'


def cpu_page_advice(backend, platform, tunables):
  """A hint for a run on a Linux CPU whose glibc maps XLA's buffers in 4 KiB pages, else None.

  XLA:CPU's large temporaries are mapped afresh on every execution; with 2 MB pages the demo
  ran 14-27 % faster (README, "The demo run"). glibc reads GLIBC_TUNABLES (`tunables`) at
  process start only, so this can only be advice.
  """
  if backend != 'cpu' or not platform.startswith('linux') or HUGE_PAGES in tunables:
    return None
  return (f'Training on the CPU without 2 MB pages: start Python with {HUGE_PAGES} in '
          f'GLIBC_TUNABLES (e.g. `GLIBC_TUNABLES={HUGE_PAGES} python main.py ...`) for '
          'fewer page faults; the demo ran 14-27 % faster with it (README, "Two commands").')


def _hardware_present():
  """The accelerator this machine has, judged without JAX ('tpu', 'gpu' or None)."""
  devices = os.listdir('/dev') if os.path.isdir('/dev') else []
  # TPU VMs expose their chips as /dev/accel* (v2-v4) or through VFIO (v5e, v6e).
  if (any(name.startswith('accel') for name in devices) or 'vfio' in devices
      or os.environ.get('TPU_ACCELERATOR_TYPE') or os.environ.get('TPU_NAME')):
    return 'tpu'
  if 'nvidia0' in devices or shutil.which('nvidia-smi'):
    return 'gpu'
  return None


def accelerator_error(hardware, jax_platforms, jax_version):
  """Why JAX found only a CPU, and the fix; `hardware` from `_hardware_present()`."""
  found = f'JAX {jax_version} found only a CPU, and this run requires an accelerator'
  if jax_platforms and 'cpu' in jax_platforms.lower():
    return (f'{found}: the environment sets JAX_PLATFORMS={jax_platforms}, which keeps JAX on '
            'the CPU. Unset it (or include tpu/cuda), or set --config.require_accelerator=False '
            'to train on the CPU.')
  if hardware == 'tpu':
    return (f'{found}, although this machine has a TPU: JAX cannot load a libtpu that matches '
            'it, most likely because a `pip install` replaced the runtime\'s JAX with another '
            f'version without its `jax[tpu]` extra. Fix: {INSTALL["tpu"]} (or reinstall the '
            'runtime\'s JAX version), then restart the runtime.')
  if hardware == 'gpu':
    return (f'{found}, although this machine has an NVIDIA GPU: this JAX has no CUDA plugin '
            'that matches it, most likely a CPU-only or mismatched install of jax/jaxlib. Fix: '
            f'{INSTALL["gpu"]}, then restart the runtime.')
  return (f'{found}, and this machine shows no GPU or TPU: choose a GPU or TPU runtime (Colab: '
          'Runtime > Change runtime type), or set --config.require_accelerator=False to train '
          'on the CPU.')


def check_accelerator(required):
  """Raises SystemExit with the likely cause when `required` and JAX runs on a CPU only."""
  if required and jax.default_backend() == 'cpu':
    raise SystemExit(accelerator_error(_hardware_present(), os.environ.get('JAX_PLATFORMS', ''),
                                       jax.__version__))


def _gathered(value):
  """[process_count] int32: `value` of every process, in process order (a collective)."""
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def agreed_stop(local):
  """The stop request all processes act on, from this process's `local` one.

  Args:
    local: name of the signal this process received (e.g. 'SIGTERM'), or None.

  Returns:
    None when no process received a signal; else the first requesting process's signal, e.g.
    'SIGTERM on process 1' (just `local` in a single-process run, which costs no device sync).
    Every process of the run must call this at the same point of the loop.
  """
  if jax.process_count() == 1:
    return local
  codes = _gathered(signal.Signals[local].value if local else 0)
  for process, code in enumerate(codes):
    if code:
      return f'{signal.Signals(int(code)).name} on process {process}'
  return None


def any_process(flag):
  """Whether `flag` holds in any process, for decisions taken on a process's own clock (e.g. a
  save timer): all processes then take the same branch. Called by all at the same point."""
  if jax.process_count() == 1:
    return flag
  return bool(_gathered(flag).any())


def exit_after_failure(error):
  """Ends a multi-process run's process at once after `error`, with the likely cause.

  A process that raises leaves the others blocked in their next collective until it fails
  ("connection closed by peer"), and the normal exit of jax.distributed then waits for the
  dead peer until the heartbeat timeout (100 s) before aborting. Exiting here ends each
  process within a collective's failure time; what was saved stays (saves are atomic).
  """
  logging.error(
      'Process %d of %d stopped: %s: %s\nIn a multi-process run this usually means another '
      'process died or was killed (see its log), or lost the network. The latest complete '
      'checkpoint in the workdir is intact: restart every process with the same command to '
      'resume.', jax.process_index(), jax.process_count(), type(error).__name__,
      str(error)[:2000], exc_info=error)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access
