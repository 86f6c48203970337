r"""Training-step time and memory of DEQs with and without Jacobian
regularisation, against explicit networks of similar size.

Bai, Koltun & Kolter (ICML 2021), Sec. 5 and Fig. 1 / Table 1: the Jacobian
term costs about 25-30% more memory per step and, by cutting the NFE the
solvers need, makes DEQs nearly as fast as explicit networks. This benchmark
measures, in one process and one run, for every case:

  * `step_time_s`: the median wall time of a full training step (gradient +
    Adam update, `jreg.train.make_update`, jitted), after `warmup` steps;
  * `memory_bytes`: the compiled step's `memory_analysis()`: temp +
    argument + output bytes (what XLA plans for one step: on CPU there is no
    peak-memory counter, and on an accelerator the device's
    `peak_bytes_in_use`, also reported as `device_peak_bytes_so_far`, is a
    process-wide high-water mark that later cases cannot lower);
  * the forward / backward NFE of the step, and the parameter count.

Cases (extensible: `CASES` maps a name to a function returning a `Case`):
  mdeq          the small CIFAR-10 MDEQ (experiments/configs/deq_cifar10.py:small),
                no Jacobian term;
  mdeq_jr       the same with the Jacobian term on every step (p = 1; the
                cost at p < 1 is (1 - p) * mdeq + p * mdeq_jr in time);
  mdeq_explicit the MDEQ cell unrolled L times with untied weights, width
                shrunk to a similar parameter count (`ExplicitMDEQ`);
  deqtx, deqtx_jr, deqtx_explicit
                the DEQ-Transformer of experiments/configs/deq_wikitext.py:small
                (`small_config()`, its `build` contract) likewise, and its
                explicit Transformer-XL stack (`explicit_config`).
The solvers run their whole budget (tolerance 0) so that every step does the
same work, in `lax.while_loop` as in training. Ratios (`summary`) are taken
within this run.

Layers (`--layers`, default `custom,xla`): every case is compiled and timed
with `jreg.layers` in each listed implementation ('custom': convolutions with
their own VJP and one-pass GroupNorm; 'xla': autodiff of
`lax.conv_general_dilated` and two-pass GroupNorm, the code path before
`jreg.layers`, and for the DEQ-Transformer also the dense adaptive-softmax
tails, `softmax_tail_chunks=0`, and compiled with XLA's default options
rather than `jreg.xla_cpu`'s); results are keyed `case/impl`, the cases of
one name are timed
interleaved (`--rounds`), and `speedup_custom_over_xla` gives, per case, the
ratio of the xla step time to the custom one. `compile_s` is the time of
`jit(...).lower(...).compile()` of the whole training step.

Memory against forward NFE (`--memory_nfe=10,40`): for the first case listed
(usually `mdeq_jr`), the compiled step's planned memory at each forward
budget (flat if the implicit layer stores no iterates and the forward
solver's memory does not grow with its budget: Anderson's does not,
Broyden's with `broyden_rank=None` does).

The DEQ-Transformer's batch is WikiText-2 text when the data is found
(`$JREG_DATA_DIR` or the download cache), else Zipf-distributed token ranks
(`_text_batch`): the softmax's cost depends on the tokens' frequencies.

    python -m experiments.bench_deq_models --cases=mdeq_jr,deqtx_jr --steps=3
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg import layers
from jreg import train
from jreg import xla_cpu
from jreg.data import wikitext
from jreg.models import count_params
from jreg.tasks import deq_lm
from jreg.tasks import mdeq as mdeq_task


class Case(NamedTuple):
  """One benchmarked network: its jreg.train functions and a batch."""
  init_fn: Callable   # rng -> (params, model_state)
  grad_fn: Callable   # jreg.train grad_fn contract
  batch: dict         # one global batch of NumPy arrays
  info: dict          # what to print about the case


def _mdeq_case(jacobian: bool, network: str = 'mdeq',
               overrides: dict | None = None) -> Case:
  """The small CIFAR-10 MDEQ at fixed budgets (tolerance 1e-12: no early stop)."""
  weight = 0.5 if jacobian else 0.0
  config = cli.get_config('deq_cifar10', 'small', {
      'model.network': network, 'deq.forward.tol': 1e-12,
      'deq.backward.tol': 1e-12, 'jacobian.weight': weight,
      'jacobian.weight_final': weight, 'jacobian.probability': 1.0,
      'jacobian.probability_final': 1.0, **(overrides or {})})
  fns = mdeq_task.build(config, (32, 32, 3), config.num_steps, num_classes=10)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(config.batch_size, 32, 32, 3)
                               ).astype(np.float32),
           'label': rng.integers(0, 10, config.batch_size).astype(np.int32)}
  info = dict(model=config.model.name, batch_size=config.batch_size,
              forward_nfe_budget=config.deq.forward.max_iter,
              backward_nfe_budget=config.deq.backward.max_iter)
  return Case(fns.init_fn, fns.grad_fn, batch, info)


WIKITEXT2_VOCAB = 33_278   # the small preset's vocabulary (WikiText-2)


@functools.lru_cache(maxsize=None)
def _text_batch(batch: int, length: int) -> tuple[dict, str]:
  """A `[B, T]` language-modelling batch of text, and where it came from.

  The adaptive softmax's tail clusters cost in proportion to the tokens whose
  targets fall in them, so the batch must have text's token frequencies:
  WikiText-2's first training batch (`wikitext_iterator`, as training starts),
  or, without the data, ranks drawn from Zipf's law p(r) ∝ 1 / (r + 1)
  (74.5% / 14.6% / 10.9% of tokens in the small preset's clusters, against
  WikiText-2's 77.3% / 15.6% / 7.1%). Loaded once per shape.
  """
  try:
    corpus = wikitext.load_wikitext('wikitext-2', source='local')
    return next(wikitext.wikitext_iterator(corpus, 'train', batch, length)), (
        'wikitext-2 train')
  except data.DataError:
    weights = 1.0 / np.arange(1, WIKITEXT2_VOCAB + 1)
    rng = np.random.default_rng(0)
    tokens = rng.choice(WIKITEXT2_VOCAB, size=(batch, length + 1),
                        p=weights / weights.sum()).astype(np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, 'zipf'


def _deqtx_case(jacobian: bool, explicit: bool = False,
                overrides: dict | None = None, impl: str = 'custom') -> Case:
  """The small DEQ-Transformer at fixed budgets (tolerance 1e-12).

  `impl='xla'` also computes the adaptive softmax's tails for every token
  (`softmax_tail_chunks=0`), as before the tail rows were gathered.
  """
  values = {'deq.forward.tol': 1e-12, 'deq.backward.tol': 1e-12}
  if jacobian:
    values['jacobian.probability'] = 1.0
  else:
    values.update({'jacobian.weight': 0.0, 'jacobian.weight_final': 0.0})
  config = cli.get_config('deq_wikitext', 'small',
                          {**values, **(overrides or {})})
  if explicit:
    config = deq_lm.explicit_config(config)
  if impl == 'xla':
    config.model.softmax_tail_chunks = 0
  built = deq_lm.build(config, WIKITEXT2_VOCAB)
  batch, source = _text_batch(config.batch_size, config.data.seq_len)
  info = dict(model='deq_transformer_small', batch_size=config.batch_size,
              seq_len=config.data.seq_len, tokens=source,
              forward_nfe_budget=config.deq.forward.max_iter,
              backward_nfe_budget=config.deq.backward.max_iter)
  return Case(built.init_fn, built.grad_fn, batch, info)


# name -> (builder(impl), group, role); a new case is one more entry.
CASES: dict[str, tuple[Callable[[str], Case], str, str]] = {
    'mdeq': (lambda impl: _mdeq_case(False), 'mdeq', 'deq'),
    'mdeq_jr': (lambda impl: _mdeq_case(True), 'mdeq', 'deq_jr'),
    'mdeq_explicit': (lambda impl: _mdeq_case(False, 'explicit'), 'mdeq',
                      'explicit'),
    'deqtx': (lambda impl: _deqtx_case(False, impl=impl), 'deqtx', 'deq'),
    'deqtx_jr': (lambda impl: _deqtx_case(True, impl=impl), 'deqtx', 'deq_jr'),
    'deqtx_explicit': (lambda impl: _deqtx_case(False, explicit=True, impl=impl),
                       'deqtx', 'explicit'),
}


# Cases whose forward budget can be set, for `memory_against_nfe`.
MEMORY_CASES: dict[str, Callable[[int], Case]] = {
    'mdeq_jr': lambda nfe: _mdeq_case(True, overrides={'deq.forward.max_iter': nfe}),
    'mdeq': lambda nfe: _mdeq_case(False, overrides={'deq.forward.max_iter': nfe}),
    'deqtx_jr': lambda nfe: _deqtx_case(True,
                                        overrides={'deq.forward.max_iter': nfe}),
    'deqtx': lambda nfe: _deqtx_case(False,
                                     overrides={'deq.forward.max_iter': nfe}),
}


def _memory(compiled, device) -> dict[str, Any]:
  analysis = compiled.memory_analysis()
  out = {'memory_bytes': int(analysis.temp_size_in_bytes +
                             analysis.argument_size_in_bytes +
                             analysis.output_size_in_bytes),
         'temp_bytes': int(analysis.temp_size_in_bytes),
         'memory_source': 'compiled memory_analysis: temp + argument + output'}
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_bytes_so_far'] = int(stats['peak_bytes_in_use'])
  return out


def _jit(impl: str):
  """How a step is compiled: as `jreg.train` compiles it (`jreg.xla_cpu.jit`)
  for the current path, with XLA's defaults for the old path ('xla')."""
  return xla_cpu.jit if impl == 'custom' else jax.jit


class _Compiled:
  """One case's training step, compiled (under a `jreg.layers` implementation)."""

  def __init__(self, case: Case, warmup: int, impl: str = 'custom'):
    optimizer = optax.adam(1e-3)
    self.case = case
    with layers.implementation(impl):
      self.state = train.init_state(jax.jit(case.init_fn), optimizer, seed=0)
      update = _jit(impl)(train.make_update(case.grad_fn, optimizer),
                          donate_argnums=0)
      self.batch = jax.device_put(case.batch)
      start = time.perf_counter()
      self.compiled = update.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - start
    for _ in range(warmup):
      self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    self.times = []

  def time(self, steps: int):
    for _ in range(steps):
      start = time.perf_counter()
      self.state, self.metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, self.metrics))
      self.times.append(time.perf_counter() - start)

  def result(self) -> dict[str, Any]:
    metrics = jax.device_get(self.metrics)
    out = dict(self.case.info, step_time_s=statistics.median(self.times),
               step_times_s=self.times, compile_s=self.compile_s,
               num_params=count_params(self.state.params),
               **_memory(self.compiled, jax.devices()[0]))
    for key in ('forward_nfe', 'backward_nfe', 'jacobian_applied', 'loss'):
      if key in metrics:
        out[key] = float(metrics[key])
    return out


