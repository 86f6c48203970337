r"""Jacobian-regularised multiscale DEQ (MDEQ) on CIFAR-10.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.3, Tables 1 and 4, Appendix A: an MDEQ with
4 scales of [28, 56, 112, 224] channels (`jreg.models.mdeq`), trained for 200
epochs with batch 96, Adam at 1e-3 and cosine decay, Broyden solvers with
forward / backward budgets of 7 / 8 evaluations, an unrolled weight-tied
pre-training phase, and the Jacobian term gamma * ||J_f(z*)||_F^2 / d with
gamma = 0.5 on a random fraction p = 0.05 of the training steps. The claim: at
a small cost in accuracy, the regularised MDEQ reaches the same tolerance in
markedly fewer NFE. `default_config()` is that run; the data path is its only
required flag (add --parallel=sharded on several devices or hosts):

    python -m experiments.deq_cifar10 --workdir=runs/mdeq_c10 \
        --data_dir=/path/with/cifar-10-batches-bin --parallel=sharded

`--jacobian_weight=0` is the unregularised baseline; `--network=explicit`
trains the explicit counterpart (the MDEQ cell unrolled with untied weights,
see `jreg.models.mdeq.ExplicitMDEQ`). Reduced runs: BUILD_NOTES.md (MDEQ).

Library contract (used by experiments/deq_imagenet.py and
experiments/bench_deq_models.py): `build(config) -> mdeq.ClassifierFns` with
`init_fn`, `loss_fn` / `grad_fn` (DEQ phase), `pretrain_loss_fn` /
`pretrain_grad_fn` (unrolled phase), `predict_fn`; `train_and_evaluate(config,
workdir, train_iter, eval_batches, image_shape)` runs both phases.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
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

from jreg import cli
from jreg import data
from jreg import deq
from jreg import plotting
from jreg import train
from jreg.models import mdeq

CIFAR10_TRAIN_SIZE = 50_000


def default_config() -> dict[str, Any]:
  """The paper's CIFAR-10 MDEQ + JR run (Table 4; reference yaml for the rest)."""
  return dict(
      model='cifar10',              # jreg.models.mdeq.mdeq_config name
      model_overrides={},           # MDEQConfig fields to change, e.g. dropout
      network='mdeq',               # 'mdeq' | 'explicit' (untied unrolled cells)
      explicit_num_layers=4,        # L of the explicit network
      batch_size=96,                # global, split over devices and hosts
      num_epochs=200,
      num_steps=0,                  # 0: num_epochs of the training set
      pretrain_steps=16_000,        # unrolled weight-tied phase (reference yaml)
      optimizer='adam',             # 'adam' | 'sgd' (Nesterov momentum)
      learning_rate=1e-3,           # peak; cosine decay to 0
      weight_decay=0.0,
      momentum=0.9,                 # sgd only
      warmup_steps=0,
      forward_solver='broyden', forward_nfe=7,
      backward_solver='broyden', backward_nfe=8,
      solver_tol=1e-3, stop_mode='rel',
      jacobian_weight=0.5,          # gamma at the start of training
      jacobian_weight_final=0.5,    # gamma at the end (linear ramp)
      jacobian_prob=0.05,           # p: fraction of steps with the term
      jacobian_prob_final=0.05,
      pretrain_jacobian_weight=0.0,  # gamma in the unrolled phase (every step)
      jacobian_vectors=1,           # Hutchinson vectors
      eval_nfe=7,                   # forward budget for test accuracy
      probe_nfe=40,                 # budget of the NFE-to-tolerance probe
      probe_tol=1e-3,               # tolerance of that probe (rel residual)
      probe_examples=500,           # test examples probed (0: none)
      probe_batch_size=50,
      train_examples=0,             # 0: all 50,000
      test_examples=0,              # 0: all 10,000
      eval_batch_size=500,
      seed=0,
      parallel='single',
      log_every=100,
      eval_every=2_000,
      checkpoint_every=2_000,
      data_source='local',
      data_dir=None,
  )


