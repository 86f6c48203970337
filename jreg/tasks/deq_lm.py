"""Word-level language modelling with the DEQ-Transformer: objective, schedule, evaluation.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization" (ICML 2021, Sec. 5.2, Appendix A) on the DEQ-Transformer of
Bai, Kolter & Koltun (NeurIPS 2019) (`jreg.models.deq_transformer`). The
training objective per segment is

    loss = mean token NLL + gamma(t) * ||J_f(z*)||_F^2 / d,

the Jacobian term on a random fraction p of the steps of the DEQ phase, after
`deq.pretrain_steps` steps of the unrolled weight-tied network. gamma(t) rises
from `jacobian.weight` to `jacobian.weight_final` in steps of 0.1
(`jacobian_weight`). Evaluation is Transformer-XL's ordered evaluation with
memory carried across segments (`perplexity`).

From a config in the naming scheme of `experiments/configs` (`model.*`,
`deq.*`, `jacobian.*`, `data.seq_len`, `data.eval_seq_len`, ...):
`model_config(config, vocab_size)`, `explicit_config(config)`,
`build(config, vocab_size) -> Built`, `train(...)`, `summarize(...)`,
`plot_runs(...)`.

Shapes: B batch (streams), T segment length, V vocabulary.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jreg import deq as deq_lib
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import train as train_lib
from jreg import xla_cpu
from jreg.data import wikitext
from jreg.models import deq_transformer as dtm
from jreg.tasks import deq as deq_task
from jreg.tasks import mdeq as mdeq_task
from jreg.tasks import optimizers

MODEL_KEYS = ('architecture', 'd_model', 'n_head', 'd_head', 'd_inner', 'cutoffs',
              'div_val', 'dropout', 'dropatt', 'pre_lnorm', 'weight_norm',
              'mem_len', 'n_layer', 'init_std', 'proj_init_std')
# Implementation choices with defaults in `TransformerConfig`, read when set
# (e.g. `softmax_tail_chunks=0`, the dense tails, for a comparison).
OPTIONAL_MODEL_KEYS = ('softmax_chunk_size', 'softmax_tail_chunks')


def model_config(config, vocab_size: int) -> dtm.TransformerConfig:
  """The `TransformerConfig` of `config.model` for a vocabulary of `vocab_size`.

  Raises:
    ValueError: an inconsistent architecture (one sentence, from the model).
  """
  values = {key: config.model[key] for key in MODEL_KEYS}
  for key in OPTIONAL_MODEL_KEYS:   # not in the experiment configs
    if key in config.model:
      values[key] = config.model[key]
  values['cutoffs'] = tuple(values['cutoffs'])
  return dtm.TransformerConfig(vocab_size=vocab_size, **values)


def explicit_config(config, n_layer: Optional[int] = None
                    ) -> ml_collections.ConfigDict:
  """The explicit Transformer-XL counterpart of a DEQ configuration.

  Same width, heads, memory, embedding and softmax, `n_layer` untied layers
  (default `model.n_layer`) whose feed-forward width is chosen so that the
  layers together have about as many parameters as the DEQ's one layer
  (at least D, so small configurations get a larger explicit stack)
  (per layer: 5 D^2 + 2 D F + 2 F + 10 D with weight normalisation).
  """
  config = config.copy_and_resolve_references()
  layers = n_layer or config.model.n_layer
  d, f = config.model.d_model, config.model.d_inner
  per_layer = lambda inner: 5 * d * d + 2 * d * inner + 2 * inner + 10 * d  # noqa: E731
  target = per_layer(f) / layers
  config.model.architecture = 'transformer_xl'
  config.model.n_layer = layers
  config.model.d_inner = max(d, round((target - 5 * d * d - 10 * d) / (2 * d + 2)))
  return config


def jacobian_weight(step, config) -> jax.Array:
  """gamma(step): `jacobian.weight` at the start of the DEQ phase, raised in
  steps of 0.1 evenly over the DEQ phase to `jacobian.weight_final`.

  The reference (`train_transformer.py`, `--jac_incremental`) adds 0.1 every
  fixed number of steps; here that interval is chosen so that the paper's
  final value is reached at the end of training.
  """
  start, end = config.deq.pretrain_steps, config.num_steps
  g0, g1 = config.jacobian.weight, config.jacobian.weight_final
  increments = round((g1 - g0) / 0.1)
  if increments <= 0 or end <= start:
    return jnp.asarray(g0, jnp.float32)
  fraction = jnp.clip((step - start) / (end - start), 0.0, 1.0)
  return jnp.asarray(g0 + 0.1 * jnp.floor(fraction * increments + 1e-6),
                     jnp.float32)


def check(config) -> None:
  """Range checks of a DEQ-Transformer config (one sentence).

  Raises:
    ValueError: naming the key.
  """
  deq_task.solver_config(config.deq.forward, 'deq.forward')
  deq_task.backward_config(config.deq.backward, 'deq.backward')
  deq_task.compute_dtype(config.deq)
  deq_task.check_jacobian(config.jacobian)
  for key in ('seq_len', 'eval_seq_len'):
    if config.data[key] < 1:
      raise ValueError(f'data.{key} must be >= 1, got {config.data[key]}.')
  for key in ('pretrain_layers', 'eval_pretrain_layers'):
    if config.deq[key] < 1:
      raise ValueError(f'deq.{key} must be >= 1, got {config.deq[key]}.')
  if not 0 <= config.deq.pretrain_steps <= config.num_steps:
    raise ValueError(f'deq.pretrain_steps={config.deq.pretrain_steps} must be in '
                     f'[0, num_steps={config.num_steps}].')
  if config.eval_max_batches < 0:
    raise ValueError(f'eval_max_batches must be >= 0 (0: the whole split), got '
                     f'{config.eval_max_batches}.')
  model_config(config, vocab_size=max(config.model.cutoffs or (0,)) + 1)


class Built(NamedTuple):
  """What `build` returns; every function follows jreg.train's contracts."""
  init_fn: Callable         # rng -> (params, model_state), memory for batch_size
  loss_fn: Callable         # DEQ phase (or the explicit stack)
  grad_fn: Callable         # jreg.deq.value_and_grad(loss_fn) + per-device memory
  pretrain_loss_fn: Callable  # unrolled weight-tied phase (== loss_fn if explicit)
  pretrain_grad_fn: Callable
  eval_step: Callable       # (params, state, batch, unrolled) -> (sum nll, count, state, info)
  initial_state: Callable   # batch_size -> fresh model_state (empty memory)
  transformed: hk.TransformedWithState
  model_config: dtm.TransformerConfig


