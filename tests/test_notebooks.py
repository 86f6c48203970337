"""Every notebook under notebooks/ runs top to bottom without a cell error.

Each notebook is executed by nbclient in a fresh Jupyter kernel (the Python
running the tests), in a temporary working directory, with the checkout first
on PYTHONPATH and JREG_NOTEBOOK_SMOKE=1, the notebooks' small setting (same
code, fewer steps); with JREG_NOTEBOOKS_FULL=1 (as CI runs them once) at the
settings a user runs, a few minutes each. One notebook per test, so
`pytest -n 2` runs two at once.
"""
import json
import os
import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
COLAB = 'https://colab.research.google.com/github/jreg-project/jreg/blob/main/notebooks/'


def test_there_are_at_least_four_notebooks():
  assert len(NOTEBOOKS) >= 4, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_with_badge_and_install_cell(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  first = notebook.cells[0]
  assert first.cell_type == 'markdown'
  assert f'({COLAB}{path.name})' in first.source, 'Open-in-Colab badge missing'
  first_code = next(c for c in notebook.cells if c.cell_type == 'code')
  assert 'pip' in first_code.source and "find_spec('jreg')" in first_code.source
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          f'{path.name} is stored with outputs; clear them before committing.')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_error(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                 p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p),
             MPLBACKEND='module://matplotlib_inline.backend_inline')
  if os.environ.get('JREG_NOTEBOOKS_FULL') == '1':
    env.pop('JREG_NOTEBOOK_SMOKE', None)
  else:
    env['JREG_NOTEBOOK_SMOKE'] = '1'
  # A last cell checks that the kernel imported this checkout's jreg.
  notebook.cells.append(nbformat.v4.new_code_cell(
      'import jreg, json; print(json.dumps(jreg.__file__))'))
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError naming the failing cell
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert images, f'{path.name} drew no inline figure'
  printed = ''.join(o.get('text', '') for o in notebook.cells[-1].outputs)
  assert pathlib.Path(json.loads(printed)).resolve().parent == REPO / 'jreg'