def small_config() -> dict[str, Any]:
  """The reduced-scale run of BUILD_NOTES.md (MDEQ) (2 CPU cores, <= 10 min per run)."""
  return dict(
      default_config(), model='cifar10_small', batch_size=32, num_steps=400,
      pretrain_steps=100, forward_nfe=10, backward_nfe=10, eval_nfe=10,
      probe_nfe=30, probe_examples=200, probe_batch_size=50,
      train_examples=0, test_examples=500, eval_batch_size=250,
      jacobian_weight=0.5, jacobian_weight_final=0.5, jacobian_prob=0.5,
      jacobian_prob_final=0.5, log_every=10, eval_every=100,
      checkpoint_every=0)


def quickstart_config() -> dict[str, Any]:
  """A few steps of the tiny MDEQ on a CIFAR-10 subset (well under a minute)."""
  return dict(
      default_config(), model='tiny', model_overrides={'num_classes': 10},
      batch_size=8, num_steps=3, pretrain_steps=0, forward_nfe=4,
      backward_nfe=4, eval_nfe=4, probe_nfe=6, probe_examples=16,
      probe_batch_size=16, train_examples=64, test_examples=32,
      eval_batch_size=32, jacobian_prob=1.0, jacobian_prob_final=1.0,
      log_every=1, eval_every=0, checkpoint_every=0)


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError with one sentence for an out-of-range setting."""
  mdeq.mdeq_config(config['model'])  # raises for an unknown name
  if config['network'] not in ('mdeq', 'explicit'):
    raise ValueError(f"network must be 'mdeq' or 'explicit', got "
                     f"{config['network']!r}.")
  if config['optimizer'] not in ('adam', 'sgd'):
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got "
                     f"{config['optimizer']!r}.")
  for key in ('batch_size', 'forward_nfe', 'backward_nfe', 'eval_nfe',
              'probe_nfe', 'eval_batch_size', 'probe_batch_size', 'log_every',
              'explicit_num_layers', 'jacobian_vectors'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  for key in ('num_steps', 'num_epochs', 'pretrain_steps', 'weight_decay',
              'warmup_steps', 'jacobian_weight', 'jacobian_weight_final',
              'pretrain_jacobian_weight', 'train_examples', 'test_examples',
              'probe_examples', 'eval_every', 'checkpoint_every'):
    if config[key] < 0:
      raise ValueError(f'{key} must be >= 0, got {config[key]}.')
  for key in ('jacobian_prob', 'jacobian_prob_final'):
    if not 0 <= config[key] <= 1:
      raise ValueError(f'{key} must be a probability in [0, 1], got '
                       f'{config[key]}.')
  if not config['learning_rate'] > 0 or not config['solver_tol'] > 0:
    raise ValueError('learning_rate and solver_tol must be > 0.')
  if config['stop_mode'] not in ('abs', 'rel'):
    raise ValueError(f"stop_mode must be 'abs' or 'rel', got "
                     f"{config['stop_mode']!r}.")
  if config['parallel'] not in train.PARALLEL_MODES:
    raise ValueError(f'parallel must be one of {train.PARALLEL_MODES}.')


def model_config(config: Mapping[str, Any]) -> mdeq.MDEQConfig:
  """The MDEQConfig named by `config['model']` with `model_overrides`."""
  return mdeq.mdeq_config(config['model']).replace(
      **dict(config['model_overrides']))


def training_settings(config: Mapping[str, Any], num_steps: int,
                      ) -> mdeq.TrainingSettings:
  """Solver and Jacobian-regularisation settings; gamma and p ramp linearly
  over the whole run (`num_steps`)."""
  solver = lambda name, nfe: deq.SolverConfig(  # noqa: E731
      name=name, max_iter=nfe, tol=config['solver_tol'],
      stop_mode=config['stop_mode'])
  return mdeq.TrainingSettings(
      network=config['network'],
      forward=solver(config['forward_solver'], config['forward_nfe']),
      backward=deq.BackwardConfig(
          mode='implicit',
          solver=solver(config['backward_solver'], config['backward_nfe'])),
      eval_forward=solver(config['forward_solver'], config['eval_nfe']),
      jacobian_weight=config['jacobian_weight'],
      jacobian_weight_final=config['jacobian_weight_final'],
      jacobian_prob=config['jacobian_prob'],
      jacobian_prob_final=config['jacobian_prob_final'],
      jacobian_ramp_steps=max(num_steps, 1),
      pretrain_jacobian_weight=config['pretrain_jacobian_weight'],
      jacobian_vectors=config['jacobian_vectors'],
      explicit_num_layers=config['explicit_num_layers'])


def build(config: Mapping[str, Any], image_shape=(32, 32, 3),
          num_steps: int = 1) -> mdeq.ClassifierFns:
  """The classifier's functions (jreg.train contracts) for `config`."""
  config = dict(default_config(), **dict(config))
  return mdeq.build_classifier(model_config(config),
                               training_settings(config, num_steps),
                               tuple(image_shape))


