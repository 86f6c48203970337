r"""Fixed vs adaptive Jacobian weight gamma: one figure and a table from finished runs.

Reads each run's `metrics.jsonl` and `config.json` (a run folder of
`experiments.deq_synthetic`, `W/runs/<name>/`, or the workdir of
`experiments.deq_cifar10`) and draws, against the training step, gamma
(`jacobian.weight` for a fixed run, the controller's gamma_t for an adaptive
one; `jreg.deq.adaptive`), the training forward NFE (with the runs' budgets
`deq.forward.max_iter`) and the training loss term (`mse` or
`cross_entropy`); prints one JSON line per run with the final logged values.

    python -m experiments.compare_adaptive_gamma --out=FIGURE.png \
        --title='...' --loss_key=mse 'fixed gamma 1=RUN_DIR' \
        'adaptive, rho target 0.3=RUN_DIR'   # labels without '='
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import app
from absl import flags
import numpy as np

from jreg import metrics as metrics_lib
from jreg import plotting

_OUT = flags.DEFINE_string('out', None, 'PNG to write.', required=True)
_TITLE = flags.DEFINE_string('title', '', 'Figure title.')
_LOSS_KEY = flags.DEFINE_string('loss_key', 'mse',
                                "Training loss term: 'mse' | 'cross_entropy'.")


def gamma_series(history: list[dict], config: Mapping[str, Any]):
  """(steps, gamma) of a run: logged gamma_t, or the fixed `jacobian.weight`."""
  steps, values = metrics_lib.series(history, 'jacobian_weight')
  if len(steps):  # gamma = 0 in an unrolled pre-training phase: not drawn
    return steps[values > 0], values[values > 0]
  steps, _ = metrics_lib.series(history, 'forward_nfe')
  return steps, np.full(len(steps), float(config['jacobian']['weight']))


def plot(runs: Mapping[str, str], out: str, title: str,
         loss_key: str) -> dict[str, dict]:
  """Writes the figure at `out`; returns label -> final logged values."""
  histories, configs, table = {}, {}, {}
  for label, run_dir in runs.items():
    histories[label] = metrics_lib.read_jsonl(
        os.path.join(run_dir, 'metrics.jsonl'))
    with open(os.path.join(run_dir, 'config.json')) as f:
      configs[label] = json.load(f)
  with plotting.figure(out, ncols=3, size=(5.0, 3.8)) as (fig, axes):
    plotting.curves(axes[0], {k: gamma_series(h, configs[k])
                              for k, h in histories.items()},
                    'training step', 'Jacobian weight gamma (dimensionless)',
                    logy=True)
    plotting.curves(axes[1], {k: metrics_lib.series(h, 'forward_nfe')
                              for k, h in histories.items()},
                    'training step', 'forward NFE (solver evaluations)')
    for value in sorted({plotting.solver_budgets(c)['forward_nfe']
                         for c in configs.values()} - {None}):
      plotting.budget(axes[1], value, 'forward max_iter')
    plotting.curves(axes[2], {k: metrics_lib.series(h, loss_key)
                              for k, h in histories.items()},
                    'training step', f'training {loss_key} (per example)',
                    logy=loss_key == 'mse')
    if title:
      fig.suptitle(title)
  for label, history in histories.items():
    train = [r for r in history if r['split'] == 'train']
    evals = [r for r in history if r['split'] == 'eval']
    table[label] = {
        'final_gamma': float(gamma_series(history, configs[label])[1][-1]),
        'train_forward_nfe_last': train[-1]['forward_nfe'],
        f'train_{loss_key}_last': train[-1][loss_key],
        'final_eval': evals[-1] if evals else {}}
  return table


def main(argv):
  runs = dict(arg.split('=', 1) for arg in argv[1:])  # LABEL=RUN_DIR
  for label, row in plot(runs, _OUT.value, _TITLE.value,
                         _LOSS_KEY.value).items():
    print(json.dumps({'run': label, **row}))


if __name__ == '__main__':
  app.run(main)
