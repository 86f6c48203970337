"""Range checks of config keys, each failing with one sentence (`ValueError`).

Config files' `validate(config)` functions call these for keys given by their
dotted names (`'sweep.model_width'`); a key may hold one value or a tuple of
values (a sweep), and every value must pass. Booleans are never numbers here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


def config_value(config: Mapping[str, Any], key: str) -> Any:
  """The value of a dotted key (`'sweep.model_width'`)."""
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _check_each(config: Mapping[str, Any], keys, ok: Callable[[Any], bool],
                one: str, many: str) -> None:
  for key in keys:
    value = config_value(config, key)
    if isinstance(value, (tuple, list)):
      if not value or not all(not isinstance(v, bool) and ok(v) for v in value):
        raise ValueError(f'{key} must be a non-empty tuple of {many}, got '
                         f'{value!r}.')
    elif isinstance(value, bool) or not ok(value):
      raise ValueError(f'{key} must be {one}, got {value!r}.')


def check_counts(config: Mapping[str, Any], *keys: str) -> None:
  """Each dotted key holds integers >= 1 (a number or a tuple of them)."""
  _check_each(config, keys, lambda v: isinstance(v, int) and v >= 1,
              'an integer >= 1', 'integers >= 1')


def check_sizes(config: Mapping[str, Any], *keys: str) -> None:
  """Each dotted key holds integers >= 0 (e.g. `*_examples`, where 0 means all)."""
  _check_each(config, keys, lambda v: isinstance(v, int) and v >= 0,
              'an integer >= 0', 'integers >= 0')


def check_positive(config: Mapping[str, Any], *keys: str) -> None:
  """Each dotted key holds numbers > 0 (a number or a tuple of them)."""
  _check_each(config, keys, lambda v: isinstance(v, (int, float)) and v > 0,
              'a number > 0', 'numbers > 0')
