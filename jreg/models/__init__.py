"""Models: MLPs, CIFAR ResNets, MDEQ, DEQ-Transformer, adaptive softmax.

Submodules are imported explicitly (`from jreg.models import mlp`); this
package imports none of them eagerly. `count_params` is the one parameter
count every model, task and experiment uses.
"""
import math
from typing import Any

import jax
import numpy as np


def count_params(params: Any) -> int:
  """m, the number of scalars in a parameter pytree.

  Works on arrays and on `jax.ShapeDtypeStruct`s (`jax.eval_shape` of an
  `init`), so a model's size is known without allocating it.
  """
  return int(sum(math.prod(leaf.shape if hasattr(leaf, 'shape') else np.shape(leaf))
                 for leaf in jax.tree.leaves(params)))


__all__ = ('adaptive_softmax', 'count_params', 'deq_transformer', 'mdeq', 'mlp',
           'resnet')
