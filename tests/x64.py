"""`enable_x64()`: 64-bit floats inside a `with` block, on every supported JAX.

`jax.enable_x64` is the context manager of newer JAX; older releases (the
floor, JAX 0.7.2) have it as `jax.experimental.enable_x64`.
"""
import jax


def enable_x64():
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as experimental_enable_x64  # pylint: disable=g-import-not-at-top
  return experimental_enable_x64(True)
