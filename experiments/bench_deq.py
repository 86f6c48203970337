"""Benchmark: one DEQ+JR training step in jreg against PyTorch + torchdeq.

Builds in Haiku exactly the model and step of the reference script
`torchdeq_reference.py` (by default `../shared/bench/` beside the repository;
`--reference_script`), as its docstring defines them:

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
their cell evaluations and VJPs. The reference is run in a subprocess of
the torchdeq environment (`--torchdeq_python`, default `$JREG_TORCHDEQ_PYTHON`
or else `.venv-torchdeq/bin/python` in the repository) in the same invocation, before and after jreg's timing,
and the ratio jreg / torchdeq (mean of the two reference medians) is reported.

Loop forms. The default is what users run: both solvers in `lax.while_loop`
(early stopping; here tol = 0 so that both frameworks do exactly F and B
evaluations). The straight-line form (`unroll`: the loops unrolled into
straight-line code, no early stop) is timed in the same run, interleaved
round by round with the default, and reported under `loop_forms`; the
top-level figures are those of `--loop` (default `while`).

Layers. `--layers=custom` (default) builds the cell's convolutions and
GroupNorms with `jreg.layers` (convolution with its own VJP, one-pass
GroupNorm); `--layers=xla` with autodiff of `lax.conv_general_dilated` and
the two-pass GroupNorm (the code path before `jreg.layers`);
`--layers=custom,xla` times both. The head's 8x8 average pooling is
`jreg.layers.avg_pool` (a reshape and a mean; `hk.avg_pool` with `xla`).

Compilation. Every jitted function here is compiled as jreg compiles its
training steps (`jreg.xla_cpu.jit`: on CPU, convolutions by XLA's own
multi-threaded kernels rather than YNNPACK); `--nocompiler_options` compiles
with XLA's defaults instead, for comparison.

Usage (the figure in BUILD_NOTES.md; a few minutes on 2 cores):
  python -m experiments.bench_deq --model=conv
  python -m experiments.bench_deq --model=toy
"""
import json
import os
import pathlib
import statistics
import subprocess
import time

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import optax

from jreg import cli
from jreg import layers
from jreg import xla_cpu
import jreg.deq

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO.parent / 'shared' / 'bench' / 'torchdeq_reference.py'
DEFAULT_TORCH_PYTHON = pathlib.Path(os.environ.get(
    'JREG_TORCHDEQ_PYTHON', REPO / '.venv-torchdeq' / 'bin' / 'python'))
LOOP_FORMS = ('while', 'unroll')

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum('model', 'conv', ['conv', 'toy'], 'Which DEQ to time.')
  flags.DEFINE_integer('batch', 64, 'Batch size.')
  flags.DEFINE_integer('channels', 48, 'C (conv model).')
  flags.DEFINE_integer('inner', 64, 'I (conv model).')
  flags.DEFINE_integer('f_iters', 20, 'F: forward Anderson evaluations.')
  flags.DEFINE_integer('b_iters', 20, 'B: backward fixed-point VJPs.')
  flags.DEFINE_integer('steps', 4, 'Timed steps per round and loop form.')
  flags.DEFINE_integer('rounds', 2, 'Rounds; each times every loop form.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_enum('loop', 'while', list(LOOP_FORMS),
                    'Loop form of the top-level figures: lax.while_loop '
                    '(early stopping, what users run) or straight-line code.')
  flags.DEFINE_list('loop_forms', list(LOOP_FORMS),
                    'Loop forms timed (interleaved); must include --loop.')
  flags.DEFINE_list('layers', ['custom'],
                    'jreg.layers implementations timed: custom, xla.')
  flags.DEFINE_bool('reference', True, 'Also run the torchdeq reference.')
  flags.DEFINE_bool('compiler_options', True,
                    "Compile with jreg.xla_cpu's options, as jreg's training "
                    "steps are (--nocompiler_options: XLA's defaults).")
  flags.DEFINE_string('torchdeq_python', str(DEFAULT_TORCH_PYTHON),
                      'Python of the torchdeq environment.')
  flags.DEFINE_string('reference_script', str(DEFAULT_REFERENCE),
                      'Path of torchdeq_reference.py.')


def default_config():
  return dict(model='conv', batch=64, channels=48, inner=64, f_iters=20,
              b_iters=20, steps=4, rounds=2, warmup=1, loop='while',
              loop_forms=LOOP_FORMS, layers=('custom',), reference=True,
              compiler_options=True,
              torchdeq_python=str(DEFAULT_TORCH_PYTHON),
              reference_script=str(DEFAULT_REFERENCE), seed=0)


