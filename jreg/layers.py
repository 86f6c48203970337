"""Convolution and GroupNorm written for fast gradients inside solver loops.

A DEQ runs its cell, and the cell's vector-Jacobian products, inside
`lax.while_loop` (early-stopping solvers, forward and backward) and under
`lax.cond` (the gated Jacobian term). XLA:CPU runs a convolution fast only in
its canonical form (NHWC input, HWIO kernel, no dilation, no kernel
reversal); the gradients autodiff emits for `lax.conv_general_dilated` are
other forms (reversed kernel and swapped feature dimensions for the input
gradient; the batch as the contracted feature dimension for the weight
gradient), which XLA:CPU normalises to the fast form only outside control
flow. Inside loops and conditionals they fall back to a naive loop nest,
measured at 20x (input gradient) and over 100x (weight gradient) slower.

`conv2d` therefore carries its own VJP. With out = x * w (cross-correlation,
stride s, padding (lo, hi), kernel size K; one spatial axis shown):

  out[m]  = sum_k xpad[s m + k] w[k]
  dx[i]   = sum_k gd[i + lo - k] w[k]     = (gd_p * flip(w)^T)[i]
  dw[k]   = sum_{b, m} xpad[s m + k] g[m] = (xpad^T * gd^T)[k]

where gd is the cotangent g dilated by s (s - 1 zeros between entries) and
gd_p is gd padded by K - 1 - lo on the left; flip(w)^T reverses the kernel's
spatial axes and swaps its input and output channels. The input gradient is
a canonical forward convolution (exactly what cuDNN's backward-data
algorithm computes); the weight gradient is one matmul per kernel tap k (the
strided window xpad[s m + k] of every example against g, contracted over
batch and positions, in row groups: `_weight_gradient`). The backward pass
calls `conv2d` and matmuls only, so it is differentiable again in reverse
mode (the Jacobian term differentiates a VJP of the cell) with every
derivative canonical.

Backends: the rewritten backward is used on CPU only. On GPU and TPU the
backward is `jax.vjp` of `lax.conv_general_dilated`, i.e. exactly the ops
autodiff emits without this module, which those compilers map to their own
backward-data and backward-filter kernels; so accelerator users inherit
nothing measured only on CPU. `jax.custom_vjp` has no forward-mode rule:
`jax.jvp` / `jax.linearize` / `jax.jacfwd` through the custom convolution
fail; jreg's DEQ tools use reverse mode only (`jreg.deq.spectral_radius`
iterates VJPs). Select `impl='xla'` (or the context `implementation('xla')`)
for plain autodiff, e.g. for Hessian-vector products by forward-over-reverse.

`group_norm` computes the statistics in one pass in the activations' layout:
per-channel sums of x and x^2 over the spatial axes (a reduction over the
second axis of [B, H*W, C], contiguous in C), then sums over each group's
channels on the small [B, C] arrays:

  mu_g = E[x],  var_g = max(E[x^2] - mu_g^2, 0),
  y = (x - mu_g) / sqrt(var_g + eps) * scale + offset

(Wu & He, "Group Normalization", ECCV 2018). This is the same function as
`hk.GroupNorm` (which reduces over [B, H, W, G, C/G] in two passes, 10x slower
on XLA:CPU); it is differentiated by autodiff (forward and reverse mode).
The one-pass variance loses precision when `|mean| >> std` (float32 keeps
about 7 digits of E[x^2]); normalised DEQ activations are far from that.

For bfloat16 / float16 inputs the statistics and the normalisation are
computed in float32 and only y is rounded to the input's dtype (reductions
in float32: Micikevicius et al., "Mixed Precision Training", ICLR 2018,
Sec. 3.3; x * gain + bias in low precision would cancel digits when
`|mean| >> std`).

`avg_pool` averages non-overlapping windows (stride = window, 'VALID') as a
reshape and a mean, [B, H, W, C] -> [B, H/k, k, W/k, k, C] -> mean over both
k axes: the same values as `hk.avg_pool`, whose gradient (the transpose of
XLA's reduce_window) XLA:CPU runs 45x slower (89 ms against 1.9 ms at
[64, 32, 32, 48], window 8). Other windows fall back to `hk.avg_pool`.

`spectral_normalize` wraps any Haiku function so that its weight matrices
and kernels are divided by their largest singular value, estimated by power
iteration without Haiku state (Miyato et al., ICLR 2018; see below).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ('custom', 'xla')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_IMPLEMENTATION = contextvars.ContextVar('jreg_layers_implementation',
                                         default='custom')

Padding = Union[str, Sequence[tuple[int, int]]]


@contextlib.contextmanager
def implementation(name: str):
  """Within the context (at trace time), layers default to `name`.

  'custom' (the default): `conv2d` with its own VJP and the one-pass
  `group_norm`; 'xla': `lax.conv_general_dilated` differentiated by autodiff
  and GroupNorm in `hk.GroupNorm`'s two-pass form (the code path before this
  module existed, kept for comparisons and forward-mode autodiff).
  """
  _check_implementation(name)
  token = _IMPLEMENTATION.set(name)
  try:
    yield
  finally:
    _IMPLEMENTATION.reset(token)


def current_implementation() -> str:
  """The implementation layers use when called with `impl=None`."""
  return _IMPLEMENTATION.get()


def _check_implementation(name):
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown layer implementation {name!r}; use one of '
                     f'{IMPLEMENTATIONS}.')


def _resolve(impl: Optional[str]) -> str:
  impl = _IMPLEMENTATION.get() if impl is None else impl
  _check_implementation(impl)
  return impl


def _explicit_padding(padding: Padding, kernel: tuple[int, int],
                      strides: tuple[int, int],
                      spatial: tuple[int, int]) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(spatial, kernel, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


# Row groups of the weight gradient's contraction (a power of two; fewer when
# B * H' * W' has fewer factors of two).
_WEIGHT_GRADIENT_GROUPS = 16


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
  x, w = residuals
  if jax.default_backend() != 'cpu':
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding), x, w)
    return vjp(g)
  (kh, kw), (sh, sw) = w.shape[:2], strides
  (lo_h, hi_h), (lo_w, hi_w) = padding
  _, h_in, w_in, _ = x.shape
  _, h_out, w_out, _ = g.shape
  # Input gradient: g dilated by the stride, padded so that a VALID
  # correlation with the flipped, channel-swapped kernel gives [B, H, W, C_in].
  right_h = h_in + lo_h - sh * (h_out - 1) - 1
  right_w = w_in + lo_w - sw * (w_out - 1) - 1
  g_padded = lax.pad(g, jnp.zeros((), g.dtype),
                     ((0, 0, 0), (kh - 1 - lo_h, right_h, sh - 1),
                      (kw - 1 - lo_w, right_w, sw - 1), (0, 0, 0)))
  w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # [kh, kw, C_out, C_in]
  dx = _conv(g_padded, w_flipped, (1, 1), ((0, 0), (0, 0)))
  x_padded = lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (lo_h, kh + sh * (h_out - 1) - h_in - lo_h, 0),
                      (lo_w, kw + sw * (w_out - 1) - w_in - lo_w, 0),
                      (0, 0, 0)))
  return dx, _weight_gradient(x_padded, g, (kh, kw), (sh, sw))


def _weight_gradient(x_padded, g, kernel, strides):
  """dw[i, j] = sum_{b, m, n} xpad[b, s m + i, s n + j] g[b, m, n], as matmuls.

  One matmul per kernel tap (i, j): the strided window of the padded input
  that tap sees, `[R, C_in]` with R = B * H' * W' rows, contracted with the
  cotangent `[R, C_out]`. The R rows are split into G groups contracted
  separately and summed (`[G, C_in, C_out]`), which gives XLA:CPU's matmul
  G independent blocks to run in parallel: a single contraction over R with
  a `[C_in, C_out]` result runs at a fifth of matmul speed. The taps run in
  `lax.map`, so one window is alive at a time (memory of one input, not
  kh * kw of them). Measured at the benchmark's shape ([64, 32, 32, 48] ->
  64 channels, 3x3): 84 ms, against 107-136 ms for autodiff's weight
  gradient outside control flow (9.7 s inside `lax.cond`) and 247 ms for the
  same contraction written as a forward convolution with the batch as its
  feature axis.
  """
  (kh, kw), (sh, sw) = kernel, strides
  batch, h_out, w_out, c_out = g.shape
  c_in = x_padded.shape[-1]
  rows = batch * h_out * w_out
  groups = math.gcd(rows, _WEIGHT_GRADIENT_GROUPS)
  g_rows = g.reshape(groups, rows // groups, c_out)
  extent = (batch, sh * (h_out - 1) + 1, sw * (w_out - 1) + 1, c_in)

  def tap(index):
    i, j = index // kw, index % kw
    window = lax.dynamic_slice(x_padded, (0, i, j, 0), extent)
    window = window[:, ::sh, ::sw, :]                      # [B, H', W', C_in]
    return jnp.einsum('grc,gro->gco', window.reshape(groups, -1, c_in),
                      g_rows).sum(0)

  dw = lax.map(tap, jnp.arange(kh * kw))                   # [kh * kw, C_in, C_out]
  return dw.reshape(kh, kw, c_in, c_out)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = 'SAME', impl: Optional[str] = None) -> jax.Array:
  """2-D cross-correlation, NHWC input and HWIO kernel.

  Args:
    x: [B, H, W, C_in].
    w: [kh, kw, C_in, C_out].
    strides: (s_h, s_w).
    padding: 'SAME', 'VALID' or ((lo_h, hi_h), (lo_w, hi_w)).
    impl: 'custom' (own VJP, see module docstring), 'xla' (autodiff of
      `lax.conv_general_dilated`), or None for `current_implementation()`.

  Returns:
    [B, H', W', C_out], the same values as `lax.conv_general_dilated`.
  """
  strides = tuple(int(s) for s in strides)
  padding = _explicit_padding(padding, w.shape[:2], strides, x.shape[1:3])
  if _resolve(impl) == 'xla':
    return _xla_conv(x, w, strides, padding)
  return _conv(x, w, strides, padding)


def group_norm(x: jax.Array, groups: int, scale: Optional[jax.Array] = None,
               offset: Optional[jax.Array] = None, eps: float = 1e-5,
               impl: Optional[str] = None) -> jax.Array:
  """GroupNorm over a channels-last [B, ..., C] array (formula: module docstring).

  Args:
    x: [B, ..., C], C divisible by `groups`.
    groups: G.
    scale, offset: optional [C] affine parameters.
    eps: added to the variance.
    impl: 'custom' (one-pass statistics), 'xla' (two-pass over
      [B, ..., G, C/G], as `hk.GroupNorm`), or None for the current default.

  Returns:
    The normalised array, x's shape.
  """
  channels = x.shape[-1]
  if channels % groups:
    raise ValueError(f'{channels} channels are not divisible by {groups} groups.')
  batch, per_group = x.shape[0], channels // groups
  flat = x.reshape(batch, -1, channels)  # [B, N, C]
  count = flat.shape[1] * per_group
  acc = jnp.promote_types(x.dtype, jnp.float32)  # dtype of the statistics
  if _resolve(impl) == 'xla':
    grouped = flat.reshape(batch, -1, groups, per_group)  # [B, N, G, C/G]
    grouped = grouped.astype(acc)
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    var = jnp.var(grouped, axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) * lax.rsqrt(var + eps)).reshape(flat.shape)
    if scale is not None:
      normed = normed * scale
    if offset is not None:
      normed = normed + offset
    return normed.reshape(x.shape).astype(x.dtype)
  flat = flat.astype(acc)
  sums = jnp.sum(flat, axis=1)                    # [B, C]
  square_sums = jnp.sum(jnp.square(flat), axis=1)  # [B, C]
  mean = jnp.sum(sums.reshape(batch, groups, per_group), -1) / count  # [B, G]
  mean_square = jnp.sum(square_sums.reshape(batch, groups, per_group),
                        -1) / count
  inv_std = lax.rsqrt(jnp.maximum(mean_square - jnp.square(mean), 0.0) + eps)
  gain = jnp.repeat(inv_std, per_group, axis=1)  # [B, C]
  if scale is not None:
    gain = gain * scale
  bias = -jnp.repeat(mean, per_group, axis=1) * gain
  if offset is not None:
    bias = bias + offset
  out = flat * gain[:, None, :] + bias[:, None, :]
  return out.reshape(x.shape).astype(x.dtype)


def avg_pool(x: jax.Array, window: Union[int, Sequence[int]],
             strides: Union[int, Sequence[int], None] = None,
             padding: str = 'VALID', impl: Optional[str] = None) -> jax.Array:
  """Average pooling over the spatial axes of [B, H, W, C], as `hk.avg_pool`.

  out[b, i, j, c] = mean_{0 <= u < k_h, 0 <= v < k_w} x[b, s_h i + u, s_w j + v, c].
  With strides equal to the window, 'VALID' padding and H, W divisible by
  it ('custom'), computed as a reshape to [B, H/k_h, k_h, W/k_w, k_w, C] and
  a mean over the k axes (see the module docstring for why); otherwise, or
  with impl='xla', `hk.avg_pool(x, window, strides, padding)`.

  Args:
    x: [B, H, W, C].
    window: k, or (k_h, k_w).
    strides: s, (s_h, s_w), or None for the window.
    padding: 'VALID' or 'SAME'.
    impl: 'custom', 'xla', or None for `current_implementation()`.

  Returns:
    [B, H', W', C].
  """
  k_h, k_w = (window, window) if isinstance(window, int) else tuple(window)
  if strides is None:
    strides = (k_h, k_w)
  s_h, s_w = (strides, strides) if isinstance(strides, int) else tuple(strides)
  batch, height, width, channels = x.shape
  if (_resolve(impl) == 'xla' or (s_h, s_w) != (k_h, k_w) or padding != 'VALID'
      or height % k_h or width % k_w):
    return hk.avg_pool(x, (1, k_h, k_w, 1), (1, s_h, s_w, 1), padding)
  blocks = x.reshape(batch, height // k_h, k_h, width // k_w, k_w, channels)
  return jnp.mean(blocks, axis=(2, 4))


class Conv2D(hk.Module):
  """`hk.Conv2D`'s parameters ('w' [k, k, C_in, C_out], 'b' [C_out]) on `conv2d`.

  Channels-last only, no dilation or feature groups; the same parameter
  names, shapes and default initialisers as `hk.Conv2D`, so checkpoints and
  parameter trees are unchanged.
  """

  def __init__(self, output_channels: int, kernel_shape: int, stride: int = 1,
               padding: Padding = 'SAME', with_bias: bool = True,
               w_init: Optional[hk.initializers.Initializer] = None,
               b_init: Optional[hk.initializers.Initializer] = None,
               impl: Optional[str] = None, name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = kernel_shape
    self.stride = stride
    self.padding = padding
    self.with_bias = with_bias
    self.w_init = w_init
    self.b_init = b_init or jnp.zeros
    self.impl = impl

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs: [B, H, W, C_in] -> [B, H', W', C_out]."""
    k, c_in = self.kernel_shape, inputs.shape[-1]
    w_init = self.w_init
    if w_init is None:  # hk.Conv2D's default: truncated normal, std 1/sqrt(fan_in)
      w_init = hk.initializers.TruncatedNormal(1.0 / (k * k * c_in) ** 0.5)
    w = hk.get_parameter('w', [k, k, c_in, self.output_channels],
                         inputs.dtype, init=w_init)
    out = conv2d(inputs, w, (self.stride, self.stride), self.padding,
                 impl=self.impl)
    if self.with_bias:
      out = out + hk.get_parameter('b', [self.output_channels], inputs.dtype,
                                   init=self.b_init)
    return out


