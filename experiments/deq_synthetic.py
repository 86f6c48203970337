r"""Jacobian regularisation of a tiny DEQ on the synthetic 1-D task.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization" (ICML 2021), Sec. 5 / Fig. 5 and Appendix A.1 / Table 4: a
scalar DEQ f(z; x) = W2^T ReLU(W1 z + U x + b) (`jreg.tasks.deq_synthetic`)
fitted to a noisy cubic, with the Jacobian term gamma ||J_f(z*)||_F^2 / d on a
fraction p = 0.4 of the steps, one run per gamma (and seed) of the sweep
(`experiments/configs/deq_synthetic.py`).

Measured per run on the validation split: MSE of z* at the training solver
budget, NFE to reach the tolerance with a high budget, residual after the
training budget, spectral radius |df/dz| at z*. Figures: the surface
z_out = f(z; x) with the plane z_out = z and z*(x), and the slice x = -1 with
the solver's iterates, for the smallest and the largest gamma; the training
curves of every run.

    python -m experiments.deq_synthetic --workdir=runs/deq_synthetic
    python -m experiments.deq_synthetic --workdir=runs/deq_synthetic_seeds \
        --config.sweep.seed='(0,1,2)'

Each run trains in `W/runs/<name>/` and resumes there on its own; a killed
command, restarted, ends with the same `results.json` and figures, built from
the runs' `metrics.jsonl`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jreg import cli
from jreg import data
from jreg import deq as deq_lib
from jreg import train
from jreg.tasks import deq as deq_task
from jreg.tasks import deq_synthetic as task
from jreg.tasks import optimizers
from jreg.tasks import runs as runs_lib


def train_run(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes, or reads back) one DEQ; returns `(state, history)`."""
  optimizer, schedule = optimizers.make_optimizer(
      config.learning_rate, config.optimizer, config.num_steps)
  per_example = task.per_example_metrics(config)

  def eval_fn(params, model_state):
    batches = data.synthetic_1d_iterator('validation', config.eval_batch_size,
                                         mode='eval')
    return train.evaluate(per_example, params, model_state, batches)

  return train.fit(
      workdir=workdir, init_fn=task.init_fn(config),
      grad_fn=deq_task.log_unconverged_from_config(
          deq_lib.value_and_grad(task.loss_fn(config)), config),
      optimizer=optimizer,
      train_iter=data.synthetic_1d_iterator('train', config.batch_size,
                                            seed=config.seed),
      num_steps=config.num_steps, seed=config.seed, parallel=config.parallel,
      eval_fn=eval_fn, eval_every=config.eval_every, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, learning_rate_fn=schedule,
      config=config.to_dict(), allow_config_change=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every run of the sweep; writes results.json and PNGs under workdir."""
  cli.validate('deq_synthetic', config)
  runs = runs_lib.expand(config)
  results, params, histories = {}, {}, {}
  for run_ in runs:
    state, history = train_run(run_.config, runs_lib.run_dir(workdir, run_))
    results[run_.name] = task.summarize(history)
    histories[run_.name], params[run_.name] = history, state.params
    print(f'{run_.name}: ' + json.dumps(results[run_.name]), flush=True)
  summary = {'runs': results, 'steps_per_run': config.num_steps,
             'noise_variance': data.synthetic.NOISE_VARIANCE}
  if jax.process_index() == 0:
    gammas = {run_.name: run_.config.jacobian.weight for run_ in runs
              if run_.config.seed == runs[0].config.seed}
    extremes = {min(gammas, key=gammas.get), max(gammas, key=gammas.get)}
    shown = {f'gamma = {gammas[name]:g}': params[name]
             for name in sorted(extremes, key=gammas.get)}
    task.figures(workdir, runs[0].config, shown, histories)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


if __name__ == '__main__':
  cli.main(run, 'deq_synthetic')
