"""XLA compiler options for the programs jreg compiles, chosen per backend.

On CPU, jaxlib 0.10 and 0.12 hand every convolution to YNNPACK: the default
of the XLA option `xla_cpu_experimental_ynn_fusion_type` is
{INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE}. Measured on a 2-core
AVX-512 CPU (BUILD_NOTES.md, "XLA:CPU's convolutions: YNNPACK or Eigen"), a
3x3 convolution of [64, 32, 32, 48] activations to 48 channels takes 26 ms
through YNNPACK on one thread with jaxlib 0.10.2 (24.5 ms on two threads with
0.12), and 12-17 ms through XLA's own (Eigen) convolution on both cores;
forward plus both gradients of ten convolution shapes of the ResNet-20 and
MDEQ presets ran 1.2-2.6x faster through Eigen (the one exception, 0.85x, is
a 3-channel input layer), and the conv DEQ training step of
`experiments.bench_deq` 1.35x faster. So jreg compiles its programs
on CPU with that option set to the default list without
INDIVIDUAL_CONVOLUTION: matmuls and reductions stay with YNNPACK.

`compiler_options()` is None on GPU and TPU (nothing changes there) and when
the installed jaxlib does not know the option (checked once by compiling a
one-element program). `jit(fun, ...)` is `jax.jit` with these options; jreg's
training step (`jreg.train`), its tasks' evaluations and its benchmarks use
it. In your own code: `jax.jit(fun, compiler_options=jreg.xla_cpu
.compiler_options())`, or the same flag process-wide through the environment
before JAX starts: `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
individual_dot,reduce`.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ('CPU_OPTIONS', 'compiler_options', 'jit')

CPU_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


@functools.cache
def _cpu_options_accepted() -> bool:
  try:
    jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(
        jnp.zeros((1,), jnp.float32)).compile()
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('jreg.xla_cpu: this jaxlib refuses %s (%s); compiling '
                    'with XLA:CPU defaults.', CPU_OPTIONS,
                    str(error).splitlines()[0])
    return False
  return True


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """The options jreg compiles with on `backend` (default: JAX's default).

  Returns a new dict of `CPU_OPTIONS` on CPU when the installed jaxlib accepts
  them, else None (GPU, TPU, or an older / newer jaxlib without the option).
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu' or not _cpu_options_accepted():
    return None
  return dict(CPU_OPTIONS)


class _Jitted:
  """`jax.jit(fun)` compiled with options at top level, plain when nested.

  JAX refuses `compiler_options` on a jit called inside another trace, so a
  call whose arguments hold tracers goes to the plain `jax.jit(fun)` (it is
  inlined into the caller's program, compiled with the caller's options).
  Everything else (`lower`, `trace`, `eval_shape`, ...) is the top-level
  function's.
  """

  def __init__(self, fun: Callable, options: dict, kwargs: dict):
    self._top = jax.jit(fun, compiler_options=options, **kwargs)
    self._nested = jax.jit(fun, **kwargs)
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    leaves = jax.tree.leaves((args, kwargs))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
      return self._nested(*args, **kwargs)
    return self._top(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._top, name)


def jit(fun: Callable, **kwargs: Any) -> Callable:
  """`jax.jit(fun, compiler_options=compiler_options(), **kwargs)`.

  Usable inside another `jax.jit` too (then without options of its own; see
  `_Jitted`). Without options (GPU, TPU) it is exactly `jax.jit(fun, ...)`.
  """
  options = compiler_options()
  if options is None:
    return jax.jit(fun, **kwargs)
  return _Jitted(fun, options, kwargs)
