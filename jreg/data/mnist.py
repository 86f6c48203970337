"""MNIST from its four gzipped IDX files (local or downloaded), or tfds `mnist`.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian
int32 magic number (2051 for images, 2049 for labels; the low byte is the
number of dimensions, the next byte 0x08 = unsigned byte), one big-endian
int32 per dimension, then the row-major uint8 data.
"""
import gzip
import pathlib
from typing import Optional

import numpy as np

from jreg.data import augment
from jreg.data import common
from jreg.data import iterator

SPLITS = ('train', 'test')
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def _how_to_get(directory) -> str:
  return ("use source='auto' or 'download' (or `python -m jreg.data.download "
          "mnist`) to download and verify them, or put the four IDX .gz files "
          f'of https://storage.googleapis.com/cvdf-datasets/mnist/ into '
          f'{directory}')


def read_idx(path: pathlib.Path, magic: int, ndim: int,
             how_to_get: str) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes, checking its header.

  Args:
    path: the `.gz` file.
    magic: expected magic number (2051 images, 2049 labels).
    ndim: expected number of dimensions (3 images, 1 labels).
    how_to_get: the clause telling the user how to get the data.

  Returns:
    uint8 array with the shape given in the header.

  Raises:
    DataError: missing file, bad gzip, wrong magic number or truncated data.
  """
  common.require_file(path, how_to_get)
  try:
    with gzip.open(path, 'rb') as stream:
      content = stream.read()
  except (OSError, EOFError) as error:
    raise common.DataError(
        f'{path} is not a readable gzip file ({error}): {how_to_get}.'
    ) from error
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    raise common.DataError(
        f'{path} holds {len(content)} bytes, fewer than an IDX header: '
        f'{how_to_get}.')
  found_magic = int(np.frombuffer(content, '>i4', 1)[0])
  if found_magic != magic:
    raise common.DataError(
        f'{path} has IDX magic number {found_magic} where {magic} was expected '
        f'(wrong or corrupt file): {how_to_get}.')
  dims = tuple(int(d) for d in np.frombuffer(content, '>i4', ndim, offset=4))
  expected = int(np.prod(dims))
  found = len(content) - header_size
  if found != expected:
    raise common.DataError(
        f'{path} holds {found} data bytes but its header promises {dims} = '
        f'{expected} (truncated or corrupt file): {how_to_get}.')
  return np.frombuffer(content, np.uint8, offset=header_size).reshape(dims)


def load_mnist(split: str = 'train', *, source: str = common.DEFAULT_SOURCE,
               data_dir: Optional[str] = None,
               mirror: Optional[str] = None) -> dict[str, np.ndarray]:
  """MNIST as arrays.

  Args:
    split: 'train' (60,000) or 'test' (10,000).
    source: 'auto', 'local', 'download' (IDX files under `data_dir/mnist/`
      or `data_dir/`; see `jreg.data.common`) or 'tfds' (an already prepared
      `mnist` under tfds's `data_dir`).
    data_dir: see `source`; None means `common.default_data_dir()` (or
      tfds's default for 'tfds').
    mirror: download mirror base URL (default `$JREG_DATA_MIRROR`).

  Returns:
    {'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}.
  """
  common.check_source(source)
  if split not in SPLITS:
    raise ValueError(f'MNIST split {split!r} is not one of {SPLITS}.')
  if source == 'tfds':
    return common.tfds_image_classification('mnist', split, data_dir,
                                            (28, 28, 1))
  images_name, labels_name = _FILES[split]
  directory = common.resolve_dataset_dir('mnist', source, data_dir,
                                         ('mnist',), images_name, _how_to_get,
                                         mirror)
  how = _how_to_get(directory)
  images = read_idx(directory / images_name, _IMAGES_MAGIC, 3, how)
  labels = read_idx(directory / labels_name, _LABELS_MAGIC, 1, how)
  if images.shape[1:] != (28, 28):
    raise common.DataError(
        f'{directory / images_name} holds images of shape {images.shape[1:]} '
        f'instead of (28, 28): {how}.')
  if len(images) != len(labels):
    raise common.DataError(
        f'{directory / images_name} holds {len(images)} images but '
        f'{directory / labels_name} holds {len(labels)} labels: {how}.')
  if labels.size and labels.max() > 9:
    raise common.DataError(
        f'{directory / labels_name} holds label {labels.max()} outside 0..9: '
        f'{how}.')
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


def mnist_transform(batch: dict[str, np.ndarray],
                    keys: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 images -> float32 normalised with MNIST mean/std (no augmentation)."""
  del keys
  return {'image': augment.normalize(batch['image'], augment.MNIST_MEAN,
                                     augment.MNIST_STD),
          'label': batch['label']}


def mnist_iterator(split: str, global_batch_size: int, *, mode: str = 'train',
                   seed: int = 0, source: str = common.DEFAULT_SOURCE,
                   data_dir: Optional[str] = None,
                   mirror: Optional[str] = None,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None,
                   num_epochs: Optional[int] = None,
                   arrays: Optional[dict[str, np.ndarray]] = None,
                   ) -> iterator.ArrayIterator:
  """MNIST batches `{'image': float32 [B,28,28,1], 'label': int32 [B]}`.

  Args:
    split: 'train' or 'test'.
    global_batch_size: examples per step over all processes.
    mode: 'train' or 'eval' (see `iterator.ArrayIterator`).
    seed: shuffling seed.
    source, data_dir, mirror: as `load_mnist`.
    process_index, process_count, num_epochs: as `iterator.ArrayIterator`.
    arrays: already loaded `load_mnist(split)` output (skips reading).
  """
  if arrays is None:
    arrays = load_mnist(split, source=source, data_dir=data_dir,
                        mirror=mirror)
  return iterator.ArrayIterator(
      arrays, global_batch_size,
      mode=mode, seed=seed, transform=mnist_transform,
      process_index=process_index, process_count=process_count,
      num_epochs=num_epochs)
