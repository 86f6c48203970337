r"""Implicit gradient regularisation experiments as library calls ([BD21]).

[BD21] D. G. T. Barrett and B. Dherin, "Implicit Gradient Regularization",
ICLR 2021. The penalties themselves (R_IG, λ, the penalised gradients) live
in `jreg.gradient_regularization`; this module holds what the paper's
experiments measure with them:

* **R_IG of a whole training set** (Section 5): R_IG(θ) = ‖∇L(θ)‖²/m with
  L(θ) = (1/N) Σₙ ℓₙ(θ) the mean loss over all N training examples, the
  gradient accumulated over batches (`full_batch_gradient`,
  `classifier_evaluation`).
* **The two-parameter model** (Section 4, Fig. 1): E(a, b) = ½(y − a·b·x)²,
  gradient descent θₙ₊₁ = θₙ − h∇E(θₙ) against the exact flow θ' = −∇E and
  the modified flow θ' = −∇Ẽ, Ẽ = E + (h/4)‖∇E‖² (`two_parameter_loss`,
  `exact_flow_field`, `modified_flow_field`, `rk4`, `gradient_descent`).
  Backward error analysis (Theorem 3.1) predicts ‖θₙ − θ_E(nh)‖ = O(h) and
  ‖θₙ − θ_Ẽ(nh)‖ = O(h²) (`log_log_slope` measures the orders).
* **The classifiers** of Sections 5 and 6 with their objective, compiled
  evaluation and full-batch gradient, built once per architecture
  (`mnist_mlp_task`, `cifar_resnet_task`), their datasets (`load_splits`)
  and the end-of-run evaluation `fit` logs (`classifier_evaluation`).
* **Summaries** read back from a run's whole `metrics.jsonl`
  (`final_record`, `training_mean`): the best test accuracy among runs that
  reach 100% training accuracy (Section 5, Fig. 2–3; `summarize_sweep`) and
  the test accuracy per EGR coefficient over seeds (Section 6;
  `summarize_egr`).
* `check_regularizer`: the range check of a config's `regularizer` group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from jreg import data
from jreg import gradient_regularization as gr
from jreg import tasks
from jreg import train
from jreg import xla_cpu
from jreg.errors import UserError
from jreg.models import count_params
from jreg.models import mlp as mlp_lib
from jreg.models import resnet
from jreg.tasks import classification

PyTree = Any


# ---------------------------------------------------------------------------
# R_IG of a training set.
# ---------------------------------------------------------------------------


def summed_gradient(per_example_loss: Callable[..., jax.Array]) -> Callable[..., PyTree]:
  """Compiled `(params, model_state, batch, mask) -> ∇_θ Σᵢ maskᵢ ℓᵢ(θ)`.

  Args:
    per_example_loss: `(params, model_state, batch) -> ℓ [B]`, e.g.
      `jreg.tasks.classification.per_example_cross_entropy(model)`.
  """
  @xla_cpu.jit
  def gradient(params, model_state, batch, mask):
    total = lambda p: jnp.sum(mask * per_example_loss(p, model_state, batch))  # noqa: E731
    return jax.grad(total)(params)
  return gradient


def full_batch_gradient(summed: Callable[..., PyTree], params: PyTree,
                        model_state: hk.State, batches: Iterable[dict]) -> PyTree:
  """∇L of the mean loss L = (1/N) Σₙ ℓₙ over every real example of `batches`.

  Args:
    summed: `summed_gradient(per_example_loss)`, compiled once by the caller.
    params, model_state: where the gradient is taken.
    batches: one pass of a `jreg.data` iterator in eval mode (padded batches
      carry `'mask'`); in a multi-process run each process passes its slices
      and the sums are added over processes.
  """
  total, count = None, 0.0
  for batch in batches:
    mask = np.asarray(batch.get('mask', np.ones(len(batch['label']), bool)),
                      np.float32)  # [B]
    inputs = {k: v for k, v in batch.items() if k != 'mask'}
    grads = summed(params, model_state, inputs, mask)
    total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    count += float(mask.sum())
  if total is None:
    raise ValueError('the gradient needs at least one batch of examples.')
  if jax.process_count() > 1:
    total = jax.tree.map(
        lambda g: multihost_utils.process_allgather(np.asarray(g)).sum(0), total)
    count = float(multihost_utils.process_allgather(np.float64(count)).sum())
  return jax.tree.map(lambda g: g / count, total)


class ClassifierTask(NamedTuple):
  """A classifier and its compiled functions, built once per architecture."""
  model: classification.Classifier
  example_images: jax.Array            # [1, H, W, C]: the input shape
  loss_fn: Callable[..., Any]          # the training objective (engine contract)
  per_example: Callable[..., Any]      # compiled per-example accuracy / cross entropy
  summed_gradient: Callable[..., Any]  # compiled ∇ Σ mask·ℓ, for R_IG
  num_params: int                      # m

  def init(self, rng: jax.Array) -> tuple[hk.Params, hk.State]:
    """`(params, model_state)`: the `init_fn` of `jreg.train.fit`."""
    if isinstance(self.model, hk.TransformedWithState):
      return self.model.init(rng, self.example_images, is_training=True)
    return self.model.init(rng, self.example_images), {}


def classifier_task(model: classification.Classifier,
                    example_images: jax.Array) -> ClassifierTask:
  """Wraps `model`, whose inputs are shaped like `example_images` [1, H, W, C]."""
  task = ClassifierTask(
      model=model, example_images=example_images,
      loss_fn=classification.cross_entropy_loss(model),
      per_example=classification.per_example_metrics(model),
      summed_gradient=summed_gradient(
          classification.per_example_cross_entropy(model)),
      num_params=0)
  params, _ = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  return task._replace(num_params=count_params(params))


@functools.lru_cache(maxsize=None)
def mnist_mlp_task(width: int, num_layers: int) -> ClassifierTask:
  """[BD21] Section 5's MLP on MNIST, compiled once per architecture (the
  sweep's runs and the tests share it)."""
  return classifier_task(mlp_lib.mnist_mlp(width, num_layers),
                         jnp.zeros((1, 28, 28, 1), jnp.float32))