def make_optimizer(config: Mapping[str, Any], num_steps: int):
  """Adam or SGD (Nesterov) with L2 weight decay and (warm-up +) cosine decay."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config['learning_rate'], config['warmup_steps'],
      max(num_steps, config['warmup_steps'] + 1)) if config['warmup_steps'] \
      else optax.cosine_decay_schedule(config['learning_rate'], max(num_steps, 1))
  if config['optimizer'] == 'adam':
    base = optax.adam(schedule)
  else:
    base = optax.sgd(schedule, momentum=config['momentum'], nesterov=True)
  if config['weight_decay']:
    base = optax.chain(optax.add_decayed_weights(config['weight_decay']), base)
  return base, schedule


def make_eval_fn(config: Mapping[str, Any], fns: mdeq.ClassifierFns,
                 probe_fns: mdeq.ClassifierFns | None,
                 eval_batches: Callable[[int], Any], clock: dict):
  """`eval_fn(params, model_state) -> metrics` for jreg.train.fit.

  Test accuracy and cross-entropy at the evaluation budget (`eval_nfe`), its
  forward NFE and residual, and (DEQ only) the NFE-to-tolerance probe: the
  forward solver with budget `probe_nfe` and tolerance `probe_tol` on the first
  `probe_examples` test examples in batches of `probe_batch_size`; a batch stops
  when all its examples reached the tolerance (jreg.deq's batch rule), so
  `probe_nfe_to_tol` is the mean over batches of that count, and
  `probe_converged_fraction` the share of examples that reached it.
  `train_wall_time` is the training time so far (evaluation excluded).
  """

  def per_example(predict):
    @jax.jit
    def metrics(params, model_state, batch):
      logits, info = predict(params, model_state, batch['image'])
      labels = batch['label']
      out = {'accuracy': (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
             'cross_entropy': optax.softmax_cross_entropy_with_integer_labels(
                 logits, labels)}
      for key in ('forward_nfe', 'forward_rel_residual', 'forward_abs_residual',
                  'forward_converged_fraction'):
        if key in info:
          out[key] = jnp.full(labels.shape, info[key], jnp.float32)
      return out
    return metrics

  test_metrics = per_example(fns.predict_fn)
  probe_metrics = per_example(probe_fns.predict_fn) if probe_fns else None

  def eval_fn(params, model_state):
    start = time.perf_counter()
    result = train.evaluate(test_metrics, params, model_state,
                            eval_batches(config['eval_batch_size']))
    if probe_metrics is not None and config['probe_examples']:
      probe = train.evaluate(probe_metrics, params, model_state,
                             eval_batches(config['probe_batch_size'],
                                          config['probe_examples']))
      result.update(probe_nfe_to_tol=probe['forward_nfe'],
                    probe_rel_residual=probe['forward_rel_residual'],
                    probe_converged_fraction=probe['forward_converged_fraction'])
    now = time.perf_counter()
    clock['eval'] += now - start
    result['train_wall_time'] = now - clock['start'] - clock['eval']
    return result

  return eval_fn


def train_and_evaluate(config: Mapping[str, Any], workdir: str, train_iter,
                       eval_batches: Callable[..., Any],
                       image_shape: tuple[int, int, int],
                       num_steps: int) -> dict[str, Any]:
  """Trains an MDEQ classifier in two phases and evaluates it.

  Phase 1 (`pretrain_steps` updates): the unrolled weight-tied network
  (`num_layers` cell applications, ordinary backprop); phase 2 (up to
  `num_steps`): the implicit DEQ with the Jacobian term. Both are phases of one
  `jreg.train.fit` call, so a killed run resumes in whichever phase it stopped.

  Args:
    config: a full configuration (see `default_config`).
    workdir: checkpoints, metrics.jsonl.
    train_iter: a jreg.data iterator of training batches.
    eval_batches: `(batch_size, max_examples=0) -> iterable` of eval batches.
    image_shape: (H, W, C).
    num_steps: total updates.

  Returns:
    {'history': logged records, 'final_eval': last eval record, 'num_params',
     'train_wall_time'}.
  """
  fns = build(config, image_shape, num_steps)
  probe_fns = None
  if config['network'] == 'mdeq':
    probe_fns = build(dict(config, eval_nfe=config['probe_nfe'],
                           solver_tol=config['probe_tol'], stop_mode='rel'),
                      image_shape, num_steps)
  optimizer, schedule = make_optimizer(config, num_steps)
  clock = {'start': time.perf_counter(), 'eval': 0.0}
  eval_fn = make_eval_fn(config, fns, probe_fns, eval_batches, clock)
  common = dict(workdir=workdir, init_fn=jax.jit(fns.init_fn),
                optimizer=optimizer, train_iter=train_iter, seed=config['seed'],
                parallel=config['parallel'], eval_fn=eval_fn,
                eval_every=config['eval_every'], log_every=config['log_every'],
                checkpoint_every=config['checkpoint_every'],
                learning_rate_fn=schedule, tensorboard=False)
  pretrain_steps = min(config['pretrain_steps'], num_steps)
  if config['network'] == 'explicit':
    pretrain_steps = 0
  # Phase 1 (steps 1..pretrain_steps): the unrolled weight-tied network;
  # phase 2: the implicit DEQ. One fit, so a killed run resumes in its phase.
  phases = [(num_steps, fns.grad_fn)]
  if pretrain_steps == num_steps:
    phases = [(num_steps, fns.pretrain_grad_fn)]
  elif pretrain_steps:
    phases.insert(0, (pretrain_steps, fns.pretrain_grad_fn))
  logging.info('MDEQ: %d unrolled pre-training steps, then %s to step %d',
               pretrain_steps, config['network'], num_steps)
  state, records = train.fit(grad_fn=phases, num_steps=num_steps, **common)
  history = [dict(r, phase='pretrain' if r['step'] <= pretrain_steps
                  else config['network']) for r in records]
  evals = [r for r in history if r['split'] == 'eval']
  return dict(history=history, final_eval=evals[-1] if evals else None,
              num_params=mdeq.count_params(state.params),
              train_wall_time=time.perf_counter() - clock['start'] - clock['eval'])



def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains one CIFAR-10 MDEQ run; writes results.json and figures."""
  config = dict(default_config(), **dict(config))
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  arrays = {
      split: data.first_examples(
          data.load_cifar10(split, source=config['data_source'],
                            data_dir=config['data_dir']),
          config[f'{split}_examples'])
      for split in ('train', 'test')}
  train_size = len(arrays['train']['label'])
  if train_size < config['batch_size']:
    raise ValueError(f'the training set ({train_size} examples) is smaller than '
                     f'one batch of {config["batch_size"]}.')
  num_steps = config['num_steps'] or (
      config['num_epochs'] * (train_size // config['batch_size']))

  def eval_batches(batch_size, max_examples=0):
    return data.cifar10_iterator('test', batch_size, mode='eval',
                                 arrays=data.first_examples(arrays['test'],
                                                            max_examples))

  train_iter = data.cifar10_iterator('train', config['batch_size'],
                                     seed=config['seed'],
                                     arrays=arrays['train'])
  out = train_and_evaluate(config, workdir, train_iter, eval_batches,
                           (32, 32, 3), num_steps)
  results = summarize(config, out)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(dict(results, history=out['history']), f, indent=1)
  plot_runs({'run': out['history']}, workdir)
  return results


def summarize(config: Mapping[str, Any], out: Mapping[str, Any]) -> dict:
  """The headline numbers of one run (JSON-serialisable)."""
  final = out['final_eval'] or {}
  train_records = [r for r in out['history'] if r['split'] == 'train']
  deq_records = [r for r in train_records if r.get('phase') == 'mdeq']
  last = deq_records[-1] if deq_records else (train_records[-1] if train_records else {})
  keys = ('accuracy', 'cross_entropy', 'forward_nfe', 'forward_rel_residual',
          'probe_nfe_to_tol', 'probe_rel_residual', 'probe_converged_fraction',
          'train_wall_time')
  return dict(
      config={k: v for k, v in config.items()},
      num_params=out['num_params'],
      test={k: final[k] for k in keys if k in final},
      last_train={k: last[k] for k in last
                  if k.startswith(('forward_', 'backward_', 'jacobian_',
                                   'loss', 'accuracy'))},
      train_wall_time=out['train_wall_time'])


def plot_runs(histories: Mapping[str, list[dict]], workdir: str,
              prefix: str = '') -> list[str]:
  """NFE and residual over training, and test accuracy against wall time.

  Args:
    histories: run label -> logged records (with 'phase').
    workdir: where the PNGs go.
    prefix: file-name prefix.

  Returns:
    The paths written.
  """
  paths = []
  path = os.path.join(workdir, f'{prefix}convergence.png')
  with plotting.figure(path, ncols=3) as (_, axes):
    for index, (key, label) in enumerate(
        [('forward_nfe', 'forward NFE (training)'),
         ('forward_rel_residual', 'forward relative residual (training)'),
         ('backward_nfe', 'backward NFE (training)')]):
      series = {}
      for name, history in histories.items():
        records = [r for r in history if r['split'] == 'train' and key in r
                   and r.get('phase') == 'mdeq']
        if records:
          series[name] = ([r['step'] for r in records],
                          [float(r[key]) for r in records])
      plotting.curves(axes[index], series, 'step', label,
                      logy=key.endswith('residual'))
  paths.append(path)
  path = os.path.join(workdir, f'{prefix}accuracy_vs_time.png')
  with plotting.figure(path, ncols=2) as (_, axes):
    acc, nfe = {}, {}
    for name, history in histories.items():
      evals = [r for r in history if r['split'] == 'eval' and
               'train_wall_time' in r]
      if evals:
        acc[name] = ([r['train_wall_time'] for r in evals],
                     [r['accuracy'] for r in evals])
      probes = [r for r in evals if 'probe_nfe_to_tol' in r]
      if probes:
        nfe[name] = ([r['step'] for r in probes],
                     [r['probe_nfe_to_tol'] for r in probes])
    plotting.curves(axes[0], acc, 'training wall time (s)', 'test accuracy',
                    marker='o')
    plotting.curves(axes[1], nfe, 'step', 'test NFE to reach the tolerance',
                    marker='o')
  paths.append(path)
  return paths


def compare(workdirs: Mapping[str, str], out_dir: str) -> dict[str, Any]:
  """Joins finished runs: figures with one curve per run and a summary.

  Args:
    workdirs: label -> workdir of a finished `run` (with results.json).
    out_dir: where `mdeq_convergence.png`, `mdeq_accuracy_vs_time.png` and
      `mdeq_comparison.json` go.

  Returns:
    label -> the run's headline numbers (`summarize` output without config).
  """
  histories, table = {}, {}
  for label, workdir in workdirs.items():
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    histories[label] = results.pop('history')
    results.pop('config')
    table[label] = results
  os.makedirs(out_dir, exist_ok=True)
  plot_runs(histories, out_dir, prefix='mdeq_')
  with open(os.path.join(out_dir, 'mdeq_comparison.json'), 'w') as f:
    json.dump(table, f, indent=1)
  return table


def define_flags(with_preset: bool = True):
  """Flags of this experiment (see `default_config`); others are common."""
  d = default_config()
  if with_preset:
    flags.DEFINE_enum('preset', 'paper', ['paper', 'small'],
                      'paper: default_config() (Table 4); small: '
                      'small_config(), the reduced-scale run of BUILD_NOTES.md (MDEQ).')
  flags.DEFINE_string('model', d['model'], 'MDEQ configuration name.')
  flags.DEFINE_enum('network', d['network'], ['mdeq', 'explicit'],
                    'mdeq: the DEQ; explicit: untied unrolled cells.')
  flags.DEFINE_integer('num_epochs', d['num_epochs'], 'Training epochs.')
  flags.DEFINE_integer('num_steps', d['num_steps'], 'Updates (0: from epochs).')
  flags.DEFINE_integer('pretrain_steps', d['pretrain_steps'],
                       'Unrolled weight-tied pre-training updates.')
  flags.DEFINE_integer('batch_size', d['batch_size'], 'Global batch size.')
  flags.DEFINE_float('learning_rate', d['learning_rate'], 'Peak learning rate.')
  flags.DEFINE_integer('forward_nfe', d['forward_nfe'], 'Forward solver budget.')
  flags.DEFINE_integer('backward_nfe', d['backward_nfe'], 'Backward solver budget.')
  flags.DEFINE_float('jacobian_weight', d['jacobian_weight'],
                     'gamma (0: no Jacobian regularisation).')
  flags.DEFINE_float('jacobian_prob', d['jacobian_prob'],
                     'p, the fraction of steps with the Jacobian term.')
  flags.DEFINE_integer('train_examples', 0, 'Training examples (0: all).')
  flags.DEFINE_integer('test_examples', 0, 'Test examples (0: all).')


def config_from_flags(defaults: dict[str, Any]) -> dict[str, Any]:
  """Applies the common and this experiment's flags to `defaults`."""
  f = flags.FLAGS
  config = dict(defaults)
  if not cli.QUICKSTART.value:
    for key in ('model', 'network', 'num_epochs', 'num_steps', 'pretrain_steps',
                'batch_size', 'learning_rate', 'forward_nfe', 'backward_nfe',
                'train_examples', 'test_examples'):
      if key in f and f[key].present:
        config[key] = f[key].value
    for key in ('jacobian_weight', 'jacobian_prob'):
      if key in f and f[key].present:
        config[key] = config[f'{key}_final'] = f[key].value
    if cli.CHECKPOINT_EVERY.present:
      config['checkpoint_every'] = cli.CHECKPOINT_EVERY.value
    if cli.EVAL_EVERY.present:
      config['eval_every'] = cli.EVAL_EVERY.value
  config.update(seed=cli.SEED.value, parallel=cli.PARALLEL.value,
                data_source=cli.DATA_SOURCE.value, data_dir=cli.DATA_DIR.value)
  if cli.LOG_EVERY.present:
    config['log_every'] = cli.LOG_EVERY.value
  try:
    check_config(config)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  return config


def main(argv):
  del argv
  workdir = cli.start()
  if cli.QUICKSTART.value:
    defaults = quickstart_config()
  else:
    defaults = small_config() if flags.FLAGS.preset == 'small' else default_config()
  results = run(config_from_flags(defaults), workdir)
  print(json.dumps({k: results[k] for k in ('num_params', 'test',
                                            'train_wall_time')}, indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
