"""The documentation site: it builds without warnings, renders in a browser,
and its API reference holds every public name.

The site is built once per session, as README.md's "Documentation" says
(`sphinx-build -W --keep-going`), into a temporary folder; with
`JREG_DOCS_HTML=DIR` the tests read a build made earlier instead (CI builds
the site in its own step first). The build needs the `docs` extra
(`pip install -e '.[docs]'`) and the browser tests Chromium; either missing
skips those tests, or fails them when `JREG_REQUIRE_DOCS=1` (as in CI).

The generator's own check (`test_generated_pages_name_every_public_name`)
needs neither.
"""
import html
import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import time
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
REQUIRED = os.environ.get('JREG_REQUIRE_DOCS') == '1'

# Public modules that `import jreg` does not import; every other top-level
# module of jreg/ is internal (`INTERNAL`) or reached from `jreg.__all__`.
IMPORTED_ON_THEIR_OWN = ('jreg.layers', 'jreg.xla_cpu', 'jreg.plotting',
                         'jreg.errors')
INTERNAL = ('jreg.checkpoint', 'jreg.cli', 'jreg.distributed',
            'jreg.metrics', 'jreg.report', 'jreg.rundir', 'jreg.tasks')
GUIDE_PAGES = ('architecture', 'data', 'deq', 'gradient_regularization',
               'models', 'reproduction', 'reproduction_protocol', 'api')


def _unavailable(reason):
  if REQUIRED:
    pytest.fail(f'{reason} (JREG_REQUIRE_DOCS=1 makes this an error)')
  pytest.skip(reason)


def _chromium():
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    path = shutil.which(name)
    if path:
      return path
  _unavailable('no Chromium on PATH (Debian: apt-get install -y chromium)')
  return None


def _is_module(module, attribute):
  value = getattr(module, attribute, None)
  if isinstance(value, types.ModuleType):
    return True
  # jreg.models imports its submodules on use only.
  return value is None and hasattr(module, '__path__') and (
      importlib.util.find_spec(f'{module.__name__}.{attribute}') is not None)


def _public_names(module):
  exported = module.__dict__.get('__all__')
  if exported is not None:
    return tuple(exported)
  return tuple(
      name for name, value in vars(module).items()
      if not name.startswith('_') and not isinstance(value, types.ModuleType)
      and ((inspect.isclass(value) or inspect.isfunction(value))
           and value.__module__ == module.__name__ or name.isupper()))


def _public_modules():
  """`jreg`, every module a public `__all__` names, and the three above."""
  found, queue = [], ['jreg', *IMPORTED_ON_THEIR_OWN]
  while queue:
    name = queue.pop(0)
    if name not in found:
      found.append(name)
      module = importlib.import_module(name)
      queue += [f'{name}.{a}' for a in _public_names(module)
                if _is_module(module, a)]
  return found


def test_every_top_level_module_is_public_or_internal():
  import jreg  # pylint: disable=g-import-not-at-top
  top = {f'jreg.{m.name}' for m in pkgutil.iter_modules(jreg.__path__)}
  documented = set(_public_modules())
  unclassified = top - documented - set(INTERNAL)
  assert not unclassified, (
      f'{sorted(unclassified)}: add each to jreg.__all__ (documented), to '
      'IMPORTED_ON_THEIR_OWN here and in docs/_ext/jreg_api.py (documented), '
      'or to INTERNAL here')


def test_generated_pages_name_every_public_name():
  sys.path.insert(0, str(DOCS / '_ext'))
  try:
    import jreg_api  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(DOCS / '_ext'))
  assert jreg_api.IMPORTED_ON_THEIR_OWN == IMPORTED_ON_THEIR_OWN
  assert jreg_api.public_modules() == _public_modules()
  for name in _public_modules():
    module = importlib.import_module(name)
    page = jreg_api.module_page(name)
    assert f'.. automodule:: {name}\n' in page
    for attribute in _public_names(module):
      if _is_module(module, attribute):
        assert f':py:mod:`{name}.{attribute}`' in page, (name, attribute)
      else:
        assert re.search(rf'^\.\. auto\w+:: {attribute}$', page, re.M), (
            f'{name}.{attribute} has no entry in its generated page')


