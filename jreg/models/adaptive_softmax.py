"""Adaptive input embeddings and the projected adaptive softmax.

Shape letters: N tokens (flattened batch x time), V vocabulary size, S the
shortlist (size of the head's own vocabulary, `cutoffs[0]`), C number of tail
clusters (`len(cutoffs)`), V_i the size of cluster i, d_i its embedding width
(`d_embed // div_val**i`), P the model width the modules project to/from
(`d_proj`).

The vocabulary (sorted by decreasing frequency) is split by `cutoffs` into
clusters `[0, c_0), [c_0, c_1), ..., [c_{C-1}, V)`. Cluster 0 is the head.

* `AdaptiveEmbedding` (Baevski & Auli, "Adaptive Input Representations for
  Neural Language Modeling", ICLR 2019, Sec. 3): token t in cluster i is
  embedded as `sqrt(P) * E_i[t - l_i] @ W_i`, with `E_i: [V_i, d_i]` and
  `W_i: [d_i, P]` (Transformer-XL's `AdaptiveEmbedding`, Dai et al. 2019).
* `AdaptiveLogSoftmax` (Grave et al., "Efficient softmax approximation for
  GPUs", ICML 2017, Sec. 4; projected form of Transformer-XL's
  `ProjectedAdaptiveLogSoftmax`): the head scores the S shortlist tokens and
  one logit per tail cluster::

      log p(t) = log softmax(head(h))[t]                          (t < c_0)
      log p(t) = log softmax(head(h))[S + i - 1]
                 + log softmax(tail_i(h))[t - l_i]                (t in cluster i >= 1)

  with `head(h) = (h @ Q_0) @ [E_0; K]^T + [b_0; k]` and
  `tail_i(h) = (h @ Q_i) @ E_i^T + b_i`; `Q_i: [P, d_i]` are the output
  projections and `K: [C, d_0]`, `k: [C]` the cluster weights and biases. The
  distribution sums to one over the vocabulary exactly. With no cutoffs it is
  the full softmax `log_softmax((h @ Q_0) @ E^T + b)`.

Weight tying (Transformer-XL, `tie_weight` / `tie_projs`): the output word
matrices are the embedding tables `E_i`; the tail projections are the
transposed embedding projections (`Q_i = W_i^T`, i >= 1), the head projection
is separate.

Deviation from Transformer-XL's code, on purpose: it reads tail cluster i's
head log-probability at column `-i` (the cluster rows in reverse order); here
cluster i uses column `S + i - 1`. This relabels the rows of `K`, so the model
family and its likelihoods are the same; only checkpoints would have to be
permuted to be exchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

# Reference initialisation (locuslab/deq DEQ-Sequence/train_transformer.py:
# --init normal --init_std 0.01 --proj_init_std 0.01; biases 0).
DEFAULT_INIT_STD = 0.01
DEFAULT_PROJ_INIT_STD = 0.01


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> list[tuple[int, int]]:
  """`[(l_0, r_0), ..., (l_C, r_C)]`: the token range of each cluster.

  Raises:
    ValueError: the cutoffs are not strictly increasing inside (0, V).
  """
  cutoffs = list(cutoffs)
  edges = [0] + cutoffs + [vocab_size]
  if any(a >= b for a, b in zip(edges[:-1], edges[1:])):
    raise ValueError(f'cutoffs {cutoffs} must increase strictly inside (0, '
                     f'{vocab_size}) for a vocabulary of {vocab_size} tokens.')
  return list(zip(edges[:-1], edges[1:]))


def cluster_widths(d_embed: int, num_clusters: int, div_val: int) -> list[int]:
  """`d_i = d_embed // div_val**i` (div_val = 1: one shared width)."""
  if div_val < 1:
    raise ValueError(f'div_val must be >= 1, got {div_val}.')
  widths = [d_embed // div_val**i for i in range(num_clusters)]
  if min(widths) < 1:
    raise ValueError(f'd_embed={d_embed} with div_val={div_val} leaves a cluster '
                     f'with no embedding width ({widths}).')
  return widths


class AdaptiveEmbedding(hk.Module):
  """Adaptive input embedding `sqrt(P) * E_i[t - l_i] @ W_i` (Baevski & Auli 2019).

  With `div_val == 1` there is one table `E: [V, d_embed]` (cutoffs only matter
  to the softmax) and a projection only when `d_embed != P`; with
  `div_val > 1` every cluster has its own table and projection.
  """

  def __init__(self, vocab_size: int, d_embed: int, d_proj: int,
               cutoffs: Sequence[int] = (), div_val: int = 1,
               init_std: float = DEFAULT_INIT_STD,
               proj_init_std: float = DEFAULT_PROJ_INIT_STD,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.d_embed = d_embed
    self.d_proj = d_proj
    self.div_val = div_val
    self.bounds = cluster_bounds(vocab_size, cutoffs)
    self.init_std = init_std
    self.proj_init_std = proj_init_std
    if div_val == 1:
      self.table_bounds = [(0, vocab_size)]
      self.widths = [d_embed]
    else:
      self.table_bounds = self.bounds
      self.widths = cluster_widths(d_embed, len(self.bounds), div_val)

  @property
  def num_tables(self) -> int:
    return len(self.table_bounds)

  def table(self, i: int) -> jax.Array:
    """Embedding table `E_i`, `[V_i, d_i]` (the whole vocabulary when div_val = 1)."""
    lo, hi = self.table_bounds[i]
    return hk.get_parameter(f'table_{i}', [hi - lo, self.widths[i]],
                            init=hk.initializers.RandomNormal(self.init_std))

  def projection(self, i: int) -> Optional[jax.Array]:
    """Input projection `W_i`, `[d_i, P]`, or None when there is none."""
    if self.div_val == 1 and self.d_embed == self.d_proj:
      return None
    return hk.get_parameter(f'projection_{i}', [self.widths[i], self.d_proj],
                            init=hk.initializers.RandomNormal(self.proj_init_std))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Embeds int tokens `[...]` as `[..., P]`."""
    out = jnp.zeros(tokens.shape + (self.d_proj,), jnp.float32)
    for i, (lo, hi) in enumerate(self.table_bounds):
      in_cluster = (tokens >= lo) & (tokens < hi)                    # [...]
      rows = jnp.take(self.table(i), jnp.clip(tokens - lo, 0, hi - lo - 1),
                      axis=0)                                        # [..., d_i]
      projection = self.projection(i)
      if projection is not None:
        rows = rows @ projection                                     # [..., P]
      out = out + jnp.where(in_cluster[..., None], rows, 0.0)
    return out * (self.d_proj ** 0.5)


