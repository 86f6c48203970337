"""The public API: `import jreg` and its modules, side effects, tracked files.

Each check that imports jreg runs in a fresh interpreter, so what this test
process has already imported (conftest, other tests) cannot hide a side effect.
"""
import importlib
import json
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ('data', 'deq', 'gradient_regularization', 'models', 'train')

# Imports jreg and everything a notebook imports from it, draws and saves a
# figure, and prints what global state it finds before and after.
_SIDE_EFFECT_PROBE = r'''
import json, logging, sys
import matplotlib

def snapshot():
  absl = logging.getLogger('absl')
  return {
      'backend': matplotlib.get_backend(),
      'root_handlers': [repr(h) for h in logging.root.handlers],
      'root_filters': [repr(f) for f in logging.root.filters],
      'root_level': logging.root.level,
      'absl_handlers': [repr(h) for h in absl.handlers],
      'absl_filters': [repr(f) for f in absl.filters],
  }

before = snapshot()
import jreg
from jreg import checkpoint, metrics, plotting
for name in jreg.__all__:
  getattr(jreg, name)
with plotting.figure(sys.argv[1]) as (fig, ax):
  plotting.curves(ax, {'a': ([0, 1], [0, 1]), 'b': ([0, 1], [1, 0])}, 'x', 'y')
print(json.dumps({'before': before, 'after': snapshot()}))
'''


def _python(*args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_import_jreg_changes_no_global_state(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  # A backend other than Agg: `matplotlib.use('Agg')` at import would show.
  env = dict(os.environ, MPLBACKEND='svg')
  png = tmp_path / 'figure.png'
  result = _python('-c', _SIDE_EFFECT_PROBE, str(png), env=env)
  assert result.returncode == 0, result.stderr
  state = json.loads(result.stdout.strip().splitlines()[-1])
  assert state['before']['backend'] == 'svg'
  assert state['after'] == state['before']
  assert png.stat().st_size > 1000  # the figure was drawn and written as PNG


def test_one_line_import_from_the_issue():
  result = _python('-c', 'import jreg; jreg.deq.DEQ; jreg.train.fit; '
                   'jreg.gradient_regularization')
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', PUBLIC_MODULES)
def test_public_module_has_explicit_all(name):
  import jreg  # pylint: disable=g-import-not-at-top
  assert name in jreg.__all__
  module = getattr(jreg, name)
  exported = module.__dict__.get('__all__')
  assert exported, f'jreg.{name} has no explicit __all__'
  assert len(set(exported)) == len(exported), f'jreg.{name}.__all__ repeats names'
  for attribute in exported:
    if name == 'models' and attribute != 'count_params':  # submodules, on use
      importlib.import_module(f'jreg.models.{attribute}')
    else:
      assert getattr(module, attribute) is not None, f'jreg.{name}.{attribute}'
  if name == 'models':
    submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    assert set(exported) == submodules | {'count_params'}


def test_deq_exports_what_the_readme_uses():
  import jreg  # pylint: disable=g-import-not-at-top
  for attribute in ('DEQ', 'SolverConfig', 'BackwardConfig', 'value_and_grad',
                    'anderson', 'broyden', 'fixed_point_iteration', 'solve',
                    'jacobian_frobenius_estimate', 'spectral_radius'):
    assert attribute in jreg.deq.__all__


# Paths of the machines jreg was built on. The pattern is assembled from
# pieces so that this file does not contain what it searches for.
_MACHINE_PATHS = re.compile('|'.join(re.escape('/' + a + '/' + b) for a, b in (
    ('work', 'main'), ('work', 'venv'), ('work', 'shared'), ('root', '.pyenv'))))


def test_no_tracked_file_holds_a_build_machine_path():
  listed = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO,
                          capture_output=True, timeout=60)
  assert listed.returncode == 0, (
      'git ls-files failed; this test needs the git checkout of jreg: '
      + listed.stderr.decode(errors='replace'))
  offending = []
  for name in listed.stdout.decode().split('\0'):
    path = REPO / name
    if not name or not path.is_file():
      continue
    text = path.read_bytes().decode('utf-8', errors='ignore')
    for number, line in enumerate(text.splitlines(), 1):
      if _MACHINE_PATHS.search(line):
        offending.append(f'{name}:{number}: {line.strip()}')
  assert not offending, 'machine paths in tracked files:\n' + '\n'.join(offending)


def test_notes_folder_is_gone():
  assert not (REPO / 'notes').exists()
