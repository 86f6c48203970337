"""DEQ-Transformer on WikiText with Jacobian regularisation.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.2 and Appendix A (Tables 3-4): the
DEQ-Transformer of Bai, Kolter & Koltun (NeurIPS 2019) on WikiText-103, trained
with Adam (2.5e-4, linear warm-up then cosine decay), batch 60 x 150 tokens,
memory of 300 positions, forward/backward solver budgets 12/12 NFE, an unrolled
weight-tied pre-training phase, and the Jacobian term gamma * ||J_f(z*)||_F^2/d
on a random fraction p = 0.35 of steps with gamma raised from 1.6 to 2.5.
`default_config()` is that run; the data path is its only required flag:

    python -m experiments.deq_wikitext --workdir=runs/wt103 \
        --data_dir=/path/with/wikitext-103 --parallel=sharded

Reduced runs here use WikiText-2 (`--dataset_name=wikitext-2`) and
`small_config()`; `--model_architecture=transformer_xl` trains the explicit
(untied) Transformer-XL stack instead. See BUILD_NOTES.md (DEQ-Transformer).

Library contract (used by experiments/bench_deq_models.py):
`build(config) -> Built` with `init_fn(rng) -> (params, model_state)`,
`loss_fn` / `grad_fn` (jreg.train contracts; DEQ phase), `pretrain_loss_fn` /
`pretrain_grad_fn` (unrolled phase), `eval_step`, `initial_state(batch)`;
`small_config()` is a WikiText-2-sized configuration.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg import deq
from jreg import plotting
from jreg import train
from jreg.data import wikitext
from jreg.metrics import read_jsonl, series
from jreg.models import deq_transformer as dtm


def default_config() -> dict[str, Any]:
  """The paper's WikiText-103 DEQ-Transformer run (Table 4; reference script)."""
  return dict(
      dataset_name='wikitext-103',
      dataset_dir=None,             # None: ../shared/data beside the repository
      dataset_source='local',
      vocab_size=267_735,           # replaced by the loaded vocabulary's size
      train_batch_size=60,          # global, split over devices/hosts
      train_seq_len=150,
      train_steps=300_000,
      train_pretrain_steps=32_000,  # unrolled weight-tied phase
      train_pretrain_layers=2,      # N weight-tied applications when pre-training
      eval_batch_size=16,
      eval_seq_len=150,
      eval_pretrain_layers=24,      # unrolled depth when evaluating in pre-training
      eval_max_batches=0,           # 0: whole split; > 0: that many batches
      final_eval_whole_split=True,  # the reported perplexity reads the whole split
      optimizer_lr=2.5e-4,          # Adam
      optimizer_warmup_epochs=1.0,  # linear warm-up, then cosine decay to 0
      optimizer_clip=0.25,          # global-norm clipping (reference --clip)
      model_architecture='deq',     # 'deq' | 'transformer_xl' (explicit, untied)
      model_d_model=700,
      model_n_head=10,
      model_d_head=70,
      model_d_inner=48_000,
      model_cutoffs=(20_000, 40_000, 200_000),
      model_div_val=4,
      model_dropout=0.06,
      model_dropatt=0.01,
      model_pre_lnorm=False,
      model_weight_norm=True,
      model_mem_len=300,
      model_n_layer=16,             # explicit stack depth (transformer_xl)
      model_init_std=0.01,
      model_proj_init_std=0.01,
      deq_forward_solver='anderson',
      deq_forward_nfe=12,
      deq_backward_solver='broyden',
      deq_backward_nfe=12,
      deq_tol=1e-3,                 # relative residual
      jacobian_weight_init=1.6,     # gamma at the start of the DEQ phase
      jacobian_weight_final=2.5,    # gamma at the end, raised in steps of 0.1
      jacobian_probability=0.35,    # p: fraction of steps with the term
      seed=0,
      parallel='single',
      log_every=200,
      eval_every=5000,
      checkpoint_every=5000,
  )