def build(config, vocab_size: int) -> Built:
  """Builds the model and its training / evaluation functions from `config`."""
  cfg = model_config(config, vocab_size)
  forward_solver = deq_task.solver_config(config.deq.forward, 'deq.forward')
  backward = deq_task.backward_config(config.deq.backward, 'deq.backward')
  compute_dtype = deq_task.compute_dtype(config.deq)
  probability = config.jacobian.probability
  use_jacobian = (cfg.architecture == 'deq' and config.jacobian.weight > 0
                  and probability > 0)

  def forward(inputs, targets, is_training, unrolled=False):
    model = dtm.DEQTransformerLM(
        cfg, forward=forward_solver, backward=backward,
        pretrain_layers=config.deq.pretrain_layers,
        eval_pretrain_layers=config.deq.eval_pretrain_layers,
        compute_dtype=compute_dtype)
    step = deq_lib.step_count(increment=is_training)
    gate = False
    if is_training and not unrolled and use_jacobian:
      gate = deq_lib.regularization_gate(hk.next_rng_key(), probability)
    log_prob, info = model(inputs, targets, is_training=is_training,
                           unrolled=unrolled and cfg.architecture == 'deq',
                           jacobian_loss=gate)                       # [B, T]
    return log_prob, info, step

  transformed = hk.transform_with_state(forward)
  batch, seq_len = config.batch_size, config.data.seq_len

  @xla_cpu.jit
  def init_fn(rng):   # compiled: eager Haiku init would compile op by op
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return transformed.init(rng, tokens, tokens, True)

  def initial_state(batch_size):
    tokens = jax.ShapeDtypeStruct((batch_size, config.data.eval_seq_len), jnp.int32)
    _, state = jax.eval_shape(
        lambda t: transformed.init(jax.random.PRNGKey(0), t, t, False), tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)

  def make_loss(unrolled):
    def loss_fn(params, model_state, rng, batch):
      (log_prob, info, step), model_state = transformed.apply(
          params, model_state, rng, batch['inputs'], batch['targets'], True,
          unrolled)
      nll = -jnp.mean(log_prob)
      metrics = dict(info, nll=nll, ppl=jnp.exp(nll))
      loss = nll
      if use_jacobian:
        gamma = jacobian_weight(step, config)
        if 'jacobian_loss' in info:
          loss = loss + gamma * info['jacobian_loss']
        else:  # pre-training: the same metric names in both phases
          metrics.update(jacobian_loss=jnp.zeros([]), jacobian_applied=jnp.zeros([]))
        metrics['jacobian_weight'] = gamma
      return loss, (model_state, metrics)
    return loss_fn

  loss_fn = make_loss(False)
  pretrain_loss_fn = make_loss(cfg.architecture == 'deq')

  def eval_apply(params, state, batch, unrolled):
    (log_prob, info, _), state = transformed.apply(
        params, state, None, batch['inputs'], batch['targets'], False, unrolled)
    mask = batch.get('mask', jnp.ones_like(log_prob, bool))
    total = -jnp.sum(jnp.where(mask, log_prob, 0.0))
    return total, jnp.sum(mask), state, info

  compiled_eval = xla_cpu.jit(eval_apply, static_argnums=3)

  def eval_step(params, state, batch, unrolled=False):
    return compiled_eval(params, state, batch,
                         unrolled and cfg.architecture == 'deq')

  return Built(
      init_fn=init_fn, loss_fn=loss_fn,
      grad_fn=dtm.shard_memory(deq_lib.value_and_grad(loss_fn)),
      pretrain_loss_fn=pretrain_loss_fn,
      pretrain_grad_fn=dtm.shard_memory(deq_lib.value_and_grad(pretrain_loss_fn)),
      eval_step=eval_step, initial_state=initial_state,
      transformed=transformed, model_config=cfg)


