"""DEQ-Transformer: relative attention, memory, dropout, sizes, experiment."""
import dataclasses
import json
import math
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jreg import cli
from jreg import deq
from jreg import train
from jreg.models import count_params
from jreg.models import deq_transformer as dtm
from jreg.tasks import deq_lm

TINY = dtm.TransformerConfig(
    vocab_size=50, d_model=16, n_head=2, d_head=8, d_inner=32, cutoffs=(10, 30),
    div_val=2, dropout=0.0, dropatt=0.0, mem_len=8, n_layer=2, init_std=0.05,
    proj_init_std=0.1)
# Weights large enough that the injection dominates the post-LN layer, which is
# then contractive: Broyden reaches float32 precision (rel. residual ~1e-7).
TIGHT_SOLVER = deq.SolverConfig('broyden', max_iter=100, tol=1e-6)
DEQ_INIT_STD = 0.3


# ----------------------------------------------------------------------------
# Relative positional attention.

def test_rel_shift_matches_direct_relative_scores():
  rng = np.random.default_rng(0)
  t, m, h, e = 5, 3, 2, 4
  k = t + m
  q = rng.normal(size=(1, t, h, e))
  r = rng.normal(size=(k, h, e))   # r[c] embeds distance K - 1 - c
  shifted = dtm.rel_shift(jnp.einsum('bihe,jhe->bhij', q, r))
  for i in range(t):
    for j in range(k):
      if j <= i + m:   # causal pairs; the rest is masked in the layer
        distance = i + m - j
        direct = np.einsum('he,he->h', q[0, i], r[k - 1 - distance])
        np.testing.assert_allclose(shifted[0, :, i, j], direct, rtol=1e-5, atol=1e-6)


