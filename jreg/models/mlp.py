"""Multi-layer perceptrons: ReLU networks of linear layers, in Haiku.

Shapes: B batch, D input features (all axes after the batch axis, flattened),
K outputs.

* `mlp(layer_sizes)`: the output sizes of each linear layer, ReLU between
  layers (none after the last): [B, ...] -> [B, layer_sizes[-1]].
* `mnist_mlp(width, num_layers)`: the MNIST networks of Barrett & Dherin
  ("Implicit Gradient Regularization", ICLR 2021, Section 5): `num_layers`
  linear layers, the first `num_layers - 1` of `width` units, then the 10-way
  output; images [B, 28, 28, 1] -> logits [B, 10].

The models carry no state and use no randomness, so they are
`hk.without_apply_rng(hk.transform(...))`: `apply(params, inputs)`.
"""
from __future__ import annotations

from collections.abc import Sequence

import haiku as hk


def mlp(layer_sizes: Sequence[int]) -> hk.Transformed:
  """A ReLU MLP with linear layers of `layer_sizes` outputs.

  Args:
    layer_sizes: the output size of every linear layer, the last one being
      the number of outputs K; all must be >= 1.

  Returns:
    `hk.Transformed` with `apply(params, inputs [B, ...]) -> [B, K]`; the
    inputs are flattened to [B, D] first (Haiku's default initialisers:
    truncated normal with stddev 1/√fan_in, zero biases).
  """
  layer_sizes = [int(n) for n in layer_sizes]
  if not layer_sizes or min(layer_sizes) < 1:
    raise ValueError(f'an MLP needs at least one layer and positive layer '
                     f'sizes, got {layer_sizes}.')

  def forward(inputs):
    x = inputs.reshape((inputs.shape[0], -1))   # [B, D]
    return hk.nets.MLP(layer_sizes)(x)           # [B, K]

  return hk.without_apply_rng(hk.transform(forward))


def mnist_mlp(width: int, num_layers: int, num_classes: int = 10) -> hk.Transformed:
  """`num_layers` linear layers ([BD21] Section 5's "5-layer" MLP for 5):
  `num_layers - 1` hidden ReLU layers of `width` units, then `num_classes`
  logits. [B, 28, 28, 1] -> [B, num_classes]."""
  if num_layers < 1 or width < 1:
    raise ValueError(f'width and num_layers must be >= 1, got {width} and '
                     f'{num_layers}.')
  return mlp([width] * (num_layers - 1) + [num_classes])
