"""Adaptive input embedding and adaptive softmax against direct computations."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreg.models import adaptive_softmax as asm

V, P, N = 23, 8, 11  # vocabulary, model width, tokens


def _build(cutoffs, div_val, tied, chunk_size=None, d_embed=P, tail_chunks=4):
  def forward(hidden, targets, tokens):
    embedding = asm.AdaptiveEmbedding(V, d_embed, P, cutoffs, div_val,
                                      init_std=0.5, proj_init_std=0.5)
    softmax = asm.AdaptiveLogSoftmax(
        V, d_embed, P, cutoffs, div_val, tied_embedding=embedding if tied else None,
        init_std=0.5, proj_init_std=0.5, chunk_size=chunk_size,
        tail_chunks=tail_chunks)
    return embedding(tokens), softmax(hidden, targets), softmax.log_probs(hidden)
  model = hk.without_apply_rng(hk.transform(forward))
  return hk.Transformed(jax.jit(model.init), jax.jit(model.apply))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(N, P)), jnp.float32)
  targets = jnp.asarray(np.concatenate([[0, 4, 5, 9, 10, 22], rng.integers(0, V, N - 6)]),
                        jnp.int32)
  return hidden, targets


def _params(model, hidden, targets, seed=0):
  params = model.init(jax.random.PRNGKey(seed), hidden, targets, targets)
  # Non-zero biases so that they are exercised.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.3 * jnp.sin(jnp.arange(p.size).reshape(p.shape))
      if 'bias' in jax.tree_util.keystr(path) else p, params)


CASES = [((), 1, True), ((5, 10), 1, False), ((5, 10), 1, True), ((5, 10, 20), 2, True)]


@pytest.mark.parametrize('cutoffs,div_val,tied', CASES)
def test_distribution_sums_to_one_and_targets_match(cutoffs, div_val, tied):
  model = _build(cutoffs, div_val, tied)
  hidden, targets = _inputs()
  params = _params(model, hidden, targets)
  _, target_lp, full_lp = model.apply(params, hidden, targets, targets)
  assert full_lp.shape == (N, V)
  np.testing.assert_allclose(jax.nn.logsumexp(full_lp, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(target_lp, full_lp[jnp.arange(N), targets], atol=1e-5)
  # Not degenerate: the distribution is far from uniform.
  assert float(jnp.std(full_lp)) > 0.1


def test_full_vocabulary_mode_is_the_softmax():
  model = _build((), 1, False, d_embed=6)   # projection P -> d_embed present
  hidden, targets = _inputs(1)
  params = _params(model, hidden, targets)
  sm = params['adaptive_log_softmax']
  logits = hidden @ sm['projection_0'] @ sm['words_0'].T + sm['bias_0']
  _, target_lp, full_lp = model.apply(params, hidden, targets, targets)
  np.testing.assert_allclose(full_lp, jax.nn.log_softmax(logits), atol=1e-5)


def _numpy_adaptive_log_prob(params, hidden, targets, cutoffs, div_val):
  """Token-by-token Grave et al. (2017) with untied weights, from raw arrays."""
  sm = {k: np.asarray(v, np.float64) for k, v in params['adaptive_log_softmax'].items()}
  bounds = [0] + list(cutoffs) + [V]
  hidden = np.asarray(hidden, np.float64)
  out = []
  for h, t in zip(hidden, np.asarray(targets)):
    def log_softmax(z):
      return z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
    head_w = np.concatenate([sm['words_0'], sm['cluster_weight']])
    head_b = np.concatenate([sm['bias_0'], sm['cluster_bias']])
    head = log_softmax((h @ sm['projection_0']) @ head_w.T + head_b)
    if t < bounds[1]:
      out.append(head[t])
      continue
    i = max(j for j in range(len(bounds) - 1) if bounds[j] <= t)
    tail = log_softmax((h @ sm[f'projection_{i}']) @ sm[f'words_{i}'].T + sm[f'bias_{i}'])
    out.append(head[bounds[1] + i - 1] + tail[t - bounds[i]])
  return np.array(out)


def test_matches_token_by_token_reference_and_chunking():
  cutoffs = (5, 10, 20)
  hidden, targets = _inputs(2)
  model = _build(cutoffs, 2, False)
  params = _params(model, hidden, targets)
  _, target_lp, _ = model.apply(params, hidden, targets, targets)
  expected = _numpy_adaptive_log_prob(params, hidden, targets, cutoffs, 2)
  np.testing.assert_allclose(target_lp, expected, atol=1e-5)
  # The chunked logsumexp (3 rows at a time, padded) gives the same values and
  # gradients.
  chunked = _build(cutoffs, 2, False, chunk_size=3)

  def total(m, p):
    return jnp.sum(m.apply(p, hidden, targets, targets)[1])
  g_full = jax.grad(lambda p: total(model, p))(params)
  g_chunk = jax.grad(lambda p: total(chunked, p))(params)
  np.testing.assert_allclose(total(chunked, params), total(model, params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('targets', [
    'mixed',         # rows in the head and in every tail cluster (3-row chunks)
    'head_only',     # no tail rows: every chunk skipped
    'one_cluster',   # all 11 rows in cluster 2: all 4 chunks, the last partial
])
def test_gathered_tails_equal_dense_tails_to_second_order(targets):
  """Tails scored on their own rows only = every row scored (values, grad, HVP)."""
  cutoffs = (5, 10, 20)
  hidden, mixed = _inputs(3)
  targets = {'mixed': mixed, 'head_only': mixed % 5,
             'one_cluster': 10 + mixed % 10}[targets]
  dense = _build(cutoffs, 2, True, tail_chunks=0)
  gathered = _build(cutoffs, 2, True, tail_chunks=4)   # ceil(11 / 4) = 3 rows
  params = _params(dense, hidden, targets)

  def total(m, p, h):
    return jnp.sum(jnp.sin(m.apply(p, h, targets, targets)[1]))
  np.testing.assert_allclose(gathered.apply(params, hidden, targets, targets)[1],
                             dense.apply(params, hidden, targets, targets)[1],
                             rtol=1e-6, atol=1e-6)
  grads = [jax.grad(lambda p, h: total(m, p, h), argnums=(0, 1))(params, hidden)
           for m in (dense, gathered)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # Forward over reverse (what an HVP gradient penalty differentiates).
  tangent = jax.tree.map(jnp.ones_like, params)
  hvps = [jax.jvp(jax.grad(lambda p: total(m, p, hidden)), (params,), (tangent,))[1]
          for m in (dense, gathered)]
  for a, b in zip(*map(jax.tree.leaves, hvps)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_negative_tail_chunks_are_rejected():
  with pytest.raises(ValueError, match='tail_chunks must be >= 0'):
    _build((5,), 1, False, tail_chunks=-1).init(
        jax.random.PRNGKey(0), *_inputs(), _inputs()[1])


@pytest.mark.parametrize('div_val', [1, 2])
def test_embedding_is_scaled_projected_table_row(div_val):
  cutoffs = (5, 10)
  model = _build(cutoffs, div_val, True, d_embed=8 if div_val > 1 else 6)
  hidden, targets = _inputs(3)
  tokens = jnp.arange(V, dtype=jnp.int32)
  params = model.init(jax.random.PRNGKey(0), hidden, targets, tokens)
  emb = params['adaptive_embedding']
  out, _, _ = model.apply(params, hidden, targets, tokens)
  bounds = [0] + list(cutoffs) + [V]
  for t in range(V):
    if div_val == 1:
      row = emb['table_0'][t] @ emb['projection_0']
    else:
      i = max(j for j in range(3) if bounds[j] <= t)
      row = emb[f'table_{i}'][t - bounds[i]] @ emb[f'projection_{i}']
    np.testing.assert_allclose(out[t], np.sqrt(P) * row, atol=1e-5)


def test_tied_weights_are_shared():
  cutoffs = (5, 10)
  model = _build(cutoffs, 2, True)
  hidden, targets = _inputs(4)
  params = model.init(jax.random.PRNGKey(0), hidden, targets, targets)
  names = set(params['adaptive_log_softmax'])
  # Tied: no own word matrices, only the head projection of its own.
  assert not any(n.startswith('words_') for n in names)
  assert {n for n in names if n.startswith('projection_')} == {'projection_0'}
  # The softmax gradient reaches the embedding tables and tail projections.
  grads = jax.grad(lambda p: jnp.sum(model.apply(p, hidden, targets, targets)[1]))(params)
  for name in ('table_0', 'table_1', 'table_2', 'projection_1', 'projection_2'):
    assert float(jnp.abs(grads['adaptive_embedding'][name]).sum()) > 0


def test_bad_cutoffs_are_rejected():
  with pytest.raises(ValueError, match='increase strictly'):
    asm.cluster_bounds(10, (5, 5))
  with pytest.raises(ValueError, match='increase strictly'):
    asm.cluster_bounds(10, (10,))
