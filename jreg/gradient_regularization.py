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
says which:

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
                       error O(ε) (a forward difference).

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
import functools
import math
from typing import Any, Literal

import jax
from jax import lax
import jax.numpy as jnp

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


def _resolve_coefficient(coefficient: float | None,
                         regularization_rate: float | None,
                         num_params: int) -> float:
  """μ from exactly one of μ (on ‖∇L‖²) and λ (on R_IG)."""
  if (coefficient is None) == (regularization_rate is None):
    raise ValueError('Give exactly one of coefficient (μ, multiplying ‖∇L‖²) '
                     'and regularization_rate (λ, multiplying R_IG = ‖∇L‖²/m).')
  if coefficient is not None:
    mu = float(coefficient)
  else:
    mu = coefficient_from_rate(float(regularization_rate), num_params)
  if not math.isfinite(mu) or mu < 0:
    raise ValueError(f'The gradient penalty coefficient must be a finite number '
                     f'>= 0, got μ = {mu}.')
  return mu


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
                        params: PyTree, mu: float, method: str,
                        fd_epsilon: float,
                        reduce: Callable[[PyTree], PyTree]):
  """g + 2μ H g for g = reduce(∇L(θ)).

  Args:
    gradient_with_aux: θ ↦ (∇L(θ), aux); called once at θ (its aux is the one
      returned), and, for 'finite_difference', once more at a shifted θ.
    params: θ.
    mu: μ, the coefficient on ‖g‖².
    method: how H g is computed (see the module docstring).
    fd_epsilon: ε for 'finite_difference'.
    reduce: identity, or `lax.pmean` over the data axis for the global-batch
      gradient; applied to g and to H_local g (H = mean of the local Hessians).

  Returns:
    (penalised gradient, g, aux), with g the gradient whose norm is penalised.
  """
  if mu == 0.0:
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


def _penalized_core(loss_fn: Callable[..., Any], *, has_aux: bool, mu: float,
                    method: str, fd_epsilon: float, num_microbatches: int,
                    split_argnums: Sequence[int], stacked_argnums: Sequence[int],
                    axis_name, data_parallel: str, mean_aux: bool):
  """Builds (params, *args) -> (loss, aux, penalised grads, stats).

  With k = num_microbatches > 1 the arguments at `split_argnums` (positions in
  `loss_fn`'s signature, params is 0) are split [B, ...] -> [k, B/k, ...], the
  ones at `stacked_argnums` already carry a leading axis of size k, and the
  penalised gradient of each microbatch is computed under `jax.vmap`.

  stats: 'grad_norm_sq' ‖∇L‖² of the full (and, with `axis_name`, global)
  batch gradient; 'penalized_norm_sq' the quantity multiplied by μ (‖g‖²,
  or the mean over microbatches / devices of their ‖gⱼ‖²).
  """
  if axis_name is not None and data_parallel == 'global':
    reduce = functools.partial(lax.pmean, axis_name=axis_name)
  else:
    reduce = lambda tree: tree  # noqa: E731

  def single(params, *args):
    def loss_with_aux(p):
      out = loss_fn(p, *args)
      loss, aux = out if has_aux else (out, None)
      return loss, (loss, aux)
    gradient_with_aux = jax.grad(loss_with_aux, has_aux=True)
    penalized, grads, (loss, aux) = _penalized_gradient(
        gradient_with_aux, params, mu, method, fd_epsilon, reduce)
    return loss, aux, penalized, grads

  def core(params, *args):
    if num_microbatches == 1:
      loss, aux, penalized, grads = single(params, *args)
      full_grads = grads
      penalized_norm_sq = gradient_norm_sq(grads)
    else:
      for i in tuple(split_argnums) + tuple(stacked_argnums):
        if not 1 <= i <= len(args):
          raise ValueError(f'Microbatch argument {i} does not exist: loss_fn '
                           f'gets params and {len(args)} more arguments.')
      split_args = tuple(
          _split_microbatches(a, num_microbatches)
          if i + 1 in split_argnums else a for i, a in enumerate(args))
      mapped = set(split_argnums) | set(stacked_argnums)
      in_axes = (None,) + tuple(0 if i + 1 in mapped else None
                                for i in range(len(args)))
      losses, auxes, penalized, grads = jax.vmap(single, in_axes=in_axes)(
          params, *split_args)
      loss = jnp.mean(losses)
      aux = _tree_mean0(auxes) if mean_aux else auxes
      penalized_norm_sq = jnp.mean(jax.vmap(gradient_norm_sq)(grads))
      penalized = _tree_mean0(penalized)
      full_grads = _tree_mean0(grads)
    if axis_name is not None and data_parallel == 'per_device':
      # The penalty is local, but R_IG is a property of the global gradient.
      full_grads = lax.pmean(full_grads, axis_name)
    stats = {'grad_norm_sq': gradient_norm_sq(full_grads),
             'penalized_norm_sq': penalized_norm_sq}
    return loss, aux, penalized, stats

  return core


