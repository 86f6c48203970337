r"""Cost of the gradient penalty: penalised vs plain update step of the MNIST MLP.

Times the engine's update step (`jreg.train.make_update`: gradient function +
optax SGD, compiled once by `jreg.train.Parallel('single')` as training
compiles it, state donated) of the MLP of [BD21] Section 5
(`jreg.tasks.igr.mnist_mlp_task`, input 784) plain and with each penalty
method of `jreg.gradient_regularization`:

  'finite_difference'  ∇L + 2μ(∇L(θ + εĝ) − ∇L(θ))‖g‖/ε: two gradients;
  'hvp'                forward-over-reverse Hessian-vector product;
  'double_backprop'    reverse-over-reverse (VJP of the gradient map).

Every variant is warmed up (compiled, run once), then timed in round-robin
order so that a shared machine's load hits them alike; each timing is
`timing.steps_per_repeat` steps ended by `block_until_ready`, and the figure
reported is the median over `timing.repeats`, as a ratio to the plain step
timed in the same run, beside XLA's FLOP ratio.

It also measures how well the finite difference approximates the exact
penalty term 2μH∇L (after `finite_difference.warmup_steps` plain SGD steps on
MNIST, over `finite_difference.batches` batches) for each ε: the relative
error ‖FD − exact‖/‖2μH∇L‖. In a ReLU network units crossing their kink
within the step make this error O(1) as ε → 0.

    python -m experiments.bench_gradient_penalty --workdir=runs/bench_gp
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import tasks
from jreg import train
from jreg.tasks import igr


def variants(config: ml_collections.ConfigDict, loss_fn, **options) -> dict[str, Any]:
  """`{'plain', *methods}` -> grad function of `loss_fn`."""
  reg = config.regularizer
  return {'plain': train.value_and_grad(loss_fn), **{
      method: gr.gradient_penalty_grad_fn(
          loss_fn, coefficient=reg.coefficient, method=method,
          learning_rate=config.learning_rate,
          fd_epsilon=options.get('fd_epsilon', reg.fd_epsilon))
      for method in reg.methods}}


def bench_width(config: ml_collections.ConfigDict, width: int) -> dict[str, Any]:
  """Median seconds per step of every variant, and their ratios to plain."""
  task = igr.mnist_mlp_task(width, config.model.num_layers)
  optimizer = optax.sgd(config.learning_rate)
  rng = np.random.default_rng(config.seed)
  # Random inputs: the dense step's cost does not depend on the values.
  batch = jax.device_put({
      'image': rng.normal(size=(config.batch_size, 28, 28, 1)).astype(np.float32),
      'label': rng.integers(0, 10, size=config.batch_size).astype(np.int32)})
  steps, states, flops = {}, {}, {}
  for name, grad_fn in variants(config, task.loss_fn).items():
    state = jax.device_put(train.init_state(task.init, optimizer, config.seed))
    steps[name] = train.Parallel('single').compile(
        train.make_update(grad_fn, optimizer)).lower(state, batch).compile()
    cost = steps[name].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[name] = float(cost.get('flops', float('nan')))  # XLA's count
    states[name] = jax.block_until_ready(steps[name](state, batch))[0]  # warm-up
  times = {name: [] for name in steps}
  for _ in range(config.timing.repeats):
    for name, step in steps.items():
      state, start = states[name], time.perf_counter()
      for _ in range(config.timing.steps_per_repeat):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - start) / config.timing.steps_per_repeat)
      states[name] = state
  median = {name: float(np.median(t)) for name, t in times.items()}
  return dict(
      width=width, num_params=task.num_params, median_seconds_per_step=median,
      ratio_to_plain={name: median[name] / median['plain'] for name in median},
      flops_per_step=flops,
      flops_ratio_to_plain={name: flops[name] / flops['plain'] for name in flops},
      spread_seconds={name: [float(np.min(t)), float(np.max(t))]
                      for name, t in times.items()})


def finite_difference_accuracy(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Relative error of the FD penalty term against double backprop."""
  fd = config.finite_difference
  task = igr.mnist_mlp_task(fd.width, config.model.num_layers)
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  batches = data.mnist_iterator('train', config.batch_size, seed=config.seed,
                                source=source, data_dir=data_dir)
  params, _ = task.init(jax.random.PRNGKey(config.seed))
  plain = jax.jit(train.value_and_grad(task.loss_fn))
  for _ in range(fd.warmup_steps):  # leave the initialisation
    _, grads = plain(params, {}, None, next(batches))
    params = jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)
  exact_fn = jax.jit(variants(config, task.loss_fn)['double_backprop'])
  fd_fns = {eps: jax.jit(variants(config, task.loss_fn, fd_epsilon=eps)
                         ['finite_difference']) for eps in fd.epsilons}
  flat = lambda tree: np.concatenate(  # noqa: E731
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  errors = {eps: [] for eps in fd_fns}
  for _ in range(fd.batches):
    batch = next(batches)
    exact = flat(exact_fn(params, {}, None, batch)[1])
    penalty_term = exact - flat(plain(params, {}, None, batch)[1])
    for eps, fn in fd_fns.items():
      error = flat(fn(params, {}, None, batch)[1]) - exact
      errors[eps].append(float(np.linalg.norm(error) / np.linalg.norm(penalty_term)))
  return dict(width=fd.width, coefficient=config.regularizer.coefficient,
              relative_error_mean={f'{e:g}': float(np.mean(v)) for e, v in errors.items()},
              relative_error_max={f'{e:g}': float(np.max(v)) for e, v in errors.items()})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Benchmarks every width; writes results.json; returns the ratios and the
  mean relative errors of the finite difference."""
  cli.validate('bench_gradient_penalty', config)
  widths = ([bench_width(config, w) for w in config.model.widths]
            if config.timing.enabled else [])
  results = dict(device=str(jax.devices()[0]), widths=widths,
                 finite_difference_accuracy=finite_difference_accuracy(config))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  print(json.dumps([{k: e[k] for k in ('width', 'ratio_to_plain',
                                       'flops_ratio_to_plain')} for e in widths]
                   + [results['finite_difference_accuracy']], indent=2))
  return dict({f'width_{e["width"]}': e['ratio_to_plain'] for e in widths},
              fd_relative_error=results['finite_difference_accuracy'][
                  'relative_error_mean'])


if __name__ == '__main__':
  cli.main(run, 'bench_gradient_penalty')
