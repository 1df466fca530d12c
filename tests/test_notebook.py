"""notebooks/train_colab.ipynb executed end to end on the CPU, with its tiny preset.

The test injects a cell after the notebook's `parameters` cell (papermill's convention), as a
user would edit it, and runs every cell in a fresh kernel (nbclient).
"""

import os

import jax
import nbclient
import nbformat

from jaxtrain import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'train_colab.ipynb')


def _with_parameters(notebook, **values):
  """The notebook with a cell setting `values` after its `parameters` cell."""
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  source = '\n'.join(f'{name} = {value!r}' for name, value in values.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
  return notebook


def test_notebook_trains_the_tiny_preset_and_shows_the_report(tmp_path, tmp_path_factory,
                                                              monkeypatch):
  workdir = str(tmp_path / 'run')
  # The kernel and the training it starts inherit these. The session's cache is the one
  # test_distributed's one-process run fills with this same step.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', os.environ.get('JAX_COMPILATION_CACHE_DIR')
                     or str(tmp_path_factory.getbasetemp() / 'jax_cache'))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('PYTHONPATH', ROOT)
  notebook = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), PRESET='test',
                              WORKDIR=workdir, REQUIRE_ACCELERATOR=False, TENSORBOARD=False)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}
                          ).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  # main.py's device line, streamed into the notebook: the kernel and the training it started
  # ran on this interpreter's JAX (CI runs this test again on the oldest JAX allowed).
  assert f'JAX {jax.__version__} backend cpu' in text
  rows = writers.read_metrics(workdir)
  assert {r['split'] for r in rows} == {'train', 'val', 'test'}
  assert os.path.exists(os.path.join(workdir, 'report', 'report.md'))
  markdown = [o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {})]
  assert len(markdown) == 1 and '## Checklist:' in markdown[0]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 3  # The loss, component and learning-rate figures at least.
