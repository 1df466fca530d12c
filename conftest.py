"""Test-session set-up. Pytest imports this first, from the repository root, which also puts
the root on sys.path so that tests import `configs` and `jaxtrain` from the tree.

The suite compiles many small train steps (subprocesses included: they inherit the
environment). XLA:CPU's backend optimisation level 0 compiles them about 40 % faster; the
tests compare runs made under the same flags, so their results do not depend on it. A
persistent compilation cache shared by the whole session (subprocesses too) makes a program
that several tests build, e.g. the `:test` preset's steps, compile once.
"""

import os
import tempfile

_FAST_COMPILE = '--xla_backend_optimization_level=0'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_FAST_COMPILE}'.strip()

if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxtrain_test_cache_')


def pytest_configure(config):
  # A donated buffer that no output can reuse costs its memory and a warning on every run:
  # any program of the suite that donates one fails its test.
  config.addinivalue_line('filterwarnings', 'error:Some donated buffers were not usable')
