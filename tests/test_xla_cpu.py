"""jreg.xla_cpu: the compiler options jreg compiles with, per backend."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreg import train
from jreg import xla_cpu


def _conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _args():
  rng = np.random.default_rng(0)
  # Enough channels that XLA's defaults give the convolution to YNNPACK.
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 24)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 24, 24)), jnp.float32) / 15
  return x, w


def _convolutions_in_ynn_fusions(compiled_text):
  """How many YNNPACK fusions of a compiled module compute a convolution."""
  computations = {}  # name -> body
  for block in compiled_text.split('\n\n'):
    match = re.match(r'\s*(?:ENTRY\s+)?%?([\w.\-]+)\s', block)
    if match:
      computations[match.group(1)] = block
  called = re.findall(r'calls=%?([\w.\-]+).*__ynn_fusion', compiled_text)
  return sum(' convolution(' in computations.get(name, '') for name in called)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options')
def test_convolutions_leave_ynnpack_on_cpu_with_the_same_values():
  x, w = _args()
  ours = xla_cpu.jit(_conv)
  text = ours.lower(x, w).compile().as_text()
  assert ' convolution(' in text
  if xla_cpu.compiler_options() is not None:
    assert xla_cpu.compiler_options() == xla_cpu.CPU_OPTIONS
    assert _convolutions_in_ynn_fusions(text) == 0
  else:  # an older jaxlib (JAX 0.7.2, the floor) has no such option: plain jit
    assert jax.__version_info__ < (0, 10), jax.__version__
  default_text = jax.jit(_conv).lower(x, w).compile().as_text()
  if '__ynn_fusion' in default_text:  # jaxlib 0.10 and 0.12: the helper sees it
    assert _convolutions_in_ynn_fusions(default_text) == 1
  np.testing.assert_allclose(ours(x, w), jax.jit(_conv)(x, w), rtol=1e-5,
                             atol=1e-5)


def test_a_compiled_function_can_be_called_inside_another_jit():
  x, w = _args()
  ours = xla_cpu.jit(_conv)
  outer = jax.jit(lambda x, w: 2.0 * ours(x, w))  # options refused when nested
  np.testing.assert_allclose(outer(x, w), 2.0 * ours(x, w), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda w: jnp.sum(ours(x, w) ** 2))(w)
  want = jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2))(w)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)
  assert ours.__name__ == '_conv'


def test_no_options_off_cpu():
  assert xla_cpu.compiler_options('gpu') is None
  assert xla_cpu.compiler_options('tpu') is None


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options')
def test_the_training_step_is_compiled_with_the_options():
  x, w = _args()

  def update(state, batch):  # a plain SGD step on the features' square
    loss = lambda w: jnp.sum(_conv(batch, w) ** 2)  # noqa: E731
    return state - 1e-3 * jax.grad(loss)(state), {'features': _conv(batch, state)}

  step = train.Parallel('single').compile(update)
  text = step.lower(w, x).compile().as_text()
  assert ' convolution(' in text
  assert _convolutions_in_ynn_fusions(text) == 0


def test_a_jaxlib_that_refuses_the_options_gets_none(monkeypatch, caplog):
  monkeypatch.setattr(xla_cpu, 'CPU_OPTIONS',
                      {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH_TYPE'})
  xla_cpu._cpu_options_accepted.cache_clear()
  try:
    assert xla_cpu.compiler_options('cpu') is None
    assert 'refuses' in caplog.text
  finally:
    xla_cpu._cpu_options_accepted.cache_clear()
