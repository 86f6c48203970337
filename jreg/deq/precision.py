"""Mixed precision for fixed-point layers: the cell in bfloat16 / float16.

Policy (Micikevicius et al., "Mixed Precision Training", ICLR 2018, Sec. 3;
the same split as DeepMind's `jmp` and torchdeq's mixed-precision runs):

  * master copies: the parameters, the solver state z, the residuals, the
    Anderson least-squares system and the Broyden low-rank updates stay in
    float32 (`jreg.deq.solvers` works in the state's dtype and promotes
    anything lower to float32 for residuals and the Gram system);
  * compute: each evaluation of the cell casts the floating leaves of
    (params, z, x) to `compute_dtype`, runs the cell there, and casts its
    output back to the dtype of z (float32);
  * gradients: the backward solve u = J_f^T u + dl/dz* keeps u in float32;
    each vector-Jacobian product is the VJP of the cast cell, so its
    cotangent is rounded to `compute_dtype`, the cell's backward runs there
    and the results (dl/dz, dl/dparams, dl/dx) come back in float32; the
    parameter gradients therefore have the parameters' float32 dtype. The
    Jacobian term and the spectral radius use the same cast cell, so their
    VJPs run in `compute_dtype` and their sums of squares / norms in float32.

float16 has 5 exponent bits (normal range 6.1e-5 .. 65504), so small
cotangents underflow (Micikevicius et al., Sec. 3.2, loss scaling). With
`compute_dtype=float16` every VJP of the cast cell therefore scales its
float32 cotangent by the power of two s = 2^-floor(log2 max|g|), so that its
largest entry lies in [1, 2), runs the float16 VJP on s g and divides the
float32 results by s: exact in exact arithmetic (VJPs are linear in g, and a
power of two changes no mantissa), and local to each VJP, so it follows the
cotangent's scale as it changes over the backward solve (no global loss
scale to tune). bfloat16 has float32's exponent range and needs no scaling.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Cell = Callable[[PyTree, PyTree, PyTree], PyTree]
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')


def compute_dtype_of(name_or_dtype) -> Optional[jnp.dtype]:
  """None for float32 / None (no casting), else bfloat16 or float16.

  Raises:
    ValueError: any other dtype.
  """
  if name_or_dtype is None:
    return None
  try:
    dtype = jnp.dtype(name_or_dtype)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype must be one of {COMPUTE_DTYPES} (or None), '
                     f'got {name_or_dtype!r}.')
  return None if dtype == jnp.float32 else dtype


def _cast_floating(tree: PyTree, dtype) -> PyTree:
  """Casts the inexact leaves of `tree` to `dtype`; others pass unchanged."""
  def cast(leaf):
    if isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(
        leaf.dtype, jnp.inexact):
      return leaf.astype(dtype)
    return leaf
  return jax.tree.map(cast, tree)


def _power_of_two_scale(tree: PyTree) -> jax.Array:
  """2^-floor(log2 max|leaf|) over the floating leaves (1 if all are 0)."""
  peaks = [jnp.max(jnp.abs(l)).astype(jnp.float32) for l in jax.tree.leaves(tree)
           if jnp.issubdtype(l.dtype, jnp.inexact) and l.size]
  if not peaks:
    return jnp.ones([], jnp.float32)
  peak = jnp.max(jnp.stack(peaks))
  ok = jnp.isfinite(peak) & (peak > 0)
  exponent = jnp.floor(jnp.log2(jnp.where(ok, peak, 1.0)))
  return jnp.exp2(jnp.clip(-exponent, -126.0, 126.0))  # finite in float32


def mixed_precision_cell(cell: Cell, compute_dtype=None) -> Cell:
  """The cell (params, z, x) -> z evaluated in `compute_dtype` (see module doc).

  Args:
    cell: pure function (params, z, x) -> z-like pytree.
    compute_dtype: None or 'float32' (returns `cell` itself), 'bfloat16' /
      jnp.bfloat16, or 'float16' / jnp.float16.

  Returns:
    A cell with the same signature whose outputs have the dtypes of z's
    leaves (float32 for a float32 state), whose VJPs return float32
    cotangents for float32 inputs, and which runs `cell` on
    (params, z, x) cast to `compute_dtype`. For float16 each VJP is
    scaled by a power of two (module docstring).
  """
  dtype = compute_dtype_of(compute_dtype)
  if dtype is None:
    return cell

  def cast_cell(params, z, x):
    out = cell(_cast_floating(params, dtype), _cast_floating(z, dtype),
               _cast_floating(x, dtype))
    out_leaves, treedef = jax.tree.flatten(out)
    z_leaves = jax.tree.leaves(z)
    if len(out_leaves) != len(z_leaves):
      raise ValueError(f'the cell returned {len(out_leaves)} arrays for a state '
                       f'of {len(z_leaves)}; f(z) must have the structure of z.')
    return jax.tree.unflatten(treedef, [o.astype(s.dtype) for o, s in
                                        zip(out_leaves, z_leaves)])

  if dtype != jnp.float16:
    return cast_cell

  @jax.custom_vjp
  def scaled_cell(params, z, x):
    return cast_cell(params, z, x)

  def fwd(params, z, x):
    out, vjp = jax.vjp(cast_cell, params, z, x)  # vjp: a pytree (Partial)
    return out, vjp

  def bwd(vjp, g):
    scale = _power_of_two_scale(g)
    cotangents = vjp(jax.tree.map(lambda a: a * scale.astype(a.dtype), g))
    return jax.tree.map(
        lambda a: a / scale.astype(a.dtype)
        if jnp.issubdtype(a.dtype, jnp.inexact) else a, cotangents)

  scaled_cell.defvjp(fwd, bwd)
  return scaled_cell
