"""Benchmark: one DEQ+JR training step in jreg against PyTorch + torchdeq.

Builds in Haiku exactly the model and step of
/work/shared/bench/torchdeq_reference.py (its docstring):

  stem:  x_inj = GN(8, C)(conv3x3(3 -> C, bias)(image))
  cell:  f(z, x) = GN3(relu(z + GN2(x + conv2(GN1(relu(conv1(z)))))))
  head:  logits = Linear(C*4*4 -> 10)(flatten(avgpool8x8(GN(8, C)(z*))))

or, with `model='toy'`, the tiny 1-D DEQ f(z; x) = W2^T ReLU(W1 z + U x + b).
One step = Anderson (m=5, exactly F evaluations), IFT backward by fixed-point
iteration (exactly B VJPs), Hutchinson Jacobian term (1 vector, weight 1) at z*,
cross-entropy (MSE for toy), Adam(1e-3).

Printed (JSON): median step time; time of one cell evaluation t_f and of one
cell VJP t_vjp (the transposed map of a cell linearised once, as the backward
loop uses it); t_rest, the same step with the solve replaced by one cell
application from z0 (so it keeps stem, the one linearisation of f and the one
VJP into parameters and input that the implicit backward also does, the
Jacobian term, head, loss and Adam); and

  solver overhead = step / (NFE_f * t_f + NFE_b * t_vjp + t_rest),

with NFE_f = F and NFE_b = B: the overhead is what the solver loops cost beyond
their cell evaluations and VJPs. When the torchdeq environment is
present the reference is run in a subprocess in the same invocation (before
and after jreg's timing) and the ratio jreg / torchdeq (mean of the two
reference medians) is reported.

Usage:
  python -m experiments.bench_deq --model=conv --batch=64 --f_iters=20 --b_iters=20
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreg import cli
import jreg.deq

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / 'shared' / 'bench' / 'torchdeq_reference.py'
TORCH_PYTHON = REPO / '.venv-torchdeq' / 'bin' / 'python'

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum('model', 'conv', ['conv', 'toy'], 'Which DEQ to time.')
  flags.DEFINE_integer('batch', 64, 'Batch size.')
  flags.DEFINE_integer('channels', 48, 'C (conv model).')
  flags.DEFINE_integer('inner', 64, 'I (conv model).')
  flags.DEFINE_integer('f_iters', 20, 'F: forward Anderson evaluations.')
  flags.DEFINE_integer('b_iters', 20, 'B: backward fixed-point VJPs.')
  flags.DEFINE_integer('steps', 20, 'Timed steps.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_enum('backward_loop', 'unroll', ['unroll', 'while'],
                    'Backward fixed-point loop: straight-line code or '
                    'lax.while_loop.')
  flags.DEFINE_enum('forward_loop', 'while', ['unroll', 'while'],
                    'Forward Anderson loop: straight-line code or '
                    'lax.while_loop.')
  flags.DEFINE_bool('reference', True, 'Also run torchdeq_reference.py.')


def default_config():
  return dict(model='conv', batch=64, channels=48, inner=64, f_iters=20,
              b_iters=20, steps=20, warmup=3, backward_loop='unroll',
              forward_loop='while',
              reference=True, seed=0)


def quickstart_config():
  """A seconds-long run: the toy model, few steps, jreg only."""
  return dict(default_config(), model='toy', f_iters=6, b_iters=6, steps=5,
              warmup=1, reference=False)


class ConvCell(hk.Module):
  """f(z, x) = GN3(relu(z + GN2(x + conv2(GN1(relu(conv1(z)))))))."""

  def __init__(self, inner, name=None):
    super().__init__(name=name)
    self.inner = inner

  def __call__(self, z, x):  # z, x: [B, H, W, C]
    channels = z.shape[-1]
    y = hk.Conv2D(self.inner, 3, with_bias=False, name='conv1')(z)  # [B, H, W, I]
    y = hk.GroupNorm(8, name='gn1')(jax.nn.relu(y))
    y = hk.Conv2D(channels, 3, with_bias=False, name='conv2')(y)    # [B, H, W, C]
    y = hk.GroupNorm(8, name='gn2')(x + y)
    return hk.GroupNorm(8, name='gn3')(jax.nn.relu(z + y))


class ToyCell(hk.Module):
  """f(z; x) = W2^T ReLU(W1 z + U x + b) (Bai et al., 2021, Appendix A.1)."""

  def __init__(self, hidden=50, name=None):
    super().__init__(name=name)
    self.hidden = hidden

  def __call__(self, z, x):  # z, x: [B, 1]
    h = hk.Linear(self.hidden, name='w1')(z) + hk.Linear(
        self.hidden, with_bias=False, name='u')(x)
    return hk.Linear(z.shape[-1], with_bias=False, name='w2')(jax.nn.relu(h))


def _make_cell(config):
  if config['model'] == 'conv':
    return lambda z, x: ConvCell(config['inner'], name='cell')(z, x)
  return lambda z, x: ToyCell(name='cell')(z, x)


def _deq(config):
  # ridge_relative=False: torchdeq's (absolute) Anderson regulariser.
  forward = jreg.deq.SolverConfig(name='anderson', max_iter=config['f_iters'],
                                  tol=0.0, history=5, ridge_relative=False,
                                  unroll=config['forward_loop'] == 'unroll')
  backward = jreg.deq.BackwardConfig(
      mode='implicit', solver=jreg.deq.SolverConfig(
          name='fixed_point', max_iter=config['b_iters'], tol=0.0,
          unroll=config['backward_loop'] == 'unroll'))
  return jreg.deq.DEQ(_make_cell(config), forward=forward, backward=backward,
                      unrolled_steps=1, jacobian_vectors=1,
                      report_backward_stats=False,
                      name='deq')


def _stem(config, inputs):
  if config['model'] == 'conv':
    x = hk.Conv2D(config['channels'], 3, name='stem')(inputs)  # [B, 32, 32, C]
    return hk.GroupNorm(8, name='stem_gn')(x)
  return inputs  # [B, 1]


def _head_loss(config, z, targets):
  if config['model'] == 'conv':
    h = hk.GroupNorm(8, name='head_gn')(z)
    h = hk.avg_pool(h, 8, 8, 'VALID')                          # [B, 4, 4, C]
    logits = hk.Linear(10, name='fc')(h.reshape(h.shape[0], -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return jnp.mean(jnp.square(z - targets))


def build(config):
  """Returns (params, opt_state, step, batch, timers) for the configured model."""
  rng = jax.random.PRNGKey(config['seed'])
  data_rng, init_rng = jax.random.split(rng)
  if config['model'] == 'conv':
    inputs = jax.random.normal(data_rng, (config['batch'], 32, 32, 3))
    targets = jax.random.randint(data_rng, (config['batch'],), 0, 10)
  else:
    inputs = jax.random.uniform(data_rng, (config['batch'], 1)) * 4 - 2
    targets = jnp.sin(inputs)

  def loss(inputs, targets, solve=True):
    x = _stem(config, inputs)
    deq = _deq(config)
    if solve:
      z, info = deq(x, jnp.zeros_like(x), jacobian_loss=True)
    else:  # "rest": one cell application instead of the solve (see docstring)
      z, info = deq(x, jax.lax.stop_gradient(x), unrolled=True,
                    jacobian_loss=True)
    return _head_loss(config, z, targets) + 1.0 * info['jacobian_loss']

  model = hk.transform(loss)
  params = model.init(init_rng, inputs, targets)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)

  def make_step(solve):
    def step(params, opt_state, rng):
      value, grads = jax.value_and_grad(
          lambda p: model.apply(p, rng, inputs, targets, solve))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value
    return jax.jit(step)

  return params, opt_state, make_step(True), make_step(False), inputs


def _median_time(fn, args, steps, warmup):
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _time_step(step, params, opt_state, steps, warmup):
  rng = jax.random.PRNGKey(1)
  out = step(params, opt_state, rng)
  jax.block_until_ready(out)
  for _ in range(warmup):
    params, opt_state, _ = step(params, opt_state, rng)
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, opt_state, value = step(params, opt_state, rng)
    jax.block_until_ready(value)
    times.append(time.perf_counter() - start)
  return statistics.median(times), float(value)


def _cell_timers(config, params, inputs, steps):
  """t_f: one cell evaluation; t_vjp: one transposed linearised cell."""
  cell = hk.without_apply_rng(hk.transform(_make_cell(config)))
  stem = hk.without_apply_rng(hk.transform(lambda i: _stem(config, i)))
  x = stem.apply(params, inputs)
  prefix = 'deq/cell/'  # DEQ lifts the cell's params under <name>/cell/
  cell_params = {k[len(prefix):]: v for k, v in params.items()
                 if k.startswith(prefix)}
  z = x
  f = jax.jit(cell.apply)
  t_f = _median_time(f, (cell_params, z, x), steps, 2)
  _, vjp_fn = jax.vjp(lambda zz: cell.apply(cell_params, zz, x), z)
  apply_vjp = jax.jit(lambda vjp_fn, u: vjp_fn(u))
  t_vjp = _median_time(apply_vjp, (vjp_fn, z), steps, 2)
  return t_f, t_vjp


def run_reference(config):
  """Runs torchdeq_reference.py in the torchdeq venv; returns its JSON dict."""
  if not TORCH_PYTHON.exists():
    raise FileNotFoundError(
        f'{TORCH_PYTHON} is missing: set up .venv-torchdeq as '
        '/work/shared/bench/README.md says, or pass --noreference.')
  cmd = [str(TORCH_PYTHON), str(REFERENCE), '--model', config['model'],
         '--batch', str(config['batch']), '--channels', str(config['channels']),
         '--inner', str(config['inner']), '--f_iters', str(config['f_iters']),
         '--b_iters', str(config['b_iters']), '--steps', str(config['steps']),
         '--warmup', str(config['warmup']), '--threads', str(os.cpu_count())]
  out = subprocess.run(cmd, check=False, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f'the torchdeq reference failed (exit {out.returncode}): '
                       f'{out.stderr.strip().splitlines()[-1:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(config, workdir):
  """Times jreg's step (and torchdeq's); writes bench.json under workdir.

  The reference runs once before and once after jreg's timing, and the ratio
  uses the mean of its two medians, so that a drift in machine load between
  the two frameworks shows up (both medians are reported).
  """
  references = [run_reference(config)] if config['reference'] else []
  params, opt_state, step, rest_step, inputs = build(config)
  step_s, loss = _time_step(step, params, opt_state, config['steps'],
                            config['warmup'])
  rest_s, _ = _time_step(rest_step, params, opt_state, config['steps'],
                         config['warmup'])
  t_f, t_vjp = _cell_timers(config, params, inputs, config['steps'])
  nfe_f, nfe_b = config['f_iters'], config['b_iters']
  ideal = nfe_f * t_f + nfe_b * t_vjp + rest_s
  result = {
      'framework': 'jax+jreg', 'jax': jax.__version__, 'model': config['model'],
      'batch': config['batch'], 'f_iters': config['f_iters'],
      'b_iters': config['b_iters'], 'backward_loop': config['backward_loop'],
      'forward_loop': config['forward_loop'],
      'median_step_s': step_s, 't_f_s': t_f, 't_vjp_s': t_vjp,
      't_rest_s': rest_s, 'ideal_step_s': ideal,
      'solver_overhead': step_s / ideal, 'loss': loss,
      'devices': str(jax.devices()), 'cpu_count': os.cpu_count(),
  }
  if config['reference']:
    references.append(run_reference(config))
    medians = [r['median_step_s'] for r in references]
    result['torchdeq'] = references[-1]
    result['torchdeq_median_step_s_before_after'] = medians
    result['ratio_jreg_over_torchdeq'] = step_s / statistics.mean(medians)
  if workdir:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / 'bench.json').write_text(json.dumps(result, indent=1))
  return result


def main(argv):
  del argv
  for name in ('batch', 'f_iters', 'b_iters', 'steps', 'channels', 'inner'):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f'--{name} must be >= 1, got {getattr(FLAGS, name)}.')
  if FLAGS.warmup < 0:
    raise app.UsageError(f'--warmup must be >= 0, got {FLAGS.warmup}.')
  if FLAGS.channels % 8 or FLAGS.inner % 8:
    raise app.UsageError('--channels and --inner must be multiples of 8 '
                         '(GroupNorm with 8 groups).')
  config = dict(default_config(), model=FLAGS.model, batch=FLAGS.batch,
                channels=FLAGS.channels, inner=FLAGS.inner,
                f_iters=FLAGS.f_iters, b_iters=FLAGS.b_iters, steps=FLAGS.steps,
                warmup=FLAGS.warmup, backward_loop=FLAGS.backward_loop,
                forward_loop=FLAGS.forward_loop,
                reference=FLAGS.reference)
  try:
    result = run(config, cli.WORKDIR.value or '')
  except FileNotFoundError as error:
    raise app.UsageError(str(error)) from None
  print(json.dumps(result))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