def perplexity(built: Built, params, tokens: np.ndarray, batch_size: int,
               seq_len: int, *, unrolled: bool = False, max_batches: int = 0
               ) -> dict[str, float]:
  """exp(mean token NLL) over a split, memory carried across its segments.

  Transformer-XL's ordered evaluation: the stream is cut into `batch_size`
  contiguous rows read in segments of `seq_len`; every target of the trimmed
  stream is scored once (the padded tail is masked). `max_batches > 0` stops
  early (periodic evaluations of long runs).
  """
  iterator = wikitext.LMOrderedIterator(tokens, batch_size, seq_len, mode='eval',
                                        process_index=0, process_count=1)
  state = built.initial_state(batch_size)
  total, count, nfe, residual, batches = 0.0, 0, [], [], 0
  for batch in iterator:
    if max_batches and batches >= max_batches:
      break
    nll, n, state, info = built.eval_step(params, state, batch, unrolled)
    total += float(nll)
    count += int(n)
    batches += 1
    if 'forward_nfe' in info:
      nfe.append(float(info['forward_nfe']))
      residual.append(float(info['forward_rel_residual']))
  mean_nll = total / count
  out = {'nll': mean_nll, 'ppl': math.exp(mean_nll), 'tokens': count}
  if nfe:
    out.update(forward_nfe=float(np.mean(nfe)),
               forward_rel_residual=float(np.mean(residual)))
  return out


def pretrain_steps(config, built: Built) -> int:
  """Steps of the unrolled weight-tied phase (none for the explicit stack)."""
  return config.deq.pretrain_steps if built.model_config.architecture == 'deq' else 0


