r"""IGR in MNIST MLPs: R_IG and test accuracy against λ = h·m/4 ([BD21] Section 5).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 5:
5-layer ReLU MLPs of widths {50, 100, 200, 400, 800, 1600} are trained on MNIST
with plain (full-step) SGD, batch 512, cross entropy, at learning rates
h ∈ {0.005, 0.01, 0.05, 0.1, 0.2}. Backward error analysis gives each run an
implicit regularisation rate λ = h·m/4 (m parameters) on
R_IG = ‖∇L‖²/m; the paper finds that runs with larger λ end with smaller R_IG
and, among those reaching 100% training accuracy, higher test accuracy.
With `egr_coefficients` the same grid is also trained with explicit gradient
regularisation, L + μ‖∇L‖² ([BD21] Section 6; μ on the sum ‖∇L‖², i.e. an
explicit rate μ·m in R_IG units).

Per run: final R_IG (of the full training-set loss, accumulated over batches),
λ, the explicit rate μ·m, the parameter L2 norm, train and test accuracy.
"5-layer" is read as five linear layers (four hidden ReLU layers of the given
width, then the 10-way output), settable with `num_layers`.

    python -m experiments.igr_mnist_sweep --workdir=/tmp/mnist   # reduced grid
    python -m experiments.igr_mnist_sweep --workdir=/tmp/mnist --full_grid
    python -m experiments.igr_mnist_sweep --workdir=/tmp/mnist \
        --egr_coefficients=0.01,0.05 --widths=400 --learning_rates=0.05
"""
from __future__ import annotations

from collections.abc import Mapping
import functools
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import plotting
from jreg import train

PAPER_WIDTHS = (50, 100, 200, 400, 800, 1600)
PAPER_LEARNING_RATES = (0.005, 0.01, 0.05, 0.1, 0.2)


def full_grid_config() -> dict[str, Any]:
  """The paper's grid on the whole of MNIST."""
  return dict(
      widths=list(PAPER_WIDTHS),
      learning_rates=list(PAPER_LEARNING_RATES),
      egr_coefficients=[],        # μ > 0: extra EGR runs over the same grid
      egr_widths=None,            # EGR runs on these widths (None: all widths)
      egr_learning_rates=None,    # ... and these rates (None: all rates)
      egr_method='double_backprop',
      num_layers=5,               # linear layers (num_layers − 1 hidden ReLU)
      batch_size=512,
      num_steps=20000,            # ≈ 170 epochs of 60,000 examples
      train_examples=0,           # 0: all 60,000
      test_examples=0,            # 0: all 10,000
      eval_batch_size=2000,
      seed=0,
      parallel='single',
      log_every=200,
      data_source='local',
      data_dir=None,
  )


def default_config() -> dict[str, Any]:
  """A reduced grid that runs in minutes on 2 CPU cores."""
  return dict(full_grid_config(), widths=[50, 200, 800],
              learning_rates=[0.01, 0.05, 0.2], num_steps=600,
              train_examples=10240, test_examples=5000, log_every=100)