def small_config() -> dict[str, Any]:
  """A small DEQ-Transformer for WikiText-2 (CPU-sized; benchmarks, reduced runs)."""
  return dict(
      default_config(),
      dataset_name='wikitext-2', vocab_size=33_278,
      train_batch_size=8, train_seq_len=32, train_steps=400,
      train_pretrain_steps=100, eval_batch_size=8, eval_seq_len=32,
      eval_pretrain_layers=6, eval_max_batches=0,
      optimizer_lr=1e-3, optimizer_warmup_epochs=0.0,
      model_d_model=64, model_n_head=4, model_d_head=16, model_d_inner=256,
      model_cutoffs=(2_000, 10_000), model_div_val=4, model_dropout=0.05,
      model_dropatt=0.0, model_mem_len=32, model_n_layer=4,
      model_init_std=0.05, model_proj_init_std=0.05,
      deq_forward_nfe=12, deq_backward_nfe=12,
      log_every=20, eval_every=100, checkpoint_every=0)


def quickstart_config() -> dict[str, Any]:
  """Runs in well under a minute on 2 CPU cores (WikiText-2, tiny model)."""
  return dict(
      small_config(), train_batch_size=4, train_seq_len=16, train_steps=12,
      train_pretrain_steps=4, eval_batch_size=4, eval_seq_len=16,
      eval_max_batches=4, model_d_model=32, model_n_head=2, model_d_inner=64,
      model_mem_len=16, model_n_layer=2, deq_forward_nfe=6, deq_backward_nfe=6,
      log_every=4, eval_every=0, checkpoint_every=0, final_eval_whole_split=False)


def explicit_config(config, n_layer: Optional[int] = None) -> dict[str, Any]:
  """The explicit Transformer-XL counterpart of a DEQ configuration.

  Same width, heads, memory, embedding and softmax, `n_layer` untied layers
  (default `model_n_layer`) whose feed-forward width is chosen so that the
  layers together have about as many parameters as the DEQ's one layer
  (at least D, so small configurations get a larger explicit stack)
  (per layer: 5 D^2 + 2 D F + 2 F + 10 D with weight normalisation). Used by
  the DEQ-vs-explicit benchmark (experiments/bench_deq_models.py).
  """
  config = dict(default_config(), **config)
  layers = n_layer or config['model_n_layer']
  d, f = config['model_d_model'], config['model_d_inner']
  per_layer = lambda inner: 5 * d * d + 2 * d * inner + 2 * inner + 10 * d
  target = per_layer(f) / layers
  inner = max(d, round((target - 5 * d * d - 10 * d) / (2 * d + 2)))
  return dict(config, model_architecture='transformer_xl', model_n_layer=layers,
              model_d_inner=inner)


def model_config(config) -> dtm.TransformerConfig:
  """The `TransformerConfig` named by the `model_*` entries of `config`."""
  return dtm.TransformerConfig(
      vocab_size=config['vocab_size'], d_model=config['model_d_model'],
      n_head=config['model_n_head'], d_head=config['model_d_head'],
      d_inner=config['model_d_inner'], cutoffs=tuple(config['model_cutoffs']),
      div_val=config['model_div_val'], dropout=config['model_dropout'],
      dropatt=config['model_dropatt'], pre_lnorm=config['model_pre_lnorm'],
      weight_norm=config['model_weight_norm'], mem_len=config['model_mem_len'],
      architecture=config['model_architecture'], n_layer=config['model_n_layer'],
      init_std=config['model_init_std'], proj_init_std=config['model_proj_init_std'])


def jacobian_weight(step, config) -> jax.Array:
  """gamma(step): `jacobian_weight_init` at the start of the DEQ phase, raised in
  steps of 0.1 evenly over the DEQ phase to `jacobian_weight_final`.

  The reference (`train_transformer.py`, `--jac_incremental`) adds 0.1 every
  fixed number of steps; here that interval is chosen so that the paper's
  final value is reached at the end of training.
  """
  start, end = config['train_pretrain_steps'], config['train_steps']
  g0, g1 = config['jacobian_weight_init'], config['jacobian_weight_final']
  increments = round((g1 - g0) / 0.1)
  if increments <= 0 or end <= start:
    return jnp.asarray(g0, jnp.float32)
  fraction = jnp.clip((step - start) / (end - start), 0.0, 1.0)
  return jnp.asarray(g0 + 0.1 * jnp.floor(fraction * increments + 1e-6),
                     jnp.float32)


