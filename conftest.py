"""Test-session set-up. Pytest imports this first, from the repository root, which also puts
the root on sys.path so that tests import `configs` and `jaxtrain` from the tree.

The suite compiles many small train steps (subprocesses included: they inherit the
environment). XLA:CPU's backend optimisation level 0 compiles them about 40 % faster; the
tests compare runs made under the same flags, so their results do not depend on it. A
persistent compilation cache shared by the whole session (subprocesses too) makes a program
that several tests build, e.g. the `:test` preset's steps, compile once.

The README's command runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`):
most tests compile and run one small program at a time, about one core's work. Each module
is in one group, run by one worker, so that its module fixtures are built once (a group is one
module unless `_GROUP` or the shared trained run joins several).
"""

import os
import tempfile

import pytest

_FAST_COMPILE = '--xla_backend_optimization_level=0'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_FAST_COMPILE}'.strip()

if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxtrain_test_cache_')

# pylint: disable-next=g-import-not-at-top
from jaxtrain import distributed  # After the environment above, which JAX reads at import.

# glibc reads GLIBC_TUNABLES when a process starts: the xdist workers and the main.py
# subprocesses started from here get 2 MB pages for XLA's large CPU buffers (README, "Two
# commands") unless the variable already sets them (to any value); this process keeps what it
# started with.
_TUNABLES = os.environ.get('GLIBC_TUNABLES', '')
if f'{distributed.HUGE_PAGES_KEY}=' not in _TUNABLES:
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, (_TUNABLES, distributed.HUGE_PAGES)))


def pytest_configure(config):
  # A donated buffer that no output can reuse costs its memory and a warning on every run:
  # any program of the suite that donates one fails its test.
  config.addinivalue_line('filterwarnings', 'error:Some donated buffers were not usable')


# The modules that run training subprocesses two at a time (test_checkpoint's and
# test_distributed's fixtures, test_train's one- and eight-device runs) share a group: one
# worker runs them one after the other, so that they never run four processes on two cores
# (test_distributed's processes must exit within their time bounds). It also balances the two
# workers: without test_train (184 s) the group took 694 s of a 1,071 s suite and left a core
# idle for the rest.
_GROUP = dict.fromkeys(('test_checkpoint', 'test_distributed', 'test_train'),
                       'training_subprocesses')
# Every module with a test that reads this session fixture (a trained `:test` run,
# tests/conftest.py) joins its group, so that one worker trains it once.
_SHARED_RUN = 'saved_test_run'


def _module(item):
  return item.module.__name__.rsplit('.', 1)[-1]


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook, which reads the groups.
def pytest_collection_modifyitems(items):
  sharing = {_module(item) for item in items if _SHARED_RUN in item.fixturenames}
  for item in items:
    module = _module(item)
    group = _SHARED_RUN if module in sharing else _GROUP.get(module, module)
    item.add_marker(pytest.mark.xdist_group(group))