def quickstart_config() -> dict[str, Any]:
  """Four plain runs and one EGR run on an MNIST subset (well under a minute)."""
  return dict(full_grid_config(), widths=[50, 100], learning_rates=[0.05, 0.2],
              egr_coefficients=[0.02], num_steps=40, batch_size=256,
              train_examples=2048, test_examples=1000, eval_batch_size=1024,
              log_every=20, egr_widths=[50], egr_learning_rates=[0.2])


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError with one sentence for an out-of-range setting."""
  if not config['widths'] or min(config['widths']) < 1:
    raise ValueError('widths must be a non-empty list of positive integers.')
  if not config['learning_rates'] or min(config['learning_rates']) <= 0:
    raise ValueError('learning_rates must be a non-empty list of numbers > 0.')
  if config['egr_coefficients'] and min(config['egr_coefficients']) <= 0:
    raise ValueError('egr_coefficients (μ) must all be > 0; the plain runs '
                     'are always included.')
  if config['egr_method'] not in gr.METHODS:
    raise ValueError(f'egr_method must be one of {gr.METHODS}.')
  for key in ('num_layers', 'batch_size', 'num_steps', 'eval_batch_size',
              'log_every'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  for key in ('train_examples', 'test_examples'):
    if config[key] < 0:
      raise ValueError(f'{key} must be >= 0 (0 means all), got {config[key]}.')
  if config['parallel'] not in train.PARALLEL_MODES:
    raise ValueError(f'parallel must be one of {train.PARALLEL_MODES}.')


def mlp(width: int, num_layers: int) -> hk.Transformed:
  """`num_layers` linear layers: [B, 28, 28, 1] -> [B, 10] logits."""
  def forward(images):
    x = images.reshape((images.shape[0], -1))  # [B, 784]
    return hk.nets.MLP([width] * (num_layers - 1) + [10])(x)  # [B, 10]
  return hk.without_apply_rng(hk.transform(forward))


def classification_loss(model: hk.Transformed):
  """`loss_fn(params, model_state, rng, batch)`: mean softmax cross entropy."""
  def loss_fn(params, model_state, rng, batch):
    del rng
    logits = model.apply(params, batch['image'])  # [B, 10]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, (model_state, {'accuracy': accuracy})
  return loss_fn


def _per_example_metrics(model):
  @jax.jit
  def metrics(params, model_state, batch):
    del model_state
    logits = model.apply(params, batch['image'])
    return {'accuracy': (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32),
            'cross_entropy': optax.softmax_cross_entropy_with_integer_labels(
                logits, batch['label'])}
  return metrics


def _summed_gradient(model):
  """Gradient of Σ (masked) per-example cross entropy over one batch."""
  @jax.jit
  def summed(params, batch, mask):
    def total(p):
      logits = model.apply(p, batch['image'])
      return jnp.sum(mask * optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']))
    return jax.grad(total)(params)
  return summed


def full_batch_gradient(model, params, batches, summed=None) -> Any:
  """∇L of the mean training loss over every example of `batches` (masked).

  `summed` is `_summed_gradient(model)`, compiled once by the caller if given.
  """
  summed = summed or _summed_gradient(model)
  total, count = None, 0.0
  for batch in batches:
    mask = np.asarray(batch.get('mask', np.ones(len(batch['label']), bool)),
                      np.float32)
    inputs = {'image': batch['image'], 'label': batch['label']}
    grads = summed(params, inputs, mask)
    total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    count += float(mask.sum())
  return jax.tree.map(lambda g: g / count, total)



@functools.lru_cache(maxsize=None)
def _model_and_functions(width, num_layers):
  """One model and its compiled evaluation functions per architecture."""
  model = mlp(width, num_layers)
  return model, _per_example_metrics(model), _summed_gradient(model)


def train_one(config, arrays, width, learning_rate, coefficient, workdir):
  """Trains one MLP; returns its results dict."""
  model, per_example, summed = _model_and_functions(width, config['num_layers'])
  grad_fn = gr.gradient_penalty_grad_fn(
      classification_loss(model), coefficient=coefficient,
      learning_rate=learning_rate, method=config['egr_method'])
  train_iter = data.mnist_iterator('train', config['batch_size'],
                                   seed=config['seed'], arrays=arrays['train'])
  init_fn = lambda rng: (model.init(rng, jnp.zeros((1, 28, 28, 1))), {})  # noqa: E731
  state, history = train.fit(
      workdir=workdir, init_fn=init_fn, grad_fn=grad_fn,
      optimizer=optax.sgd(learning_rate), train_iter=train_iter,
      num_steps=config['num_steps'], seed=config['seed'],
      parallel=config['parallel'], log_every=config['log_every'],
      checkpoint_every=0, tensorboard=False)
  evaluate = lambda split: train.evaluate(  # noqa: E731
      per_example, state.params, state.model_state,
      data.mnist_iterator(split, config['eval_batch_size'], mode='eval',
                          arrays=arrays[split]))
  train_metrics, test_metrics = evaluate('train'), evaluate('test')
  grads = full_batch_gradient(
      model, state.params,
      data.mnist_iterator('train', config['eval_batch_size'], mode='eval',
                          arrays=arrays['train']), summed)
  m = gr.num_parameters(state.params)
  last = [r for r in history if r['split'] == 'train'][-1]
  return dict(
      width=width, learning_rate=learning_rate, egr_coefficient=coefficient,
      num_params=m,
      igr_rate=gr.implicit_regularization_rate(learning_rate, m),
      egr_rate=coefficient * m,
      r_ig=float(gr.implicit_regularizer(grads)),
      final_train_loss=train_metrics['cross_entropy'],
      last_logged_r_ig=float(last['r_ig']),
      param_norm=float(optax.tree.norm(state.params)),
      train_accuracy=train_metrics['accuracy'],
      test_accuracy=test_metrics['accuracy'],
      test_loss=test_metrics['cross_entropy'])


def _grid(config):
  runs = [(w, h, 0.0) for w in config['widths'] for h in config['learning_rates']]
  egr_widths = config.get('egr_widths') or config['widths']
  egr_rates = config.get('egr_learning_rates') or config['learning_rates']
  runs += [(w, h, float(mu)) for mu in config['egr_coefficients']
           for w in egr_widths for h in egr_rates]
  return runs


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains the grid; writes results.json and two PNG figures under workdir.

  Returns:
    {'runs': [per-run results], 'summary': {...}}; the summary names the best
    test accuracy among runs that reached 100% training accuracy (or says
    that none did).
  """
  config = dict(default_config(), **dict(config))
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  arrays = {
      split: data.first_examples(
          data.load_mnist(split, source=config['data_source'],
                          data_dir=config['data_dir']),
          config[f'{split}_examples'])
      for split in ('train', 'test')}
  if len(arrays['train']['label']) < config['batch_size']:
    raise ValueError(f'train_examples={config["train_examples"]} is smaller '
                     f'than one batch of {config["batch_size"]}.')
  runs = []
  grid = _grid(config)
  for index, (width, h, mu) in enumerate(grid):
    name = f'width{width}_lr{h:g}_mu{mu:g}'
    logging.info('MNIST sweep: run %d/%d: %s', index + 1, len(grid), name)
    result = train_one(config, arrays, width, h, mu,
                       os.path.join(workdir, 'runs', name))
    logging.info('  R_IG %.3g, λ %.3g, train acc %.4f, test acc %.4f',
                 result['r_ig'], result['igr_rate'], result['train_accuracy'],
                 result['test_accuracy'])
    runs.append(result)
  results = dict(config=config, runs=runs, summary=summarize(runs))
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  _plot(runs, workdir)
  return results


