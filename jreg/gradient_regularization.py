"""Implicit and explicit gradient regularisation (IGR / EGR).

Sources:
  [BD21] D. G. T. Barrett and B. Dherin, "Implicit Gradient Regularization",
    ICLR 2021.
  [SDBD21] S. L. Smith, B. Dherin, D. G. T. Barrett and S. De, "On the Origin
    of Implicit Regularization in Stochastic Gradient Descent", ICLR 2021.

Backward error analysis ([BD21] Section 3, Theorem 3.1): over a fixed time
T = n·h, the iterates of gradient descent θₙ₊₁ = θₙ − h ∇L(θₙ) with learning
rate h stay O(h²) close to the gradient flow of the *modified loss*

    L̃(θ) = L(θ) + (h/4) ‖∇L(θ)‖²  =  L(θ) + λ R_IG(θ),

where the implicit gradient regulariser and the implicit regularisation rate are

    R_IG(θ) = (1/m) Σᵢ (∂L/∂θᵢ)²  = ‖∇L‖² / m,        λ = h·m/4,

with m the number of parameters, while they are only O(h) close to the flow of
L itself (`experiments/igr_two_parameter.py` measures both orders).

Explicit gradient regularisation ([BD21] Section 6) trains on L + μ‖∇L‖².
Every function here takes the coefficient in one of two normalisations, and
says which::

    coefficient          μ   multiplies ‖∇L‖² = Σᵢ (∂L/∂θᵢ)²   (sum over parameters)
    regularization_rate  λ   multiplies R_IG = ‖∇L‖²/m        (mean; IGR units)
                         μ = λ/m, so plain GD with rate h has μ = h/4.

The gradient of the penalised loss is

    ∇(L + μ‖∇L‖²) = ∇L + 2μ H ∇L,       H = ∇²L,

and the Hessian-gradient product H∇L is computed by one of three methods:

  'double_backprop'    reverse-over-reverse: the VJP of θ ↦ ∇L(θ) at the
                       cotangent ∇L, which is exactly ∇(½‖∇L‖²) (what
                       `jax.grad` of L + μ‖∇L‖² computes, without redoing the
                       first gradient).
  'hvp'                forward-over-reverse: the JVP of θ ↦ ∇L(θ) along
                       v = stop_gradient(∇L) (`jax.linearize`, so the first
                       gradient is evaluated once).
  'finite_difference'  H g ≈ (∇L(θ + ε ĝ) − ∇L(θ)) · ‖g‖/ε with ĝ = g/‖g‖:
                       two gradient evaluations (the first one reused),
                       error O(ε) (a forward difference) where ∇L is
                       smooth. ReLU networks' ∇L is only piecewise smooth:
                       on a ResNet-20 at initialisation the relative error
                       in H∇L grew as ε fell (0.26 at ε = 0.1, 0.68 at 1e-2,
                       2.2 at 1e-3; BUILD_NOTES.md).

SGD's modified loss ([SDBD21] Section 2): with the batch split into k
microbatches of losses Lⱼ (L = (1/k) Σⱼ Lⱼ), SGD follows the flow of
L + (h/4k) Σⱼ ‖∇Lⱼ‖², i.e. a penalty on the *mean of the microbatch gradient
norms*. `num_microbatches=k` penalises (1/k) Σⱼ ‖∇Lⱼ‖² instead of ‖∇L‖²
(microbatches are evaluated with `jax.vmap`; a model with batch statistics then
normalises each microbatch on its own statistics, i.e. "ghost" batch norm).

Data parallelism (`axis_name` given, inside `jax.pmap`): `data_parallel`
says whose gradient is penalised,

  'global'      the global-batch gradient g = pmean(∇L_d) (all-reduced before
                the norm); the penalty μ‖g‖² equals the single-device penalty
                on the whole batch, and H g = pmean(H_d g).
  'per_device'  each device's own gradient: device d returns
                ∇L_d + 2μ H_d ∇L_d and the caller's pmean averages them, which
                minimises L + μ (1/D) Σ_d ‖∇L_d‖², the microbatch penalty with
                k = D devices.

With `axis_name=None` (one device, or `jax.jit` over a mesh where the function
sees the global batch) both options penalise the gradient of the batch seen.

Models with state (Haiku batch statistics): the extra gradient evaluations
never feed their state back; the returned state is the one from the first,
plain evaluation, so running statistics are updated once per step.
"""
from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any, Literal

import jax
from jax import lax
import jax.numpy as jnp

__all__ = (
    'DATA_PARALLEL_MODES', 'DEFAULT_FD_EPSILON', 'METHODS',
    'coefficient_from_rate', 'gradient_norm_sq', 'gradient_penalty_grad_fn',
    'implicit_regularization_rate', 'implicit_regularizer', 'modified_loss',
    'penalized_value_and_grad',
    # The finite-difference (SAM / gnp) family, warm-up, unbiased penalty.
    'DIFFERENCES', 'PERTURBATIONS', 'WARMUP_STRATEGIES', 'PENALTY_STATE_KEY',
    'PenaltyWarmup', 'add_penalty_step_counter', 'with_penalty_step_counter',
    'finite_difference_value_and_grad', 'finite_difference_grad_fn',
    'unbiased_gradient_norm_sq', 'unbiased_penalty_value_and_grad',
    'unbiased_penalty_grad_fn',
)

from jreg.models import count_params

PyTree = Any
Method = Literal['double_backprop', 'hvp', 'finite_difference']
DataParallel = Literal['global', 'per_device']

METHODS = ('double_backprop', 'hvp', 'finite_difference')
DATA_PARALLEL_MODES = ('global', 'per_device')

# Step length ε (in parameter space, along the unit gradient) of the
# finite-difference Hessian-gradient product. For smooth networks the error is
# truncation (∝ ε) plus float32 rounding (∝ 1/ε). In ReLU networks the units
# that cross their kink within the step add an error that the exact methods
# do not see (they use the almost-everywhere Hessian) and that grows like
# ε^(-1/2) as ε shrinks, until no unit crosses (ε ~ 1e-6, below float32
# resolution); on the MNIST MLP it is O(1) relative to 2μH∇L for every
# usable ε. See BUILD_NOTES.md (gradient regularisation).
DEFAULT_FD_EPSILON = 1e-2


# ---------------------------------------------------------------------------
# Bookkeeping: R_IG, λ, μ.
# ---------------------------------------------------------------------------


def gradient_norm_sq(grads: PyTree) -> jax.Array:
  """‖∇L‖² = Σᵢ (∂L/∂θᵢ)² over every leaf of `grads` (at least float32)."""
  return sum(jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))))
             for g in jax.tree.leaves(grads))


def implicit_regularizer(grads: PyTree) -> jax.Array:
  """R_IG = (1/m) Σᵢ (∂L/∂θᵢ)² = ‖∇L‖²/m ([BD21] Section 3)."""
  return gradient_norm_sq(grads) / count_params(grads)


def implicit_regularization_rate(learning_rate: float, num_params: int) -> float:
  """λ = h·m/4, the implicit regularisation rate of GD ([BD21] Theorem 3.1)."""
  return learning_rate * num_params / 4.0


def modified_loss(loss: jax.Array, grads: PyTree,
                  learning_rate: float) -> jax.Array:
  """L̃ = L + (h/4)‖∇L‖² = L + λ R_IG, GD's modified loss ([BD21] Theorem 3.1)."""
  return loss + 0.25 * learning_rate * gradient_norm_sq(grads)


def coefficient_from_rate(regularization_rate: float, num_params: int) -> float:
  """μ = λ/m: converts a rate on R_IG to a coefficient on ‖∇L‖²."""
  return regularization_rate / num_params


