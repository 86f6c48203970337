"""Why the conv DEQ step is slower on XLA:CPU than in PyTorch: the kernels.

Times, at the shapes of `experiments/bench_deq.py` ([64, 32, 32, C]), a 3×3
convolution forward, its input and weight gradients, and GroupNorm, in JAX
and (when `.venv-torchdeq` exists) in PyTorch, and prints JSON. The solver
loops of `jreg.deq` add no overhead there (solver overhead ≈ 0.9); the gap to
torchdeq is these kernels (BUILD_NOTES.md, "Figures re-measured").

    python -m experiments.bench_cpu_kernels
"""
import json
import pathlib
import subprocess
import time

from absl import app
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = REPO / '.venv-torchdeq' / 'bin' / 'python'
_DN = ('NHWC', 'HWIO', 'NHWC')

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
print(json.dumps({
    'conv_forward': median(lambda: conv(x)),
    'conv_forward_and_gradients': median(lambda: (conv(x) ** 2).sum().backward()),
    'group_norm': median(lambda: gn(z)),
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


def jax_timings():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32, 32, 48)), jnp.float32)   # [B, H, W, C]
  w = jnp.asarray(0.1 * rng.normal(size=(3, 3, 48, 64)), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=_DN)
  gy = conv(x, w)
  gn = hk.without_apply_rng(hk.transform(lambda z: hk.GroupNorm(8)(z)))
  z = jnp.asarray(rng.normal(size=(64, 32, 32, 64)), jnp.float32)
  gn_params = gn.init(jax.random.PRNGKey(0), z)
  return {
      'conv_forward': _median(jax.jit(conv), x, w),
      'conv_forward_and_gradients': _median(jax.jit(jax.grad(
          lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))), x, w),
      'conv_input_gradient': _median(jax.jit(
          lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)), x, w, gy),
      'conv_weight_gradient': _median(jax.jit(
          lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)), x, w, gy),
      'group_norm': _median(jax.jit(gn.apply), gn_params, z),
  }


def main(argv):
  del argv
  result = {'jax': jax_timings()}
  if TORCH_PYTHON.exists():
    out = subprocess.run([str(TORCH_PYTHON), '-c', _TORCH_SCRIPT],
                         capture_output=True, text=True, check=True).stdout
    result['torch'] = json.loads(out)
    result['jax_over_torch'] = {k: result['jax'][k] / v
                                for k, v in result['torch'].items()}
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  app.run(main)