class GroupNorm(hk.Module):
  """`hk.GroupNorm`'s parameters ('scale', 'offset', [C]) on `group_norm`.

  Channels-last; normalises over all non-batch axes within each group.
  """

  def __init__(self, groups: int, create_scale: bool = True,
               create_offset: bool = True, eps: float = 1e-5,
               impl: Optional[str] = None, name: Optional[str] = None):
    super().__init__(name=name)
    self.groups = groups
    self.create_scale = create_scale
    self.create_offset = create_offset
    self.eps = eps
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] -> same shape."""
    channels = x.shape[-1]
    scale = offset = None
    if self.create_scale:
      scale = hk.get_parameter('scale', [channels], x.dtype, init=jnp.ones)
    if self.create_offset:
      offset = hk.get_parameter('offset', [channels], x.dtype, init=jnp.zeros)
    return group_norm(x, self.groups, scale, offset, self.eps, impl=self.impl)


# Spectral normalisation (Miyato, Kataoka, Koyama & Yoshida, "Spectral
# Normalization for Generative Adversarial Networks", ICLR 2018).


def spectral_norm_estimate(w: jax.Array, num_iters: int = 10,
                           eps: float = 1e-12) -> jax.Array:
  """Largest singular value of w by power iteration, differentiable in w.

  The weight is read as the matrix W = w.reshape(-1, w.shape[-1]) (Haiku's
  [in, out] Linear weight; an HWIO kernel [k, k, C_in, C_out] as
  [k*k*C_in, C_out]). From a fixed start vector v_0 (a standard normal draw
  with key 0, so every call is deterministic and needs no state), N steps of

    u <- W v / ||W v||,   v <- W^T u / ||W^T u||

  and sigma = u^T W v with u, v under `stop_gradient`, so that
  d sigma / dW = u v^T (Miyato et al., 2018, Alg. 1 and Eq. 12). sigma is a
  lower bound of ||W||_2 that converges to it as (s_2/s_1)^(2N).

  Args:
    w: weight of ndim >= 2.
    num_iters: N >= 1.
    eps: added to the norms before dividing.

  Returns:
    sigma, a scalar of w's dtype.
  """
  if w.ndim < 2:
    raise ValueError(f'spectral norm needs a weight of ndim >= 2; got {w.shape}.')
  if num_iters < 1:
    raise ValueError(f'num_iters must be >= 1, got {num_iters}.')
  mat = w.reshape(-1, w.shape[-1])                                 # [m, n]
  frozen = lax.stop_gradient(mat)
  v = jax.random.normal(jax.random.PRNGKey(0), (mat.shape[1],), mat.dtype)
  v = v / jnp.linalg.norm(v)
  u = None
  for _ in range(num_iters):
    u = frozen @ v
    u = u / (jnp.linalg.norm(u) + eps)
    v = frozen.T @ u
    v = v / (jnp.linalg.norm(v) + eps)
  u, v = lax.stop_gradient((u, v))
  return u @ mat @ v


def spectral_normalize_weight(w: jax.Array, num_iters: int = 10,
                              scale: float = 1.0, clip: bool = False,
                              eps: float = 1e-12) -> jax.Array:
  """w * c / sigma(w) (Miyato et al., 2018, Eq. 8, with a target norm c).

  Args:
    w: weight of ndim >= 2 (matrix view: `spectral_norm_estimate`).
    num_iters: power iterations N.
    scale: c, the target spectral norm of the matrix view.
    clip: rescale only when sigma > c, i.e. w * min(1, c / sigma) (as
      torchdeq's `SpectralNorm(clip=True)`).
    eps: see `spectral_norm_estimate`.

  Returns:
    The rescaled weight, w's shape. Its matrix view has spectral norm
    c * ||W||_2 / sigma >= c, equal to c up to the power iteration's error.
  """
  factor = scale / spectral_norm_estimate(w, num_iters, eps)
  if clip:
    factor = jnp.minimum(factor, jnp.ones_like(factor))
  return w * factor


def spectral_normalize(fn: Callable, num_iters: int = 10, scale: float = 1.0,
                       clip: bool = False,
                       include: Callable[[hk.GetterContext], bool] = (
                           lambda context: True)) -> Callable:
  """Wraps Haiku code so that its weights of ndim >= 2 are spectrally normalised.

  Runs `fn` under an `hk.custom_getter` that replaces every parameter of
  ndim >= 2 (Linear weights, convolution kernels) by
  `spectral_normalize_weight(w, num_iters, scale, clip)` when it is read;
  biases, norm scales and other vectors are left alone. The stored
  parameters stay the raw ones, and nothing is kept in Haiku state (the
  power iteration restarts from a fixed vector at every call), so the
  wrapped function is as pure as `fn`: a DEQ cell stays stateless and
  deterministic, e.g. `DEQ(spectral_normalize(cell, scale=0.9))`.

  Lipschitz bounds: a Linear layer then has ||W||_2 = c, so a cell
  tanh(z W + x U + b) is a contraction in z with constant <= c (tanh is
  1-Lipschitz). A convolution normalises the matrix view [k*k*C_in, C_out]
  of its kernel; the convolution operator's norm is at most k * c for a
  k x k kernel at stride 1 (each input pixel enters at most k^2 patches).

  Args:
    fn: a function that creates Haiku modules (e.g. a DEQ cell f(z, x)).
    num_iters: power iterations N per weight and call.
    scale: c, the target spectral norm.
    clip: only scale weights down (see `spectral_normalize_weight`).
    include: predicate on the `hk.GetterContext` (e.g.
      `lambda c: 'linear' in c.module_name`) selecting parameters to
      normalise, among those of ndim >= 2; leave weight-normalised
      directions ('v' of a weight norm) out, since the norm is divided
      out again.

  Returns:
    A function with fn's signature.
  """

  def getter(next_getter, value, context):
    if value.ndim >= 2 and include(context):
      value = spectral_normalize_weight(value, num_iters, scale, clip)
    return next_getter(value)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with hk.custom_getter(getter):
      return fn(*args, **kwargs)

  return wrapped
