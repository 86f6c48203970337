"""The synthetic 1-D regression task of the Jacobian-regularisation paper.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization" (ICML 2021), the synthetic 1-D experiment (main text and
appendix): 5096 pairs (x, y) with

    y = 1.5 x^3 + x^2 - 5 x + 2 sin(x) - 3 + delta,   delta ~ N(0, 0.05),

split into 4096 training and 1000 validation pairs.

Choices the paper leaves open (recorded in BUILD_NOTES.md (data pipelines)):
- Input range: x ~ U[-2, 2] (the paper states none).
- Sign of the linear term: -5x (the main text and the appendix differ).
- Noise: N(0, 0.05) is read in the usual N(mean, variance) notation, so
  delta has variance 0.05 (standard deviation sqrt(0.05) ~= 0.224).
- The 5096 pairs are drawn once from `seed`; the first 4096 are 'train', the
  last 1000 'validation', so both splits of one seed are disjoint draws.
"""
from typing import Optional

import numpy as np

from jreg.data import iterator

SPLITS = ('train', 'validation')
NUM_TRAIN = 4096
NUM_VALIDATION = 1000
X_RANGE = (-2.0, 2.0)
NOISE_VARIANCE = 0.05


def target_function(x: np.ndarray) -> np.ndarray:
  """The noiseless target 1.5 x^3 + x^2 - 5 x + 2 sin(x) - 3."""
  return 1.5 * x**3 + x**2 - 5.0 * x + 2.0 * np.sin(x) - 3.0


def load_synthetic_1d(split: str = 'train', *, seed: int = 0,
                      noise_variance: float = NOISE_VARIANCE,
                      x_range: tuple[float, float] = X_RANGE,
                      ) -> dict[str, np.ndarray]:
  """One split of the synthetic 1-D regression data (see module docstring).

  Args:
    split: 'train' (4096 pairs) or 'validation' (1000 pairs).
    seed: the draw of all 5096 pairs (both splits come from the same draw).
    noise_variance: variance of the Gaussian noise delta.
    x_range: (low, high) of the uniform inputs.

  Returns:
    {'x': float32 [N, 1], 'y': float32 [N, 1]}.
  """
  if split not in SPLITS:
    raise ValueError(f'synthetic split {split!r} is not one of {SPLITS}.')
  if noise_variance < 0:
    raise ValueError(f'noise_variance={noise_variance} must be >= 0.')
  rng = np.random.default_rng(seed)
  total = NUM_TRAIN + NUM_VALIDATION
  x = rng.uniform(x_range[0], x_range[1], size=(total, 1))         # [N, 1]
  noise = rng.normal(0.0, np.sqrt(noise_variance), size=(total, 1))
  y = target_function(x) + noise                                  # [N, 1]
  rows = slice(0, NUM_TRAIN) if split == 'train' else slice(NUM_TRAIN, total)
  return {'x': x[rows].astype(np.float32), 'y': y[rows].astype(np.float32)}


def synthetic_1d_iterator(split: str, global_batch_size: int, *,
                          mode: str = 'train', seed: int = 0,
                          data_seed: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          num_epochs: Optional[int] = None,
                          ) -> iterator.ArrayIterator:
  """Batches `{'x': float32 [B, 1], 'y': float32 [B, 1]}`.

  Args:
    split: 'train' or 'validation'.
    global_batch_size: examples per step over all processes.
    mode: 'train' or 'eval' (see `iterator.ArrayIterator`).
    seed: shuffling seed.
    data_seed: the draw of the data (`load_synthetic_1d(seed=...)`).
    process_index, process_count, num_epochs: as `iterator.ArrayIterator`.
  """
  return iterator.ArrayIterator(
      load_synthetic_1d(split, seed=data_seed), global_batch_size, mode=mode,
      seed=seed, process_index=process_index, process_count=process_count,
      num_epochs=num_epochs)