def summarize(runs) -> dict[str, Any]:
  """Best test accuracy among the runs at 100% training accuracy."""
  perfect = [r for r in runs if r['train_accuracy'] >= 1.0]
  summary = dict(num_runs=len(runs), num_at_full_train_accuracy=len(perfect),
                 best_test_accuracy_overall=max(r['test_accuracy'] for r in runs))
  if perfect:
    best = max(perfect, key=lambda r: r['test_accuracy'])
    summary.update(best_at_full_train_accuracy=best, message=(
        f'best test accuracy among {len(perfect)} runs at 100% training '
        f'accuracy: {best["test_accuracy"]:.4f} (width {best["width"]}, '
        f'h={best["learning_rate"]}, μ={best["egr_coefficient"]}, '
        f'λ={best["igr_rate"]:.3g})'))
  else:
    best_train = max(r['train_accuracy'] for r in runs)
    summary.update(best_at_full_train_accuracy=None, message=(
        f'no run reached 100% training accuracy (best {best_train:.4f}); '
        'train longer (num_steps) for the paper\'s comparison'))
  return summary


def _plot(runs, workdir):
  widths = sorted({r['width'] for r in runs})
  colours = {w: f'C{i}' for i, w in enumerate(widths)}
  with plotting.figure(os.path.join(workdir, 'r_ig_and_test_accuracy_vs_rate.png'),
                       ncols=2) as (_, axes):
    for r in runs:
      total = r['igr_rate'] + r['egr_rate']
      style = dict(color=colours[r['width']], ms=7)
      if r['egr_coefficient'] > 0:
        style.update(marker='s', mfc='none')
      else:
        style.update(marker='o')
      axes[0].plot(total, r['r_ig'], ls='', **style)
      axes[1].plot(total, r['test_accuracy'], ls='', **style)
    for w in widths:
      axes[0].plot([], [], 'o', color=colours[w], label=f'width {w}')
    if any(r['egr_coefficient'] > 0 for r in runs):
      axes[0].plot([], [], 's', mfc='none', color='k', label='with EGR (μ > 0)')
    axes[0].set(xscale='log', yscale='log', xlabel='λ = h·m/4 (+ μ·m with EGR)',
                ylabel='final R_IG = ‖∇L‖²/m', title='implicit regulariser')
    axes[1].set(xscale='log', xlabel='λ = h·m/4 (+ μ·m with EGR)',
                ylabel='test accuracy', title='MNIST test accuracy')
    axes[0].legend(fontsize='x-small')
    for ax in axes:
      ax.grid(alpha=0.3)


def define_flags():
  """Flags of this experiment (see `full_grid_config`)."""
  flags.DEFINE_bool('full_grid', False, "The paper's full grid on all of MNIST.")
  flags.DEFINE_list('widths', None, 'MLP widths (default: the chosen grid).')
  flags.DEFINE_list('learning_rates', None, 'SGD learning rates h.')
  flags.DEFINE_list('egr_coefficients', [], 'μ > 0 values of extra EGR runs '
                    '(coefficient on ‖∇L‖², sum over parameters).')
  flags.DEFINE_enum('egr_method', 'double_backprop', list(gr.METHODS),
                    'How the EGR gradient is computed.')
  flags.DEFINE_integer('num_steps', None, 'SGD steps per run.')
  flags.DEFINE_integer('batch_size', 512, 'Global batch size.')
  flags.DEFINE_integer('train_examples', None, 'Training examples (0: all).')
  flags.DEFINE_integer('test_examples', None, 'Test examples (0: all).')


def main(argv):
  del argv
  workdir = cli.start()
  f = flags.FLAGS
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    config = full_grid_config() if f.full_grid else default_config()
    try:
      for key, cast in (('widths', int), ('learning_rates', float),
                        ('egr_coefficients', float)):
        if f[key].value is not None and (f[key].value or key == 'egr_coefficients'):
          config[key] = [cast(v) for v in f[key].value]
    except ValueError as error:
      raise app.UsageError(f'A list flag has a non-numeric entry: {error}.')
    for key in ('num_steps', 'train_examples', 'test_examples'):
      if f[key].value is not None:
        config[key] = f[key].value
    config.update(batch_size=f.batch_size, egr_method=f.egr_method)
  config.update(seed=cli.SEED.value, parallel=cli.PARALLEL.value,
                log_every=cli.LOG_EVERY.value, data_source=cli.DATA_SOURCE.value,
                data_dir=cli.DATA_DIR.value)
  try:
    check_config(config)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  results = run(config, workdir)  # bad data, NaN loss: cli.run's one sentence
  print(json.dumps(results['summary'], indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