class Built(NamedTuple):
  """What `build` returns; every function follows jreg.train's contracts."""
  init_fn: Callable         # rng -> (params, model_state), memory for train_batch_size
  loss_fn: Callable         # DEQ phase (or the explicit stack)
  grad_fn: Callable         # jreg.deq.value_and_grad(loss_fn) + per-device memory
  pretrain_loss_fn: Callable  # unrolled weight-tied phase (== loss_fn if explicit)
  pretrain_grad_fn: Callable
  eval_step: Callable       # (params, state, batch, unrolled) -> (sum nll, count, state, info)
  initial_state: Callable   # batch_size -> fresh model_state (empty memory)
  transformed: hk.TransformedWithState
  model_config: dtm.TransformerConfig


def build(config) -> Built:
  """Builds the model and its training/evaluation functions from `config`."""
  config = dict(default_config(), **config)
  cfg = model_config(config)
  forward_solver = deq.SolverConfig(
      name=config['deq_forward_solver'], max_iter=config['deq_forward_nfe'],
      tol=config['deq_tol'], stop_mode='rel')
  backward = deq.BackwardConfig(
      mode='implicit', solver=deq.SolverConfig(
          name=config['deq_backward_solver'], max_iter=config['deq_backward_nfe'],
          tol=config['deq_tol'], stop_mode='rel'))
  use_jacobian = (cfg.architecture == 'deq' and config['jacobian_weight_init'] > 0
                  and config['jacobian_probability'] > 0)

  def forward(inputs, targets, is_training, unrolled=False):
    model = dtm.DEQTransformerLM(
        cfg, forward=forward_solver, backward=backward,
        pretrain_layers=config['train_pretrain_layers'],
        eval_pretrain_layers=config['eval_pretrain_layers'])
    step = deq.step_count(increment=is_training)
    gate = False
    if is_training and not unrolled and use_jacobian:
      gate = deq.regularization_gate(hk.next_rng_key(),
                                     config['jacobian_probability'])
    log_prob, info = model(inputs, targets, is_training=is_training,
                           unrolled=unrolled and cfg.architecture == 'deq',
                           jacobian_loss=gate)
    return log_prob, info, step

  transformed = hk.transform_with_state(forward)
  batch, seq_len = config['train_batch_size'], config['train_seq_len']

  @jax.jit
  def init_fn(rng):   # compiled: eager Haiku init would compile op by op
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return transformed.init(rng, tokens, tokens, True)

  def initial_state(batch_size):
    tokens = jax.ShapeDtypeStruct((batch_size, config['eval_seq_len']), jnp.int32)
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

  compiled_eval = jax.jit(eval_apply, static_argnums=3)

  def eval_step(params, state, batch, unrolled=False):
    return compiled_eval(params, state, batch,
                         unrolled and cfg.architecture == 'deq')

  return Built(
      init_fn=init_fn, loss_fn=loss_fn,
      grad_fn=dtm.shard_memory(deq.value_and_grad(loss_fn)),
      pretrain_loss_fn=pretrain_loss_fn,
      pretrain_grad_fn=dtm.shard_memory(deq.value_and_grad(pretrain_loss_fn)),
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


def _check(config):
  for key in ('train_batch_size', 'train_seq_len', 'train_steps', 'eval_batch_size',
              'eval_seq_len', 'deq_forward_nfe', 'deq_backward_nfe'):
    if config[key] < 1:
      raise ValueError(f'{key}={config[key]} must be >= 1.')
  if not 0 <= config['train_pretrain_steps'] <= config['train_steps']:
    raise ValueError(f"train_pretrain_steps={config['train_pretrain_steps']} must be "
                     f"in [0, train_steps={config['train_steps']}].")
  if not 0.0 <= config['jacobian_probability'] <= 1.0:
    raise ValueError('jacobian_probability must be in [0, 1].')
  if config['optimizer_lr'] <= 0:
    raise ValueError('optimizer_lr must be positive.')


def run(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates; writes metrics.jsonl, results.json and PNGs to `workdir`."""
  config = dict(default_config(), **config)
  _check(config)
  corpus = wikitext.load_wikitext(config['dataset_name'],
                                  source=config['dataset_source'],
                                  data_dir=config['dataset_dir'])
  config['vocab_size'] = len(corpus.vocabulary)
  built = build(config)
  train_iter = wikitext.wikitext_iterator(corpus, 'train', config['train_batch_size'],
                                          config['train_seq_len'])
  steps_per_epoch = train_iter.steps_per_epoch
  warmup = int(config['optimizer_warmup_epochs'] * steps_per_epoch)
  warmup = min(warmup, config['train_steps'] - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config['optimizer_lr'], max(warmup, 0), config['train_steps'], 0.0)
  optimizer = optax.chain(optax.clip_by_global_norm(config['optimizer_clip']),
                          optax.adam(schedule))
  start_time = time.perf_counter()
  pretrain_steps = (config['train_pretrain_steps']
                    if built.model_config.architecture == 'deq' else 0)

  def eval_fn(params, model_state):
    # In the pre-training phase the model is evaluated unrolled (the
    # reference's eval_n_layer), afterwards as a DEQ; the step counter in the
    # state tells which. Evaluation starts from an empty memory.
    steps_done = float(model_state['~']['step_count'])
    out = perplexity(built, params, corpus.valid, config['eval_batch_size'],
                     config['eval_seq_len'], unrolled=steps_done <= pretrain_steps,
                     max_batches=config['eval_max_batches'])
    out['wall_time'] = time.perf_counter() - start_time
    return out

  # The unrolled weight-tied pre-training phase, then the implicit layer
  # (with the Jacobian term); fit's last evaluation is the reported one.
  if pretrain_steps == config['train_steps']:
    phases = [(pretrain_steps, built.pretrain_grad_fn)]
  else:
    phases = [(config['train_steps'], built.grad_fn)]
    if pretrain_steps:
      phases.insert(0, (pretrain_steps, built.pretrain_grad_fn))
  state, history = train.fit(
      workdir=workdir, init_fn=built.init_fn, grad_fn=phases, optimizer=optimizer,
      train_iter=train_iter, num_steps=config['train_steps'], seed=config['seed'],
      parallel=config['parallel'], eval_fn=eval_fn, eval_every=config['eval_every'],
      log_every=config['log_every'], checkpoint_every=config['checkpoint_every'],
      learning_rate_fn=schedule)
  valid = [r for r in history if r['split'] == 'eval'][-1]
  if config['eval_max_batches'] and config.get('final_eval_whole_split', True):
    # Periodic evaluations read part of the split; the reported one reads it all.
    valid = perplexity(built, state.params, corpus.valid, config['eval_batch_size'],
                       config['eval_seq_len'])
    valid.update(step=config['train_steps'], split='eval_whole',
                 wall_time=time.perf_counter() - start_time)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(valid) + '\n')
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_records = [r for r in records if r['split'] == 'train'
                   and r['step'] > pretrain_steps]
  results = {
      'valid_ppl': valid['ppl'], 'valid_nll': valid['nll'],
      'valid_tokens': valid['tokens'],
      'valid_whole_split': valid['split'] == 'eval_whole' or not config['eval_max_batches'],
      'valid_forward_nfe': valid.get('forward_nfe'),
      'valid_forward_rel_residual': valid.get('forward_rel_residual'),
      'train_forward_nfe_mean': (float(np.mean([r['forward_nfe'] for r in train_records]))
                                 if train_records and 'forward_nfe' in train_records[0]
                                 else None),
      'num_params': dtm.count_params(state.params),
      'steps': config['train_steps'], 'pretrain_steps': pretrain_steps,
      'wall_time_s': time.perf_counter() - start_time,
      'architecture': built.model_config.architecture,
      'jacobian_weight_init': config['jacobian_weight_init'],
      'jacobian_probability': config['jacobian_probability'],
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plot_runs({'this run': workdir}, os.path.join(workdir, 'training.png'))
  return results


def plot_runs(runs: dict[str, str], path: str) -> None:
  """NFE and residual over training, and validation perplexity against wall
  time, for one or several runs (`{label: workdir}`), as one PNG."""
  loaded = {label: read_jsonl(os.path.join(d, 'metrics.jsonl'))
            for label, d in runs.items()}
  with plotting.figure(path, ncols=3) as (_, axes):
    plotting.curves(axes[0], {l: series(r, 'forward_nfe') for l, r in loaded.items()},
                    'step', 'forward NFE', 'solver NFE (train)')
    plotting.curves(axes[1], {l: series(r, 'forward_rel_residual')
                              for l, r in loaded.items()},
                    'step', 'relative residual', 'forward residual (train)',
                    logy=True)
    time_ppl = {}
    for label, records in loaded.items():
      evals = [r for r in records if r['split'] == 'eval' and 'wall_time' in r]
      time_ppl[label] = ([r['wall_time'] for r in evals], [r['ppl'] for r in evals])
    plotting.curves(axes[2], time_ppl, 'wall time (s)', 'validation perplexity',
                    'perplexity vs wall time', logy=True, marker='.')


def define_flags():
  for key, value in default_config().items():
    if key in ('seed', 'parallel', 'log_every', 'eval_every', 'checkpoint_every',
               'dataset_dir', 'dataset_source'):
      continue  # common flags of jreg.cli
    help_text = f'See experiments/deq_wikitext.py default_config() (default {value}).'
    if isinstance(value, bool):
      flags.DEFINE_bool(key, None, help_text)
    elif isinstance(value, int):
      flags.DEFINE_integer(key, None, help_text)
    elif isinstance(value, float):
      flags.DEFINE_float(key, None, help_text)
    elif isinstance(value, tuple):
      flags.DEFINE_list(key, None, help_text)
    else:
      flags.DEFINE_string(key, None, help_text)
  flags.DEFINE_bool('small', False, 'Start from small_config() (WikiText-2 sized).')
  flags.DEFINE_list('compare', None, 'LABEL=WORKDIR pairs: only plot these runs '
                    'together into --workdir/comparison.png.')


def main(argv):
  del argv
  workdir = cli.start()
  f = flags.FLAGS
  if f.compare:
    try:
      runs = dict(item.split('=', 1) for item in f.compare)
    except ValueError:
      raise app.UsageError('--compare takes LABEL=WORKDIR pairs.') from None
    for d in runs.values():
      if not os.path.isfile(os.path.join(d, 'metrics.jsonl')):
        raise app.UsageError(f'{d} has no metrics.jsonl to plot.')
    plot_runs(runs, os.path.join(workdir, 'comparison.png'))
    return
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    config = small_config() if f.small else default_config()
  for key, value in default_config().items():
    if key in flags.FLAGS and getattr(f, key) is not None and key not in (
        'seed', 'parallel', 'log_every', 'eval_every', 'checkpoint_every'):
      given = getattr(f, key)
      config[key] = tuple(int(c) for c in given) if isinstance(value, tuple) else given
  config.update(seed=cli.SEED.value, parallel=cli.PARALLEL.value,
                dataset_dir=cli.DATA_DIR.value, dataset_source=cli.DATA_SOURCE.value)
  if f['log_every'].present:
    config['log_every'] = cli.LOG_EVERY.value
  if f['eval_every'].present:
    config['eval_every'] = cli.EVAL_EVERY.value
  if f['checkpoint_every'].present:
    config['checkpoint_every'] = cli.CHECKPOINT_EVERY.value
  try:
    results = run(config, workdir)
  except (ValueError, data.DataError) as error:
    raise app.UsageError(str(error)) from None
  print(json.dumps(results))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