def train(config, workdir: str, corpus, built: Built):
  """Both phases in one `jreg.train.fit`; returns `(state, history)`.

  Evaluation (every `eval_every` steps and at the end) reads `eval_max_batches`
  batches of the validation split (0: all of it) from an empty memory,
  unrolled during pre-training (the reference's eval_n_layer), as a DEQ after.
  `wall_time` is the run's time since it started training, carried across
  resumes (`jreg.tasks.mdeq.carried_time`).
  """
  train_iter = wikitext.wikitext_iterator(corpus, 'train', config.batch_size,
                                          config.data.seq_len)
  optimizer, schedule = optimizers.make_optimizer(
      config.learning_rate, config.optimizer, config.num_steps)
  pretrain = pretrain_steps(config, built)
  start_time = time.perf_counter()
  carried = []  # read at the first evaluation, after `fit` kept its records

  def eval_fn(params, model_state):
    steps_done = float(model_state['~']['step_count'])
    out = perplexity(built, params, corpus.valid, config.eval_batch_size,
                     config.data.eval_seq_len, unrolled=steps_done <= pretrain,
                     max_batches=config.eval_max_batches)
    if not carried:
      carried.append(mdeq_task.carried_time(workdir, 'wall_time'))
    out['wall_time'] = carried[0] + time.perf_counter() - start_time
    return out

  if pretrain == config.num_steps:
    phases = [(pretrain, built.pretrain_grad_fn)]
  else:
    grad_fn = built.grad_fn
    if built.model_config.architecture == 'deq':  # a line for unconverged solves
      grad_fn = deq_task.log_unconverged_from_config(grad_fn, config)
    phases = [(config.num_steps, grad_fn)]
    if pretrain:
      phases.insert(0, (pretrain, built.pretrain_grad_fn))
  return train_lib.fit(
      workdir=workdir, init_fn=built.init_fn, grad_fn=phases, optimizer=optimizer,
      train_iter=train_iter, num_steps=config.num_steps, seed=config.seed,
      parallel=config.parallel, eval_fn=eval_fn, eval_every=config.eval_every,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      learning_rate_fn=schedule)


def summarize(config, built: Built, history: list[dict], valid: Mapping[str, Any],
              num_params: int) -> dict[str, Any]:
  """The headline numbers of a run from its whole `metrics.jsonl` (`history`)
  and the reported validation record `valid`."""
  pretrain = pretrain_steps(config, built)
  train_records = [r for r in history if r['split'] == 'train'
                   and r['step'] > pretrain and 'forward_nfe' in r]
  return {
      'valid_ppl': valid['ppl'], 'valid_nll': valid['nll'],
      'valid_tokens': valid['tokens'],
      'valid_whole_split': valid['split'] == 'eval_whole' or not config.eval_max_batches,
      'valid_forward_nfe': valid.get('forward_nfe'),
      'valid_forward_rel_residual': valid.get('forward_rel_residual'),
      'train_forward_nfe_mean': (float(np.mean([r['forward_nfe'] for r in train_records]))
                                 if train_records else None),
      'num_params': num_params,
      'steps': config.num_steps, 'pretrain_steps': pretrain,
      'architecture': built.model_config.architecture,
  }


def plot_runs(runs: Mapping[str, str], path: str) -> None:
  """NFE and residual over training, and validation perplexity against wall
  time, for one or several runs (`{label: workdir}`), as one PNG."""
  loaded = {label: metrics_lib.read_jsonl(os.path.join(d, 'metrics.jsonl'))
            for label, d in runs.items()}
  budgets = set()
  for d in runs.values():
    if os.path.isfile(os.path.join(d, 'config.json')):
      with open(os.path.join(d, 'config.json')) as f:
        budgets.add(plotting.solver_budgets(json.load(f))['forward_nfe'])
  with plotting.figure(path, ncols=3) as (_, axes):
    plotting.curves(axes[0], {label: metrics_lib.series(r, 'forward_nfe')
                              for label, r in loaded.items()},
                    'step', 'forward NFE', 'solver NFE (train)')
    for value in sorted(b for b in budgets if b is not None):
      plotting.budget(axes[0], value, 'forward max_iter')
    plotting.curves(axes[1], {label: metrics_lib.series(r, 'forward_rel_residual')
                              for label, r in loaded.items()},
                    'step', 'relative residual', 'forward residual (train)',
                    logy=True)
    time_ppl = {}
    for label, records in loaded.items():
      evals = [r for r in records if r['split'] == 'eval' and 'wall_time' in r]
      time_ppl[label] = ([r['wall_time'] for r in evals], [r['ppl'] for r in evals])
    plotting.curves(axes[2], time_ppl, 'wall time (s)', 'validation perplexity',
                    'perplexity vs wall time', logy=True, marker='.')
