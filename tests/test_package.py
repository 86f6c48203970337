"""The package as a user gets it: a built wheel, installed by a notebook's cell.

`python -m build` makes the sdist and the wheel from a copy of the library's
files, `twine check` accepts both, and the wheel goes into a fresh virtual
environment (no checkout on sys.path; everything runs from a temporary folder)
through the install cell of notebooks/01 with JREG_SOURCE pointing at it. The
environment first holds this Python's jax, jaxlib and numpy, as a runtime does
(Colab, a cluster module): the cell must leave them as they are. Then a README
code block runs with the installed jreg. The dependencies come from the index
(pip's cache after the first run), at this environment's versions.
"""
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BUILD_FILES = ('setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'LICENSE')
KEPT = ('jax', 'jaxlib', 'numpy')


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


def test_notebook_cell_installs_the_wheel_beside_the_runtimes_jax(dist, tmp_path):
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

  notebook = nbformat.read(REPO / 'notebooks' / '01_implicit_gradient_regularization.ipynb',
                           as_version=4)
  cell = next(c for c in notebook.cells if c.cell_type == 'code').source
  script = tmp_path / 'install_cell.py'
  script.write_text(cell + '\nimport jreg, json\n'
                    "print(json.dumps({'jreg': jreg.__file__, **_versions()}))\n")
  env_cell = dict(env, JREG_SOURCE=str(wheel),
                  PIP_CONSTRAINT=str(constraints))  # the other packages' versions
  printed = _run([python, script], cwd=tmp_path, env=env_cell).stdout
  assert 'restart the runtime' not in printed, printed
  found = json.loads(printed.strip().splitlines()[-1])
  assert str(venv) in found.pop('jreg') and str(REPO) not in printed
  assert found == runtime, printed

  blocks = re.findall(r'^```python\n(.*?)^```', (REPO / 'README.md').read_text(),
                      flags=re.S | re.M)
  block = next(b for b in blocks if 'jreg.deq.DEQ' in b)
  (tmp_path / 'readme_block.py').write_text(block)
  _run([python, tmp_path / 'readme_block.py'], cwd=tmp_path, env=env)