def penalized_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | None = None,
    regularization_rate: float | None = None,
    method: Method = 'double_backprop',
    has_aux: bool = False,
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    num_microbatches: int = 1,
    microbatch_argnums: Sequence[int] = (1,),
    axis_name: Any = None,
    data_parallel: DataParallel = 'global',
) -> Callable[..., Any]:
  """Value and gradient of L + μ‖∇L‖², like `jax.value_and_grad` (argnums=0).

  The returned function is pure: use it inside `jax.jit` or `jax.pmap` and
  feed its gradient to any optax optimiser.

      grad = ∇L + 2μ H∇L                      (num_microbatches = 1)
      grad = (1/k) Σⱼ (∇Lⱼ + 2μ Hⱼ∇Lⱼ)        (k microbatches, [SDBD21])

  Args:
    loss_fn: `loss_fn(params, *args)` returning a scalar loss, or
      `(loss, aux)` when `has_aux`.
    coefficient: μ, the coefficient on ‖∇L‖² (sum over parameters).
    regularization_rate: λ, the coefficient on R_IG = ‖∇L‖²/m (IGR units;
      μ = λ/m, m counted from `params`). Give exactly one of the two.
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

  Returns:
    f(params, *args) -> ((loss, aux), grads) if has_aux else (loss, grads).
  """
  _check_options(method, data_parallel, num_microbatches, fd_epsilon)
  _resolve_coefficient(coefficient, regularization_rate, 1)  # fail early

  def value_and_grad(params, *args):
    mu = _resolve_coefficient(coefficient, regularization_rate,
                              count_params(params))
    core = _penalized_core(
        loss_fn, has_aux=has_aux, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_microbatches=num_microbatches,
        split_argnums=tuple(microbatch_argnums), stacked_argnums=(),
        axis_name=axis_name, data_parallel=data_parallel, mean_aux=False)
    loss, aux, grads, _ = core(params, *args)
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return value_and_grad


def gradient_penalty_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    coefficient: float | None = None,
    regularization_rate: float | None = None,
    learning_rate: float | None = None,
    method: Method = 'double_backprop',
    fd_epsilon: float = DEFAULT_FD_EPSILON,
    num_microbatches: int = 1,
    data_parallel: DataParallel = 'global',
) -> Callable[..., Any]:
  """A `grad_fn` for `jreg.train.fit` that follows ∇(L + μ‖∇L‖²).

  `loss_fn(params, model_state, rng, batch) -> (loss, (model_state, metrics))`
  becomes `grad_fn(params, model_state, rng, batch, axis_name=None) ->
  ((loss, (model_state, metrics)), grads)` (the contract in BUILD_NOTES.md).
  The model state returned is the one from the plain evaluation at θ; the
  extra evaluations start from the same input state and their state is
  dropped. With `coefficient=0` the gradient is the plain one and only the
  metrics are added, so a plain-SGD run logs R_IG the same way.

  Metrics added (logged with the loss):
    'grad_norm_sq'  ‖∇L‖² of the (global, full) batch gradient.
    'r_ig'          R_IG = ‖∇L‖²/m ([BD21] Section 3).
    'igr_rate'      λ = h·m/4 for the given `learning_rate` h (only if given).
    'penalty'       the explicit penalty added to the loss: μ‖∇L‖², or
                    μ (1/k) Σⱼ ‖∇Lⱼ‖² with microbatches / per-device.

  Args:
    loss_fn: the engine's loss function (contract above).
    coefficient: μ, on ‖∇L‖² (sum over parameters).
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

  Returns:
    grad_fn(params, model_state, rng, batch, axis_name=None).
  """
  _check_options(method, data_parallel, num_microbatches, fd_epsilon)
  _resolve_coefficient(coefficient, regularization_rate, 1)  # fail early

  def grad_fn(params, model_state, rng, batch, axis_name=None):
    m = count_params(params)
    mu = _resolve_coefficient(coefficient, regularization_rate, m)
    stacked_argnums = ()
    if num_microbatches > 1 and rng is not None:
      rng = jax.random.split(rng, num_microbatches)   # one key per microbatch
      stacked_argnums = (2,)
    core = _penalized_core(
        loss_fn, has_aux=True, mu=mu, method=method, fd_epsilon=fd_epsilon,
        num_microbatches=num_microbatches, split_argnums=(3,),
        stacked_argnums=stacked_argnums, axis_name=axis_name,
        data_parallel=data_parallel, mean_aux=True)
    loss, (new_state, metrics), grads, stats = core(
        params, model_state, rng, batch)
    metrics = dict(metrics)
    metrics['grad_norm_sq'] = stats['grad_norm_sq']
    metrics['r_ig'] = stats['grad_norm_sq'] / m
    metrics['penalty'] = mu * stats['penalized_norm_sq']
    if learning_rate is not None:
      metrics['igr_rate'] = jnp.asarray(
          implicit_regularization_rate(learning_rate, m), jnp.float32)
    return (loss, (new_state, metrics)), grads

  return grad_fn