def test_sinusoid_embedding_formula():
  pos = jnp.array([3.0, 0.0])
  emb = dtm.sinusoid_embedding(pos, 6)
  inv = 1.0 / 10000 ** (np.arange(0, 6, 2) / 6)
  np.testing.assert_allclose(emb[0], np.concatenate([np.sin(3 * inv), np.cos(3 * inv)]),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# Memory: one layer, the explicit stack and the DEQ.

def _layer_fn(config):
  layer = hk.without_apply_rng(hk.transform(
      lambda z, x: dtm.RelativeTransformerLayer(config, name='layer')(z, x)))
  return hk.Transformed(layer.init, jax.jit(layer.apply))


@pytest.mark.parametrize('pre_lnorm', [False, True])
def test_layer_with_memory_equals_layer_on_concatenated_segments(pre_lnorm):
  """Segment 2 with segment 1 in a (larger, partly empty) memory buffer gives
  the same output as the layer on segments 1+2 with causal masking."""
  config = dataclasses.replace(TINY, pre_lnorm=pre_lnorm)
  rng = np.random.default_rng(1)
  b, t1, t2, m, d = 2, 5, 4, 8, config.d_model
  seg1, seg2 = rng.normal(size=(b, t1, d)), rng.normal(size=(b, t2, d))
  inj = rng.normal(size=(b, t1 + t2, 3 * d)) * 0.3
  garbage = rng.normal(size=(b, m - t1, d)) * 10.0   # empty slots: must be ignored

  def context(memory, injection, length, valid):
    k = memory.shape[1] + length
    return dict(memory=jnp.asarray(memory, jnp.float32),
                injection=jnp.asarray(injection, jnp.float32),
                position=dtm.sinusoid_embedding(jnp.arange(k - 1, -1, -1.0), d),
                key_mask=dtm.key_mask(length, memory.shape[1], valid), masks=None)

  layer = _layer_fn(config)
  full_x = context(np.zeros((b, 0, d)), inj, t1 + t2, 0)
  full_z = jnp.asarray(np.concatenate([seg1, seg2], 1), jnp.float32)
  params = layer.init(jax.random.PRNGKey(0), full_z, full_x)
  full = layer.apply(params, full_z, full_x)
  mem_x = context(np.concatenate([garbage, seg1], 1),
                  np.concatenate([rng.normal(size=(b, m - t1, 3 * d)), inj], 1), t2, t1)
  with_memory = layer.apply(params, jnp.asarray(seg2, jnp.float32), mem_x)
  np.testing.assert_allclose(with_memory, full[:, t1:], atol=2e-5)
  # Without the memory the output differs: the test is not vacuous.
  no_mem_x = context(np.zeros((b, 0, d)), inj[:, t1:], t2, 0)
  assert np.abs(layer.apply(params, jnp.asarray(seg2, jnp.float32), no_mem_x)
                - full[:, t1:]).max() > 1e-2


def _lm(config, forward=deq.SolverConfig(), pretrain_layers=2):
  def fwd(inputs, targets, is_training, unrolled=False):
    model = dtm.DEQTransformerLM(config, forward=forward, pretrain_layers=pretrain_layers)
    return model(inputs, targets, is_training=is_training, unrolled=unrolled)
  transformed = hk.transform_with_state(fwd)
  return hk.TransformedWithState(
      transformed.init, jax.jit(transformed.apply, static_argnums=(5,)))


def _segments(b=2, t1=5, t2=5, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  stream = jnp.asarray(rng.integers(0, vocab, (b, t1 + t2 + 1)), jnp.int32)
  return stream[:, :-1], stream[:, 1:], t1


@pytest.mark.parametrize('architecture', ['transformer_xl', 'deq'])
def test_model_memory_carries_context_across_segments(architecture):
  """log p(segment 2 | memory of segment 1) == log p on segments 1+2 at once."""
  config = dataclasses.replace(TINY, architecture=architecture, init_std=DEQ_INIT_STD)
  model = _lm(config, forward=TIGHT_SOLVER)
  inputs, targets, t1 = _segments()
  params, state0 = model.init(jax.random.PRNGKey(0), inputs, targets, False)
  (full, info), _ = model.apply(params, state0, None, inputs, targets, False)
  (_, _), state1 = model.apply(params, state0, None, inputs[:, :t1], targets[:, :t1], False)
  assert float(state1['deq_transformer_lm']['memory_length']) == t1
  (second, _), state2 = model.apply(params, state1, None, inputs[:, t1:],
                                    targets[:, t1:], False)
  assert float(state2['deq_transformer_lm']['memory_length']) == config.mem_len  # capped
  np.testing.assert_allclose(second, full[:, t1:], atol=2e-4)
  (alone, _), _ = model.apply(params, state0, None, inputs[:, t1:], targets[:, t1:], False)
  assert np.abs(alone - full[:, t1:]).max() > 1e-3
  if architecture == 'deq':
    assert float(info['forward_rel_residual']) < 1e-6


def test_memory_is_stop_gradient():
  """The memory written by a segment carries no gradient to the parameters
  (Transformer-XL's `detach`), although it depends on them."""
  config = dataclasses.replace(TINY, architecture='transformer_xl')
  model = _lm(config)
  inputs, targets, t1 = _segments(seed=3)
  params, state0 = model.init(jax.random.PRNGKey(0), inputs, targets, False)

  def memory(params):
    _, state = model.apply(params, state0, None, inputs, targets, False)
    return state['deq_transformer_lm']['memory_layers']

  mem, vjp = jax.vjp(memory, params)
  (grads,) = vjp(jnp.ones_like(mem))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  # ... while the memory does depend on the parameters.
  scaled = jax.tree.map(lambda p: p * 1.1, params)
  assert float(jnp.abs(memory(scaled) - mem).max()) > 1e-3


# ----------------------------------------------------------------------------
# Variational dropout.

def test_dropout_masks_are_fixed_across_solver_iterations():
  """With dropout on, the training-mode DEQ still converges to tight tolerance:
  the masks are drawn once per forward pass (resampling them at every
  iteration would leave a residual of the order of the dropout noise)."""
  config = dataclasses.replace(TINY, dropout=0.2, dropatt=0.2, init_std=DEQ_INIT_STD)
  model = _lm(config, forward=TIGHT_SOLVER)
  inputs, targets, _ = _segments(seed=4)
  params, state = model.init(jax.random.PRNGKey(0), inputs, targets, True)
  (lp_a, info), _ = model.apply(params, state, jax.random.PRNGKey(1), inputs, targets, True)
  (lp_b, _), _ = model.apply(params, state, jax.random.PRNGKey(1), inputs, targets, True)
  (lp_c, _), _ = model.apply(params, state, jax.random.PRNGKey(2), inputs, targets, True)
  (lp_eval, _), _ = model.apply(params, state, None, inputs, targets, False)
  assert float(info['forward_rel_residual']) < 1e-6
  assert float(info['forward_converged_fraction']) == 1.0
  np.testing.assert_array_equal(lp_a, lp_b)          # same key, same masks
  assert np.abs(lp_a - lp_c).max() > 1e-4           # other key, other masks
  assert np.abs(lp_a - lp_eval).max() > 1e-4        # dropout is active in training


def test_dropout_mask_shapes_and_scale():
  draw = jax.jit(dtm.layer_dropout_masks, static_argnums=(1, 2, 3, 4))
  masks = draw(jax.random.PRNGKey(0), dataclasses.replace(TINY, dropout=0.25, dropatt=0.5),
               64, 3, 7)
  assert masks['attention'].shape == (64, 2, 3, 7)
  assert masks['ff_hidden'].shape == (64, 1, 32)
  assert masks['attention_output'].shape == masks['ff_output'].shape == (64, 1, 16)
  np.testing.assert_allclose(np.unique(masks['ff_hidden']), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(jnp.mean(masks['ff_hidden'])) - 1.0) < 0.1


# ----------------------------------------------------------------------------
# Sizes.

def _expected_params(c: dtm.TransformerConfig) -> int:
  """Parameter count written out from the architecture (tied, div_val > 1)."""
  d, f = c.d_model, c.d_inner
  edges = [0, *c.cutoffs, c.vocab_size]
  widths = [(c.d_embed or d) // c.div_val ** i for i in range(len(edges) - 1)]
  sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
  embedding = sum(v * w + w * d for v, w in zip(sizes, widths))
  softmax = c.vocab_size + len(c.cutoffs) * (widths[0] + 1) + d * widths[0]
  layer = (3 * d * d + 3 * d) + (d * d + d) + (d * d + 2 * d) + (d * f + 2 * f) \
      + (f * d + 2 * d) + 2 * d
  if c.architecture == 'deq':
    return embedding + softmax + (3 * d * d + 3 * d) + layer
  return embedding + softmax + c.n_layer * layer


VOCAB = {'paper': 267_735, 'small': 33_278}  # WikiText-103 / WikiText-2


@pytest.mark.parametrize('name', ['paper', 'paper_explicit', 'small', 'small_explicit'])
def test_parameter_counts(name):
  preset = name.split('_')[0]
  config = cli.get_config('deq_wikitext', preset)
  if name.endswith('explicit'):
    config = deq_lm.explicit_config(config)
  built = deq_lm.build(config, VOCAB[preset])
  params, state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  count = count_params(params)
  assert count == _expected_params(built.model_config)
  if name == 'paper':
    # Bai et al. (2019, 2021): a 98M-parameter DEQ-Transformer on WikiText-103.
    assert 97.5e6 < count < 98.5e6, count
    m, d = config.model.mem_len, config.model.d_model
    mem = state['deq_transformer_lm']
    assert mem['memory_z'].shape == (60, m, d)
    assert mem['memory_u'].shape == (60, m, 3 * d)
  if name == 'paper_explicit':   # the explicit counterpart is of similar size
    deq_count = count_params(jax.eval_shape(
        deq_lm.build(cli.get_config('deq_wikitext'), VOCAB['paper']).init_fn,
        jax.random.PRNGKey(0))[0])
    assert abs(count - deq_count) / deq_count < 0.03


def test_bad_configurations_are_rejected():
  with pytest.raises(ValueError, match='n_head \\* d_head'):
    dtm.TransformerConfig(d_model=16, n_head=3, d_head=5)
  with pytest.raises(ValueError, match='architecture'):
    dtm.TransformerConfig(architecture='rnn')
  with pytest.raises(cli.ConfigError, match='deq.pretrain_steps'):
    cli.get_config('deq_wikitext', 'small', {'deq.pretrain_steps': 10_000})
  with pytest.raises(cli.ConfigError, match='gamma'):
    cli.get_config('deq_wikitext', 'small', {'jacobian.weight': -1.0})


def test_jacobian_weight_schedule_steps_from_init_to_final():
  config = cli.get_config('deq_wikitext', 'paper', {
      'deq.pretrain_steps': 100, 'num_steps': 1000, 'jacobian.weight': 1.6,
      'jacobian.weight_final': 2.5})
  values = np.array([float(deq_lm.jacobian_weight(s, config))
                     for s in range(0, 1001, 10)])
  np.testing.assert_allclose(values[:11], 1.6, rtol=1e-6)       # pre-training and start
  np.testing.assert_allclose(values[-1], 2.5, rtol=1e-6)
  assert np.all(np.diff(values) >= -1e-6)
  steps = np.round(np.diff(values)[np.diff(values) > 1e-6], 5)
  np.testing.assert_allclose(steps, 0.1, atol=1e-5)


# ----------------------------------------------------------------------------
# Data parallelism: per-device memory under pmap equals the single-device run.

def test_data_parallel_modes_keep_per_stream_memory():
  """Two jreg.train steps in 'pmap' and 'sharded' modes (4 devices) give the
  parameters and the per-stream memory of the 'single' mode."""
  config = cli.get_config('deq_wikitext', 'quickstart', {
      'batch_size': 4, 'data.seq_len': 6, 'model.cutoffs': (), 'model.div_val': 1,
      'model.dropout': 0.0, 'model.dropatt': 0.0, 'model.mem_len': 6,
      'model.architecture': 'transformer_xl', 'model.n_layer': 1})
  built = deq_lm.build(config, vocab_size=50)
  rng = np.random.default_rng(5)
  batches = [{'inputs': rng.integers(0, 50, (4, 6)).astype(np.int32),
              'targets': rng.integers(0, 50, (4, 6)).astype(np.int32)} for _ in range(2)]
  optimizer = optax.sgd(0.5)
  final = {}
  for mode in ('single', 'pmap', 'sharded'):
    par = train.Parallel(mode)
    state = par.put_state(train.init_state(built.init_fn, optimizer, seed=0))
    update = par.compile(train.make_update(built.grad_fn, optimizer, par.axis_name))
    for batch in batches:
      state, _ = update(state, par.put_batch(batch))
    final[mode] = par.get(state)
  memory = final['single'].model_state['deq_transformer_lm']
  assert float(memory['memory_length']) == 6
  assert float(np.abs(memory['memory_layers']).max()) > 0
  for mode in ('pmap', 'sharded'):
    for part in ('params', 'model_state'):
      single = getattr(final['single'], part)
      other = getattr(final[mode], part)
      assert jax.tree.structure(single) == jax.tree.structure(other)
      for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(other)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f'{mode} {part}')


# ----------------------------------------------------------------------------
# The experiment end to end on WikiText-2.

def test_experiment_runs_end_to_end(tmp_path, shared_data):
  from experiments import deq_wikitext  # pylint: disable=g-import-not-at-top
  # Logging every 2 steps mixes the pre-training step 1 and the DEQ step 2 in
  # one record (both phases report the same metric names).
  config = cli.get_config('deq_wikitext', 'quickstart', {
      'data.dir': str(shared_data), 'num_steps': 3, 'deq.pretrain_steps': 1,
      'eval_max_batches': 2, 'jacobian.probability': 1.0, 'log_every': 2})
  results = cli.execute('deq_wikitext', deq_wikitext.run, config, str(tmp_path))
  assert math.isfinite(results['valid_ppl']) and results['valid_ppl'] > 1
  assert results['valid_tokens'] == 2 * 4 * 16
  assert results['train_forward_nfe_mean'] >= 1
  for name in ('results.json', 'metrics.jsonl', 'training.png', 'config.json'):
    assert os.path.isfile(tmp_path / name)
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [2, 3]
  # Step 1 (unrolled pre-training) has no Jacobian term, steps 2-3 (p = 1) do.
  assert train[0]['jacobian_applied'] == 0.5
  assert train[1]['jacobian_applied'] == 1.0 and train[1]['jacobian_loss'] > 0
  assert train[1]['backward_nfe'] >= 1
  assert [r['step'] for r in records if r['split'] == 'eval'] == [3]
  # Run again once finished: the same report, no row added.
  assert cli.execute('deq_wikitext', deq_wikitext.run, config,
                     str(tmp_path)) == results
  assert [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')] == records