def _linear_logsumexp(x: jax.Array, weight: jax.Array, bias: jax.Array,
                      chunk_size: Optional[int]) -> jax.Array:
  """`logsumexp(x @ weight^T + bias, axis=-1)` for `x: [N, d]`, `weight: [V, d]`.

  With `chunk_size`, the `[N, V]` logits are formed `chunk_size` rows at a
  time and recomputed in the backward pass (`jax.checkpoint`), so memory is
  `O(chunk_size * V)` instead of `O(N * V)` (the 160,000-token cluster of
  WikiText-103 would otherwise need `N * 160000` floats).
  """
  def lse(rows):
    return jax.nn.logsumexp(rows @ weight.T + bias, axis=-1)

  n = x.shape[0]
  if chunk_size is None or n <= chunk_size:
    return lse(x)
  num_chunks = -(-n // chunk_size)
  padded = jnp.pad(x, ((0, num_chunks * chunk_size - n), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk_size, x.shape[1])       # [n/c, c, d]
  out = jax.lax.map(jax.checkpoint(lse), chunks)                     # [n/c, c]
  return out.reshape(-1)[:n]


def _cluster_logsumexp(x: jax.Array, weight: jax.Array, bias: jax.Array,
                       in_cluster: jax.Array, chunk_rows: int) -> jax.Array:
  """`logsumexp(x @ weight^T + bias, axis=-1)` on the rows where `in_cluster`.

  A tail cluster's normaliser is needed only for the tokens whose target lies
  in it (a small fraction: in WikiText-2 15.6% and 7.1% of the training
  tokens for the small preset's cutoffs (2000, 10000)). Those rows are
  gathered to the front (`jnp.nonzero`, static size N) and scored in chunks
  of `chunk_rows`; chunks past the cluster's row count are skipped
  (`lax.cond` inside `lax.map`), so the work is
  `ceil(count / chunk_rows) * chunk_rows * V_i * d_i` instead of
  `N * V_i * d_i`, exactly, with static shapes. This is the computation of
  Transformer-XL's `ProjectedAdaptiveLogSoftmax`, which selects the
  cluster's rows with `index_select`. When the rows fit in one chunk (the
  common case) that chunk is scored without the loop (`lax.cond`), sparing
  the loop's per-iteration accumulation of the weight's cotangent. Each
  chunk's logits are recomputed in the backward pass (`jax.checkpoint`):
  storing them costs more than recomputing them, and a skipped chunk then
  stores nothing. (A `lax.switch` over the number of active chunks is
  slower: reverse mode makes every branch emit the residuals of the
  largest.)

  Returns:
    `[N]`: the log-normaliser on rows in the cluster, 0 on the others.
  """
  n = x.shape[0]
  num_chunks = -(-n // chunk_rows)
  count = jnp.sum(in_cluster)
  rows = jnp.nonzero(in_cluster, size=num_chunks * chunk_rows, fill_value=0)[0]
  # The bias rides in the matmul as a column of ones: its gradient is then the
  # same matmul's, not a column reduction of the [rows, V_i] cotangent (which
  # XLA:CPU runs ~10x slower than the matmul).
  x = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)       # [N, d + 1]
  weight = jnp.concatenate([weight, bias[:, None].astype(weight.dtype)], axis=1)
  chunks = jnp.take(x, rows, axis=0).reshape(num_chunks, chunk_rows, x.shape[1])

  score = jax.checkpoint(lambda c: jax.nn.logsumexp(c @ weight.T, axis=-1))

  def chunk_lse(args):
    start, chunk = args
    return jax.lax.cond(start < count, score,
                        lambda c: jnp.zeros(c.shape[:1], c.dtype), chunk)

  def every_chunk(chunks):
    starts = jnp.arange(num_chunks) * chunk_rows
    return jax.lax.map(chunk_lse, (starts, chunks)).reshape(-1)

  def first_chunk(chunks):   # the common case, without the loop's bookkeeping
    return jnp.pad(score(chunks[0]), (0, (num_chunks - 1) * chunk_rows))

  lse = jax.lax.cond(count <= chunk_rows, first_chunk, every_chunk, chunks)
  valid = jnp.arange(num_chunks * chunk_rows) < count
  return jnp.zeros(n, lse.dtype).at[rows].add(jnp.where(valid, lse, 0.0))


class AdaptiveLogSoftmax(hk.Module):
  """Projected adaptive log-softmax (Grave et al. 2017; Dai et al. 2019).

  See the module docstring for the formula. `__call__` gives the
  log-probability of given targets without forming `[N, V]`; `log_probs` gives
  the whole `[N, V]` distribution (small vocabularies, tests).

  `tail_chunks` (default 4): a tail cluster's normaliser is computed only for
  the rows whose target lies in it, in chunks of `ceil(N / tail_chunks)` rows
  (at most `chunk_size`; see `_cluster_logsumexp`); 0 computes it for every
  row (the dense form, `N * V_i` logits per cluster). Both are exact.
  """

  def __init__(self, vocab_size: int, d_embed: int, d_proj: int,
               cutoffs: Sequence[int] = (), div_val: int = 1,
               tied_embedding: Optional[AdaptiveEmbedding] = None,
               tie_projections: bool = True,
               init_std: float = DEFAULT_INIT_STD,
               proj_init_std: float = DEFAULT_PROJ_INIT_STD,
               chunk_size: Optional[int] = 4096,
               tail_chunks: int = 4,
               name: Optional[str] = None):
    super().__init__(name=name)
    if tail_chunks < 0:
      raise ValueError(f'tail_chunks must be >= 0, got {tail_chunks}.')
    self.vocab_size = vocab_size
    self.d_embed = d_embed
    self.d_proj = d_proj
    self.div_val = div_val
    self.bounds = cluster_bounds(vocab_size, cutoffs)
    self.shortlist = self.bounds[0][1]
    self.num_tails = len(self.bounds) - 1
    self.widths = (cluster_widths(d_embed, len(self.bounds), div_val)
                   if div_val > 1 else [d_embed] * len(self.bounds))
    self.tied = tied_embedding
    if tied_embedding is not None and (
        tied_embedding.vocab_size != vocab_size or
        tied_embedding.d_embed != d_embed or tied_embedding.div_val != div_val or
        tied_embedding.d_proj != d_proj or
        (div_val > 1 and tied_embedding.bounds != self.bounds)):
      raise ValueError('a tied embedding must have the softmax\'s vocabulary, '
                       'widths, cutoffs and div_val.')
    self.tie_projections = tie_projections
    self.init_std = init_std
    self.proj_init_std = proj_init_std
    self.chunk_size = chunk_size
    self.tail_chunks = tail_chunks

  def _tail_logsumexp(self, projected, weight, bias, in_cluster):
    """Tail cluster's log-normaliser `[N]` (needed only where `in_cluster`)."""
    n = projected.shape[0]
    if not self.tail_chunks:
      return _linear_logsumexp(projected, weight, bias, self.chunk_size)
    chunk_rows = -(-n // self.tail_chunks)
    if self.chunk_size is not None:
      chunk_rows = min(chunk_rows, self.chunk_size)
    return _cluster_logsumexp(projected, weight, bias, in_cluster, chunk_rows)

  def _word_matrix(self, i: int) -> tuple[jax.Array, jax.Array]:
    """Output words `[V_i, d_i]` and biases `[V_i]` of cluster i."""
    lo, hi = self.bounds[i]
    if self.tied is not None:
      if self.div_val == 1:
        weight = self.tied.table(0)[lo:hi]
      else:
        weight = self.tied.table(i)
    else:
      weight = hk.get_parameter(f'words_{i}', [hi - lo, self.widths[i]],
                                init=hk.initializers.RandomNormal(self.init_std))
    bias = hk.get_parameter(f'bias_{i}', [hi - lo], init=jnp.zeros)
    return weight, bias

  def _projection(self, i: int) -> Optional[jax.Array]:
    """Output projection `Q_i: [P, d_i]`, or None when `d_i == P` without div_val."""
    if self.div_val == 1 and self.d_embed == self.d_proj:
      return None
    if self.tied is not None and self.tie_projections and i > 0:
      return self.tied.projection(i if self.div_val > 1 else 0).T
    return hk.get_parameter(f'projection_{i}', [self.d_proj, self.widths[i]],
                            init=hk.initializers.RandomNormal(self.proj_init_std))

  def _clusters(self, hidden: jax.Array):
    """Per cluster: projected hidden `[N, d_i]`, words, biases (head with K, k)."""
    out = []
    for i in range(len(self.bounds)):
      weight, bias = self._word_matrix(i)
      if i == 0 and self.num_tails:
        cluster_weight = hk.get_parameter(
            'cluster_weight', [self.num_tails, self.widths[0]],
            init=hk.initializers.RandomNormal(self.init_std))
        cluster_bias = hk.get_parameter('cluster_bias', [self.num_tails],
                                        init=jnp.zeros)
        weight = jnp.concatenate([weight, cluster_weight], axis=0)   # [S + C, d_0]
        bias = jnp.concatenate([bias, cluster_bias], axis=0)         # [S + C]
      projection = self._projection(i)
      projected = hidden if projection is None else hidden @ projection  # [N, d_i]
      out.append((projected, weight, bias))
    return out

  def __call__(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probabilities `log p(target | hidden)`.

    Args:
      hidden: `[N, P]` float.
      targets: `[N]` int tokens in `[0, V)`.

    Returns:
      `[N]` float log-probabilities.
    """
    clusters = self._clusters(hidden)
    # Head: the target's own column for shortlist tokens, its cluster's column
    # otherwise.
    head_column = targets
    for i in range(1, len(self.bounds)):
      lo, hi = self.bounds[i]
      head_column = jnp.where((targets >= lo) & (targets < hi),
                              self.shortlist + i - 1, head_column)
    projected, weight, bias = clusters[0]
    head_logit = (jnp.sum(projected * jnp.take(weight, head_column, axis=0), -1)
                  + jnp.take(bias, head_column, axis=0))                    # [N]
    log_prob = head_logit - _linear_logsumexp(projected, weight, bias,
                                              self.chunk_size)
    for i in range(1, len(self.bounds)):
      lo, hi = self.bounds[i]
      projected, weight, bias = clusters[i]
      in_cluster = (targets >= lo) & (targets < hi)                  # [N]
      index = jnp.clip(targets - lo, 0, hi - lo - 1)
      tail_logit = (jnp.sum(projected * jnp.take(weight, index, axis=0), -1)
                    + jnp.take(bias, index, axis=0))                        # [N]
      tail_log_prob = tail_logit - self._tail_logsumexp(projected, weight, bias,
                                                        in_cluster)
      log_prob = log_prob + jnp.where(in_cluster, tail_log_prob, 0.0)
    return log_prob

  def log_probs(self, hidden: jax.Array) -> jax.Array:
    """The full distribution `log p(. | hidden)`, `[N, P] -> [N, V]`."""
    clusters = self._clusters(hidden)
    projected, weight, bias = clusters[0]
    head = jax.nn.log_softmax(projected @ weight.T + bias, axis=-1)  # [N, S + C]
    parts = [head[:, :self.shortlist]]
    for i in range(1, len(self.bounds)):
      projected, weight, bias = clusters[i]
      tail = jax.nn.log_softmax(projected @ weight.T + bias, axis=-1)  # [N, V_i]
      parts.append(head[:, self.shortlist + i - 1, None] + tail)
    return jnp.concatenate(parts, axis=-1)
