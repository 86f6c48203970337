r"""Cost of the gradient penalty: penalised vs plain update step of the MNIST MLP.

Times the engine's update step (`jreg.train.make_update`: gradient function +
optax SGD, compiled once with `jax.jit`, state donated) of the 5-layer ReLU
MLP of `experiments/igr_mnist_sweep.py` (input 784, batch 512) plain and with
each penalty method of `jreg.gradient_regularization`:

  'finite_difference'  ∇L + 2μ(∇L(θ + εĝ) − ∇L(θ))‖g‖/ε: two gradients;
  'hvp'                forward-over-reverse Hessian-vector product;
  'double_backprop'    reverse-over-reverse (VJP of the gradient map).

Every variant is warmed up (compiled, run once), then timed in round-robin
order so that a shared machine's load hits them alike; each timing is
`steps_per_repeat` steps ended by `block_until_ready`, and the reported figure
is the median over `repeats`, as a ratio to the plain step timed in the same
run. Goals on a 2-core CPU: finite difference <= 2.1x, HVP / double backprop
<= 2.8x.

It also measures how well the finite difference approximates the exact
penalty term 2μH∇L on the same MLP on MNIST (after `fd_warmup_steps` plain
SGD steps, over `fd_batches` batches) for each ε of `fd_epsilons`: the relative
error ‖FD − exact‖/‖2μH∇L‖ (mean and max over batches). In a ReLU network
units crossing their kink within the step make this error O(1) as ε → 0.

    python -m experiments.bench_gradient_penalty --workdir=/tmp/bench
"""
from __future__ import annotations

from collections.abc import Mapping
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import igr_mnist_sweep
from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import train


def default_config() -> dict[str, Any]:
  return dict(widths=[400, 1600], batch_size=512, num_layers=5,
              methods=list(gr.METHODS), coefficient=0.01, learning_rate=0.05,
              repeats=15, steps_per_repeat=5, seed=0, timing=True,
              fd_epsilons=[1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5],
              fd_width=400, fd_batches=4, fd_warmup_steps=20, data_dir=None)


def quickstart_config() -> dict[str, Any]:
  return dict(default_config(), widths=[64], batch_size=128, repeats=3,
              steps_per_repeat=2, fd_width=64, fd_epsilons=[1e-2, 1e-3],
              fd_batches=2, fd_warmup_steps=2)


def check_config(config: Mapping[str, Any]) -> None:
  if not config['widths'] or min(config['widths']) < 1:
    raise ValueError('widths must be a non-empty list of positive integers.')
  unknown = sorted(set(config['methods']) - set(gr.METHODS))
  if unknown:
    raise ValueError(f'unknown methods {unknown}; known: {gr.METHODS}.')
  for key in ('batch_size', 'num_layers', 'repeats', 'steps_per_repeat'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  if not config['coefficient'] > 0:
    raise ValueError('coefficient (μ) must be > 0.')
  if not config['fd_epsilons'] or min(config['fd_epsilons']) <= 0:
    raise ValueError('fd_epsilons must be a non-empty list of numbers > 0.')
  for key in ('fd_width', 'fd_batches'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')


def _variants(config, model):
  loss_fn = igr_mnist_sweep.classification_loss(model)
  variants = {'plain': train.value_and_grad(loss_fn)}
  for method in config['methods']:
    variants[method] = gr.gradient_penalty_grad_fn(
        loss_fn, coefficient=config['coefficient'], method=method,
        learning_rate=config['learning_rate'])
  return variants


def _random_batch(rng, batch_size):
  return {'image': rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32),
          'label': rng.integers(0, 10, size=batch_size).astype(np.int32)}


def bench_width(config, width) -> dict[str, Any]:
  """Median seconds per step of every variant, and their ratios to plain."""
  model = igr_mnist_sweep.mlp(width, config['num_layers'])
  optimizer = optax.sgd(config['learning_rate'])
  # Random inputs: the dense step's cost does not depend on the values.
  batch = jax.device_put(_random_batch(np.random.default_rng(config['seed']),
                                       config['batch_size']))
  init_fn = lambda key: (model.init(key, batch['image'][:1]), {})  # noqa: E731
  steps, states, flops = {}, {}, {}
  for name, grad_fn in _variants(config, model).items():
    state = jax.device_put(train.init_state(init_fn, optimizer, config['seed']))
    steps[name] = jax.jit(train.make_update(grad_fn, optimizer),
                          donate_argnums=0).lower(state, batch).compile()
    cost = steps[name].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops[name] = float(cost.get('flops', float('nan')))  # XLA's count
    state, metrics = steps[name](state, batch)        # warm-up
    jax.block_until_ready((state, metrics))
    states[name] = state
  times = {name: [] for name in steps}
  for _ in range(config['repeats']):
    for name, step in steps.items():
      state = states[name]
      start = time.perf_counter()
      for _ in range(config['steps_per_repeat']):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - start) / config['steps_per_repeat'])
      states[name] = state
  median = {name: float(np.median(t)) for name, t in times.items()}
  return dict(
      width=width, num_params=gr.num_parameters(states['plain'].params),
      median_seconds_per_step=median,
      ratio_to_plain={name: median[name] / median['plain'] for name in median},
      flops_per_step=flops,
      flops_ratio_to_plain={name: flops[name] / flops['plain'] for name in flops},
      spread_seconds={name: [float(np.min(t)), float(np.max(t))]
                      for name, t in times.items()})