def measure(case: Case, steps: int, warmup: int,
            impl: str = 'custom') -> dict[str, Any]:
  """Compiles one training step and times `steps` of them."""
  compiled = _Compiled(case, warmup, impl)
  compiled.time(steps)
  return compiled.result()


def memory_against_nfe(name: str, budgets, impl: str = 'custom') -> dict:
  """Planned memory of case `name`'s compiled step at each forward budget."""
  out = {}
  for nfe in budgets:
    builder = MEMORY_CASES[name]
    with layers.implementation(impl):
      case = builder(nfe)
      optimizer = optax.adam(1e-3)
      state = train.init_state(jax.jit(case.init_fn), optimizer, seed=0)
      update = _jit(impl)(train.make_update(case.grad_fn, optimizer),
                          donate_argnums=0)
      compiled = update.lower(state, jax.device_put(case.batch)).compile()
    out[str(nfe)] = _memory(compiled, jax.devices()[0])
  return out


def run(case_names, steps: int = 3, warmup: int = 1,
        impls=('custom',), rounds: int = 1,
        memory_nfe=()) -> dict[str, Any]:
  """Measures every named case; returns {'cases', 'summary', 'device'}.

  With several `impls`, each case is compiled once per implementation and
  the implementations are timed interleaved over `rounds` rounds of `steps`
  steps; results are keyed `name` for the first implementation and
  `name/impl` for the others.
  """
  unknown = sorted(set(case_names) - set(CASES))
  if unknown:
    raise ValueError(f'unknown cases {unknown}; known: {sorted(CASES)}.')
  for impl in impls:
    if impl not in layers.IMPLEMENTATIONS:
      raise ValueError(f'unknown layers {impl!r}; use {layers.IMPLEMENTATIONS}.')
  results, roles, speedups = {}, {}, {}
  for name in case_names:
    builder, group, role = CASES[name]
    logging.info('bench_deq_models: %s', name)
    compiled = {impl: _Compiled(builder(impl), warmup, impl) for impl in impls}
    for _ in range(rounds):
      for impl in impls:
        compiled[impl].time(steps)
    for index, impl in enumerate(impls):
      results[name if index == 0 else f'{name}/{impl}'] = (
          dict(compiled[impl].result(), layers=impl))
    if 'custom' in impls and 'xla' in impls:
      speedups[name] = (results[name if impls[0] == 'xla' else f'{name}/xla']
                        ['step_time_s'] /
                        results[name if impls[0] == 'custom'
                                else f'{name}/custom']['step_time_s'])
    roles.setdefault(group, {})[role] = name
  summary = {}
  if speedups:
    summary['speedup_custom_over_xla'] = speedups
  for group, members in roles.items():
    ratios = {}
    base = results.get(members.get('deq'))
    jr = results.get(members.get('deq_jr'))
    explicit = results.get(members.get('explicit'))
    if base and jr:
      ratios['jr_over_deq_memory'] = jr['memory_bytes'] / base['memory_bytes']
      ratios['jr_over_deq_step_time'] = jr['step_time_s'] / base['step_time_s']
    for label, deq_case in (('deq', base), ('deq_jr', jr)):
      if deq_case and explicit:
        ratios[f'{label}_over_explicit_step_time'] = (
            deq_case['step_time_s'] / explicit['step_time_s'])
        ratios[f'{label}_over_explicit_memory'] = (
            deq_case['memory_bytes'] / explicit['memory_bytes'])
    summary[group] = ratios
  device = jax.devices()[0]
  out = dict(cases=results, summary=summary,
             device=f'{device.platform}: {device.device_kind}',
             steps=steps, warmup=warmup, rounds=rounds, layers=list(impls))
  if memory_nfe:
    name = case_names[0]
    if name not in MEMORY_CASES:
      raise ValueError(f'memory against NFE needs one of {sorted(MEMORY_CASES)} '
                       f'first in --cases, got {name!r}.')
    out['memory_against_forward_nfe'] = {
        name: memory_against_nfe(name, memory_nfe, impls[0])}
  return out


