r"""Explicit gradient regularisation of CIFAR-10 ResNets ([BD21] Section 6).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 6:
adding the implicit regulariser explicitly, L + μ‖∇L‖², to the training loss
of a ResNet-18 on CIFAR-10 raises its test accuracy over a range of μ. Here
ResNet-18 (CIFAR variant) and ResNet-20 (He et al. 2016), both with batch
norm (`jreg.models.resnet`), are trained with and without EGR for each μ of
`egr_coefficients` (μ multiplies the sum ‖∇L‖²; μ = 0 is plain training),
with the standard augmentation (pad 4, random 32x32 crop, horizontal flip;
`jreg.data`). The penalised gradient ∇L + 2μ H∇L is computed by
`jreg.gradient_regularization` (default: exact double backprop; the
two-gradient finite difference is cheaper but, in ReLU networks, only an
approximation of the penalty term); batch-norm running statistics are updated
once per step, by the plain evaluation.

Choices the paper leaves open (documented in BUILD_NOTES.md (gradient regularisation)):
SGD with momentum 0.9, cosine-decayed learning rate, no weight decay (so that
the gradient penalty is the only explicit regulariser), batch 128.

    python -m experiments.egr_cifar10 --workdir=/tmp/egr \
        --models=resnet20 --egr_coefficients=0,0.001,0.01 --num_steps=20000
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
import jax
import jax.numpy as jnp
import optax

from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import plotting
from jreg import train
from jreg.models import resnet


def default_config() -> dict[str, Any]:
  """Full-scale settings (an accelerator is needed for these)."""
  return dict(
      models=['resnet20', 'resnet18'],
      egr_coefficients=[0.0, 0.001, 0.01, 0.05],   # μ on ‖∇L‖²; 0 = plain
      egr_method='double_backprop',
      fd_epsilon=gr.DEFAULT_FD_EPSILON,
      batch_size=128,
      num_steps=39000,            # 100 epochs of 50,000 examples
      learning_rate=0.1,          # peak; cosine decay to 0
      momentum=0.9,               # 0: plain SGD
      train_examples=0,           # 0: all 50,000
      test_examples=0,            # 0: all 10,000
      eval_batch_size=500,
      seed=0,
      parallel='single',
      log_every=100,
      checkpoint_every=2000,
      data_source='local',
      data_dir=None,
  )


def quickstart_config() -> dict[str, Any]:
  """Two very small runs (plain and EGR) of ResNet-8 on a CIFAR subset.

  ResNet-8 (He et al.'s 6n + 2 family with n = 1) instead of ResNet-20 keeps
  the compile time, which dominates such short runs on a CPU, low.
  """
  return dict(default_config(), models=['resnet8'], egr_coefficients=[0.0, 0.01],
              batch_size=16, num_steps=3, train_examples=256, test_examples=128,
              eval_batch_size=128, log_every=1, checkpoint_every=0)


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError with one sentence for an out-of-range setting."""
  unknown = sorted(set(config['models']) - set(resnet.MODELS))
  if not config['models'] or unknown:
    raise ValueError(f'models must be a non-empty subset of '
                     f'{sorted(resnet.MODELS)}; got {config["models"]}.')
  if not config['egr_coefficients'] or min(config['egr_coefficients']) < 0:
    raise ValueError('egr_coefficients (μ) must be a non-empty list of numbers '
                     '>= 0 (0 = no EGR).')
  if config['egr_method'] not in gr.METHODS:
    raise ValueError(f'egr_method must be one of {gr.METHODS}.')
  for key in ('batch_size', 'num_steps', 'eval_batch_size', 'log_every'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  for key in ('train_examples', 'test_examples', 'checkpoint_every'):
    if config[key] < 0:
      raise ValueError(f'{key} must be >= 0, got {config[key]}.')
  if not config['learning_rate'] > 0 or not 0 <= config['momentum'] < 1:
    raise ValueError('learning_rate must be > 0 and momentum in [0, 1).')
  if config['parallel'] not in train.PARALLEL_MODES:
    raise ValueError(f'parallel must be one of {train.PARALLEL_MODES}.')


def classification_loss(model):
  """`loss_fn(params, model_state, rng, batch)`, cross entropy in train mode."""
  def loss_fn(params, model_state, rng, batch):
    logits, model_state = model.apply(params, model_state, rng, batch['image'],
                                      is_training=True)  # [B, 10]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, (model_state, {'accuracy': accuracy})
  return loss_fn


def _per_example_metrics(model):
  @jax.jit
  def metrics(params, model_state, batch):
    logits, _ = model.apply(params, model_state, None, batch['image'],
                            is_training=False)
    return {'accuracy': (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32),
            'cross_entropy': optax.softmax_cross_entropy_with_integer_labels(
                logits, batch['label'])}
  return metrics


@functools.lru_cache(maxsize=None)
def _model_and_metrics(model_name):
  """One model and one compiled evaluation function per architecture."""
  model = resnet.make(model_name)
  return model, _per_example_metrics(model)


def train_one(config, arrays, model_name, coefficient, workdir):
  """Trains one ResNet with EGR coefficient μ; returns its results."""
  model, per_example = _model_and_metrics(model_name)
  schedule = optax.cosine_decay_schedule(config['learning_rate'],
                                         config['num_steps'])
  optimizer = (optax.sgd(schedule, momentum=config['momentum'])
               if config['momentum'] else optax.sgd(schedule))
  grad_fn = gr.gradient_penalty_grad_fn(
      classification_loss(model), coefficient=coefficient,
      method=config['egr_method'], fd_epsilon=config['fd_epsilon'])
  init_fn = lambda rng: model.init(  # noqa: E731
      rng, jnp.zeros((1, 32, 32, 3), jnp.float32), is_training=True)

  def eval_fn(params, model_state):
    return train.evaluate(
        per_example, params, model_state,
        data.cifar10_iterator('test', config['eval_batch_size'], mode='eval',
                              arrays=arrays['test']))

  state, history = train.fit(
      workdir=workdir, init_fn=init_fn, grad_fn=grad_fn, optimizer=optimizer,
      train_iter=data.cifar10_iterator('train', config['batch_size'],
                                       seed=config['seed'],
                                       arrays=arrays['train']),
      num_steps=config['num_steps'], seed=config['seed'],
      parallel=config['parallel'], eval_fn=eval_fn,
      log_every=config['log_every'],
      checkpoint_every=config['checkpoint_every'], learning_rate_fn=schedule,
      tensorboard=False)
  train_records = [r for r in history if r['split'] == 'train']
  test = [r for r in history if r['split'] == 'eval'][-1]
  m = gr.num_parameters(state.params)
  return dict(
      model=model_name, egr_coefficient=coefficient, num_params=m,
      egr_rate=coefficient * m,
      test_accuracy=test['accuracy'], test_loss=test['cross_entropy'],
      final_train_loss=float(train_records[-1]['loss']),
      final_train_accuracy=float(train_records[-1]['accuracy']),
      final_r_ig=float(train_records[-1]['r_ig']),
      param_norm=float(optax.tree.norm(state.params)))



def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains every (model, μ); writes results.json and test_accuracy_vs_mu.png."""
  config = dict(default_config(), **dict(config))
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  arrays = {
      split: data.first_examples(
          data.load_cifar10(split, source=config['data_source'],
                            data_dir=config['data_dir']),
          config[f'{split}_examples'])
      for split in ('train', 'test')}
  if len(arrays['train']['label']) < config['batch_size']:
    raise ValueError(f'train_examples={config["train_examples"]} is smaller '
                     f'than one batch of {config["batch_size"]}.')
  runs = []
  grid = [(name, float(mu)) for name in config['models']
          for mu in config['egr_coefficients']]
  for index, (name, mu) in enumerate(grid):
    logging.info('EGR CIFAR-10: run %d/%d: %s, μ=%g', index + 1, len(grid),
                 name, mu)
    result = train_one(config, arrays, name, mu,
                       os.path.join(workdir, 'runs', f'{name}_mu{mu:g}'))
    logging.info('  test accuracy %.4f, R_IG %.3g', result['test_accuracy'],
                 result['final_r_ig'])
    runs.append(result)
  summary = {}
  for name in config['models']:
    mine = [r for r in runs if r['model'] == name]
    best = max(mine, key=lambda r: r['test_accuracy'])
    plain = [r for r in mine if r['egr_coefficient'] == 0]
    summary[name] = dict(
        best_mu=best['egr_coefficient'], best_test_accuracy=best['test_accuracy'],
        plain_test_accuracy=plain[0]['test_accuracy'] if plain else None)
  results = dict(config=config, runs=runs, summary=summary)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  _plot(config, runs, workdir)
  return results


def _plot(config, runs, workdir):
  positive = [mu for mu in config['egr_coefficients'] if mu > 0]
  with plotting.figure(os.path.join(workdir, 'test_accuracy_vs_mu.png'),
                       ncols=2) as (_, axes):
    series_acc, series_rig = {}, {}
    for name in config['models']:
      mine = sorted((r for r in runs if r['model'] == name),
                    key=lambda r: r['egr_coefficient'])
      mus = [r['egr_coefficient'] for r in mine]
      series_acc[name] = (mus, [r['test_accuracy'] for r in mine])
      series_rig[name] = (mus, [r['final_r_ig'] for r in mine])
    plotting.curves(axes[0], series_acc, 'EGR coefficient μ (on ‖∇L‖²)',
                    'test accuracy', 'CIFAR-10 test accuracy', marker='o')
    plotting.curves(axes[1], series_rig, 'EGR coefficient μ (on ‖∇L‖²)',
                    'R_IG at the last logged step', 'implicit regulariser',
                    logy=True, marker='o')
    if positive:
      for ax in axes:
        ax.set_xscale('symlog', linthresh=min(positive))


def define_flags():
  """Flags of this experiment (see `default_config`)."""
  defaults = default_config()
  flags.DEFINE_list('models', defaults['models'],
                    f'Models, of {sorted(resnet.MODELS)}.')
  flags.DEFINE_list('egr_coefficients',
                    [str(v) for v in defaults['egr_coefficients']],
                    'μ values (coefficient on ‖∇L‖²); 0 = no EGR.')
  flags.DEFINE_enum('egr_method', defaults['egr_method'], list(gr.METHODS),
                    'How the EGR gradient is computed.')
  flags.DEFINE_integer('num_steps', defaults['num_steps'], 'SGD steps per run.')
  flags.DEFINE_integer('batch_size', defaults['batch_size'], 'Global batch size.')
  flags.DEFINE_float('learning_rate', defaults['learning_rate'],
                     'Peak learning rate (cosine decay).')
  flags.DEFINE_float('momentum', defaults['momentum'], 'SGD momentum (0: none).')
  flags.DEFINE_integer('train_examples', 0, 'Training examples (0: all).')
  flags.DEFINE_integer('test_examples', 0, 'Test examples (0: all).')


def main(argv):
  del argv
  workdir = cli.start()
  f = flags.FLAGS
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    config = default_config()
    try:
      config['egr_coefficients'] = [float(v) for v in f.egr_coefficients]
    except ValueError as error:
      raise app.UsageError(f'--egr_coefficients has a non-numeric entry: '
                           f'{error}.')
    config.update(models=list(f.models), egr_method=f.egr_method,
                  num_steps=f.num_steps, batch_size=f.batch_size,
                  learning_rate=f.learning_rate, momentum=f.momentum,
                  train_examples=f.train_examples, test_examples=f.test_examples,
                  checkpoint_every=cli.CHECKPOINT_EVERY.value)
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
