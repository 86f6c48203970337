"""DEQ-Transformer language model and its explicit Transformer-XL counterpart.

Shape letters: B batch (streams), T segment length (tokens predicted per
step), M memory length (cached positions of earlier segments), K = M + T key
length, D model width (`d_model`), H heads, E head width (`d_head`, H * E = D
for the DEQ's input injection), F feed-forward width (`d_inner`), V vocabulary,
L layers of the explicit stack.

The DEQ-Transformer (Bai, Kolter & Koltun, "Deep Equilibrium Models",
NeurIPS 2019, Sec. 4.2; code: locuslab/deq `DEQ-Sequence/models/
deq_transformer.py`) finds, for each segment, the equilibrium

    z* = f_theta(z*; u, m),

where f is ONE Transformer-XL layer (relative multi-head self-attention and a
position-wise feed-forward block, Dai et al., "Transformer-XL", ACL 2019,
Sec. 3.3), u = Linear(AdaptiveEmbedding(tokens)) is the input injection added
to the query/key/value projections, and m is the memory: the equilibria z* of
the previous segment(s) (and their injections), `stop_gradient`-ed and
concatenated in front of the keys and values. The layer is

    a      = [m; z]                                 # [B, K, D]
    q,k,v  = W_qkv LN?(a) + [u_m; u]                # injection
    score  = (q + r_w)^T k  +  shift((q + r_r)^T W_r R)   # Transformer-XL
    h      = LN(z + W_o softmax(score / sqrt(E)) v)        (post-LN)
    f(z)   = LN(h + FF(h))                                 (post-LN)

(pre-LN variant: LN on the attention input, no LN after the residuals, and
the feed-forward residual taken from the normalised input, exactly as the
reference code). Linear maps of the layer are weight-normalised
(w = g v / ||v||, Salimans & Kingma 2016), dropout is variational: one mask
per forward pass, shared over positions and solver iterations, drawn outside
the solver and passed to the cell with its other inputs.

Training follows Bai et al., "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021 (Sec. 5, Appendix A): an unrolled weight-tied
pre-training phase, then the implicit layer with the Jacobian term
gamma * ||J_f(z*)||_F^2 / d on a random fraction p of steps; all solver
machinery comes from `jreg.deq`.

Memory across segments lives in the Haiku state of the model
(`deq_transformer_lm`: `memory_z`, `memory_u` or `memory_layers`, and
`memory_length`): fixed-size, right-aligned buffers plus the
number of valid positions, which starts at 0 and grows to M (keys of invalid
positions are masked, which is exactly the reference's growing memory).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from jreg import deq
from jreg.models import adaptive_softmax

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of the DEQ-Transformer (or the explicit Transformer-XL stack).

  Defaults are the WikiText-103 DEQ-Transformer of the reference script
  `DEQ-Sequence/wt103_deq_transformer_reg.sh` (see BUILD_NOTES.md (DEQ-Transformer)).
  """
  vocab_size: int = 267_735
  d_model: int = 700            # D
  n_head: int = 10              # H
  d_head: int = 70              # E (H * E = D)
  d_inner: int = 48_000         # F
  d_embed: Optional[int] = None  # adaptive-input width; None: d_model
  cutoffs: tuple[int, ...] = (20_000, 40_000, 200_000)
  div_val: int = 4
  tie_weights: bool = True      # softmax word matrices = embedding tables
  tie_projections: bool = True  # tail output projections = input projections
  dropout: float = 0.06         # variational dropout (hidden, embedding, output)
  dropatt: float = 0.01         # attention-probability dropout
  pre_lnorm: bool = False       # pre-LN (True) or post-LN (False) layer
  weight_norm: bool = True
  mem_len: int = 300            # M
  architecture: str = 'deq'     # 'deq' (weight-tied, implicit) | 'transformer_xl'
  n_layer: int = 16             # L of the explicit stack (architecture 'transformer_xl')
  init_std: float = 0.01        # N(0, init_std) for weights and embeddings
  proj_init_std: float = 0.01   # N(0, proj_init_std) for adaptive projections
  softmax_chunk_size: Optional[int] = 4096  # rows per chunk of tail logits
  softmax_tail_chunks: int = 4  # tails only for their own rows; 0: every row

  def __post_init__(self):
    if self.architecture not in ('deq', 'transformer_xl'):
      raise ValueError(f"architecture must be 'deq' or 'transformer_xl', got "
                       f'{self.architecture!r}.')
    if self.n_head * self.d_head != self.d_model:
      raise ValueError(f'n_head * d_head = {self.n_head * self.d_head} must equal '
                       f'd_model = {self.d_model} (the input injection is added to '
                       'the query/key/value projections).')
    for name in ('dropout', 'dropatt'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {getattr(self, name)}.')
    if self.mem_len < 0:
      raise ValueError(f'mem_len must be >= 0, got {self.mem_len}.')


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Parameter-free layer normalisation over the last axis (reference: F.layer_norm)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def sinusoid_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Transformer-XL position embedding `[sin(p w); cos(p w)]`, `w_k = 10000^(-2k/dim)`.

  Args:
    positions: `[K]` float relative distances.
    dim: even width D.

  Returns:
    `[K, D]`.
  """
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0.0, dim, 2.0) / dim))    # [D/2]
  angles = positions[:, None] * inv_freq[None, :]                      # [K, D/2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rel_shift(x: jax.Array) -> jax.Array:
  """Transformer-XL's relative shift of position scores.

  With keys j = 0..K-1 (memory first) and queries i = 0..T-1 at key position
  i + M, `x[..., i, k]` holds the score of query i against relative distance
  `K - 1 - k` (positions ordered K-1, ..., 0). The output holds at `[i, j]`
  the score against distance `i + M - j`, for every causal pair `j <= i + M`
  (Dai et al. 2019, Appendix B); other entries are garbage and must be masked.

  Args:
    x: `[..., T, K]`.

  Returns:
    `[..., T, K]`.
  """
  *lead, t, k = x.shape
  padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])          # [..., T, K+1]
  padded = padded.reshape(padded.shape[:-2] + (k + 1, t))                        # [..., K+1, T]
  return padded[..., 1:, :].reshape(padded.shape[:-2] + (t, k))


class WeightNormLinear(hk.Module):
  """`y = x (g v / ||v||) + b` (Salimans & Kingma 2016), norm per output unit.

  With `weight_norm=False` a plain linear map `y = x v + b`. The gain g starts
  at `||v_init||`, so the initial map equals the unnormalised one (PyTorch's
  `weight_norm`, used by the reference).
  """

  def __init__(self, output_size: int, with_bias: bool = True,
               weight_norm: bool = True, init_std: float = 0.01,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.with_bias = with_bias
    self.weight_norm = weight_norm
    self.init_std = init_std

  def __call__(self, x: jax.Array) -> jax.Array:
    v = hk.get_parameter('v', [x.shape[-1], self.output_size],
                         init=hk.initializers.RandomNormal(self.init_std))
    w = v
    if self.weight_norm:
      norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0))                  # [out]
      g = hk.get_parameter('g', [self.output_size], init=lambda *_: norm)
      w = v * (g / norm)
    y = x @ w
    if self.with_bias:
      y = y + hk.get_parameter('b', [self.output_size], init=jnp.zeros)
    return y


def _variational_mask(rng, rate: float, shape) -> Optional[jax.Array]:
  """Inverted-dropout mask `Bernoulli(1 - rate) / (1 - rate)`, or None if rate is 0."""
  if rate == 0.0:
    return None
  keep = 1.0 - rate
  return jax.random.bernoulli(rng, keep, shape).astype(jnp.float32) / keep


def layer_dropout_masks(rng: jax.Array, config: TransformerConfig, batch: int,
                        length: int, key_length: int) -> dict:
  """Masks of one layer, fixed for a forward pass (variational dropout).

  Shapes follow the reference's `VariationalHidDropout` (one mask per example
  and feature, shared over positions) and `VariationalAttnDropout` (one per
  attention entry): attention `[B, H, T, K]`, attention_output `[B, 1, D]`,
  ff_hidden `[B, 1, F]`, ff_output `[B, 1, D]`.
  """
  keys = jax.random.split(rng, 4)
  return dict(
      attention=_variational_mask(keys[0], config.dropatt,
                                  (batch, config.n_head, length, key_length)),
      attention_output=_variational_mask(keys[1], config.dropout,
                                         (batch, 1, config.d_model)),
      ff_hidden=_variational_mask(keys[2], config.dropout,
                                  (batch, 1, config.d_inner)),
      ff_output=_variational_mask(keys[3], config.dropout,
                                  (batch, 1, config.d_model)))


def _apply_mask(x, masks, name):
  if masks is None or masks.get(name) is None:
    return x
  return x * masks[name]


class RelativeTransformerLayer(hk.Module):
  """One Transformer-XL layer with input injection: the DEQ cell `f(z, x)`.

  `x` is a dict: `memory` `[B, M, D]`, `injection` `[B, K, 3D]` or None,
  `position` `[K, D]` (relative position embeddings, distances K-1..0),
  `key_mask` `[T, K]` (1 where query i may attend to key j), `masks` (dict of
  dropout masks from `layer_dropout_masks`, or None).
  """

  def __init__(self, config: TransformerConfig, name: Optional[str] = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, z: jax.Array, x: dict) -> jax.Array:
    cfg = self.config
    batch, length, d_model = z.shape
    heads, d_head = cfg.n_head, cfg.d_head
    linear = lambda n, bias, name: WeightNormLinear(
        n, bias, cfg.weight_norm, cfg.init_std, name=name)
    memory, masks = x['memory'], x['masks']
    key_length = memory.shape[1] + length

    # Relative multi-head attention over [memory; z].
    keys_in = jnp.concatenate([memory, z], axis=1)                      # [B, K, D]
    if cfg.pre_lnorm:
      keys_in = layer_norm(keys_in)
    qkv = linear(3 * heads * d_head, False, 'qkv')(keys_in)              # [B, K, 3HE]
    if x['injection'] is not None:
      qkv = qkv + x['injection']
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = q[:, -length:].reshape(batch, length, heads, d_head)           # [B, T, H, E]
    k = k.reshape(batch, key_length, heads, d_head)                    # [B, K, H, E]
    v = v.reshape(batch, key_length, heads, d_head)                    # [B, K, H, E]
    r = linear(heads * d_head, False, 'r_net')(x['position'])          # [K, HE]
    r = r.reshape(key_length, heads, d_head)                           # [K, H, E]
    bias_init = hk.initializers.RandomNormal(cfg.init_std)
    r_w_bias = hk.get_parameter('r_w_bias', [heads, d_head], init=bias_init)
    r_r_bias = hk.get_parameter('r_r_bias', [heads, d_head], init=bias_init)
    content = jnp.einsum('bihe,bjhe->bhij', q + r_w_bias, k)           # [B, H, T, K]
    position = rel_shift(jnp.einsum('bihe,jhe->bhij', q + r_r_bias, r))
    score = (content + position) / math.sqrt(d_head)
    score = jnp.where(x['key_mask'] > 0, score, _NEG_INF)
    prob = _apply_mask(jax.nn.softmax(score, axis=-1), masks, 'attention')
    attended = jnp.einsum('bhij,bjhe->bihe', prob, v)                  # [B, T, H, E]
    attended = attended.reshape(batch, length, heads * d_head)
    attn_out = _apply_mask(linear(d_model, True, 'o_net')(attended), masks,
                           'attention_output')                          # [B, T, D]
    h = attn_out + z if cfg.pre_lnorm else layer_norm(attn_out + z)

    # Position-wise feed-forward.
    ff_in = layer_norm(h) if cfg.pre_lnorm else h
    hidden = jax.nn.relu(linear(cfg.d_inner, True, 'ff1')(ff_in))      # [B, T, F]
    hidden = _apply_mask(hidden, masks, 'ff_hidden')
    ff_out = _apply_mask(linear(d_model, True, 'ff2')(hidden), masks, 'ff_output')
    out = ff_out + ff_in
    return out if cfg.pre_lnorm else layer_norm(out)


def key_mask(length: int, memory_size: int, memory_valid) -> jax.Array:
  """`[T, K]` float: 1 where query i attends to key j.

  Causal (`j <= i + M`) and restricted to the `memory_valid` most recent
  memory slots (the buffer is right-aligned: slots `j < M - valid` are empty).
  """
  i = jnp.arange(length)[:, None]
  j = jnp.arange(memory_size + length)[None, :]
  allowed = (j <= i + memory_size) & (j >= memory_size - memory_valid)
  return allowed.astype(jnp.float32)


def _append_to_memory(memory: jax.Array, new: jax.Array) -> jax.Array:
  """The last M positions of `[memory; new]` (along axis -2), no gradient."""
  size = memory.shape[-2]
  if size == 0:
    return memory
  both = jnp.concatenate([memory, jax.lax.stop_gradient(new)], axis=-2)
  return both[..., -size:, :]


class DEQTransformerLM(hk.Module):
  """Language model: adaptive input -> DEQ (or Transformer-XL stack) -> adaptive softmax.

  Call: `log_prob, info = model(inputs, targets, is_training=..., ...)`, with
  `inputs`, `targets` int `[B, T]`, `log_prob` float `[B, T]`
  (log p(target | context)) and `info` a flat dict of scalars (solver stats,
  Jacobian term). Reads and updates the memory in the Haiku state.
  """

  def __init__(self, config: TransformerConfig,
               forward: deq.SolverConfig = deq.SolverConfig(),
               backward: deq.BackwardConfig = deq.BackwardConfig(),
               pretrain_layers: int = 2, eval_pretrain_layers: int = 24,
               compute_dtype=None,
               name: Optional[str] = 'deq_transformer_lm'):
    super().__init__(name=name)
    self.compute_dtype = compute_dtype  # the DEQ layer's dtype (jreg.deq.DEQ)
    self.config = config
    self.forward_solver = forward
    self.backward_solver = backward
    self.pretrain_layers = pretrain_layers
    self.eval_pretrain_layers = eval_pretrain_layers

  def __call__(self, inputs: jax.Array, targets: jax.Array, *,
               is_training: bool, unrolled: bool = False,
               jacobian_loss=False, spectral_radius: bool = False):
    cfg = self.config
    batch, length = inputs.shape
    d_embed = cfg.d_embed or cfg.d_model
    mem_len = cfg.mem_len
    key_length = mem_len + length
    dropout = cfg.dropout if is_training else 0.0
    train_config = dataclasses.replace(
        cfg, dropout=dropout, dropatt=cfg.dropatt if is_training else 0.0)

    embedding = adaptive_softmax.AdaptiveEmbedding(
        cfg.vocab_size, d_embed, cfg.d_model, cfg.cutoffs, cfg.div_val,
        cfg.init_std, cfg.proj_init_std)
    # Dropout masks (embedding, positions, layer, output) and the Hutchinson key.
    rngs = (jax.random.split(hk.next_rng_key(), 5) if is_training
            else [None] * 5)
    word = embedding(inputs)                                           # [B, T, D]
    word = word * (_variational_mask(rngs[0], dropout, (batch, 1, cfg.d_model))
                   if dropout else 1.0)

    position = sinusoid_embedding(jnp.arange(key_length - 1, -1, -1.0),
                                  cfg.d_model)                         # [K, D]
    if dropout:
      position = position * _variational_mask(rngs[1], dropout, (1, cfg.d_model))

    # Memory: right-aligned buffers and the number of valid slots.
    valid = hk.get_state('memory_length', [], jnp.float32, init=jnp.zeros)
    mask = key_mask(length, mem_len, valid)                             # [T, K]
    info = {}

    if cfg.architecture == 'deq':
      mem_z = hk.get_state(
          'memory_z', [batch, mem_len, cfg.d_model], jnp.float32, init=jnp.zeros)
      mem_u = hk.get_state(
          'memory_u', [batch, mem_len, 3 * cfg.d_model], jnp.float32,
          init=jnp.zeros)
      injection = hk.Linear(3 * cfg.d_model, name='injection',
                            w_init=hk.initializers.RandomNormal(cfg.init_std))(word)
      x = dict(memory=mem_z, injection=jnp.concatenate([mem_u, injection], 1),
               position=position, key_mask=mask,
               masks=(layer_dropout_masks(rngs[2], train_config, batch, length,
                                          key_length) if is_training else None))
      layers = (self.pretrain_layers if is_training else self.eval_pretrain_layers)
      equilibrium = deq.DEQ(
          lambda z, x: RelativeTransformerLayer(cfg, name='layer')(z, x),
          forward=self.forward_solver, backward=self.backward_solver,
          unrolled_steps=layers, compute_dtype=self.compute_dtype, name='deq')
      z0 = jnp.zeros((batch, length, cfg.d_model), jnp.float32)
      hidden, info = equilibrium(x, z0, unrolled=unrolled,
                                 jacobian_loss=jacobian_loss,
                                 spectral_radius=spectral_radius, rng=rngs[4])
      if not hk.running_init():
        hk.set_state('memory_z', _append_to_memory(mem_z, hidden))
        hk.set_state('memory_u', _append_to_memory(mem_u, injection))
    else:
      mems = hk.get_state(
          'memory_layers', [cfg.n_layer, batch, mem_len, cfg.d_model], jnp.float32,
          init=jnp.zeros)
      layer_rngs = (jax.random.split(rngs[2], cfg.n_layer) if is_training
                    else [None] * cfg.n_layer)
      hidden, new_mems = word, []
      for l in range(cfg.n_layer):
        new_mems.append(_append_to_memory(mems[l], hidden))
        x = dict(memory=mems[l], injection=None, position=position, key_mask=mask,
                 masks=(layer_dropout_masks(layer_rngs[l], train_config, batch,
                                            length, key_length)
                        if is_training else None))
        hidden = RelativeTransformerLayer(cfg, name=f'layer_{l}')(hidden, x)
      if not hk.running_init():
        hk.set_state('memory_layers', jnp.stack(new_mems))
    if not hk.running_init():
      hk.set_state('memory_length', jnp.minimum(valid + length, float(mem_len)))

    if dropout:
      hidden = hidden * _variational_mask(rngs[3], dropout, (batch, 1, cfg.d_model))
    softmax = adaptive_softmax.AdaptiveLogSoftmax(
        cfg.vocab_size, d_embed, cfg.d_model, cfg.cutoffs, cfg.div_val,
        tied_embedding=embedding if cfg.tie_weights else None,
        tie_projections=cfg.tie_projections, init_std=cfg.init_std,
        proj_init_std=cfg.proj_init_std, chunk_size=cfg.softmax_chunk_size,
        tail_chunks=cfg.softmax_tail_chunks)
    log_prob = softmax(hidden.reshape(batch * length, cfg.d_model),
                       targets.reshape(batch * length))
    return log_prob.reshape(batch, length), info


# Batch axis of each memory buffer in the model state (others are not per example).
_MEMORY_BATCH_AXIS = {'memory_z': 0, 'memory_u': 0, 'memory_layers': 1}


def shard_memory(grad_fn):
  """Makes a grad function keep per-example memory right under `pmap`.

  The memory buffers in the model state hold one row per stream of the
  *global* batch in every parallel mode ('single' and 'sharded' see the global
  arrays). Under `pmap` each device computes only its rows; this wrapper hands
  `grad_fn` that device's rows (`axis_index * b ... + b`) and gathers the
  updated rows of all devices back (`all_gather`), so every device holds the
  same full memory and the engine's `pmean` of the state leaves it unchanged.
  Without `axis_name` it is `grad_fn` itself.
  """

  def wrapped(params, model_state, rng, batch, axis_name=None):
    if axis_name is None:
      return grad_fn(params, model_state, rng, batch, axis_name)
    rows = batch['inputs'].shape[0]
    index = jax.lax.axis_index(axis_name)

    def take(module, name, value):
      del module
      axis = _MEMORY_BATCH_AXIS.get(name)
      if axis is None:
        return value
      return jax.lax.dynamic_slice_in_dim(value, index * rows, rows, axis)

    def gather(module, name, value):
      del module
      axis = _MEMORY_BATCH_AXIS.get(name)
      if axis is None:
        return value
      return jax.lax.all_gather(value, axis_name, axis=axis, tiled=True)

    local_state = hk.data_structures.map(take, model_state)
    (loss, (new_state, metrics)), grads = grad_fn(params, local_state, rng, batch,
                                                  axis_name)
    new_state = hk.data_structures.map(gather, new_state)
    return (loss, (new_state, metrics)), grads

  return wrapped