@functools.lru_cache(maxsize=None)
def cifar_resnet_task(name: str, conv_impl: str = 'xla') -> ClassifierTask:
  """A CIFAR ResNet of `jreg.models.resnet` ([BD21] Section 6 uses ResNet-18),
  with batch norm, compiled once per architecture and convolution
  implementation (`conv_implementation` says which a run wants)."""
  return classifier_task(resnet.make(name, conv_impl=conv_impl),
                         jnp.zeros((1, 32, 32, 3), jnp.float32))


def conv_implementation(coefficient: float, method: str) -> str:
  """The ResNet convolutions' implementation for a run with EGR `coefficient`
  mu and penalty `method`: 'custom' for the exact penalty by double backprop
  (reverse-over-reverse; about 1.7x faster on CPU, BUILD_NOTES.md), else 'xla'
  (plain training, finite differences, and 'hvp', whose forward-mode pass
  the custom VJP does not support)."""
  return 'custom' if coefficient and method == 'double_backprop' else 'xla'


def classifier_evaluation(task: ClassifierTask,
                          splits: Mapping[str, Callable[[], Iterable[dict]]],
                          r_ig_split: str | None = None):
  """An `eval_fn(params, model_state) -> metrics` for `jreg.train.fit`.

  Args:
    task: the classifier.
    splits: `{name: () -> one pass of eval batches}`; each split `s` gives
      `s_accuracy` and `s_cross_entropy` (means over its examples).
    r_ig_split: also measure, on this split, `r_ig` = ‖∇L‖²/m and
      `grad_norm_sq` = ‖∇L‖² of the mean loss over all its examples.

  The metrics also hold `param_norm` = ‖θ‖₂, of exactly these parameters.
  """
  def eval_fn(params, model_state):
    metrics = {}
    for name, batches in splits.items():
      values = train.evaluate(task.per_example, params, model_state, batches())
      metrics.update({f'{name}_{k}': v for k, v in values.items()})
    if r_ig_split is not None:
      grads = full_batch_gradient(task.summed_gradient, params, model_state,
                                  splits[r_ig_split]())
      metrics['grad_norm_sq'] = float(gr.gradient_norm_sq(grads))
      metrics['r_ig'] = metrics['grad_norm_sq'] / task.num_params
    metrics['param_norm'] = float(optax.tree.norm(params))
    return metrics
  return eval_fn


