"""The package as a user gets it: a built wheel, installed by a notebook's cell.

`python -m build` makes the sdist and the wheel from a copy of the library's
files, `twine check` accepts both, and the wheel goes into a fresh virtual
environment (no checkout on sys.path; everything runs from a temporary folder)
through the install cell of notebooks/01 with JREG_SOURCE pointing at it. The
environment first holds this Python's jax, jaxlib and numpy, as a runtime does
(Colab, a cluster module): the cell must leave them as they are. Then, with
the installed jreg, every code block of the README's "As a library" section
runs, each in its own process, and notebooks/01 runs top to bottom at its
smoke settings, its install cell included (which then installs nothing). The
dependencies come from the index (pip's cache after the first run), at this
environment's versions. One test, as the environment takes a while to make.
"""
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys

import nbformat
import pytest
from readme_blocks import LIBRARY_SECTION
from readme_blocks import python_blocks

REPO = pathlib.Path(__file__).resolve().parents[1]
BUILD_FILES = ('setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'LICENSE')
KEPT = ('jax', 'jaxlib', 'numpy')
NOTEBOOK = REPO / 'notebooks' / '01_implicit_gradient_regularization.ipynb'
# Runs a notebook's code cells (a JSON list, argv[1]) in order in one
# namespace, as a kernel with the inline backend does: a cell's last
# expression is printed unless None, every figure a cell shows or leaves open
# is rendered to PNG and closed. Prints a cell's output after it ran, and last
# a JSON line: jreg's file and per cell the figures drawn and the characters
# printed. An exception ends it with its traceback. For notebooks without
# IPython magics or IPython.display.
NOTEBOOK_RUNNER = """\
import ast, contextlib, io, json, sys
import matplotlib
matplotlib.use('Agg')
from matplotlib import pyplot as plt

report = []

def show(*args, **kwargs):
  for number in plt.get_fignums():
    plt.figure(number).savefig(io.BytesIO(), format='png')
    report[-1]['figures'] += 1
  plt.close('all')

plt.show = show
namespace = {'__name__': '__main__'}
with open(sys.argv[1]) as f:
  cells = json.load(f)
for index, source in enumerate(cells):
  report.append({'figures': 0, 'printed': 0})
  tree = ast.parse(source, f'<cell {index}>')
  last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      exec(compile(tree, f'<cell {index}>', 'exec'), namespace)
      if last is not None:
        value = eval(compile(ast.Expression(last.value), f'<cell {index}>', 'eval'), namespace)
        if value is not None:
          print(repr(value))
  finally:
    sys.stdout.write(printed.getvalue())
  show()
  report[-1]['printed'] = len(printed.getvalue())
import jreg
print(json.dumps({'jreg': jreg.__file__, 'cells': report}))
"""


def _run(args, **kwargs):
  result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=900, **kwargs)
  assert result.returncode == 0, (
      f'{" ".join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}')
  return result


