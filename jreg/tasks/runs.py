"""Named runs of a multi-run experiment: the cross product of `config.sweep`.

A config's `sweep` group holds one tuple per swept key; `sweep.KEY` sets the
top-level key `KEY`, or `GROUP.LEAF` when `KEY` is `GROUP_LEAF` and the config
has that group (`sweep.jacobian_weight` sets `jacobian.weight`). Each run is
named `key=value,key=value` (sweep keys in sorted order, a ConfigDict's) and trains in its
own folder `W/runs/<name>/`, resuming there on its own (`jreg.train.fit`,
whose history is the run's whole `metrics.jsonl`), so summaries and figures
built from it are those of an uninterrupted command.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, NamedTuple

import ml_collections


class Run(NamedTuple):
  name: str                           # 'jacobian_weight=2,seed=0'
  values: dict[str, Any]              # the sweep values of this run
  config: ml_collections.ConfigDict   # the full config of this run (no `sweep`)


def _target(config: ml_collections.ConfigDict, key: str) -> tuple[Any, str]:
  """(node, leaf) that `sweep.KEY` sets."""
  if key in config and not isinstance(config[key], ml_collections.ConfigDict):
    return config, key
  group, _, leaf = key.partition('_')
  while leaf:
    if (group in config and isinstance(config[group], ml_collections.ConfigDict)
        and leaf in config[group]):
      return config[group], leaf
    more, _, leaf = leaf.partition('_')
    group = f'{group}_{more}'
  raise ValueError(f'sweep.{key} names no key of the config (a top-level key, '
                   'or GROUP_LEAF for GROUP.LEAF).')


def format_value(value: Any) -> str:
  """A sweep value as it appears in a run name (floats with `:g`)."""
  return f'{value:g}' if isinstance(value, float) else str(value)


def run_name(values: dict[str, Any]) -> str:
  """`key=value,key=value`, the name and folder of one run."""
  return ','.join(f'{key}={format_value(value)}' for key, value in values.items())


def expand(config: ml_collections.ConfigDict) -> list[Run]:
  """The runs of `config`: one per point of the cross product of `sweep`.

  Raises:
    ValueError: a sweep key names no key of the config, or a value has the
      wrong type.
  """
  sweep = dict(config.sweep.items()) if 'sweep' in config else {}
  runs = []
  for point in itertools.product(*sweep.values()):
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
      if 'sweep' in run_config:
        del run_config['sweep']
    values = dict(zip(sweep, point))
    for key, value in values.items():
      node, leaf = _target(run_config, key)
      try:
        node[leaf] = value
      except TypeError as error:
        raise ValueError(f'sweep.{key}: {error}') from None
    runs.append(Run(run_name(values), values, run_config))
  names = [run.name for run in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'the sweep repeats a run: {names}.')
  return runs


def run_dir(workdir: str, run: Run) -> str:
  """`W/runs/<name>/`, the folder of one run."""
  return os.path.join(workdir, 'runs', run.name)
