"""Image classification with softmax cross entropy: the objective and its evaluation.

Shapes: B batch, K classes; batches follow `jreg.data`'s image contract
(`{'image': float32 [B, H, W, C], 'label': int32 [B]}`, eval batches with a
`'mask'`: bool [B]).

A classifier is either
  * `hk.Transformed` without state or randomness (`apply(params, images)`,
    e.g. `jreg.models.mlp`), or
  * `hk.TransformedWithState` taking `is_training` (`apply(params, state,
    rng, images, is_training)`, e.g. `jreg.models.resnet`, batch norm);
`logits` calls either the same way. Training uses `is_training=True` (batch
statistics, state updated); evaluation `is_training=False` (running
statistics, state left alone).

Cross entropy of one example: ℓ = −log softmax(z)_y = logsumexp(z) − z_y.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from jreg import xla_cpu

Classifier = Union[hk.Transformed, hk.TransformedWithState]


def logits(model: Classifier, params: hk.Params, model_state: hk.State,
           rng: jax.Array | None, images: jax.Array,
           is_training: bool) -> tuple[jax.Array, hk.State]:
  """`(logits [B, K], model_state)` of `images` [B, H, W, C] for either kind
  of classifier (a stateless one returns `model_state` unchanged)."""
  if isinstance(model, hk.TransformedWithState):
    return model.apply(params, model_state, rng, images, is_training=is_training)
  return model.apply(params, images), model_state


def cross_entropy_loss(model: Classifier) -> Callable[..., Any]:
  """The training objective, in the engine's contract.

  Returns:
    `loss_fn(params, model_state, rng, batch) -> (loss, (model_state,
    {'accuracy'}))`, loss = mean over the batch of ℓ, in training mode.
  """
  def loss_fn(params, model_state, rng, batch):
    z, model_state = logits(model, params, model_state, rng, batch['image'],
                            is_training=True)  # [B, K]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        z, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(z, -1) == batch['label'])
    return loss, (model_state, {'accuracy': accuracy})
  return loss_fn


def per_example_metrics(model: Classifier) -> Callable[..., dict[str, jax.Array]]:
  """Compiled `(params, model_state, batch) -> {'accuracy': [B],
  'cross_entropy': [B]}` in evaluation mode, for `jreg.train.evaluate`."""
  @xla_cpu.jit
  def metrics(params, model_state, batch):
    z, _ = logits(model, params, model_state, None, batch['image'],
                  is_training=False)  # [B, K]
    return {'accuracy': (jnp.argmax(z, -1) == batch['label']).astype(jnp.float32),
            'cross_entropy': optax.softmax_cross_entropy_with_integer_labels(
                z, batch['label'])}
  return metrics


def per_example_cross_entropy(model: Classifier) -> Callable[..., jax.Array]:
  """`(params, model_state, batch) -> ℓ [B]` in evaluation mode (not compiled:
  for differentiating, e.g. the full-batch gradient of
  `jreg.tasks.igr.full_batch_gradient`)."""
  def loss(params, model_state, batch):
    z, _ = logits(model, params, model_state, None, batch['image'],
                  is_training=False)  # [B, K]
    return optax.softmax_cross_entropy_with_integer_labels(z, batch['label'])
  return loss
