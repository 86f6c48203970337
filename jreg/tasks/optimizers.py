"""The optimiser of a config: `learning_rate` and the `optimizer.*` group.

    optimizer.name          'adam' | 'sgd' (Nesterov momentum `momentum`)
    optimizer.schedule      'constant' | 'cosine' | 'warmup_cosine' over num_steps
    optimizer.warmup_steps  linear warm-up (warmup_cosine)
    optimizer.weight_decay  lambda of the L2 term lambda * theta added to the gradient
    optimizer.grad_clip     global-norm clipping threshold (0: none)
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

from jreg import train

OPTIMIZERS = ('adam', 'sgd')


def make_optimizer(learning_rate: float, group: Mapping[str, Any],
                   num_steps: int) -> tuple[optax.GradientTransformation,
                                            optax.Schedule]:
  """`(optimizer, schedule)` for a run of `num_steps` steps.

  Raises:
    ValueError: an unknown optimiser or schedule, or a warm-up that does not
      fit in the run (one sentence).
  """
  name = group['name']
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name must be one of {OPTIMIZERS}, got {name!r}.')
  schedule = train.learning_rate_schedule(
      group.get('schedule', 'constant'), learning_rate, max(num_steps, 1),
      group.get('warmup_steps', 0))
  if name == 'adam':
    tx = optax.adam(schedule)
  else:
    tx = optax.sgd(schedule, momentum=group.get('momentum', 0.9), nesterov=True)
  if group.get('weight_decay', 0.0):
    tx = optax.chain(optax.add_decayed_weights(group['weight_decay']), tx)
  if group.get('grad_clip', 0.0):
    tx = optax.chain(optax.clip_by_global_norm(group['grad_clip']), tx)
  return tx, schedule
