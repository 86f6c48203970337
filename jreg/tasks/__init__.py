"""Tasks: what experiments, benchmarks, notebooks and tests train and measure.

A task module turns a config (an `ml_collections.ConfigDict` in the naming
scheme of `experiments/configs/`) into library objects: models, objectives in
the engine's `loss_fn` contract, evaluation and probe functions, schedules,
and summaries read back from `metrics.jsonl`. Submodules are imported
explicitly (`from jreg.tasks import deq`); this package imports none of them
eagerly.

  * `jreg.tasks.classification`, `jreg.tasks.regression`: cross entropy and
    squared error, and their evaluation.
  * `jreg.tasks.igr`: what the gradient-regularisation experiments measure.
  * `jreg.tasks.deq`: config -> DEQ solver settings, gamma / p schedules.
  * `jreg.tasks.deq_synthetic`: the synthetic 1-D DEQ.
  * `jreg.tasks.mdeq`: the MDEQ classifier's objective, evaluation, NFE probes.
  * `jreg.tasks.deq_lm`: the DEQ-Transformer language-model task.
  * `jreg.tasks.optimizers`: `learning_rate` + `optimizer.*` -> optax.
  * `jreg.tasks.runs`: named runs of multi-run experiments (`sweep.*`).
  * `jreg.tasks.checks`: range checks of config keys.
"""
from __future__ import annotations

from typing import Optional

# `data.source` values of every config: the `jreg.data` loaders' sources:
# 'auto' (local files when present, otherwise download), 'local' (the standard
# files under `data.dir`), 'download' (fetch the standard files), 'tfds'
# (an already prepared tensorflow-datasets directory).
DATA_SOURCES = ('auto', 'local', 'download', 'tfds')


def data_source(source: str, data_dir: Optional[str]) -> tuple[str, Optional[str]]:
  """`(source, data_dir)` as the `jreg.data` loaders take them (unchanged).

  `data_dir=None` lets the loaders choose: `$JREG_DATA_DIR`, else the cache
  directory (`jreg.data.default_data_dir`).

  Raises:
    jreg.data.DataError: a source that the loaders do not provide.
  """
  from jreg import data  # pylint: disable=g-import-not-at-top
  if source not in data.SOURCES:
    raise data.DataError(f'data.source={source!r} is not a data source; the '
                         f'loaders read {data.SOURCES}.')
  return source, data_dir