def _resolve_coefficient(coefficient, regularization_rate, num_params: int):
  """μ from exactly one of μ (on ‖∇L‖²) and λ (on R_IG).

  A sequence (one value per microbatch, "per-block strengths") gives a tuple
  of μⱼ; a number gives a float.
  """
  if (coefficient is None) == (regularization_rate is None):
    raise ValueError('Give exactly one of coefficient (μ, multiplying ‖∇L‖²) '
                     'and regularization_rate (λ, multiplying R_IG = ‖∇L‖²/m).')
  given = coefficient if coefficient is not None else regularization_rate
  per_block = not isinstance(given, (int, float))
  values = [float(v) for v in (given if per_block else [given])]
  if coefficient is None:
    values = [coefficient_from_rate(v, num_params) for v in values]
  for mu in values:
    if not math.isfinite(mu) or mu < 0:
      raise ValueError(f'The gradient penalty coefficient must be a finite number '
                       f'>= 0, got μ = {mu}.')
  if per_block and not values:
    raise ValueError('Per-block coefficients need one value per microbatch, '
                     'got an empty sequence.')
  return tuple(values) if per_block else values[0]


def _check_options(method: str, data_parallel: str, num_microbatches: int,
                   fd_epsilon: float) -> None:
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  if data_parallel not in DATA_PARALLEL_MODES:
    raise ValueError(f'data_parallel must be one of {DATA_PARALLEL_MODES}, '
                     f'got {data_parallel!r}.')
  if int(num_microbatches) != num_microbatches or num_microbatches < 1:
    raise ValueError(f'num_microbatches must be a positive integer, got '
                     f'{num_microbatches!r}.')
  if not fd_epsilon > 0:
    raise ValueError(f'fd_epsilon must be > 0, got {fd_epsilon!r}.')


# ---------------------------------------------------------------------------
# The penalised gradient.
# ---------------------------------------------------------------------------


def _tree_add_scaled(x: PyTree, scale, y: PyTree) -> PyTree:
  """x + scale·y, leaf by leaf (keeping x's dtypes)."""
  return jax.tree.map(lambda a, b: (a + scale * b).astype(a.dtype), x, y)


def _penalized_gradient(gradient_with_aux: Callable[[PyTree], tuple[PyTree, Any]],
                        params: PyTree, mu, method: str,
                        fd_epsilon: float,
                        reduce: Callable[[PyTree], PyTree]):
  """g + 2μ H g for g = reduce(∇L(θ)).

  Args:
    gradient_with_aux: θ ↦ (∇L(θ), aux); called once at θ (its aux is the one
      returned), and, for 'finite_difference', once more at a shifted θ.
    params: θ.
    mu: μ, the coefficient on ‖g‖² (a float, or a traced scalar when it is
      scheduled or differs per microbatch).
    method: how H g is computed (see the module docstring).
    fd_epsilon: ε for 'finite_difference'.
    reduce: identity, or `lax.pmean` over the data axis for the global-batch
      gradient; applied to g and to H_local g (H = mean of the local Hessians).

  Returns:
    (penalised gradient, g, aux), with g the gradient whose norm is penalised.
  """
  if isinstance(mu, float) and mu == 0.0:
    grads_local, aux = gradient_with_aux(params)
    grads = reduce(grads_local)
    return grads, grads, aux

  if method == 'double_backprop':
    # ∇(½‖∇L‖²) = (∂∇L/∂θ)ᵀ ∇L: the VJP of the gradient map at cotangent ∇L.
    grads_local, vjp_fn, aux = jax.vjp(gradient_with_aux, params, has_aux=True)
    grads = reduce(grads_local)
    (hess_grad,) = vjp_fn(grads)
    hess_grad = reduce(hess_grad)
  elif method == 'hvp':
    # Forward-over-reverse: the JVP of the gradient map along v = ∇L.
    grads_local, jvp_fn, aux = jax.linearize(gradient_with_aux, params,
                                             has_aux=True)
    grads = reduce(grads_local)
    hess_grad = reduce(jvp_fn(lax.stop_gradient(grads)))
  else:  # 'finite_difference'
    grads_local, aux = gradient_with_aux(params)
    grads = lax.stop_gradient(reduce(grads_local))
    norm = jnp.sqrt(gradient_norm_sq(grads))
    safe_norm = jnp.where(norm > 0, norm, 1.0)
    shifted = _tree_add_scaled(params, fd_epsilon / safe_norm, grads)
    grads_shifted_local, _ = gradient_with_aux(shifted)  # its aux is dropped
    grads_shifted = reduce(grads_shifted_local)
    # H g ≈ (∇L(θ + ε ĝ) − ∇L(θ)) ‖g‖/ε;  H g = 0 when g = 0.
    scale = jnp.where(norm > 0, norm / fd_epsilon, 0.0)
    hess_grad = jax.tree.map(lambda a, b: scale * (a - b), grads_shifted, grads)
  penalized = _tree_add_scaled(grads, 2.0 * mu, hess_grad)
  return penalized, grads, aux


