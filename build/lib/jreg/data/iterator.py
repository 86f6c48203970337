"""One iterator for datasets held in memory as arrays (MNIST, CIFAR-10, 1-D).

Shuffling, per-epoch reshuffling, process sharding, evaluation padding and the
saveable position live here once; the datasets only supply arrays and a
`transform` (normalisation, augmentation).

Order of examples. In `'train'` mode epoch `e` visits the examples in the order
`permutation_e = default_rng(SeedSequence(seed, spawn_key=(0, e))).permutation(N)`
and global batch `s` of that epoch is `permutation_e[s*G:(s+1)*G]`
(G = global batch size; the last `N mod G` examples of each permutation are
dropped, different ones every epoch). Process `p` of `P` takes rows
`[p*G/P, (p+1)*G/P)` of each global batch, so the slices of all processes are
disjoint and together make the global batch.

Randomness of augmentation. Each global batch gets one 63-bit integer per
example, `keys = default_rng(SeedSequence(seed, spawn_key=(1, e, s)))`, and a
transform derives every random choice for an example from its key only. An
example's augmentation therefore depends on (seed, epoch, step, its row in the
global batch) and not on the number of processes nor on where the iterator was
restored.

`'eval'` mode visits every example exactly once in stored order, in batches of
G; the last global batch is padded (with copies of example 0) to G rows and
each batch carries `'mask'`: bool [B], True for real examples.
"""
from typing import Callable, Mapping, Optional

import numpy as np

from jreg.data import common

# transform(batch, keys) -> batch: `keys` is int64 [B], one random key per row.
Transform = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]


class ArrayIterator(common.EpochStepPosition):
  """Batches of in-memory arrays with a saveable, exactly restorable position.

  Yields dicts `{name: array[B, ...]}` (B = global_batch_size // process_count)
  after `transform`, plus `'mask'` in eval mode. Iteration is endless in train
  mode unless `num_epochs` is given, and one pass in eval mode.
  """
  # A saved position is accepted only by an iterator over the same data.
  _IDENTITY = ('seed', 'mode', 'num_examples', 'global_batch_size')

  def __init__(self,
               arrays: Mapping[str, np.ndarray],
               global_batch_size: int,
               *,
               mode: str = 'train',
               seed: int = 0,
               transform: Optional[Transform] = None,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               num_epochs: Optional[int] = None):
    """Builds the iterator.

    Args:
      arrays: name -> array with a common leading axis N (the examples).
      global_batch_size: G, examples per step summed over all processes.
      mode: 'train' (shuffled, reshuffled each epoch, remainder dropped) or
        'eval' (one ordered pass, last batch padded and masked).
      seed: seeds the shuffling and the augmentation keys.
      transform: `transform(batch, keys) -> batch`, applied to this process's
        slice; `keys` int64 [B] (see module docstring).
      process_index: this process (default `jax.process_index()`).
      process_count: number of processes (default `jax.process_count()`).
      num_epochs: stop after this many epochs in train mode (None: endless).
    """
    if not arrays:
      raise ValueError('ArrayIterator needs at least one array.')
    sizes = {name: len(value) for name, value in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f'arrays have different numbers of examples: {sizes}.')
    self._arrays = dict(arrays)
    self._num_examples = next(iter(sizes.values()))
    self._process_index, self._process_count = common.resolve_batch_sharding(
        mode, global_batch_size, process_index, process_count)
    if mode == 'train' and global_batch_size > self._num_examples:
      raise ValueError(
          f'global_batch_size={global_batch_size} exceeds the '
          f'{self._num_examples} examples of the dataset.')
    self._global_batch_size = global_batch_size
    self._batch_size = global_batch_size // self._process_count
    self._mode = mode
    self._seed = int(seed)
    self._transform = transform
    self._num_epochs = num_epochs
    self._epoch = 0
    self._step = 0
    self._permutation_epoch = -1
    self._permutation = None

  # -- sizes ------------------------------------------------------------------

  @property
  def num_examples(self) -> int:
    return self._num_examples

  @property
  def global_batch_size(self) -> int:
    return self._global_batch_size

  @property
  def batch_size(self) -> int:
    """Rows per batch on this process."""
    return self._batch_size

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (train: floor(N/G); eval: ceil(N/G))."""
    if self._mode == 'train':
      return self._num_examples // self._global_batch_size
    return -(-self._num_examples // self._global_batch_size)

  def __len__(self) -> int:
    return self.steps_per_epoch

  # -- iteration ------------------------------------------------------------

  def __iter__(self) -> 'ArrayIterator':
    return self

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation_epoch != epoch:
      rng = np.random.default_rng(
          np.random.SeedSequence(self._seed, spawn_key=(0, epoch)))
      self._permutation = rng.permutation(self._num_examples)
      self._permutation_epoch = epoch
    return self._permutation

  def _example_keys(self, epoch: int, step: int) -> np.ndarray:
    rng = np.random.default_rng(
        np.random.SeedSequence(self._seed, spawn_key=(1, epoch, step)))
    return rng.integers(0, 2**63 - 1, size=self._global_batch_size,
                        dtype=np.int64)

  def __next__(self) -> dict[str, np.ndarray]:
    size = self._global_batch_size
    if self._mode == 'train':
      if self._step >= self.steps_per_epoch:
        self._epoch += 1
        self._step = 0
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      start = self._step * size
      global_indices = self._epoch_permutation(self._epoch)[start:start + size]
      valid = None
    else:
      if self._step >= self.steps_per_epoch:
        raise StopIteration
      positions = np.arange(self._step * size, (self._step + 1) * size)
      valid = positions < self._num_examples                 # [G]
      global_indices = np.where(valid, positions, 0)
    keys = self._example_keys(self._epoch, self._step)      # [G]
    lo = self._process_index * self._batch_size
    rows = slice(lo, lo + self._batch_size)
    indices = global_indices[rows]                          # [B]
    batch = {name: value[indices] for name, value in self._arrays.items()}
    if self._transform is not None:
      batch = self._transform(batch, keys[rows])
    if valid is not None:
      batch['mask'] = valid[rows]
    self._step += 1
    return batch
