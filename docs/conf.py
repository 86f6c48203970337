"""Sphinx configuration of jreg's documentation site.

Build (from the repository root, with `pip install -e '.[docs]'`):

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated from the public modules' `__all__` by
`docs/_ext/jreg_api.py` into `docs/_generated/api/`; the notebooks are copied
from `notebooks/` into `docs/_generated/notebooks/` and rendered as stored,
never executed.
"""
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(DOCS / '_ext'))
sys.path.insert(0, str(REPO))

import jreg  # pylint: disable=g-import-not-at-top,wrong-import-position
import jreg_api  # pylint: disable=g-import-not-at-top,wrong-import-position

GENERATED = DOCS / '_generated'
jreg_api.write_pages(GENERATED / 'api')


def _copy_notebooks():
  target = GENERATED / 'notebooks'
  target.mkdir(parents=True, exist_ok=True)
  sources = sorted((REPO / 'notebooks').glob('*.ipynb'))
  for stale in target.glob('*.ipynb'):
    if stale.name not in {s.name for s in sources}:
      stale.unlink()
  for source in sources:
    copy = target / source.name
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      shutil.copyfile(source, copy)


_copy_notebooks()

project = 'jreg'
author = 'the jreg authors'
copyright = '2026, the jreg authors'  # pylint: disable=redefined-builtin
release = version = jreg.__version__

extensions = [
    'myst_nb',                # Markdown pages and the notebooks
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',    # the Google-style docstrings
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'jreg_api',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']
root_doc = 'index'

# Notebooks are rendered from their stored cells; the build runs nothing.
nb_execution_mode = 'off'
myst_enable_extensions = ['dollarmath']
myst_heading_anchors = 3

# Docstrings write code in single backquotes (Markdown style).
default_role = 'code'
# Literal blocks of the docstrings are formulas and tables, not Python.
highlight_language = 'text'
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_inherit_docstrings = False
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = 'sphinx_book_theme'
html_title = 'jreg'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