def _clean_env(tmp):
  """The environment without anything that would put the checkout on sys.path."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
  env['TMPDIR'] = str(tmp)
  return env


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
  source = tmp_path_factory.mktemp('source')
  for name in BUILD_FILES:
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / 'jreg', source / 'jreg',
                  ignore=shutil.ignore_patterns('__pycache__'))
  out = tmp_path_factory.mktemp('dist')
  _run([sys.executable, '-m', 'build', '--outdir', out, source],
       cwd=source, env=_clean_env(source))
  return out


def test_build_makes_a_wheel_and_an_sdist_that_twine_accepts(dist):
  wheels, sdists = list(dist.glob('*.whl')), list(dist.glob('*.tar.gz'))
  assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
  _run([sys.executable, '-m', 'twine', 'check', '--strict', *wheels, *sdists])
  import zipfile  # pylint: disable=g-import-not-at-top
  names = zipfile.ZipFile(wheels[0]).namelist()
  tops = {n.split('/')[0] for n in names}
  assert {t for t in tops if not t.endswith('.dist-info')} == {'jreg'}, tops
  assert any(n.endswith('licenses/LICENSE') for n in names)


def _installed(venv):
  """{dist-info folder: its mtime} in the venv: what pip installed, and when."""
  return {p.name: p.stat().st_mtime_ns for p in venv.glob('lib/python*/site-packages/*.dist-info')}


def test_the_wheel_installed_by_a_notebook_cell_runs_the_readme_and_a_notebook(dist, tmp_path):
  wheel = next(dist.glob('*.whl'))
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', venv])
  python = venv / 'bin' / 'python'
  # This environment's exact versions, so that pip takes the same packages
  # (from its cache); only what jreg declares gets installed.
  constraints = tmp_path / 'constraints.txt'
  frozen = _run([sys.executable, '-m', 'pip', 'freeze', '--exclude-editable']).stdout
  constraints.write_text(''.join(
      line + '\n' for line in frozen.splitlines()
      if '==' in line and not line.lower().startswith('jreg==')))
  runtime = {name: importlib.metadata.version(name) for name in KEPT}
  env = _clean_env(tmp_path)
  _run([python, '-m', 'pip', 'install', '-q', '-c', constraints,
        *(f'{n}=={v}' for n, v in runtime.items())], cwd=tmp_path, env=env)

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cells = [c.source for c in notebook.cells if c.cell_type == 'code']
  script = tmp_path / 'install_cell.py'
  script.write_text(cells[0] + '\nimport jreg, json\n'
                    "print(json.dumps({'jreg': jreg.__file__, **_versions()}))\n")
  env_cell = dict(env, JREG_SOURCE=str(wheel),
                  PIP_CONSTRAINT=str(constraints))  # the other packages' versions
  printed = _run([python, script], cwd=tmp_path, env=env_cell).stdout
  assert 'restart the runtime' not in printed, printed
  found = json.loads(printed.strip().splitlines()[-1])
  assert str(venv) in found.pop('jreg') and str(REPO) not in printed
  assert found == runtime, printed

  # The README's library blocks, each in a fresh process of the venv, from a
  # folder of their own; each checks that jreg came from the venv.
  blocks = python_blocks(LIBRARY_SECTION)
  assert len(blocks) >= 3
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  for index, block in enumerate(blocks):
    script = tmp_path / f'readme_block_{index}.py'
    script.write_text(block + '\nimport jreg\nprint(jreg.__file__)\n')
    result = subprocess.run([python, script], cwd=run_dir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (
        f'README block {index} failed with the wheel:\n{block}\n{result.stderr[-4000:]}')
    where = result.stdout.strip().splitlines()[-1]
    assert where.startswith(str(venv)), (index, where)

  # notebooks/01 top to bottom at its smoke settings, the install cell
  # included: jreg is importable, so it installs nothing and prints nothing.
  before = _installed(venv)
  (tmp_path / 'cells.json').write_text(json.dumps(cells))
  (tmp_path / 'run_notebook.py').write_text(NOTEBOOK_RUNNER)
  env_notebook = dict(env, JREG_SOURCE=str(wheel), JREG_NOTEBOOK_SMOKE='1')
  env_notebook.pop('JREG_NOTEBOOKS_FULL', None)
  printed = _run([python, tmp_path / 'run_notebook.py', tmp_path / 'cells.json'],
                 cwd=run_dir, env=env_notebook).stdout
  assert _installed(venv) == before, 'the install cell changed the environment'
  found = json.loads(printed.strip().splitlines()[-1])
  assert found['jreg'].startswith(str(venv)) and str(REPO) not in printed, printed
  report = found['cells']
  assert report[0] == {'figures': 0, 'printed': 0}, printed  # the install cell
  for index, (source, done) in enumerate(zip(cells, report)):
    if index and 'print(' in source:
      assert done['printed'], f'cell {index} printed nothing:\n{source}'
    if 'plt.show()' in source:
      assert done['figures'], f'cell {index} drew no figure:\n{source}'
  assert sum(done['figures'] for done in report) >= 4, report