def finite_difference_accuracy(config) -> dict[str, Any]:
  """Relative error of the FD penalty term against double backprop."""
  model = igr_mnist_sweep.mlp(config['fd_width'], config['num_layers'])
  loss_fn = igr_mnist_sweep.classification_loss(model)
  batches = data.mnist_iterator('train', config['batch_size'],
                                seed=config['seed'], data_dir=config['data_dir'])
  params = model.init(jax.random.PRNGKey(config['seed']),
                      jnp.zeros((1, 28, 28, 1)))
  plain = jax.jit(train.value_and_grad(loss_fn))
  for _ in range(config['fd_warmup_steps']):  # leave the initialisation
    _, grads = plain(params, {}, None, next(batches))
    params = jax.tree.map(lambda p, g: p - config['learning_rate'] * g,
                          params, grads)
  mu = config['coefficient']
  exact_fn = jax.jit(gr.gradient_penalty_grad_fn(
      loss_fn, coefficient=mu, method='double_backprop'))
  fd_fns = {eps: jax.jit(gr.gradient_penalty_grad_fn(
      loss_fn, coefficient=mu, method='finite_difference', fd_epsilon=eps))
            for eps in config['fd_epsilons']}
  flat = lambda tree: np.concatenate(  # noqa: E731
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  errors = {eps: [] for eps in fd_fns}
  for _ in range(config['fd_batches']):
    batch = next(batches)
    exact = flat(exact_fn(params, {}, None, batch)[1])
    penalty_term = exact - flat(plain(params, {}, None, batch)[1])
    for eps, fn in fd_fns.items():
      error = flat(fn(params, {}, None, batch)[1]) - exact
      errors[eps].append(float(np.linalg.norm(error) / np.linalg.norm(penalty_term)))
  return dict(width=config['fd_width'], coefficient=mu,
              relative_error_mean={str(e): float(np.mean(v)) for e, v in errors.items()},
              relative_error_max={str(e): float(np.max(v)) for e, v in errors.items()})


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Benchmarks every width; writes results.json; returns it."""
  config = dict(default_config(), **dict(config))
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  results = dict(config=config, device=str(jax.devices()[0]),
                 widths=[bench_width(config, w) for w in config['widths']]
                 if config['timing'] else [],
                 finite_difference_accuracy=finite_difference_accuracy(config))
  for entry in results['widths']:
    logging.info('width %d: %s', entry['width'],
                 {k: round(v, 3) for k, v in entry['ratio_to_plain'].items()})
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def define_flags():
  flags.DEFINE_list('widths', ['400', '1600'], 'MLP widths.')
  flags.DEFINE_integer('repeats', 15, 'Timed repeats per variant (median).')
  flags.DEFINE_integer('steps_per_repeat', 5, 'Steps per timed repeat.')
  flags.DEFINE_bool('fd_accuracy_only', False,
                    'Only measure the finite-difference accuracy (no timing).')


def main(argv):
  del argv
  workdir = cli.start()
  f = flags.FLAGS
  config = quickstart_config() if cli.QUICKSTART.value else default_config()
  if not cli.QUICKSTART.value:
    try:
      config['widths'] = [int(w) for w in f.widths]
    except ValueError as error:
      raise app.UsageError(f'--widths has a non-integer entry: {error}.')
    config.update(repeats=f.repeats, steps_per_repeat=f.steps_per_repeat,
                  timing=not f.fd_accuracy_only)
  config['data_dir'] = cli.DATA_DIR.value
  try:
    check_config(config)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  results = run(config, workdir)
  print(json.dumps([{k: e[k] for k in ('width', 'ratio_to_plain',
                                       'flops_ratio_to_plain',
                                       'median_seconds_per_step')}
                    for e in results['widths']]
                   + [results['finite_difference_accuracy']], indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
