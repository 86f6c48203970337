"""Why the conv DEQ step is slower on XLA:CPU than in PyTorch: the kernels.

Times, at the shapes of `experiments/bench_deq.py` ([64, 32, 32, C]), a 3×3
convolution forward, its input and weight gradients, and GroupNorm, in JAX
and (when the torchdeq environment exists: `--torchdeq_python`, default
`$JREG_TORCHDEQ_PYTHON` or `.venv-torchdeq/bin/python`) in PyTorch, and prints
JSON. JAX figures come in two implementations (`jreg.layers`): `xla`
(autodiff of `lax.conv_general_dilated`, two-pass GroupNorm) and `custom`
(the convolution's own VJP, one-pass GroupNorm); the `*_in_loop` entries are
per iteration of a 3-iteration `lax.fori_loop` (where XLA:CPU runs the
autodiff forms of convolution gradients slowly); `avg_pool_8x8_gradient` is
the gradient of `jreg.layers.avg_pool` (a reshape and a mean with `custom`,
`hk.avg_pool` with `xla`). Each is compiled twice: with
XLA's default options (`jax_custom`, `jax_xla`) and with the options jreg
compiles its steps with (`jreg.xla_cpu`: convolutions by XLA's Eigen kernels
rather than YNNPACK; `jax_custom_jreg_options`, `jax_xla_jreg_options`).

    python -m experiments.bench_cpu_kernels
"""
import json
import os
import pathlib
import subprocess
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jreg import layers
from jreg import xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TORCH_PYTHON = pathlib.Path(os.environ.get(
    'JREG_TORCHDEQ_PYTHON', REPO / '.venv-torchdeq' / 'bin' / 'python'))
_LOOP_ITERS = 3

_TORCH_SCRIPT = '''
import json, time, torch
torch.set_num_threads(2)
def median(fn, n=10):
  fn(); ts = []
  for _ in range(n):
    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
  return sorted(ts)[n // 2]
x = torch.randn(64, 48, 32, 32, requires_grad=True)
conv = torch.nn.Conv2d(48, 64, 3, padding=1, bias=False)
gn = torch.nn.GroupNorm(8, 64)
z = torch.randn(64, 64, 32, 32)
zg = torch.randn(64, 64, 32, 32, requires_grad=True)
print(json.dumps({
    'conv_forward': median(lambda: conv(x)),
    'conv_forward_and_gradients': median(lambda: (conv(x) ** 2).sum().backward()),
    'group_norm': median(lambda: gn(z)),
    'group_norm_forward_and_gradient': median(
        lambda: (gn(zg) * zg).sum().backward()),
}))
'''


def _median(fn, *args, n=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def jax_timings(impl, compiler_options=None):
  """Per-op medians (s) with `jreg.layers` in implementation `impl`, each
  function compiled with `compiler_options`."""
  def jit(fun):
    return jax.jit(fun, compiler_options=compiler_options)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32, 32, 48)), jnp.float32)   # [B, H, W, C]
  w = jnp.asarray(0.1 * rng.normal(size=(3, 3, 48, 64)), jnp.float32)
  conv = lambda x, w: layers.conv2d(x, w, (1, 1), 'SAME', impl=impl)
  gy = conv(x, w)
  z = jnp.asarray(rng.normal(size=(64, 32, 32, 64)), jnp.float32)
  scale, offset = jnp.ones([64]), jnp.zeros([64])
  norm = lambda z: layers.group_norm(z, 8, scale, offset, impl=impl)
  input_grad = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
  weight_grad = lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

  def in_loop(grad, like):
    def loop(x, w, g):  # the carry feeds back so nothing is hoisted
      return jax.lax.fori_loop(
          0, _LOOP_ITERS, lambda i, acc: acc + grad(x, w, g + acc.mean()),
          jnp.zeros_like(like))
    return lambda *a: _median(jit(loop), *a, n=3) / _LOOP_ITERS

  return {
      'conv_forward': _median(jit(conv), x, w),
      'conv_forward_and_gradients': _median(jit(jax.grad(
          lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))), x, w),
      'conv_input_gradient': _median(jit(input_grad), x, w, gy),
      'conv_weight_gradient': _median(jit(weight_grad), x, w, gy),
      'conv_input_gradient_in_loop': in_loop(input_grad, x)(x, w, gy),
      'conv_weight_gradient_in_loop': in_loop(weight_grad, w)(x, w, gy),
      'group_norm': _median(jit(norm), z),
      'group_norm_forward_and_gradient': _median(jit(jax.grad(
          lambda z: jnp.sum(norm(z) * z))), z),
      'avg_pool_8x8_gradient': _median(jit(jax.grad(
          lambda x: jnp.sum(layers.avg_pool(x, 8, impl=impl) ** 2))), x),
  }


def main(argv):
  del argv
  result = {}
  options = xla_cpu.compiler_options()
  for impl in ('custom', 'xla'):
    result[f'jax_{impl}'] = jax_timings(impl)
    if options:
      result[f'jax_{impl}_jreg_options'] = jax_timings(impl, options)
  python = pathlib.Path(flags.FLAGS.torchdeq_python)
  if python.exists():
    out = subprocess.run([str(python), '-c', _TORCH_SCRIPT],
                         capture_output=True, text=True, check=True).stdout
    result['torch'] = json.loads(out)
    for name in [key for key in result if key.startswith('jax_')]:
      result[f'{name}_over_torch'] = {
          k: result[name][k] / v for k, v in result['torch'].items()}
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  flags.DEFINE_string('torchdeq_python', str(DEFAULT_TORCH_PYTHON),
                      'Python of the torchdeq environment (PyTorch).')
  app.run(main)
