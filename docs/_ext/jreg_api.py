"""Generates the API reference of jreg from the public modules' `__all__`.

Every public module gets one page, `_generated/api/<module>.rst`, with its
docstring, a summary table and one autodoc entry per public name, in the order
of `__all__`. The public modules are `jreg` and, recursively, every module a
public `__all__` names (`jreg.deq.adaptive`, `jreg.models.mdeq`, ...), plus
the modules imported on their own (`IMPORTED_ON_THEIR_OWN`). A module without
`__all__` is documented by the names it defines without a leading underscore.
Nothing here is written by hand, so the reference follows the code.
"""
import importlib
import inspect
import pathlib
import types

# Public modules that `import jreg` does not import (docs/api.md lists them).
IMPORTED_ON_THEIR_OWN = ('jreg.layers', 'jreg.xla_cpu', 'jreg.plotting',
                         'jreg.errors')


def public_modules():
  """Names of the public modules: `jreg`, what its `__all__`s name, the rest."""
  ordered, queue = [], ['jreg', *IMPORTED_ON_THEIR_OWN]
  while queue:
    name = queue.pop(0)
    if name in ordered:
      continue
    ordered.append(name)
    module = importlib.import_module(name)
    for attribute in public_names(module):
      full = f'{name}.{attribute}'
      if _is_submodule(module, attribute):
        queue.append(full)
  return ordered


def _is_submodule(module, attribute):
  value = getattr(module, attribute, None)
  if isinstance(value, types.ModuleType):
    return True
  # jreg.models imports its submodules on use only.
  path = getattr(module, '__path__', None)
  return value is None and path is not None and any(
      (pathlib.Path(p) / f'{attribute}.py').exists() for p in path)


def public_names(module):
  """`module.__all__`, or the names it defines without a leading underscore."""
  exported = module.__dict__.get('__all__')
  if exported is not None:
    return tuple(exported)
  names = []
  for name, value in vars(module).items():
    if name.startswith('_') or isinstance(value, types.ModuleType):
      continue
    if inspect.isclass(value) or inspect.isfunction(value):
      if getattr(value, '__module__', None) == module.__name__:
        names.append(name)
    elif name.isupper():
      names.append(name)
  return tuple(names)


def _directive(module, name):
  value = getattr(module, name)
  if inspect.isclass(value):
    return f'.. autoclass:: {name}\n   :members:\n   :special-members: __call__\n'
  if callable(value):
    return f'.. autofunction:: {name}\n'
  return f'.. autodata:: {name}\n'


def module_page(name):
  """The reStructuredText of `name`'s page."""
  module = importlib.import_module(name)
  names = public_names(module)
  submodules = [n for n in names if _is_submodule(module, n)]
  members = [n for n in names if n not in submodules]
  lines = [f'``{name}``', '=' * (len(name) + 4), '',
           f'.. automodule:: {name}', '   :no-members:', '',
           f'.. currentmodule:: {name}', '']
  if '__all__' in module.__dict__:
    lines += [f'Public names: ``{name}.__all__``.', '']
  else:
    lines += [f'``{name}`` has no ``__all__``; its public names are the ones it '
              'defines without a leading underscore.', '']
  if submodules:
    lines += ['Submodules:', '']
    lines += [f'- :py:mod:`{name}.{n}`' for n in submodules]
    lines.append('')
  if members:
    lines += ['.. autosummary::', '   :nosignatures:', '']
    lines += [f'   {n}' for n in members]
    lines.append('')
    for n in members:
      lines.append(_directive(module, n))
  return '\n'.join(lines)


def write_pages(directory):
  """Writes one page per public module into `directory`; returns the names."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  modules = public_modules()
  wanted = {f'{m}.rst' for m in modules}
  for stale in directory.glob('*.rst'):
    if stale.name not in wanted:
      stale.unlink()
  for name in modules:
    _write_if_changed(directory / f'{name}.rst', module_page(name))
  return modules


def _write_if_changed(path, text):
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  del app, what, name, options
  doc = getattr(obj, '__doc__', None) or ''
  if doc.startswith('Alias for field number'):
    return True
  return skip


def _drop_type_docstrings(app, what, name, obj, options, lines):
  """A constant (a dict, a tuple) has no docstring of its own: not its type's."""
  del app, name, options
  if what in ('data', 'attribute') and not inspect.isclass(obj) and (
      '\n'.join(lines).strip() == (inspect.getdoc(type(obj)) or '').strip()):
    lines.clear()


def setup(app):
  app.connect('autodoc-skip-member', _skip_namedtuple_fields)
  app.connect('autodoc-process-docstring', _drop_type_docstrings)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