def load_splits(config: Mapping[str, Any], load_fn: Callable[..., dict]
                ) -> dict[str, dict[str, np.ndarray]]:
  """`{'train', 'test'}` arrays of a classification dataset, as prefixes of
  `data.train_examples` / `data.eval_examples` examples (0: all).

  Args:
    config: a config with a `data` group (`source`, `dir`, the two sizes).
    load_fn: `jreg.data.load_mnist` or `jreg.data.load_cifar10`.
  """
  source, data_dir = tasks.data_source(config['data']['source'],
                                       config['data']['dir'])
  sizes = {'train': config['data']['train_examples'],
           'test': config['data']['eval_examples']}
  return {split: data.first_examples(load_fn(split, source=source,
                                             data_dir=data_dir), size)
          for split, size in sizes.items()}


class RunRecordError(UserError, ValueError):
  """A run's `metrics.jsonl` lacks the records its results are built from."""


def final_record(history: Sequence[Mapping[str, Any]], step: int,
                 run_dir: str) -> dict[str, Any]:
  """The evaluation record the run in `run_dir` logged at `step` (its last).

  Raises:
    RunRecordError: its `metrics.jsonl` has no evaluation at `step`, or no
      training record (a removed file: a resumed finished run evaluates again,
      but its training records are gone).
  """
  if not any(r.get('split') == 'train' for r in history):
    raise RunRecordError(
        f'the run in {run_dir} has no training records in its metrics.jsonl '
        '(was the file removed or edited?); start that run afresh by moving '
        'its folder away.')
  found = [r for r in history if r.get('split') == 'eval' and r['step'] == step]
  if not found:
    raise RunRecordError(
        f'the run in {run_dir} has no evaluation record at step {step} in its '
        'metrics.jsonl (was the file removed or edited?); start that run afresh '
        'by moving its folder away.')
  return dict(found[-1])


def training_mean(history: Sequence[Mapping[str, Any]], key: str) -> float:
  """Mean of a logged training metric over the whole run (every record of
  `metrics.jsonl`, whatever the number of restarts; nan if none)."""
  values = [r[key] for r in history if r.get('split') == 'train' and key in r]
  return float(np.mean(values)) if values else float('nan')


