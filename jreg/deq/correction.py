"""Fixed-point correction: a loss on several states of the forward solver.

Bai, Koltun & Kolter, "Deep Equilibrium Optical Flow Estimation", CVPR 2022,
Sec. 3.3: besides the loss at the fixed point z*, apply the loss to states
z_{k_1}, ..., z_{k_{n-1}} of the forward solver, each differentiated by a
phantom gradient taken at that state (`jreg.deq.fixed_point_states`), and sum
the weighted terms

  L = sum_{i=0}^{n-1} w_i l(z_{k_i}),   z_{k_{n-1}} = z*.

Weights (locuslab/torchdeq `torchdeq/loss/correction.py`, with i the
position of the state and n the number of states; the sum is not
normalised):

  exponential  w_i = gamma^(n-1-i)                 (torchdeq default gamma 0.8)
  linear       w_i = 1 - (n-1-i)/n * gamma         (torchdeq default gamma 0.9;
                                                    gamma = 1 gives (i+1)/n)
  constant     w_i = 1

Which states (torchdeq `DEQIndexing._compute_f_iter`, `torchdeq/core.py`):
`n_states` spreads n evaluation counts over the budget T = max_iter with
delta = T // n: k_i = (i+1) delta when n divides T, else k_i = T - (n-1-i)
delta; explicit `indexing` (k_1, ..., k_m) supervises those counts and T.
The last count is always T, whose state is z*.
"""
from typing import Optional, Sequence, Union

import jax
import numpy as np

WEIGHTINGS = ('exponential', 'linear', 'constant')
_DEFAULT_GAMMA = {'exponential': 0.8, 'linear': 0.9, 'constant': None}


def state_indices(max_iter: int,
                  states: Union[int, Sequence[int]]) -> tuple[int, ...]:
  """The evaluation counts of the supervised states, the last one max_iter.

  Args:
    max_iter: T, the forward solver's budget.
    states: an int n (torchdeq's `n_states`: n counts spread over T, see
      the module docstring) or a sequence of counts (torchdeq's `indexing`;
      T is appended).

  Returns:
    Tuple of counts in [1, T] ending with T.
  """
  if isinstance(states, int):
    if states <= 1:
      return (max_iter,)
    n = min(max_iter, states)
    delta = max_iter // n
    if max_iter % n == 0:
      return tuple((k + 1) * delta for k in range(n))
    return tuple(max_iter - (n - k - 1) * delta for k in range(n))
  indices = tuple(int(k) for k in states) + (max_iter,)
  if any(not 1 <= k <= max_iter for k in indices):
    raise ValueError(f'supervised states must lie in [1, max_iter={max_iter}]; '
                     f'got {tuple(states)}.')
  return indices


def correction_weights(n: int, weighting: str = 'exponential',
                       gamma: Optional[float] = None) -> np.ndarray:
  """The n weights w_0..w_{n-1} of `fp_correction` (formulas: module docstring).

  Args:
    n: number of states (the last is z*).
    weighting: 'exponential', 'linear' or 'constant'.
    gamma: decay; None takes torchdeq's default for the weighting.

  Returns:
    float64 [n] (numpy: n is static).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}; use one of {WEIGHTINGS}.')
  if gamma is None:
    gamma = _DEFAULT_GAMMA[weighting]
  distance = np.arange(n - 1, -1, -1, dtype=np.float64)  # n-1-i
  if weighting == 'exponential':
    return float(gamma) ** distance
  if weighting == 'linear':
    return 1.0 - distance / n * gamma
  return np.ones((n,), np.float64)


def fp_correction(losses: Sequence[jax.Array], weighting: str = 'exponential',
                  gamma: Optional[float] = None) -> jax.Array:
  """Fixed-point correction loss sum_i w_i losses[i] (Bai et al., CVPR 2022).

  Args:
    losses: scalar losses of the states in solver order, the last at z*
      (e.g. `[loss(z) for z in states]` with the states of
      `DEQ(..., supervise_states=...)`).
    weighting: 'exponential' (w_i = gamma^(n-1-i)), 'linear'
      (w_i = 1 - (n-1-i)/n * gamma) or 'constant' (w_i = 1); torchdeq's
      convention, no normalisation.
    gamma: None takes torchdeq's default (0.8 exponential, 0.9 linear).

  Returns:
    The weighted sum, a scalar.
  """
  losses = list(losses)
  if not losses:
    raise ValueError('fp_correction needs at least one loss.')
  weights = correction_weights(len(losses), weighting, gamma)
  return sum(float(w) * l for w, l in zip(weights, losses))
