"""MDEQ image classification: objective, evaluation, NFE probes, two-phase training.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization" (ICML 2021, Sec. 3.3, 5.3, Appendix A) on the MDEQ of
`jreg.models.mdeq`. The training objective is

    loss = CE(head(z*), y) + gamma(t) * ||J_f(z*)||_F^2 / d,

with the Hutchinson estimate of the Jacobian term computed only on a random
fraction p(t) of the steps. Training has two phases in one `jreg.train.fit`
call: `deq.pretrain_steps` updates of the unrolled weight-tied network, then the
implicit DEQ.

From a config in the naming scheme of `experiments/configs` (`model.*`,
`deq.forward.*`, `deq.backward.*`, `deq.eval_max_iter`, `deq.pretrain_steps`,
`jacobian.*`, `probe.*`, `optimizer.*`):
  * `model_config(config)`, `training_settings(config, num_steps)`,
    `build(config, image_shape, num_steps)` -> `ClassifierFns`;
  * `train_and_evaluate(...)`: both phases, with evaluation and the NFE probe;
  * `summarize(config, history)` from a run's whole `metrics.jsonl`;
  * `plot_runs(histories, workdir)`, `compare(workdirs, out_dir)`.

Shapes: B batch, H, W, C image, K classes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import json
import os
import time
from typing import Any, NamedTuple

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import optax

from jreg import deq as deq_lib
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import train
from jreg import xla_cpu
from jreg.deq import adaptive
from jreg.models import count_params
from jreg.models import mdeq
from jreg.tasks import deq as deq_task
from jreg.tasks import optimizers

# `model.*` keys that replace a field of the named architecture when not None.
ARCHITECTURE_KEYS = tuple(field.name for field in dataclasses.fields(mdeq.MDEQConfig))


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
  """What the training loss of an MDEQ classifier needs besides the model.

  The Jacobian term follows Bai, Koltun & Kolter (2021), Sec. 3.3 and
  Appendix A: loss = CE + gamma(t) * ||J_f(z*)||_F^2 / d, the Hutchinson
  estimate computed only on a random fraction p(t) of the training steps (a
  Bernoulli(p) gate per step; the term is not rescaled by 1/p, as in the
  reference `cls_function.py`). gamma(t) and p(t) ramp linearly from their
  initial to their final values over `jacobian_ramp_steps` steps (constant
  when the two are equal).
  """
  network: str = 'mdeq'          # 'mdeq' | 'explicit' (untied unrolled cells)
  forward: Any = None            # deq_lib.SolverConfig for training
  backward: Any = None           # deq_lib.BackwardConfig
  eval_forward: Any = None       # deq_lib.SolverConfig for evaluation
  jacobian_weight: float = 0.0   # gamma at step 0
  jacobian_weight_final: float = 0.0  # gamma after the ramp
  jacobian_prob: float = 0.0     # p at step 0
  jacobian_prob_final: float = 0.0    # p after the ramp
  jacobian_ramp_steps: int = 1
  pretrain_jacobian_weight: float = 0.0  # gamma during unrolled pre-training
  jacobian_vectors: int = 1      # Hutchinson vectors M
  explicit_num_layers: int = 4   # L for network='explicit'
  compute_dtype: Any = None      # DEQ cell dtype: None (float32) | bfloat16 | float16
  # Adaptive gamma (jreg.deq.adaptive): 'none' | 'nfe' | 'spectral_radius';
  # with a controller, gamma starts at jacobian_weight and follows it in the
  # DEQ phase (jacobian_weight_final is then unused).
  jacobian_adaptive: str = 'none'
  jacobian_controller: Any = None  # adaptive.ControllerConfig, or None
  spectral_radius_iters: int = 20  # power iterations per rho measurement
  eval_spectral_radius: bool = False  # evaluation also measures rho(J_f(z*))


class ClassifierFns(NamedTuple):
  """Pure functions of an MDEQ (or explicit) classifier, in jreg.train's contract.

  init_fn: rng -> (params, model_state).
  loss_fn / pretrain_loss_fn: (params, model_state, rng, batch) ->
    (loss, (model_state, metrics)); the DEQ phase and the unrolled weight-tied
    pre-training phase (the same function for network='explicit').
  grad_fn / pretrain_grad_fn: `jreg.deq.value_and_grad` of those (adds the
    backward solver's NFE and residuals to the metrics).
  predict_fn: (params, model_state, images) -> (logits [B, K], info), the
    evaluation forward pass (no dropout, `eval_forward` solver settings);
    pure, to be jitted by the caller.
  """
  init_fn: Any
  loss_fn: Any
  pretrain_loss_fn: Any
  grad_fn: Any
  pretrain_grad_fn: Any
  predict_fn: Any


def _classification_metrics(logits, labels, mask=None):
  """Mean cross-entropy and accuracy over the (masked) batch."""
  log_probs = jax.nn.log_softmax(logits)  # [B, K]
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]  # [B]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)  # [B]
  if mask is None:
    return jnp.mean(nll), jnp.mean(correct)
  weights = mask.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def build_classifier(config: mdeq.MDEQConfig, settings: TrainingSettings,
                     image_shape: tuple[int, int, int]) -> ClassifierFns:
  """The init / loss / gradient / prediction functions of a classifier.

  Args:
    config: the architecture.
    settings: solver, Jacobian-regularisation and network-kind settings.
    image_shape: (H, W, C) of one input image (for initialisation).

  Returns:
    `ClassifierFns`. Batches are `{'image': [B, H, W, C], 'label': [B]}`;
    the metrics hold cross_entropy, accuracy, forward_nfe, forward residuals,
    jacobian_loss / jacobian_applied / jacobian_weight / jacobian_prob (DEQ),
    and (through grad_fn) backward_nfe and backward residuals.
  """
  if settings.network not in ('mdeq', 'explicit'):
    raise ValueError(f"network must be 'mdeq' or 'explicit', got "
                     f'{settings.network!r}.')

  if settings.network == 'explicit':
    explicit = mdeq.explicit_config(config, settings.explicit_num_layers)

    def forward(images, is_training, unrolled):
      del unrolled
      return mdeq.ExplicitMDEQ(explicit, settings.explicit_num_layers,
                          name='explicit_mdeq')(images, is_training), {}
  else:
    def forward(images, is_training, unrolled):
      solver = (settings.forward if is_training or settings.eval_forward is None
                else settings.eval_forward)
      model = mdeq.MDEQClassifier(
          config, forward=solver, backward=settings.backward,
          jacobian_vectors=settings.jacobian_vectors,
          compute_dtype=settings.compute_dtype,
          spectral_radius_iters=settings.spectral_radius_iters, name='mdeq')
      step = deq_lib.step_count(increment=is_training)
      if not is_training:
        return model(images, is_training=False,
                     spectral_radius=settings.eval_spectral_radius)
      if unrolled:
        weight = jnp.asarray(settings.pretrain_jacobian_weight, jnp.float32)
        prob = jnp.asarray(1.0 if settings.pretrain_jacobian_weight else 0.0)
      else:
        weight = deq_task.linear_ramp(settings.jacobian_weight, settings.jacobian_weight_final,
                       settings.jacobian_ramp_steps, step)
        prob = deq_task.linear_ramp(settings.jacobian_prob, settings.jacobian_prob_final,
                     settings.jacobian_ramp_steps, step)
      use_jacobian = (settings.pretrain_jacobian_weight > 0 if unrolled else
                      max(settings.jacobian_weight,
                          settings.jacobian_weight_final) > 0)
      gate = (deq_lib.regularization_gate(hk.next_rng_key(), prob)
              if use_jacobian else False)
      controller = settings.jacobian_controller
      measure_radius = (gate if controller is not None and not unrolled and
                        settings.jacobian_adaptive == 'spectral_radius'
                        else False)
      logits, info = model(images, is_training=True, unrolled=unrolled,
                           jacobian_loss=gate, spectral_radius=measure_radius)
      if controller is not None:
        if unrolled:  # the state exists in both phases; it moves in the DEQ one
          adaptive.haiku_weight(controller, settings.jacobian_weight, 0.0,
                                measured=False)
        else:
          weight, info = deq_task.adaptive_weight(
              controller, settings.jacobian_adaptive, settings.jacobian_weight,
              info, is_training)
      info = dict(info, jacobian_weight=weight, jacobian_prob=prob)
      return logits, info

  model = hk.transform_with_state(forward)

  def init_fn(rng):
    # The unrolled path creates the same parameters and state as the DEQ path
    # without compiling solvers into the initialisation.
    images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return model.init(rng, images, True, True)

  def make_loss(unrolled):
    def loss_fn(params, model_state, rng, batch):
      (logits, info), model_state = model.apply(
          params, model_state, rng, batch['image'], True, unrolled)
      cross_entropy, accuracy = _classification_metrics(logits, batch['label'])
      loss = cross_entropy
      if 'jacobian_loss' in info:
        loss = loss + info['jacobian_weight'] * info['jacobian_loss']
      metrics = dict(info, cross_entropy=cross_entropy, accuracy=accuracy)
      return loss, (model_state, metrics)
    return loss_fn

  def predict_fn(params, model_state, images):
    # A fixed key: the power iteration's start vector when rho is measured.
    rng = jax.random.PRNGKey(0) if settings.eval_spectral_radius else None
    (logits, info), _ = model.apply(params, model_state, rng, images, False,
                                    False)
    return logits, info

  loss_fn, pretrain_loss_fn = make_loss(False), make_loss(True)
  return ClassifierFns(
      init_fn=init_fn, loss_fn=loss_fn, pretrain_loss_fn=pretrain_loss_fn,
      grad_fn=deq_lib.value_and_grad(loss_fn),
      pretrain_grad_fn=deq_lib.value_and_grad(pretrain_loss_fn),
      predict_fn=predict_fn)


def model_config(config, num_classes: int | None = None) -> mdeq.MDEQConfig:
  """The architecture `model.name` with every non-None `model.<field>` applied.

  Args:
    config: the experiment config.
    num_classes: the labels of the data, used when `model.num_classes` is None.

  Raises:
    ValueError: an unknown architecture name.
  """
  changes = {key: config.model[key] for key in ARCHITECTURE_KEYS
             if config.model.get(key) is not None}
  if num_classes is not None and 'num_classes' not in changes:
    changes['num_classes'] = num_classes
  for key in ('num_channels', 'head_channels'):
    if key in changes:
      changes[key] = tuple(changes[key])
  return mdeq.mdeq_config(config.model.name).replace(**changes)


def check_model(config, num_labels: int, image_size: int) -> mdeq.MDEQConfig:
  """The architecture, refused in one sentence when it cannot fit the data.

  Raises:
    ValueError: a head with another number of classes than the data's labels,
      or an image size the scales do not divide.
  """
  model = model_config(config, num_labels)
  if model.num_classes != num_labels:
    raise ValueError(
        f'model {config.model.name!r} has {model.num_classes} classes but the '
        f'data has {num_labels} labels; set --config.model.num_classes='
        f'{num_labels}.')
  finest = image_size // 2**model.downsample_times
  scales = 2**(model.num_scales - 1)
  if finest < scales or finest % scales:
    raise ValueError(
        f'images of side {image_size} give a finest equilibrium resolution of '
        f'{finest}, which must be a positive multiple of 2^(scales - 1) = '
        f'{scales}.')
  if config.model.network not in ('mdeq', 'explicit'):
    raise ValueError(f"model.network must be 'mdeq' or 'explicit', got "
                     f'{config.model.network!r}.')
  if config.model.explicit_num_layers < 1:
    raise ValueError('model.explicit_num_layers must be >= 1.')
  return model


def check(config) -> None:
  """Range checks of the DEQ, Jacobian and probe groups (one sentence)."""
  training_settings(config, 1)
  deq_task.check_jacobian(config.jacobian)
  if config.deq.pretrain_steps < 0:
    raise ValueError(f'deq.pretrain_steps must be >= 0, got '
                     f'{config.deq.pretrain_steps}.')
  for key in ('max_iter', 'batch_size'):
    if config.probe[key] < 1:
      raise ValueError(f'probe.{key} must be >= 1, got {config.probe[key]}.')
  for key in ('examples',):
    if config.probe[key] < 0:
      raise ValueError(f'probe.{key} must be >= 0, got {config.probe[key]}.')
  for key in ('train_examples', 'eval_examples'):
    if config.data.get(key, 0) < 0:
      raise ValueError(f'data.{key} must be >= 0 (0: all), got {config.data[key]}.')


def training_settings(config, num_steps: int) -> TrainingSettings:
  """Solvers and Jacobian settings; gamma and p ramp linearly over the run."""
  forward = deq_task.solver_config(config.deq.forward, 'deq.forward')
  jac = config.jacobian
  return TrainingSettings(
      network=config.model.network,
      forward=forward,
      backward=deq_task.backward_config(config.deq.backward, 'deq.backward'),
      eval_forward=forward._replace(max_iter=config.deq.eval_max_iter),
      jacobian_weight=jac.weight, jacobian_weight_final=jac.weight_final,
      jacobian_prob=jac.probability, jacobian_prob_final=jac.probability_final,
      jacobian_ramp_steps=max(num_steps, 1),
      pretrain_jacobian_weight=jac.pretrain_weight,
      jacobian_vectors=jac.num_vectors,
      explicit_num_layers=config.model.explicit_num_layers,
      compute_dtype=deq_task.compute_dtype(config.deq),
      jacobian_adaptive=jac.get('adaptive', 'none'),
      jacobian_controller=deq_task.controller_config(jac),
      spectral_radius_iters=jac.get('radius_iters', 20))


def build(config, image_shape: tuple[int, int, int], num_steps: int = 1,
          num_classes: int | None = None, probe: bool = False) -> ClassifierFns:
  """The classifier's functions (jreg.train contracts) for `config`.

  With `probe`, evaluation uses the NFE-to-tolerance probe's solver: budget
  `probe.max_iter`, tolerance `probe.tol` on the relative residual, and also
  measures the spectral radius of J_f at the fixed point it reaches.
  """
  settings = training_settings(config, num_steps)
  if probe:
    settings = dataclasses.replace(
        settings, eval_spectral_radius=settings.network == 'mdeq',
        eval_forward=settings.forward._replace(
            max_iter=config.probe.max_iter, tol=config.probe.tol, stop_mode='rel'))
  return build_classifier(model_config(config, num_classes), settings,
                          tuple(image_shape))


def carried_time(workdir: str, key: str) -> float:
  """The training time a resumed run carries over: `key` of the last
  evaluation record kept in `workdir/metrics.jsonl` (0.0 for a fresh run).

  `jreg.train.fit` keeps the records up to the checkpoint it resumes from, so
  a resumed run's clock goes on from its last kept evaluation instead of 0
  (the steps between that evaluation and the checkpoint are not counted).
  Read at a run's first evaluation, once `fit` has dropped the later records.
  The times are measurements, not results: comparisons of a resumed run with
  an uninterrupted one leave them out.
  """
  times = [r[key] for r in metrics_lib.read_history(workdir)
           if r.get('split') == 'eval' and key in r]
  return float(times[-1]) if times else 0.0



def make_eval_fn(config, fns: ClassifierFns, probe_fns: ClassifierFns | None,
                 eval_batches: Callable[..., Any], clock: dict):
  """`eval_fn(params, model_state) -> metrics` for jreg.train.fit.

  Test accuracy and cross-entropy at the evaluation budget
  (`deq.eval_max_iter`), its forward NFE and residual, and (DEQ only) the
  NFE-to-tolerance probe: the forward solver with budget `probe.max_iter` and
  tolerance `probe.tol` on the first `probe.examples` test examples in batches
  of `probe.batch_size`; a batch stops when all its examples reached the
  tolerance (jreg.deq's batch rule), so `probe_nfe_to_tol` is the mean over
  batches of that count, and `probe_converged_fraction` the share of examples
  that reached it; `probe_spectral_radius` is the batch mean of rho(J_f(z*))
  at the probe's fixed points (power iteration, `jacobian.radius_iters`).
  `train_wall_time` is the run's training time so far (evaluation excluded),
  carried across resumes from `clock['workdir']` (`carried_time`).
  """

  def per_example(predict):
    @xla_cpu.jit
    def metrics(params, model_state, batch):
      logits, info = predict(params, model_state, batch['image'])  # [B, K]
      labels = batch['label']
      out = {'accuracy': (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
             'cross_entropy': optax.softmax_cross_entropy_with_integer_labels(
                 logits, labels)}
      for key in ('forward_nfe', 'forward_rel_residual', 'forward_abs_residual',
                  'forward_converged_fraction', 'spectral_radius'):
        if key in info:
          out[key] = jnp.full(labels.shape, info[key], jnp.float32)
      return out
    return metrics

  test_metrics = per_example(fns.predict_fn)
  probe_metrics = per_example(probe_fns.predict_fn) if probe_fns else None

  def eval_fn(params, model_state):
    start = time.perf_counter()
    result = train.evaluate(test_metrics, params, model_state,
                            eval_batches(config.eval_batch_size))
    if probe_metrics is not None and config.probe.examples:
      probe = train.evaluate(probe_metrics, params, model_state,
                             eval_batches(config.probe.batch_size,
                                          config.probe.examples))
      result.update(probe_nfe_to_tol=probe['forward_nfe'],
                    probe_rel_residual=probe['forward_rel_residual'],
                    probe_converged_fraction=probe['forward_converged_fraction'])
      if 'spectral_radius' in probe:
        result['probe_spectral_radius'] = probe['spectral_radius']
    now = time.perf_counter()
    clock['eval'] += now - start
    if 'carried' not in clock:
      clock['carried'] = (carried_time(clock['workdir'], 'train_wall_time')
                          if 'workdir' in clock else 0.0)
    result['train_wall_time'] = (clock['carried'] + now - clock['start'] -
                                 clock['eval'])
    return result

  return eval_fn


def pretrain_steps(config) -> int:
  """Steps of the unrolled weight-tied phase (none for the explicit network)."""
  if config.model.network == 'explicit':
    return 0
  return min(config.deq.pretrain_steps, config.num_steps)


def train_and_evaluate(config, workdir: str, train_iter,
                       eval_batches: Callable[..., Any],
                       image_shape: tuple[int, int, int],
                       num_classes: int) -> tuple[Any, list[dict]]:
  """Trains an MDEQ classifier in two phases and evaluates it.

  Phase 1 (steps 1..`pretrain_steps(config)`): the unrolled weight-tied network
  (`num_layers` cell applications, ordinary backprop); phase 2 (up to
  `num_steps`): the implicit DEQ with the Jacobian term. Both are phases of
  one `jreg.train.fit` call, so a killed run resumes in whichever phase it
  stopped, and a finished one is read back.

  Args:
    config: the experiment config.
    workdir: checkpoints, metrics.jsonl.
    train_iter: a jreg.data iterator of training batches.
    eval_batches: `(batch_size, max_examples=0) -> iterable` of eval batches.
    image_shape: (H, W, C).
    num_classes: K, the labels of the data.

  Returns:
    `(state, history)`: the final state and the run's whole `metrics.jsonl`.
  """
  num_steps = config.num_steps
  fns = build(config, image_shape, num_steps, num_classes)
  probe_fns = (build(config, image_shape, num_steps, num_classes, probe=True)
               if config.model.network == 'mdeq' else None)
  optimizer, schedule = optimizers.make_optimizer(
      config.learning_rate, config.optimizer, num_steps)
  clock = {'start': time.perf_counter(), 'eval': 0.0, 'workdir': workdir}
  eval_fn = make_eval_fn(config, fns, probe_fns, eval_batches, clock)
  pretrain = pretrain_steps(config)
  grad_fn = fns.grad_fn
  if config.model.network == 'mdeq':  # a warning line for unconverged solves
    grad_fn = deq_task.log_unconverged_from_config(grad_fn, config)
  phases = [(num_steps, grad_fn)]
  if pretrain == num_steps:
    phases = [(num_steps, fns.pretrain_grad_fn)]
  elif pretrain:
    phases.insert(0, (pretrain, fns.pretrain_grad_fn))
  logging.info('MDEQ: %d unrolled pre-training steps, then %s to step %d',
               pretrain, config.model.network, num_steps)
  return train.fit(
      workdir=workdir, init_fn=xla_cpu.jit(fns.init_fn), grad_fn=phases,
      optimizer=optimizer, train_iter=train_iter, num_steps=num_steps,
      seed=config.seed, parallel=config.parallel, eval_fn=eval_fn,
      eval_every=config.eval_every, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, learning_rate_fn=schedule,
      tensorboard=False)


def with_phases(config, history: list[dict]) -> list[dict]:
  """The records with `phase`: 'pretrain' up to `pretrain_steps`, then the network."""
  pretrain = pretrain_steps(config)
  return [dict(r, phase='pretrain' if r['step'] <= pretrain
               else config.model.network) for r in history]


EVAL_KEYS = ('accuracy', 'cross_entropy', 'forward_nfe', 'forward_rel_residual',
             'probe_nfe_to_tol', 'probe_rel_residual', 'probe_converged_fraction',
             'probe_spectral_radius', 'train_wall_time')


def summarize(config, history: list[dict], num_params: int) -> dict[str, Any]:
  """The headline numbers of one run, from its whole `metrics.jsonl`."""
  history = with_phases(config, history)
  evals = [r for r in history if r['split'] == 'eval']
  final = evals[-1] if evals else {}
  train_records = [r for r in history if r['split'] == 'train']
  deq_records = [r for r in train_records if r['phase'] == 'mdeq']
  last = (deq_records or train_records or [{}])[-1]
  return dict(
      num_params=num_params,
      test={k: final[k] for k in EVAL_KEYS if k in final},
      last_train={k: last[k] for k in last
                  if k.startswith(('forward_', 'backward_', 'jacobian_',
                                   'loss', 'accuracy'))})


def write_results(config, workdir: str, state, history: list[dict],
                  **extra) -> dict[str, Any]:
  """results.json and the figures of one run; returns the results."""
  results = dict(summarize(config, history, count_params(state.params)), **extra)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1)
    plot_runs({'run': with_phases(config, history)}, workdir,
              budgets=plotting.solver_budgets(config))
  return results


def plot_runs(histories: Mapping[str, list[dict]], workdir: str,
              prefix: str = '',
              budgets: Mapping[str, Any] | None = None) -> list[str]:
  """NFE and residual over training, and test accuracy against wall time.

  Args:
    histories: run label -> logged records (with 'phase', see `with_phases`).
    workdir: where the PNGs go.
    prefix: file-name prefix.
    budgets: NFE budgets drawn as labelled lines on the NFE panels
      (`plotting.solver_budgets(config)`), or None.

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
      if key.endswith('_nfe'):
        plotting.budget(axes[index], (budgets or {}).get(key),
                        f'{key.split("_")[0]} max_iter')
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
    plotting.budget(axes[1], (budgets or {}).get('probe_nfe_to_tol'),
                    'probe max_iter')
  paths.append(path)
  return paths


def compare(workdirs: Mapping[str, str], out_dir: str) -> dict[str, Any]:
  """Joins finished runs: figures with one curve per run and a summary.

  Args:
    workdirs: label -> workdir of a finished run (results.json, config.json,
      metrics.jsonl).
    out_dir: where `mdeq_convergence.png`, `mdeq_accuracy_vs_time.png` and
      `mdeq_comparison.json` go.

  Returns:
    label -> the run's results.json.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  histories, table, budgets = {}, {}, {}
  for label, workdir in workdirs.items():
    with open(os.path.join(workdir, 'results.json')) as f:
      table[label] = json.load(f)
    with open(os.path.join(workdir, 'config.json')) as f:
      config = ml_collections.ConfigDict(json.load(f))
    histories[label] = with_phases(
        config, metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl')))
    for key, value in plotting.solver_budgets(config).items():
      if value is not None:   # the largest budget when the runs differ
        budgets[key] = max(value, budgets.get(key, value))
  os.makedirs(out_dir, exist_ok=True)
  plot_runs(histories, out_dir, prefix='mdeq_', budgets=budgets)
  with open(os.path.join(out_dir, 'mdeq_comparison.json'), 'w') as f:
    json.dump(table, f, indent=1)
  return table