def quickstart_config():
  """A seconds-long run: the toy model, few steps, jreg only."""
  return dict(default_config(), model='toy', f_iters=6, b_iters=6, steps=3,
              rounds=1, warmup=1, reference=False)


class ConvCell(hk.Module):
  """f(z, x) = GN3(relu(z + GN2(x + conv2(GN1(relu(conv1(z)))))))."""

  def __init__(self, inner, impl, name=None):
    super().__init__(name=name)
    self.inner = inner
    self.impl = impl

  def __call__(self, z, x):  # z, x: [B, H, W, C]
    channels = z.shape[-1]
    y = layers.Conv2D(self.inner, 3, with_bias=False, impl=self.impl,
                      name='conv1')(z)                                # [B, H, W, I]
    y = layers.GroupNorm(8, impl=self.impl, name='gn1')(jax.nn.relu(y))
    y = layers.Conv2D(channels, 3, with_bias=False, impl=self.impl,
                      name='conv2')(y)                                # [B, H, W, C]
    y = layers.GroupNorm(8, impl=self.impl, name='gn2')(x + y)
    return layers.GroupNorm(8, impl=self.impl, name='gn3')(jax.nn.relu(z + y))


class ToyCell(hk.Module):
  """f(z; x) = W2^T ReLU(W1 z + U x + b) (Bai et al., 2021, Appendix A.1)."""

  def __init__(self, hidden=50, name=None):
    super().__init__(name=name)
    self.hidden = hidden

  def __call__(self, z, x):  # z, x: [B, 1]
    h = hk.Linear(self.hidden, name='w1')(z) + hk.Linear(
        self.hidden, with_bias=False, name='u')(x)
    return hk.Linear(z.shape[-1], with_bias=False, name='w2')(jax.nn.relu(h))


def _make_cell(config, impl):
  if config['model'] == 'conv':
    return lambda z, x: ConvCell(config['inner'], impl, name='cell')(z, x)
  return lambda z, x: ToyCell(name='cell')(z, x)


def _deq(config, loop, impl):
  # ridge_relative=False: torchdeq's (absolute) Anderson regulariser.
  forward = jreg.deq.SolverConfig(name='anderson', max_iter=config['f_iters'],
                                  tol=0.0, history=5, ridge_relative=False,
                                  unroll=loop == 'unroll')
  backward = jreg.deq.BackwardConfig(
      mode='implicit', solver=jreg.deq.SolverConfig(
          name='fixed_point', max_iter=config['b_iters'], tol=0.0,
          unroll=loop == 'unroll'))
  return jreg.deq.DEQ(_make_cell(config, impl), forward=forward,
                      backward=backward, unrolled_steps=1, jacobian_vectors=1,
                      name='deq')


def _stem(config, inputs, impl):
  if config['model'] == 'conv':
    x = layers.Conv2D(config['channels'], 3, impl=impl, name='stem')(inputs)
    return layers.GroupNorm(8, impl=impl, name='stem_gn')(x)  # [B, 32, 32, C]
  return inputs  # [B, 1]