def define_flags():
  flags.DEFINE_list('cases', list(CASES), f'Cases, of {list(CASES)}.')
  flags.DEFINE_integer('steps', 3, 'Timed steps per case.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compiling.')
  flags.DEFINE_integer('rounds', 2, 'Interleaved rounds over --layers.')
  flags.DEFINE_list('layers', ['custom', 'xla'],
                    'Code paths: custom (jreg.layers, gathered softmax tails) '
                    'and xla (before them); the first one keys the plain '
                    'case names.')
  flags.DEFINE_list('memory_nfe', [], 'Forward budgets for the memory '
                    'comparison of the first case (e.g. 10,40).')


def main(argv):
  del argv
  f = flags.FLAGS
  if f.steps < 1 or f.warmup < 0 or f.rounds < 1:
    raise app.UsageError('--steps and --rounds must be >= 1 and --warmup >= 0.')
  try:
    memory_nfe = [int(n) for n in f.memory_nfe]
  except ValueError:
    raise app.UsageError(f'--memory_nfe must be integers, got {f.memory_nfe}.'
                         ) from None
  if any(n < 1 for n in memory_nfe):
    raise app.UsageError(f'--memory_nfe must be >= 1, got {memory_nfe}.')
  try:
    results = run(f.cases, f.steps, f.warmup, tuple(f.layers), f.rounds,
                  memory_nfe)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  json.dump(results, sys.stdout, indent=1)
  print()


if __name__ == '__main__':
  define_flags()
  app.run(main)
