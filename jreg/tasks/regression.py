"""Regression with squared error: the objective and its evaluation.

Shapes: B batch, K outputs; batches `{'x': float32 [B, D], 'y': float32 [B, K]}`
(the synthetic 1-D task of `jreg.data.synthetic`: D = K = 1), eval batches
with a `'mask'`: bool [B].

Squared error of one example: e = Σₖ (ŷₖ − yₖ)²; the mean over examples is the
MSE (for K = 1 the usual mean squared error).
"""
from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp

from jreg import xla_cpu


def squared_error_loss(model: hk.Transformed) -> Callable[..., Any]:
  """The training objective for a stateless model `apply(params, x) -> ŷ`.

  Returns:
    `loss_fn(params, model_state, rng, batch) -> (mse, (model_state,
    {'mse'}))` in the engine's contract.
  """
  def loss_fn(params, model_state, rng, batch):
    del rng
    error = jnp.sum(jnp.square(model.apply(params, batch['x']) - batch['y']), -1)  # [B]
    mse = jnp.mean(error)
    return mse, (model_state, {'mse': mse})
  return loss_fn


def per_example_squared_error(model: hk.Transformed) -> Callable[..., dict]:
  """Compiled `(params, model_state, batch) -> {'mse': e [B]}` for
  `jreg.train.evaluate` (whose mean over examples is the MSE)."""
  @xla_cpu.jit
  def metrics(params, model_state, batch):
    del model_state
    return {'mse': jnp.sum(jnp.square(model.apply(params, batch['x'])
                                      - batch['y']), -1)}
  return metrics