def _head_loss(config, z, targets, impl):
  if config['model'] == 'conv':
    h = layers.GroupNorm(8, impl=impl, name='head_gn')(z)
    h = layers.avg_pool(h, 8, impl=impl)                       # [B, 4, 4, C]
    logits = hk.Linear(10, name='fc')(h.reshape(h.shape[0], -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return jnp.mean(jnp.square(z - targets))


def _data(config):
  data_rng = jax.random.split(jax.random.PRNGKey(config['seed']))[0]
  if config['model'] == 'conv':
    inputs = jax.random.normal(data_rng, (config['batch'], 32, 32, 3))
    targets = jax.random.randint(data_rng, (config['batch'],), 0, 10)
  else:
    inputs = jax.random.uniform(data_rng, (config['batch'], 1)) * 4 - 2
    targets = jnp.sin(inputs)
  return inputs, targets


def build(config, loop='while', impl='custom'):
  """Returns (params, opt_state, step, rest_step, inputs) for one loop form.

  `step(params, opt_state, rng) -> (params, opt_state, loss)` is jitted;
  `rest_step` is the same step with the solve replaced by one cell
  application (see the module docstring). Parameters do not depend on `loop`
  or `impl` (same names, same initialisation).
  """
  init_rng = jax.random.split(jax.random.PRNGKey(config['seed']))[1]
  inputs, targets = _data(config)

  def loss(inputs, targets, solve=True):
    x = _stem(config, inputs, impl)
    deq = _deq(config, loop, impl)
    if solve:
      z, info = deq(x, jnp.zeros_like(x), jacobian_loss=True)
    else:  # "rest": one cell application instead of the solve (see docstring)
      z, info = deq(x, jax.lax.stop_gradient(x), unrolled=True,
                    jacobian_loss=True)
    return _head_loss(config, z, targets, impl) + 1.0 * info['jacobian_loss']

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
    return _jit(config, step)

  return params, opt_state, make_step(True), make_step(False), inputs


def _jit(config, fun):
  """`jax.jit`, with jreg's compiler options unless the config turns them off."""
  return xla_cpu.jit(fun) if config['compiler_options'] else jax.jit(fun)


def _median_time(fn, args, steps, warmup):
  jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class _StepTimer:
  """Compiles a step once; `time(n)` appends n step times (params evolve)."""

  def __init__(self, step, params, opt_state, warmup):
    self.step, self.params, self.opt_state = step, params, opt_state
    self.rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    self._run()
    self.first_call_s = time.perf_counter() - start  # compile + one step
    for _ in range(warmup):
      self._run()
    self.times, self.loss = [], float('nan')

  def _run(self):
    self.params, self.opt_state, value = self.step(self.params, self.opt_state,
                                                   self.rng)
    jax.block_until_ready(value)
    return value

  def time(self, steps):
    for _ in range(steps):
      start = time.perf_counter()
      value = self._run()
      self.times.append(time.perf_counter() - start)
    self.loss = float(value)

  @property
  def median(self):
    return statistics.median(self.times)


def _cell_timers(config, params, inputs, steps, impl):
  """t_f: one cell evaluation; t_vjp: one transposed linearised cell."""
  cell = hk.without_apply_rng(hk.transform(_make_cell(config, impl)))
  stem = hk.without_apply_rng(hk.transform(lambda i: _stem(config, i, impl)))
  x = stem.apply(params, inputs)
  cell_params = jreg.deq.cell_params(params, 'deq')
  z = x
  f = _jit(config, cell.apply)
  t_f = _median_time(f, (cell_params, z, x), steps, 1)
  _, vjp_fn = jax.vjp(lambda zz: cell.apply(cell_params, zz, x), z)
  apply_vjp = _jit(config, lambda vjp_fn, u: vjp_fn(u))
  t_vjp = _median_time(apply_vjp, (vjp_fn, z), steps, 1)
  return t_f, t_vjp


def run_reference(config):
  """Runs torchdeq_reference.py in the torchdeq venv; returns its JSON dict."""
  python = pathlib.Path(config['torchdeq_python'])
  script = pathlib.Path(config['reference_script'])
  for path, what in ((python, '--torchdeq_python'),
                     (script, '--reference_script')):
    if not path.exists():
      raise FileNotFoundError(
          f'{path} ({what}) is missing: set up the torchdeq environment as '
          "the reference's README.md says, point the flag at it, or pass "
          '--noreference.')
  cmd = [str(python), str(script), '--model', config['model'],
         '--batch', str(config['batch']), '--channels', str(config['channels']),
         '--inner', str(config['inner']), '--f_iters', str(config['f_iters']),
         '--b_iters', str(config['b_iters']),
         '--steps', str(config['steps'] * config['rounds']),
         '--warmup', str(config['warmup']), '--threads', str(os.cpu_count())]
  out = subprocess.run(cmd, check=False, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f'the torchdeq reference failed (exit {out.returncode}): '
                       f'{out.stderr.strip().splitlines()[-1:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(config, workdir):
  """Times jreg's step in each loop form and layer implementation (and
  torchdeq's); writes bench.json under workdir.

  Every (loop form, layers) variant is compiled first; then `rounds` rounds
  each time `steps` steps of every variant in turn, so that a drift in the
  machine's load affects all variants alike. The reference runs once before
  and once after, and the ratio uses the mean of its two medians (both are
  reported).
  """
  if config['loop'] not in config['loop_forms']:
    raise ValueError(f"the loop form {config['loop']!r} must be among the "
                     f"timed forms {list(config['loop_forms'])}.")
  for impl in config['layers']:
    if impl not in layers.IMPLEMENTATIONS:
      raise ValueError(f'unknown layers {impl!r}; use {layers.IMPLEMENTATIONS}.')
  references = [run_reference(config)] if config['reference'] else []
  variants = [(loop, impl) for impl in config['layers']
              for loop in config['loop_forms']]
  timers, rest, built = {}, {}, {}
  for loop, impl in variants:
    params, opt_state, step, rest_step, inputs = build(config, loop, impl)
    built[(loop, impl)] = (params, inputs)
    timers[(loop, impl)] = _StepTimer(step, params, opt_state, config['warmup'])
    if impl not in rest:  # the rest step has no solver loop
      rest[impl] = _StepTimer(rest_step, params, opt_state, config['warmup'])
  for _ in range(config['rounds']):
    for key in variants:
      timers[key].time(config['steps'])
    for impl in rest:
      rest[impl].time(config['steps'])
  forms = {}
  nfe_f, nfe_b = config['f_iters'], config['b_iters']
  for (loop, impl), timer in timers.items():
    params, inputs = built[(loop, impl)]
    t_f, t_vjp = _cell_timers(config, params, inputs, config['steps'], impl)
    ideal = nfe_f * t_f + nfe_b * t_vjp + rest[impl].median
    forms[f'{loop}/{impl}'] = {
        'median_step_s': timer.median, 'step_times_s': timer.times,
        'compile_and_first_step_s': timer.first_call_s,
        't_f_s': t_f, 't_vjp_s': t_vjp, 't_rest_s': rest[impl].median,
        'ideal_step_s': ideal, 'solver_overhead': timer.median / ideal,
        'loss': timer.loss}
  main = forms[f"{config['loop']}/{config['layers'][0]}"]
  result = {
      'framework': 'jax+jreg', 'jax': jax.__version__, 'model': config['model'],
      'batch': config['batch'], 'f_iters': config['f_iters'],
      'b_iters': config['b_iters'], 'loop': config['loop'],
      'layers': config['layers'][0],
      'compiler_options': (xla_cpu.compiler_options()
                           if config['compiler_options'] else None),
      'median_step_s': main['median_step_s'],
      't_f_s': main['t_f_s'], 't_vjp_s': main['t_vjp_s'],
      't_rest_s': main['t_rest_s'], 'ideal_step_s': main['ideal_step_s'],
      'solver_overhead': main['solver_overhead'], 'loss': main['loss'],
      'loop_forms': forms,
      'devices': str(jax.devices()), 'cpu_count': os.cpu_count(),
  }
  if config['reference']:
    references.append(run_reference(config))
    medians = [r['median_step_s'] for r in references]
    result['torchdeq'] = references[-1]
    result['torchdeq_median_step_s_before_after'] = medians
    reference_s = statistics.mean(medians)
    result['ratio_jreg_over_torchdeq'] = main['median_step_s'] / reference_s
    for form in forms.values():
      form['ratio_over_torchdeq'] = form['median_step_s'] / reference_s
  if workdir:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / 'bench.json').write_text(json.dumps(result, indent=1))
  return result


def main(argv):
  del argv
  for name in ('batch', 'f_iters', 'b_iters', 'steps', 'rounds', 'channels',
               'inner'):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f'--{name} must be >= 1, got {getattr(FLAGS, name)}.')
  if FLAGS.warmup < 0:
    raise app.UsageError(f'--warmup must be >= 0, got {FLAGS.warmup}.')
  if FLAGS.channels % 8 or FLAGS.inner % 8:
    raise app.UsageError('--channels and --inner must be multiples of 8 '
                         '(GroupNorm with 8 groups).')
  bad_forms = sorted(set(FLAGS.loop_forms) - set(LOOP_FORMS))
  if bad_forms or not FLAGS.loop_forms:
    raise app.UsageError(f'--loop_forms must be among {list(LOOP_FORMS)}, got '
                         f'{FLAGS.loop_forms}.')
  config = dict(default_config(), model=FLAGS.model, batch=FLAGS.batch,
                channels=FLAGS.channels, inner=FLAGS.inner,
                f_iters=FLAGS.f_iters, b_iters=FLAGS.b_iters, steps=FLAGS.steps,
                rounds=FLAGS.rounds, warmup=FLAGS.warmup, loop=FLAGS.loop,
                loop_forms=tuple(FLAGS.loop_forms), layers=tuple(FLAGS.layers),
                reference=FLAGS.reference, compiler_options=FLAGS.compiler_options,
                torchdeq_python=FLAGS.torchdeq_python,
                reference_script=FLAGS.reference_script)
  try:
    result = run(config, cli.WORKDIR.value or '')
  except (FileNotFoundError, ValueError) as error:
    raise app.UsageError(str(error)) from None
  print(json.dumps(result))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