@pytest.fixture(scope='session')
def site(tmp_path_factory):
  """The built HTML folder (built here unless JREG_DOCS_HTML names one)."""
  given = os.environ.get('JREG_DOCS_HTML')
  if given:
    html_dir = pathlib.Path(given)
    assert (html_dir / 'index.html').is_file(), f'no index.html in {given}'
    return html_dir
  for package in ('sphinx', 'myst_nb', 'sphinx_book_theme'):
    if importlib.util.find_spec(package) is None:
      _unavailable(f"{package} is not installed: pip install -e '.[docs]'")
  out = tmp_path_factory.mktemp('docs')
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
       '-d', str(out / 'doctrees'), str(DOCS), str(out / 'html')],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (
      'sphinx-build -W failed (warnings are errors):\n' + result.stderr[-6000:])
  print(f'docs built in {time.monotonic() - start:.1f} s')
  return out / 'html'


def _dom(url):
  """The DOM after Chromium has loaded and scripted `url`."""
  command = [_chromium(), '--headless', '--disable-gpu', '--no-sandbox',
             '--no-first-run', '--virtual-time-budget=3000', '--dump-dom', url]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '<body' in result.stdout, result.stderr[-3000:]
  return result.stdout


def _text(dom):
  return html.unescape(re.sub(r'<[^>]+>', ' ', dom))


def _assert_no_error_markup(dom, page):
  for marker in ('admonition error', 'class="system-message',
                 'class="problematic"', 'autodoc: failed'):
    assert marker not in dom, f'{page}: {marker!r} in the rendered page'


def _page_url(site_dir, page):
  return (site_dir / page).resolve().as_uri()


def test_index_renders_with_navigation(site):
  dom = _dom(_page_url(site, 'index.html'))
  _assert_no_error_markup(dom, 'index.html')
  text = _text(dom)
  assert 'A JAX/Haiku research framework' in text  # README's introduction
  for page in GUIDE_PAGES:
    assert f'href="{page}.html"' in dom, f'index.html does not link {page}'
  notebooks = sorted(p.stem for p in (REPO / 'notebooks').glob('*.ipynb'))
  assert notebooks
  for notebook in notebooks:
    assert f'_generated/notebooks/{notebook}.html' in dom, notebook
  for module in _public_modules():
    assert f'_generated/api/{module}.html' in dom, module


def test_deq_reference_renders(site):
  page = '_generated/api/jreg.deq.html'
  dom = _dom(_page_url(site, page))
  _assert_no_error_markup(dom, page)
  text = _text(dom)
  assert 'Deep equilibrium layers with Jacobian regularisation' in text
  for name in ('DEQ', 'SolverConfig', 'BackwardConfig', 'value_and_grad',
               'anderson', 'broyden', 'fixed_point_iteration', 'gmres',
               'bicgstab', 'jacobian_frobenius_estimate', 'spectral_radius'):
    assert f'id="jreg.deq.{name}"' in dom, name
  assert 'hk.transform' in text  # the DEQ docstring rendered


def test_notebook_and_report_render(site):
  notebook = sorted((REPO / 'notebooks').glob('*.ipynb'))[0].stem
  page = f'_generated/notebooks/{notebook}.html'
  dom = _dom(_page_url(site, page))
  _assert_no_error_markup(dom, page)
  assert 'colab.research.google.com' in dom
  assert 'cell_input' in dom  # the code cells are shown
  dom = _dom(_page_url(site, 'reproduction.html'))
  _assert_no_error_markup(dom, 'reproduction.html')
  assert 'Reproduction report' in _text(dom)
  images = re.findall(r'<img [^>]*src="([^"]+\.png)"', dom)
  assert len(images) >= 5, images
  for src in images:
    assert (site / src).is_file(), f'reproduction.html: missing image {src}'


def test_every_public_name_is_in_the_reference(site):
  missing = []
  for name in _public_modules():
    path = site / '_generated' / 'api' / f'{name}.html'
    if not path.is_file():
      missing.append(f'{name}: no page')
      continue
    page = path.read_text()
    if f'id="module-{name}"' not in page:
      missing.append(f'{name}: no module anchor')
    module = importlib.import_module(name)
    for attribute in _public_names(module):
      if _is_module(module, attribute):
        if f'href="{name}.{attribute}.html' not in page:
          missing.append(f'{name}.{attribute}: no link to its page')
      elif f'id="{name}.{attribute}"' not in page:
        missing.append(f'{name}.{attribute}: no entry')
  assert not missing, 'the API reference lacks:\n' + '\n'.join(missing)


def test_every_guide_page_is_built(site):
  for page in GUIDE_PAGES:
    path = site / f'{page}.html'
    assert path.is_file(), page
    _assert_no_error_markup(path.read_text(), page)