def summarize_sweep(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The best test accuracy among runs at 100% training accuracy ([BD21] Fig. 3).

  Args:
    runs: per-run results with `train_accuracy`, `test_accuracy`, `width`,
      `learning_rate`, `egr_coefficient`, `igr_rate`.
  """
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
        "train longer (num_steps) for the paper's comparison"))
  return summary


def summarize_egr(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Test accuracy per EGR coefficient μ over seeds ([BD21] Section 6).

  Args:
    runs: per-run results with `egr_coefficient` and `test_accuracy`.

  Returns:
    `{'by_coefficient': {μ: {mean, std, num_seeds}}, 'best_coefficient',
    'best_mean_test_accuracy', 'plain_mean_test_accuracy' (μ = 0, or None)}`.
  """
  by_mu = {}
  for r in runs:
    by_mu.setdefault(float(r['egr_coefficient']), []).append(r['test_accuracy'])
  table = {f'{mu:g}': dict(mean_test_accuracy=float(np.mean(acc)),
                           std_test_accuracy=float(np.std(acc)),
                           num_seeds=len(acc))
           for mu, acc in sorted(by_mu.items())}
  best = max(table, key=lambda mu: table[mu]['mean_test_accuracy'])
  return dict(by_coefficient=table, best_coefficient=float(best),
              best_mean_test_accuracy=table[best]['mean_test_accuracy'],
              plain_mean_test_accuracy=table.get('0', {}).get('mean_test_accuracy'))


# ---------------------------------------------------------------------------
# The two-parameter model ([BD21] Section 4).
# ---------------------------------------------------------------------------


def two_parameter_loss(theta: jax.Array, x: float, y: float) -> jax.Array:
  """E(a, b) = ½ (y − a·b·x)², theta = [a, b]; minima on a·b = y/x."""
  return 0.5 * (y - theta[0] * theta[1] * x) ** 2


Field = Callable[[jax.Array, float], jax.Array]


def exact_flow_field(loss: Callable[[jax.Array], jax.Array]) -> Field:
  """θ ↦ −∇E(θ), the gradient flow of `loss` (h is unused)."""
  grad = jax.grad(loss)
  return lambda theta, h: -grad(theta)


def modified_flow_field(loss: Callable[[jax.Array], jax.Array]) -> Field:
  """(θ, h) ↦ −∇Ẽ(θ), Ẽ = E + (h/4)‖∇E‖² ([BD21] Theorem 3.1)."""
  grad = jax.grad(loss)
  modified = lambda t, h: gr.modified_loss(loss(t), grad(t), h)  # noqa: E731
  return lambda theta, h: -jax.grad(modified)(theta, h)


def rk4(field: Field, theta0: jax.Array, h: float, time: float,
        num_substeps: int, keep_path: bool = False):
  """Integrates θ' = field(θ, h) over [0, time] with classical RK4.

  Returns:
    `(θ(time) [P], path [num_substeps, P] or None)`.
  """
  dt = time / num_substeps

  def step(theta, _):
    k1 = field(theta, h)
    k2 = field(theta + 0.5 * dt * k1, h)
    k3 = field(theta + 0.5 * dt * k2, h)
    k4 = field(theta + dt * k3, h)
    theta = theta + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return theta, theta if keep_path else None

  return lax.scan(step, theta0, None, length=num_substeps)


def gradient_descent(loss: Callable[[jax.Array], jax.Array], theta0: jax.Array,
                     h: float, num_steps: int) -> jax.Array:
  """The iterates θ₀, …, θₙ of θₖ₊₁ = θₖ − h∇E(θₖ): [num_steps + 1, P]."""
  grad = jax.grad(loss)

  def step(theta, _):
    theta = theta - h * grad(theta)
    return theta, theta

  _, path = lax.scan(step, theta0, None, length=num_steps)
  return jnp.concatenate([theta0[None], path])


class DivergenceError(UserError, ValueError):
  """Gradient descent left every bound: the learning rate is too large."""


def check_finite(what: str, values: jax.Array) -> np.ndarray:
  """`values` as NumPy, or `DivergenceError` naming `what` if any is not finite."""
  values = np.asarray(values)
  if not np.all(np.isfinite(values)):
    raise DivergenceError(
        f'{what} diverged (non-finite parameters): the learning rate is beyond '
        'the stability limit of gradient descent on this loss; use a smaller one.')
  return values


def log_log_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
  """Least-squares slope of log y against log x: the order p of y = O(xᵖ)."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ---------------------------------------------------------------------------
# Range check of the configs' `regularizer` group (one sentence).
# ---------------------------------------------------------------------------


def check_regularizer(group: Mapping[str, Any],
                      coefficients: Sequence[float] = ()) -> None:
  """A `regularizer` group: `method` of `jreg.gradient_regularization.METHODS`,
  `fd_epsilon` > 0, the coefficient μ (and swept `coefficients`) >= 0."""
  if group['method'] not in gr.METHODS:
    raise ValueError(f'regularizer.method must be one of {gr.METHODS}, got '
                     f'{group["method"]!r}.')
  if not group['fd_epsilon'] > 0:
    raise ValueError(f'regularizer.fd_epsilon must be > 0, got '
                     f'{group["fd_epsilon"]}.')
  for mu in (group['coefficient'], *coefficients):
    if isinstance(mu, bool) or not (isinstance(mu, (int, float)) and mu >= 0):
      raise ValueError('regularizer.coefficient (μ) values must be numbers >= 0 '
                       f'(0: no penalty), got {mu!r}.')