def _split_microbatches(tree: PyTree, num_microbatches: int) -> PyTree:
  """[B, ...] -> [k, B/k, ...] for every leaf."""
  def split(x):
    batch = x.shape[0]
    if batch % num_microbatches:
      raise ValueError(f'The batch size {batch} is not divisible by '
                       f'num_microbatches={num_microbatches}.')
    return x.reshape((num_microbatches, batch // num_microbatches) + x.shape[1:])
  return jax.tree.map(split, tree)


def _tree_mean0(tree: PyTree) -> PyTree:
  """Mean over the leading (microbatch) axis, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)


def _check_argnums(argnums: Sequence[int], num_args: int) -> None:
  for i in argnums:
    if not 1 <= i <= num_args:
      raise ValueError(f'Microbatch argument {i} does not exist: loss_fn '
                       f'gets params and {num_args} more arguments.')


def _map_microbatches(fn: Callable[..., Any], params: PyTree, block_value,
                      args: Sequence[Any], num_microbatches: int,
                      split_argnums: Sequence[int],
                      stacked_argnums: Sequence[int],
                      block_value_mapped: bool | None = None):
  """`fn(params, block_value_j, *args_j)` for each microbatch j, stacked [k, ...].

  The arguments at `split_argnums` (positions in `loss_fn`'s signature, params
  is 0) are split [B, ...] -> [k, B/k, ...]; those at `stacked_argnums`
  already carry a leading axis of size k. `block_value` (a strength, or any
  pytree) is shared by the microbatches, or carries a leading axis of size k
  when `block_value_mapped` (default: when it is an array with a dimension).
  """
  _check_argnums(tuple(split_argnums) + tuple(stacked_argnums), len(args))
  split_args = tuple(
      _split_microbatches(a, num_microbatches) if i + 1 in split_argnums else a
      for i, a in enumerate(args))
  if block_value_mapped is None:
    block_value_mapped = bool(jnp.ndim(block_value))
  mapped = set(split_argnums) | set(stacked_argnums)
  in_axes = ((None, 0 if block_value_mapped else None) +
             tuple(0 if i + 1 in mapped else None for i in range(len(args))))
  return jax.vmap(fn, in_axes=in_axes)(params, block_value, *split_args)


def _strength_value(strength, scale):
  """A configured strength (float, or tuple per microbatch) times a schedule."""
  if isinstance(strength, tuple):
    strength = jnp.asarray(strength)
  if scale is None:
    return strength
  # Not weakly typed: a float32 factor must not round a float64 strength.
  float_dtype = jnp.result_type(float)
  return jnp.asarray(strength, float_dtype) * scale.astype(float_dtype)


def _penalized_core(loss_fn: Callable[..., Any], *, has_aux: bool, mu,
                    method: str, fd_epsilon: float, num_microbatches: int,
                    split_argnums: Sequence[int], stacked_argnums: Sequence[int],
                    axis_name, data_parallel: str, mean_aux: bool):
  """Builds (params, *args, scale=None) -> (loss, aux, penalised grads, stats).

  With k = num_microbatches > 1 the penalised gradient of each microbatch is
  computed under `jax.vmap` (see `_map_microbatches`). `mu` is a float, or a
  tuple of k floats (one coefficient per microbatch); `scale` (a traced
  scalar, e.g. a warm-up factor) multiplies it.

  stats: 'grad_norm_sq' ‖∇L‖² of the full (and, with `axis_name`, global)
  batch gradient; 'penalized_norm_sq' the mean over microbatches / devices of
  their ‖gⱼ‖² (‖g‖² for one); 'penalty' the mean of μⱼ‖gⱼ‖² (μ‖g‖²).
  """
  if axis_name is not None and data_parallel == 'global':
    reduce = functools.partial(lax.pmean, axis_name=axis_name)
  else:
    reduce = lambda tree: tree  # noqa: E731

  def single(params, mu_value, *args):
    def loss_with_aux(p):
      out = loss_fn(p, *args)
      loss, aux = out if has_aux else (out, None)
      return loss, (loss, aux)
    gradient_with_aux = jax.grad(loss_with_aux, has_aux=True)
    penalized, grads, (loss, aux) = _penalized_gradient(
        gradient_with_aux, params, mu_value, method, fd_epsilon, reduce)
    return loss, aux, penalized, grads

  def core(params, *args, scale=None):
    mu_value = _strength_value(mu, scale)
    if num_microbatches == 1:
      if jnp.ndim(mu_value):
        mu_value = mu_value[0]
      loss, aux, penalized, grads = single(params, mu_value, *args)
      full_grads = grads
      penalized_norm_sq = gradient_norm_sq(grads)
      penalty = mu_value * penalized_norm_sq
    else:
      losses, auxes, penalized, grads = _map_microbatches(
          single, params, mu_value, args, num_microbatches, split_argnums,
          stacked_argnums)
      loss = jnp.mean(losses)
      aux = _tree_mean0(auxes) if mean_aux else auxes
      norms_sq = jax.vmap(gradient_norm_sq)(grads)  # [k]
      penalized_norm_sq = jnp.mean(norms_sq)
      penalty = jnp.mean(mu_value * norms_sq)
      penalized = _tree_mean0(penalized)
      full_grads = _tree_mean0(grads)
    if axis_name is not None and data_parallel == 'per_device':
      # The penalty is local, but R_IG is a property of the global gradient.
      full_grads = lax.pmean(full_grads, axis_name)
    stats = {'grad_norm_sq': gradient_norm_sq(full_grads),
             'penalized_norm_sq': penalized_norm_sq,
             'penalty': penalty}
    return loss, aux, penalized, stats

  return core


def penalized_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | Sequence[float] | None = None,
    regularization_rate: float | Sequence[float] | None = None,
    method: Method = 'double_backprop',
    has_aux: bool = False,
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    num_microbatches: int = 1,
    microbatch_argnums: Sequence[int] = (1,),
    axis_name: Any = None,
    data_parallel: DataParallel = 'global',
    warmup: 'PenaltyWarmup | None' = None,
) -> Callable[..., Any]:
  """The value L and the gradient of L + μ‖∇L‖², like `jax.value_and_grad`.

  The returned function is pure: use it inside `jax.jit` or `jax.pmap` and
  feed its gradient to any optax optimiser.

      grad = ∇L + 2μ H∇L                      (num_microbatches = 1)
      grad = (1/k) Σⱼ (∇Lⱼ + 2μⱼ Hⱼ∇Lⱼ)       (k microbatches, [SDBD21])

  Args:
    loss_fn: `loss_fn(params, *args)` returning a scalar loss, or
      `(loss, aux)` when `has_aux`.
    coefficient: μ, the coefficient on ‖∇L‖² (sum over parameters); or a
      sequence of k values μⱼ, one per microbatch ("per-block strengths",
      see `BLOCKS` below).
    regularization_rate: λ, the coefficient on R_IG = ‖∇L‖²/m (IGR units;
      μ = λ/m, m counted from `params`), or k of them. Give exactly one of the
      two.
    method: 'double_backprop' | 'hvp' | 'finite_difference' (module docstring).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    fd_epsilon: ε, the parameter-space step of 'finite_difference'.
    num_microbatches: k; > 1 penalises the mean of the k microbatch gradient
      norms. The arguments named by `microbatch_argnums` are split along their
      leading axis; the returned loss is the mean of the microbatch losses and
      aux is stacked with a leading axis of size k.
    microbatch_argnums: positions in `loss_fn`'s signature (params is 0) of
      the batched arguments to split.
    axis_name: the `pmap` axis of data parallelism, or None.
    data_parallel: 'global' (penalise the all-reduced gradient; the returned
      gradient is already all-reduced) or 'per_device' (penalise each device's
      gradient; the caller averages the returned gradients).
    warmup: a `PenaltyWarmup` ('lambda' or 'zero'): μ(t) = μ·s(t). The
      returned function then takes the keyword `step` (updates applied so far).

  Returns:
    `f(params, *args[, step]) -> ((loss, aux), grads)` if has_aux else
    `(loss, grads)`. The loss is the unpenalised L = `loss_fn(params, *args)`
    (the mean of the k microbatch losses when num_microbatches > 1), not
    L + μ‖∇L‖²; only the gradient is penalised.

  BLOCKS: block j is microbatch j, the examples [j·B/k, (j+1)·B/k) of the
  batch this function sees (on one device of `pmap`, its local batch; with
  data_parallel='global', block j gathers slice j of every device's batch).
  """
  _check_options(method, data_parallel, num_microbatches, fd_epsilon)
  _check_block_strengths(_resolve_coefficient(coefficient, regularization_rate,
                                              1), num_microbatches)
  _check_warmup(warmup, allow_radius=False)

  def value_and_grad(params, *args, step=None):
    mu = _resolve_coefficient(coefficient, regularization_rate,
                              count_params(params))
    core = _penalized_core(
        loss_fn, has_aux=has_aux, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_microbatches=num_microbatches,
        split_argnums=tuple(microbatch_argnums), stacked_argnums=(),
        axis_name=axis_name, data_parallel=data_parallel, mean_aux=False)
    scale, _ = _warmup_scales(warmup, step)
    loss, aux, grads, _ = core(params, *args, scale=scale)
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return value_and_grad


def gradient_penalty_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | Sequence[float] | None = None,
    regularization_rate: float | Sequence[float] | None = None,
    learning_rate: float | None = None,
    method: Method = 'double_backprop',
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    num_microbatches: int = 1,
    data_parallel: DataParallel = 'global',
    warmup: 'PenaltyWarmup | None' = None,
) -> Callable[..., Any]:
  """A `grad_fn` for `jreg.train.fit` that follows ∇(L + μ‖∇L‖²).

  `loss_fn(params, model_state, rng, batch) -> (loss, (model_state, metrics))`
  becomes `grad_fn(params, model_state, rng, batch, axis_name=None) ->
  ((loss, (model_state, metrics)), grads)` (the contract in docs/architecture.md).
  The model state returned is the one from the plain evaluation at θ; the
  extra evaluations start from the same input state and their state is
  dropped. With `coefficient=0` the gradient is the plain one and only the
  metrics are added, so a plain-SGD run logs R_IG the same way.

  Metrics added (logged with the loss)::

    'grad_norm_sq'  ‖∇L‖² of the (global, full) batch gradient.
    'r_ig'          R_IG = ‖∇L‖²/m ([BD21] Section 3).
    'igr_rate'      λ = h·m/4 for the given `learning_rate` h (only if given).
    'penalty'       the explicit penalty added to the loss: μ‖∇L‖², or
                    (1/k) Σⱼ μⱼ‖∇Lⱼ‖² with microbatches / per-device.
    'penalty_scale' the warm-up factor s(t) (only with `warmup`).

  Args:
    loss_fn: the engine's loss function (contract above).
    coefficient: μ, on ‖∇L‖² (sum over parameters), or one μⱼ per microbatch
      (per-block strengths; blocks as in `penalized_value_and_grad`).
    regularization_rate: λ, on R_IG (mean over parameters); μ = λ/m.
      Give exactly one of the two.
    learning_rate: h, used only for the 'igr_rate' metric.
    method: 'double_backprop' | 'hvp' | 'finite_difference'.
    fd_epsilon: ε for 'finite_difference'.
    num_microbatches: k > 1 penalises the mean microbatch gradient norm
      ([SDBD21]); each microbatch gets its own key (`random.split(rng, k)`), and
      the returned model state and metrics are means over microbatches.
    data_parallel: 'global' | 'per_device', used when the engine passes
      `axis_name` (pmap mode).
    warmup: a `PenaltyWarmup` ('lambda' or 'zero'); the step is counted in the
      model state (`with_penalty_step_counter`).

  Returns:
    grad_fn(params, model_state, rng, batch, axis_name=None).
  """
  _check_options(method, data_parallel, num_microbatches, fd_epsilon)
  _check_block_strengths(_resolve_coefficient(coefficient, regularization_rate,
                                              1), num_microbatches)
  _check_warmup(warmup, allow_radius=False)

  def build_core(m, axis_name, stacked_argnums):
    mu = _resolve_coefficient(coefficient, regularization_rate, m)
    core = _penalized_core(
        loss_fn, has_aux=True, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_microbatches=num_microbatches, split_argnums=(3,),
        stacked_argnums=stacked_argnums, axis_name=axis_name,
        data_parallel=data_parallel, mean_aux=True)
    return lambda *args, scales: core(*args, scale=scales[0])

  return _engine_grad_fn(build_core, num_microbatches=num_microbatches,
                         learning_rate=learning_rate, warmup=warmup)


# ===========================================================================
# Beyond the exact penalty: the finite-difference (SAM / gnp) family, penalty
# warm-up, per-block strengths and the unbiased split-batch penalty.
#
# Sources:
#   [ZZH22] Y. Zhao, H. Zhang and X. Hu, "Penalizing Gradient Norm for
#     Efficiently Improving Generalization in Deep Learning", ICML 2022
#     (code: github.com/zhaoyang-0204/gnp).
#   [ZZH24] Y. Zhao, H. Zhang and X. Hu, "When Will Gradient Regularization Be
#     Harmful?", ICML 2024 (same code: gradient-regularisation warm-up).
#   [KTHO23] R. Karakida, T. Takase, T. Hayase and K. Osawa, "Understanding
#     Gradient Regularization in Deep Learning: Efficient Finite-Difference
#     Computation and Implicit Bias", ICML 2023.
#   [FKMN21] P. Foret, A. Kleiner, H. Mobahi and B. Neyshabur,
#     "Sharpness-Aware Minimization for Efficiently Improving Generalization",
#     ICLR 2021 (code: github.com/google-research/sam; `optax.contrib.sam`).
#   [GGFSG22] J. Geiping, M. Goldblum, P. Pope, M. Moeller and T. Goldstein,
#     "Stochastic Training is Not Necessary for Generalization", ICLR 2022
#     (code: github.com/JonasGeiping/fullbatchtraining).
#   [RWDB21] M. Rosca, Y. Wu, B. Dherin and D. G. T. Barrett, "Discretization
#     Drift in Two-Player Games", ICML 2021 (code:
#     github.com/google-deepmind/discretisation_drift,
#     dd_two_player_games/regularizer_estimates.py).
# ===========================================================================

DIFFERENCES = ('forward', 'central')
PERTURBATIONS = ('global', 'per_device')
WARMUP_STRATEGIES = ('lambda', 'r', 'zero')
PENALTY_STATE_KEY = 'gradient_penalty'   # model_state[KEY] = {'step': int32 []}


# ---------------------------------------------------------------------------
# Penalty warm-up ([ZZH24]) and its step counter.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PenaltyWarmup:
  """The gradient-regularisation warm-up of [ZZH24] (gnp's `gr_warmup_strategy`).

  With adaptive optimisers (Adam, RMSProp) and a learning-rate warm-up, a
  full-strength penalty from step 0 corrupts the optimiser's early moment
  estimates; [ZZH24] ramps the penalty in over the same T steps as the
  learning rate. With t the number of updates applied before this one
  (0 at the first step; gnp's `opt_state.count`) and

      s(t) = min(1, t/T)                                    (linear ramp)

  the strategies are::

    'lambda'  the strength ramps: α(t) = α·s(t) (family), μ(t) = μ·s(t)
              (exact penalty); the radius r is fixed.
    'r'       the radius ramps: r(t) = r·s(t) with α fixed, so λ = α·r
              ramps too (only the α-form of the finite-difference family,
              where λ = α·r; undefined for a coefficient μ on ‖∇L‖²).
    'zero'    no penalty while t < T, the full penalty from t = T on:
              s(t) = 1[t >= T].

  T = 0 turns the warm-up off (s = 1).

  Attributes:
    warmup_steps: T, in updates.
    strategy: 'lambda' | 'r' | 'zero'.
  """
  warmup_steps: int
  strategy: str = 'lambda'

  def __post_init__(self):
    if self.strategy not in WARMUP_STRATEGIES:
      raise ValueError(f'The warm-up strategy must be one of {WARMUP_STRATEGIES}, '
                       f'got {self.strategy!r}.')
    if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
      raise ValueError(f'warmup_steps must be an integer >= 0, got '
                       f'{self.warmup_steps!r}.')

  def factor(self, step) -> jax.Array:
    """s(t) (float32 []): the ramp, or the 0/1 gate of 'zero'."""
    t = jnp.asarray(step, jnp.float32)
    if self.warmup_steps == 0:
      return jnp.ones_like(t)
    if self.strategy == 'zero':
      return (t >= self.warmup_steps).astype(jnp.float32)
    return jnp.minimum(1.0, t / self.warmup_steps)

  def strength_scale(self, step) -> jax.Array:
    """The factor on α or μ at step t."""
    if self.strategy == 'r':
      return jnp.ones([], jnp.float32)
    return self.factor(step)

  def radius_scale(self, step) -> jax.Array:
    """The factor on the radius r at step t."""
    if self.strategy == 'r':
      return self.factor(step)
    return jnp.ones([], jnp.float32)


def _check_warmup(warmup, *, allow_radius: bool) -> None:
  if warmup is None:
    return
  if not isinstance(warmup, PenaltyWarmup):
    raise ValueError(f'warmup must be a PenaltyWarmup or None, got {warmup!r}.')
  if warmup.strategy == 'r' and not allow_radius:
    raise ValueError("The 'r' warm-up ramps the finite-difference radius with α "
                     "fixed; it needs finite_difference_* with alpha= (for a "
                     "coefficient μ on ‖∇L‖² use 'lambda' or 'zero').")


def _warmup_scales(warmup, step):
  """(strength scale, radius scale), or (None, None) without a warm-up."""
  if warmup is None:
    return None, None
  if step is None:
    raise ValueError('A penalty warm-up needs the step: call with step=t, the '
                     'number of updates applied so far.')
  return warmup.strength_scale(step), warmup.radius_scale(step)


def add_penalty_step_counter(model_state: PyTree) -> dict:
  """`model_state` plus {PENALTY_STATE_KEY: {'step': 0}}, the warm-up's clock.

  The engine's `grad_fn` contract carries no step, so a `grad_fn` built with a
  `warmup` keeps its own count of updates in the model state (int32, so
  `jreg.train`'s pmap mode keeps it unaveraged; it is checkpointed with the
  rest of the state and a resumed run continues the ramp).
  """
  if PENALTY_STATE_KEY in model_state:
    raise ValueError(f'The model state already has an entry {PENALTY_STATE_KEY!r}.')
  return {**model_state, PENALTY_STATE_KEY: {'step': jnp.zeros([], jnp.int32)}}


def with_penalty_step_counter(init_fn: Callable[[jax.Array], tuple[PyTree, PyTree]]):
  """Wraps the engine's `init_fn(rng) -> (params, model_state)` so that the
  model state carries the warm-up's step counter (`add_penalty_step_counter`)."""
  def wrapped(rng):
    params, model_state = init_fn(rng)
    return params, add_penalty_step_counter(model_state)
  return wrapped


def _pop_step(model_state, warmup):
  """(model_state without the counter, step or None)."""
  if warmup is None:
    return model_state, None
  if not isinstance(model_state, dict) or PENALTY_STATE_KEY not in model_state:
    raise ValueError('A grad_fn with a penalty warm-up counts steps in the model '
                     'state: build init_fn with '
                     'jreg.gradient_regularization.with_penalty_step_counter.')
  rest = {k: v for k, v in model_state.items() if k != PENALTY_STATE_KEY}
  return rest, model_state[PENALTY_STATE_KEY]['step']


def _engine_grad_fn(build_core, *, num_microbatches: int,
                    learning_rate: float | None, warmup):
  """The engine contract around a core (shared by the grad_fn builders).

  `build_core(m, axis_name, stacked_argnums)` returns
  `core(params, model_state, rng, batch, scales=...) -> (loss, (state,
  metrics), grads, stats)`; this adds the per-microbatch keys, the warm-up's
  step counter, and the metrics ('grad_norm_sq', 'r_ig', 'igr_rate', and every
  entry of `stats` except 'penalized_norm_sq').
  """
  def grad_fn(params, model_state, rng, batch, axis_name=None):
    m = count_params(params)
    model_state, step = _pop_step(model_state, warmup)
    stacked_argnums = ()
    if num_microbatches > 1 and rng is not None:
      rng = jax.random.split(rng, num_microbatches)   # one key per microbatch
      stacked_argnums = (2,)
    core = build_core(m, axis_name, stacked_argnums)
    scales = _warmup_scales(warmup, step)
    loss, (new_state, metrics), grads, stats = core(
        params, model_state, rng, batch, scales=scales)
    metrics = dict(metrics)
    metrics.update({k: v for k, v in stats.items() if k != 'penalized_norm_sq'})
    metrics['r_ig'] = stats['grad_norm_sq'] / m
    if learning_rate is not None:
      metrics['igr_rate'] = jnp.asarray(
          implicit_regularization_rate(learning_rate, m), jnp.float32)
    if warmup is not None:
      metrics['penalty_scale'] = warmup.factor(step)
      new_state = {**new_state, PENALTY_STATE_KEY: {'step': step + 1}}
    return (loss, (new_state, metrics)), grads

  return grad_fn


def _check_block_strengths(strength, num_blocks: int) -> None:
  if isinstance(strength, tuple) and len(strength) != num_blocks:
    raise ValueError(f'Per-block strengths need one value per microbatch: got '
                     f'{len(strength)} values for {num_blocks} microbatches.')


# ---------------------------------------------------------------------------
# The finite-difference family ([ZZH22], [KTHO23], SAM [FKMN21]).
# ---------------------------------------------------------------------------


def _resolve_family_strength(alpha, coefficient, regularization_rate,
                             num_params: int):
  """('alpha', α) or ('coefficient', μ); α and μ may be per-group tuples."""
  given = [x is not None for x in (alpha, coefficient, regularization_rate)]
  if sum(given) != 1:
    raise ValueError('Give exactly one of alpha (the interpolation weight, '
                     'α = λ/r for the penalty λ‖∇L‖), coefficient (μ on ‖∇L‖²) '
                     'and regularization_rate (λ on R_IG = ‖∇L‖²/m).')
  if alpha is None:
    return 'coefficient', _resolve_coefficient(coefficient, regularization_rate,
                                               num_params)
  per_block = not isinstance(alpha, (int, float))
  values = [float(v) for v in (alpha if per_block else [alpha])]
  if not values or not all(math.isfinite(v) and v >= 0 for v in values):
    raise ValueError(f'alpha must be a finite number >= 0 (or one per group), '
                     f'got {alpha!r}.')
  return 'alpha', tuple(values) if per_block else values[0]


def _check_family_options(radius: float, difference: str, perturbation: str,
                          inner_group_size, num_groups: int) -> None:
  if not (isinstance(radius, (int, float)) and math.isfinite(radius)
          and radius > 0):
    raise ValueError(f'radius must be a finite number > 0, got {radius!r}.')
  if difference not in DIFFERENCES:
    raise ValueError(f'difference must be one of {DIFFERENCES}, got '
                     f'{difference!r}.')
  if perturbation not in PERTURBATIONS:
    raise ValueError(f'perturbation must be one of {PERTURBATIONS}, got '
                     f'{perturbation!r}.')
  if inner_group_size is not None:
    if int(inner_group_size) != inner_group_size or inner_group_size < 1:
      raise ValueError(f'inner_group_size must be a positive integer or None, '
                       f'got {inner_group_size!r}.')
    if perturbation != 'global':
      raise ValueError("inner_group_size synchronises the perturbation within "
                       "groups of devices: it needs perturbation='global'.")
  if int(num_groups) != num_groups or num_groups < 1:
    raise ValueError(f'num_groups must be a positive integer, got '
                     f'{num_groups!r}.')


def _perturbation_sync(axis_name, perturbation: str, inner_group_size):
  """The all-reduce that decides whose gradient sets the perturbation."""
  if axis_name is None or perturbation == 'per_device':
    return lambda tree: tree

  def sync(tree):
    if inner_group_size is None:
      return lax.pmean(tree, axis_name)
    num_devices = lax.axis_size(axis_name)
    if num_devices % inner_group_size:
      raise ValueError(f'{num_devices} devices on axis {axis_name!r} do not '
                       f'split into groups of inner_group_size='
                       f'{inner_group_size}.')
    groups = [list(range(i, i + inner_group_size))
              for i in range(0, num_devices, inner_group_size)]
    return lax.pmean(tree, axis_name, axis_index_groups=groups)

  return sync


def _family_core(loss_fn: Callable[..., Any], *, has_aux: bool, form: str,
                 strength, radius: float, difference: str, num_groups: int,
                 split_argnums: Sequence[int], stacked_argnums: Sequence[int],
                 axis_name, perturbation: str, inner_group_size,
                 mean_aux: bool):
  """Builds (params, *args, scales=(s, s_r)) -> (loss, aux, grads, stats)."""
  sync = _perturbation_sync(axis_name, perturbation, inner_group_size)

  def core(params, *args, scales=(None, None)):
    strength_value = _strength_value(strength, scales[0])
    if scales[1] is None:
      radius_value = radius
    else:
      float_dtype = jnp.result_type(float)
      radius_value = (jnp.asarray(radius, float_dtype) *
                      scales[1].astype(float_dtype))

    def single(params, strength_j, *args):
      def loss_with_aux(p):
        out = loss_fn(p, *args)
        loss, aux = out if has_aux else (out, None)
        return loss, (loss, aux)
      gradient_with_aux = jax.grad(loss_with_aux, has_aux=True)
      grads, (loss, aux) = gradient_with_aux(params)
      # ĝ: the unit gradient of this device (per_device), of all devices
      # (global) or of a group of inner_group_size devices.
      direction = lax.stop_gradient(sync(grads))
      norm = jnp.sqrt(gradient_norm_sq(direction))
      inverse_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
      shift = jax.tree.map(lambda d: radius_value * inverse_norm * d, direction)
      if form == 'coefficient':
        alpha = 2.0 * strength_j * norm / radius_value   # α = 2μ‖∇L‖/r
        penalty = strength_j * norm ** 2                  # μ‖∇L‖²
      else:
        alpha = strength_j
        penalty = strength_j * radius_value * norm        # λ‖∇L‖, λ = α·r
      grads_plus, _ = gradient_with_aux(_tree_add_scaled(params, 1.0, shift))
      if difference == 'forward':
        # (1 − α)∇L(θ) + α∇L(θ + rĝ)
        combined = jax.tree.map(lambda g, gp: (1.0 - alpha) * g + alpha * gp,
                                grads, grads_plus)
      else:
        grads_minus, _ = gradient_with_aux(_tree_add_scaled(params, -1.0, shift))
        # ∇L(θ) + (α/2)(∇L(θ + rĝ) − ∇L(θ − rĝ))
        combined = jax.tree.map(
            lambda g, gp, gm: g + 0.5 * alpha * (gp - gm),
            grads, grads_plus, grads_minus)
      combined = jax.tree.map(lambda c, g: c.astype(g.dtype), combined, grads)
      return loss, aux, combined, grads, alpha, penalty

    if num_groups == 1:
      if jnp.ndim(strength_value):
        strength_value = strength_value[0]
      loss, aux, combined, grads, alpha, penalty = single(
          params, strength_value, *args)
    else:
      losses, auxes, combined, grads, alphas, penalties = _map_microbatches(
          single, params, strength_value, args, num_groups, split_argnums,
          stacked_argnums)
      loss = jnp.mean(losses)
      aux = _tree_mean0(auxes) if mean_aux else auxes
      combined, grads = _tree_mean0(combined), _tree_mean0(grads)
      alpha, penalty = jnp.mean(alphas), jnp.mean(penalties)
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)   # for the metric only
    stats = {'grad_norm_sq': gradient_norm_sq(grads),
             'penalty': penalty,
             'perturbation_alpha': jnp.asarray(alpha, jnp.float32),
             'perturbation_radius': jnp.asarray(radius_value, jnp.float32)}
    return loss, aux, combined, stats

  return core


def finite_difference_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    radius: float,
    alpha: float | Sequence[float] | None = None,
    coefficient: float | Sequence[float] | None = None,
    regularization_rate: float | Sequence[float] | None = None,
    difference: str = 'forward',
    has_aux: bool = False,
    num_groups: int = 1,
    group_argnums: Sequence[int] = (1,),
    axis_name: Any = None,
    perturbation: str = 'global',
    inner_group_size: int | None = None,
    warmup: PenaltyWarmup | None = None,
) -> Callable[..., Any]:
  """The finite-difference gradient-penalty family of gnp ([ZZH22]).

  With ĝ = ∇L/‖∇L‖ (ĝ = 0 where ∇L = 0) and a radius r > 0::

      forward:  g = (1 − α)·∇L(θ) + α·∇L(θ + r ĝ)
                  = ∇L + α·(∇L(θ + r ĝ) − ∇L(θ))
      central:  g = ∇L + (α/2)·(∇L(θ + r ĝ) − ∇L(θ − r ĝ))

  (two and three gradient evaluations). α = 1 (forward) is SAM's gradient
  ∇L(θ + rĝ) ([FKMN21]; `optax.contrib.sam` with
  `adv_optimizer = chain(normalize(), sgd(r))` gives the same update).

  Small-r limit. Taylor: ∇L(θ ± rĝ) = ∇L ± r Hĝ + (r²/2) ∇³L[ĝ,ĝ] ± O(r³),
  so both forms give g = ∇L + α r Hĝ + E with E = α(r²/2)∇³L[ĝ,ĝ] + O(αr³)
  (forward) and E = O(αr³) (central). Two ways to hold the penalty fixed as
  r → 0:

    alpha=α        (gnp's parameterisation, α = λ/r): g → ∇L + λ H∇L/‖∇L‖
                   = ∇(L + λ‖∇L‖), the penalty on the gradient norm with
                   λ = α·r; the error is O(r) (forward), O(r²) (central).
    coefficient=μ  α = 2μ‖∇L‖/r at every step: g → ∇L + 2μ H∇L
                   = ∇(L + μ‖∇L‖²), the IGR/EGR penalty of
                   `penalized_value_and_grad` (error μ‖∇L‖·r·∇³L[ĝ,ĝ] + O(r²)
                   forward, O(r²) central). The forward form is then exactly
                   `method='finite_difference'` with fd_epsilon = r.
                   [KTHO23] study finite-difference computations of this
                   penalty (their L + (γ/2)‖∇L‖², γ = 2μ).

  fullbatchtraining's 'central-differences' ([GGFSG22], GradRegularizer) is
  the central form with their `eps` = 2r (points θ ± (eps/2)ĝ, difference
  divided by eps) and an added (h/4)·block_strength·H∇L, i.e. μ =
  h·block_strength/8 here (the gradient of (h/8)·block_strength·‖∇L‖²; their
  logged full loss writes the regulariser as (h/4)·block_strength·‖∇L‖²).

  m-sharpness ([FKMN21] Section 4; google-research/sam): `num_groups` = k
  splits the batch into k groups (blocks as in `penalized_value_and_grad`),
  each perturbed along its own gradient ĝⱼ, and averages
  gⱼ = (1 − αⱼ)∇Lⱼ(θ) + αⱼ∇Lⱼ(θ + r ĝⱼ); α or μ may differ per group.

  Data parallelism (`axis_name`, inside `pmap`): `perturbation` says whose
  gradient sets ĝ::

    'global'      the all-reduced gradient (google-research/sam's
                  sync_perturbations=True); with `inner_group_size`=n, the
                  mean over each group of n consecutive devices (its
                  `inner_group_size`, via `axis_index_groups`).
    'per_device'  each device's own gradient (sync_perturbations=False).

  Each device then evaluates its own data at the perturbed point; the returned
  gradient is this device's contribution, to be averaged over `axis_name` by
  the caller (as `jreg.train` does). Under `jax.jit` over a mesh (the
  function sees the global batch) per-device perturbations are
  `num_groups` = number of devices.

  Args:
    loss_fn: `loss_fn(params, *args)` -> loss, or (loss, aux) if `has_aux`.
    radius: r > 0, the step along ĝ in parameter space (SAM's ρ).
    alpha: α (≥ 0), or one per group. Give exactly one of alpha,
      coefficient, regularization_rate.
    coefficient: μ on ‖∇L‖² (α = 2μ‖∇L‖/r), or one per group.
    regularization_rate: λ on R_IG = ‖∇L‖²/m (μ = λ/m), or one per group.
    difference: 'forward' | 'central'.
    has_aux: whether `loss_fn` returns (loss, aux); aux is from θ (stacked
      over groups).
    num_groups: k, the m-sharpness groups.
    group_argnums: positions in `loss_fn`'s signature (params is 0) of the
      batched arguments split into groups.
    axis_name: the pmap axis, or None.
    perturbation: 'global' | 'per_device'.
    inner_group_size: devices per synchronised group (with 'global').
    warmup: a `PenaltyWarmup`; the returned function then takes `step=t`.

  Returns:
    `f(params, *args[, step]) -> ((loss, aux), grads)` if has_aux else
    `(loss, grads)`; loss is L(θ) (mean over groups).
  """
  _check_family_options(radius, difference, perturbation, inner_group_size,
                        num_groups)
  form, strength = _resolve_family_strength(alpha, coefficient,
                                            regularization_rate, 1)
  _check_block_strengths(strength, num_groups)
  _check_warmup(warmup, allow_radius=form == 'alpha')

  def value_and_grad(params, *args, step=None):
    _, strength_m = _resolve_family_strength(
        alpha, coefficient, regularization_rate, count_params(params))
    core = _family_core(
        loss_fn, has_aux=has_aux, form=form, strength=strength_m,
        radius=float(radius), difference=difference, num_groups=num_groups,
        split_argnums=tuple(group_argnums), stacked_argnums=(),
        axis_name=axis_name, perturbation=perturbation,
        inner_group_size=inner_group_size, mean_aux=False)
    loss, aux, grads, _ = core(params, *args,
                               scales=_warmup_scales(warmup, step))
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return value_and_grad


def finite_difference_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    radius: float,
    alpha: float | Sequence[float] | None = None,
    coefficient: float | Sequence[float] | None = None,
    regularization_rate: float | Sequence[float] | None = None,
    difference: str = 'forward',
    num_groups: int = 1,
    perturbation: str = 'global',
    inner_group_size: int | None = None,
    warmup: PenaltyWarmup | None = None,
    learning_rate: float | None = None,
) -> Callable[..., Any]:
  """A `grad_fn` for `jreg.train.fit` following the finite-difference family.

  The family, its parameters and its limits are those of
  `finite_difference_value_and_grad`; this wraps it in the engine contract
  like `gradient_penalty_grad_fn` (model state from the plain evaluation at
  θ; one key per group; with `warmup`, build `init_fn` with
  `with_penalty_step_counter`). The engine passes `axis_name` in pmap mode.

  Metrics added: 'grad_norm_sq', 'r_ig', 'igr_rate' (with `learning_rate`) as
  in `gradient_penalty_grad_fn`; 'penalty' the small-r penalty the step
  follows (μ‖∇L‖², or λ‖∇L‖ with λ = α·r; mean over groups);
  'perturbation_alpha' α (mean over groups); 'perturbation_radius' r(t);
  'penalty_scale' s(t) with `warmup`.

  Returns:
    grad_fn(params, model_state, rng, batch, axis_name=None).
  """
  _check_family_options(radius, difference, perturbation, inner_group_size,
                        num_groups)
  form, strength = _resolve_family_strength(alpha, coefficient,
                                            regularization_rate, 1)
  _check_block_strengths(strength, num_groups)
  _check_warmup(warmup, allow_radius=form == 'alpha')

  def build_core(m, axis_name, stacked_argnums):
    _, strength_m = _resolve_family_strength(alpha, coefficient,
                                             regularization_rate, m)
    return _family_core(
        loss_fn, has_aux=True, form=form, strength=strength_m,
        radius=float(radius), difference=difference, num_groups=num_groups,
        split_argnums=(3,), stacked_argnums=stacked_argnums,
        axis_name=axis_name, perturbation=perturbation,
        inner_group_size=inner_group_size, mean_aux=True)

  return _engine_grad_fn(build_core, num_microbatches=num_groups,
                         learning_rate=learning_rate, warmup=warmup)


# ---------------------------------------------------------------------------
# The unbiased split-batch penalty ([RWDB21]'s cross-product estimators).
# ---------------------------------------------------------------------------


def unbiased_gradient_norm_sq(split_grads: PyTree) -> jax.Array:
  """U = (1/(k(k−1))) Σ_{i≠j} ⟨gᵢ, gⱼ⟩ from k split gradients stacked [k, ...].

  With gᵢ the gradients of k disjoint, equal splits of one minibatch of B
  examples drawn independently (with replacement) from the data
  distribution, every gᵢ has mean ∇L and the splits are independent, so

      E[U] = ‖∇L‖²                                       (unbiased)
      E‖ḡ‖² = ‖∇L‖² + tr(Σ)/B,   ḡ = (1/k) Σᵢ gᵢ          (biased upward)

  with Σ the covariance of a single example's gradient. For k = 2 this is
  ⟨g_A, g_B⟩. Computed as (‖Σᵢ gᵢ‖² − Σᵢ‖gᵢ‖²)/(k(k−1)).

  Drawn without replacement from N examples (one shuffled epoch), the splits
  are slightly anti-correlated: E[U] = ‖∇L‖² − tr(Σ)/(N−1) and
  E‖ḡ‖² = ‖∇L‖² + (tr(Σ)/B)·(N−B)/(N−1), Σ the population covariance.
  """
  k = jax.tree.leaves(split_grads)[0].shape[0]
  if k < 2:
    raise ValueError(f'The unbiased estimate needs at least 2 splits, got {k}.')
  total = jax.tree.map(lambda g: jnp.sum(g, axis=0), split_grads)
  sum_of_norms = jnp.sum(jax.vmap(gradient_norm_sq)(split_grads))
  return (gradient_norm_sq(total) - sum_of_norms) / (k * (k - 1))


def _unbiased_core(loss_fn: Callable[..., Any], *, has_aux: bool, mu,
                   method: str, fd_epsilon: float, num_splits: int,
                   split_argnums: Sequence[int], stacked_argnums: Sequence[int],
                   axis_name, data_parallel: str, mean_aux: bool):
  """Builds (params, *args, scale=None) -> (loss, aux, grads, stats) for
  ∇(L + μU) = ḡ + μ Σᵢ Hᵢcᵢ,  cᵢ = (2/(k(k−1))) Σ_{j≠i} gⱼ."""
  if axis_name is not None and data_parallel == 'global':
    reduce = functools.partial(lax.pmean, axis_name=axis_name)
  else:
    reduce = lambda tree: tree  # noqa: E731
  k = num_splits

  def split_gradient(params, *args):
    def loss_with_aux(p):
      out = loss_fn(p, *args)
      loss, aux = out if has_aux else (out, None)
      return loss, (loss, aux)
    return jax.grad(loss_with_aux, has_aux=True)(params)

  def map_splits(fn, params, block_value, args, mapped):
    return _map_microbatches(fn, params, block_value, args, k, split_argnums,
                             stacked_argnums, block_value_mapped=mapped)

  def cotangents(grads):   # [k, ...] -> cᵢ = (2/(k(k−1)))(Σⱼ gⱼ − gᵢ)
    scale = 2.0 / (k * (k - 1))
    return jax.tree.map(
        lambda g: (scale * (jnp.sum(g, axis=0, keepdims=True) - g)).astype(g.dtype),
        grads)

  def core(params, *args, scale=None):
    mu_value = _strength_value(mu, scale)
    grads_of = lambda p: map_splits(  # noqa: E731
        lambda q, _, *a: split_gradient(q, *a), p, None, args, False)
    if method == 'double_backprop':
      # Σᵢ Hᵢcᵢ = VJP of θ ↦ [∇Lᵢ(θ)]ᵢ at the cotangent [cᵢ]ᵢ.
      grads_local, vjp_fn, (losses, auxes) = jax.vjp(grads_of, params,
                                                     has_aux=True)
      grads = reduce(grads_local)
      (hess_term,) = vjp_fn(cotangents(lax.stop_gradient(grads)))
    else:
      grads_local, (losses, auxes) = grads_of(params)
      grads = reduce(grads_local)
      cots = cotangents(lax.stop_gradient(grads))
      if method == 'hvp':
        def hvp_one(p, c, *a):   # Hᵢcᵢ, forward-over-reverse
          return jax.jvp(lambda q: split_gradient(q, *a)[0], (p,), (c,))[1]
        products = map_splits(hvp_one, params, cots, args, True)
      else:   # 'finite_difference': Hᵢcᵢ ≈ (∇Lᵢ(θ + ε ĉᵢ) − ∇Lᵢ(θ))‖cᵢ‖/ε
        def shifted_one(p, c, *a):
          norm = jnp.sqrt(gradient_norm_sq(c))
          safe = jnp.where(norm > 0, norm, 1.0)
          return split_gradient(_tree_add_scaled(p, fd_epsilon / safe, c), *a)[0]
        shifted = reduce(map_splits(shifted_one, params, cots, args, True))
        norms = jax.vmap(lambda c: jnp.sqrt(gradient_norm_sq(c)))(cots)  # [k]
        factor = jnp.where(norms > 0, norms / fd_epsilon, 0.0)
        products = jax.tree.map(
            lambda s, g: (factor.reshape((k,) + (1,) * (g.ndim - 1)) *
                          (s - g)).astype(g.dtype), shifted, grads)
      hess_term = jax.tree.map(lambda h: jnp.sum(h, axis=0), products)
    hess_term = reduce(hess_term)
    mean_grads = _tree_mean0(grads)
    penalized = _tree_add_scaled(mean_grads, mu_value, hess_term)
    estimate = unbiased_gradient_norm_sq(grads)
    full_grads = mean_grads
    if axis_name is not None and data_parallel == 'per_device':
      full_grads = lax.pmean(full_grads, axis_name)
    loss = jnp.mean(losses)
    aux = _tree_mean0(auxes) if mean_aux else auxes
    stats = {'grad_norm_sq': gradient_norm_sq(full_grads),
             'grad_norm_sq_unbiased': estimate,
             'penalty': mu_value * estimate}
    return loss, aux, penalized, stats

  return core


def _check_splits(num_splits) -> None:
  if int(num_splits) != num_splits or num_splits < 2:
    raise ValueError(f'num_splits must be an integer >= 2, got {num_splits!r}.')


def unbiased_penalty_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | None = None,
    regularization_rate: float | None = None,
    num_splits: int = 2,
    split_argnums: Sequence[int] = (1,),
    method: Method = 'double_backprop',
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    has_aux: bool = False,
    axis_name: Any = None,
    data_parallel: DataParallel = 'global',
    warmup: PenaltyWarmup | None = None,
) -> Callable[..., Any]:
  """Value and gradient of L + μU, U the unbiased estimate of ‖∇L‖².

  ‖∇L_B‖² on a minibatch overestimates ‖∇L‖² by the gradient noise,
  tr(Σ)/B (`unbiased_gradient_norm_sq`), so L + μ‖∇L_B‖² penalises the noise
  as well as the gradient. Splitting the batch into k independent splits and
  penalising U = (1/(k(k−1))) Σ_{i≠j}⟨gᵢ, gⱼ⟩ removes that term ([RWDB21]'s
  unbiased cross-product estimators). Its gradient is

      ∇U = (2/(k(k−1))) Σᵢ Hᵢ Σ_{j≠i} gⱼ     (k = 2: ∇⟨g_A, g_B⟩ = H_A g_B + H_B g_A)

  whose expectation is 2H∇L, the gradient of ‖∇L‖²; the returned gradient is
  ḡ + μ∇U with ḡ the batch gradient. The Hessian products Hᵢcᵢ come from one
  VJP of the stacked split gradients ('double_backprop'), a JVP per split
  ('hvp', which evaluates the split gradients twice) or forward differences
  along ĉᵢ ('finite_difference').

  With data_parallel='global' under `pmap`, split i gathers slice i of every
  device's batch (U is that of the global batch); with 'per_device' each
  device penalises its own unbiased estimate (each is unbiased; the caller's
  average is too).

  Args:
    loss_fn: `loss_fn(params, *args)` -> loss, or (loss, aux) if `has_aux`
      (aux stacked over splits).
    coefficient: μ, on U (≈ ‖∇L‖²).
    regularization_rate: λ, on U/m. Give exactly one of the two.
    num_splits: k ≥ 2; the batch size must be divisible by k.
    split_argnums: positions (params is 0) of the batched arguments.
    method: 'double_backprop' | 'hvp' | 'finite_difference'.
    fd_epsilon: ε for 'finite_difference'.
    has_aux: whether `loss_fn` returns (loss, aux).
    axis_name: the pmap axis, or None.
    data_parallel: 'global' | 'per_device'.
    warmup: a `PenaltyWarmup` ('lambda' or 'zero'); then call with `step=t`.

  Returns:
    `f(params, *args[, step]) -> ((loss, aux), grads)` or `(loss, grads)`.
  """
  _check_options(method, data_parallel, 1, fd_epsilon)
  _check_splits(num_splits)
  if not isinstance(_resolve_coefficient(coefficient, regularization_rate, 1),
                    float):
    raise ValueError('The unbiased penalty takes one coefficient, not one per '
                     'split.')
  _check_warmup(warmup, allow_radius=False)

  def value_and_grad(params, *args, step=None):
    mu = _resolve_coefficient(coefficient, regularization_rate,
                              count_params(params))
    core = _unbiased_core(
        loss_fn, has_aux=has_aux, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_splits=num_splits, split_argnums=tuple(split_argnums),
        stacked_argnums=(), axis_name=axis_name, data_parallel=data_parallel,
        mean_aux=False)
    loss, aux, grads, _ = core(params, *args,
                               scale=_warmup_scales(warmup, step)[0])
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return value_and_grad


def unbiased_penalty_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | None = None,
    regularization_rate: float | None = None,
    num_splits: int = 2,
    method: Method = 'double_backprop',
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    data_parallel: DataParallel = 'global',
    warmup: PenaltyWarmup | None = None,
    learning_rate: float | None = None,
) -> Callable[..., Any]:
  """A `grad_fn` for `jreg.train.fit` following ∇(L + μU) (see
  `unbiased_penalty_value_and_grad`); one key per split, model state and
  metrics averaged over splits.

  Metrics added: 'grad_norm_sq' (‖ḡ‖², the biased batch value), 'r_ig',
  'igr_rate' (with `learning_rate`), 'grad_norm_sq_unbiased' (U), 'penalty'
  (μU), 'penalty_scale' (with `warmup`).
  """
  _check_options(method, data_parallel, 1, fd_epsilon)
  _check_splits(num_splits)
  if not isinstance(_resolve_coefficient(coefficient, regularization_rate, 1),
                    float):
    raise ValueError('The unbiased penalty takes one coefficient, not one per '
                     'split.')
  _check_warmup(warmup, allow_radius=False)

  def build_core(m, axis_name, stacked_argnums):
    mu = _resolve_coefficient(coefficient, regularization_rate, m)
    core = _unbiased_core(
        loss_fn, has_aux=True, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_splits=num_splits, split_argnums=(3,),
        stacked_argnums=stacked_argnums, axis_name=axis_name,
        data_parallel=data_parallel, mean_aux=True)
    return lambda *args, scales: core(*args, scale=scales[0])

  return _engine_grad_fn(build_core, num_microbatches=num_splits,
                         learning_rate=learning_rate, warmup=warmup)
