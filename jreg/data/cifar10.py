"""CIFAR-10 from its binary distribution (local or downloaded), or tfds `cifar10`.

Binary version (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):
`cifar-10-batches-bin/data_batch_{1..5}.bin` (train) and `test_batch.bin`,
each a sequence of 3073-byte records: 1 label byte (0..9), then 3072 pixel
bytes, the 1024 red values, 1024 green, 1024 blue, each plane a row-major
32x32 image.

Each standard file holds 10,000 records; a file with another count (a short
copy whose size is still a whole number of records) is refused, as is a file
whose SHA-256 differs from the one a `SHA256SUMS` file beside the data lists
for it (`jreg.data.common.check_listed_sha256`). A folder whose files all
hold at most `SMALL_COPY_RECORDS` records is a deliberately small copy in
the standard format (the tests write one) and is read as it is.
"""
import pathlib
from typing import Optional

import numpy as np

from jreg.data import augment
from jreg.data import common
from jreg.data import iterator

SPLITS = ('train', 'test')
_FILES = {
    'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
    'test': ('test_batch.bin',),
}
_RECORD_BYTES = 1 + 3 * 32 * 32
_FOLDER = 'cifar-10-batches-bin'
STANDARD_RECORDS = 10_000  # in every file of the distribution
# A folder whose files all hold at most this many records is a small copy.
SMALL_COPY_RECORDS = 1_000


def _how_to_get(directory: pathlib.Path) -> str:
  return ("use source='auto' or 'download' (or `python -m jreg.data.download "
          "cifar10`) to download and verify them, or download and extract "
          'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz so that '
          f'{directory} holds the .bin files')


def check_record_counts(directory: pathlib.Path, how_to_get: str) -> None:
  """Every standard file in `directory` holds 10,000 records, unless all of
  them hold at most `SMALL_COPY_RECORDS` (a deliberately small copy).

  Raises:
    DataError: a file (named) holds another number of records, e.g. one
      record short of a whole file.
  """
  counts = {}
  for name in _FILES['train'] + _FILES['test']:
    path = directory / name
    if path.is_file() and path.stat().st_size % _RECORD_BYTES == 0:
      counts[path] = path.stat().st_size // _RECORD_BYTES
  if all(count <= SMALL_COPY_RECORDS for count in counts.values()):
    return
  for path, count in counts.items():
    if count != STANDARD_RECORDS:
      raise common.DataError(
          f'{path} holds {count:,} records instead of the {STANDARD_RECORDS:,} '
          f'of every CIFAR-10 file (a truncated or incomplete copy): '
          f'{how_to_get}.')


def read_cifar10_bin(path: pathlib.Path,
                     how_to_get: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 binary batch file.

  Args:
    path: a `*.bin` file.
    how_to_get: the clause telling the user how to get the data.

  Returns:
    images uint8 [N, 32, 32, 3] and labels int32 [N].

  Raises:
    DataError: missing file, size not a multiple of 3073 bytes, label > 9,
      a SHA-256 other than the one a `SHA256SUMS` beside the data lists.
  """
  common.require_file(path, how_to_get)
  common.check_listed_sha256(path, how_to_get)
  content = np.fromfile(path, np.uint8)
  if content.size == 0 or content.size % _RECORD_BYTES:
    raise common.DataError(
        f'{path} holds {content.size} bytes, not a positive multiple of the '
        f'{_RECORD_BYTES}-byte record (truncated or corrupt file): '
        f'{how_to_get}.')
  records = content.reshape(-1, _RECORD_BYTES)
  labels = records[:, 0].astype(np.int32)
  if labels.max() > 9:
    raise common.DataError(
        f'{path} holds label {labels.max()} outside 0..9 (not the CIFAR-10 '
        f'binary version): {how_to_get}.')
  # [N, 3072] -> [N, C=3, H=32, W=32] planes -> [N, H, W, C].
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_cifar10(split: str = 'train', *, source: str = common.DEFAULT_SOURCE,
                 data_dir: Optional[str] = None,
                 mirror: Optional[str] = None) -> dict[str, np.ndarray]:
  """CIFAR-10 as arrays.

  Args:
    split: 'train' (50,000) or 'test' (10,000).
    source: 'auto', 'local', 'download' (binary files under
      `data_dir/cifar10/cifar-10-batches-bin`, `data_dir/cifar-10-batches-bin`
      or `data_dir`; see `jreg.data.common`) or 'tfds' (an already prepared
      `cifar10` under tfds's `data_dir`).
    data_dir: see `source`; None means `common.default_data_dir()` (or
      tfds's default for 'tfds').
    mirror: download mirror base URL (default `$JREG_DATA_MIRROR`).

  Returns:
    {'image': uint8 [N, 32, 32, 3], 'label': int32 [N]}.
  """
  common.check_source(source)
  if split not in SPLITS:
    raise ValueError(f'CIFAR-10 split {split!r} is not one of {SPLITS}.')
  if source == 'tfds':
    return common.tfds_image_classification('cifar10', split, data_dir,
                                            (32, 32, 3))
  directory = common.resolve_dataset_dir(
      'cifar10', source, data_dir, (f'cifar10/{_FOLDER}', _FOLDER),
      _FILES[split][0], _how_to_get, mirror)
  check_record_counts(directory, _how_to_get(directory))
  parts = [read_cifar10_bin(directory / name, _how_to_get(directory))
           for name in _FILES[split]]
  return {'image': np.concatenate([images for images, _ in parts]),
          'label': np.concatenate([labels for _, labels in parts])}


def cifar10_transform(augmentation: bool) -> iterator.Transform:
  """Optional pad-4 crop + flip, then per-channel normalisation to float32."""

  def transform(batch: dict[str, np.ndarray],
                keys: np.ndarray) -> dict[str, np.ndarray]:
    images = batch['image']                                # [B, 32, 32, 3]
    if augmentation:
      images = augment.pad_crop_flip(images, keys, padding=4)
    return {'image': augment.normalize(images, augment.CIFAR10_MEAN,
                                       augment.CIFAR10_STD),
            'label': batch['label']}

  return transform


def cifar10_iterator(split: str, global_batch_size: int, *,
                     mode: str = 'train', seed: int = 0,
                     augmentation: Optional[bool] = None,
                     source: str = common.DEFAULT_SOURCE,
                     data_dir: Optional[str] = None,
                     mirror: Optional[str] = None,
                     process_index: Optional[int] = None,
                     process_count: Optional[int] = None,
                     num_epochs: Optional[int] = None,
                     arrays: Optional[dict[str, np.ndarray]] = None,
                     ) -> iterator.ArrayIterator:
  """CIFAR-10 batches `{'image': float32 [B,32,32,3], 'label': int32 [B]}`.

  Args:
    split: 'train' or 'test'.
    global_batch_size: examples per step over all processes.
    mode: 'train' or 'eval' (see `iterator.ArrayIterator`).
    seed: shuffling and augmentation seed.
    augmentation: pad-4 random crop + flip; default True in train mode and
      False in eval mode.
    source, data_dir, mirror: as `load_cifar10`.
    process_index, process_count, num_epochs: as `iterator.ArrayIterator`.
    arrays: already loaded `load_cifar10(split)` output (skips reading).
  """
  if augmentation is None:
    augmentation = mode == 'train'
  if arrays is None:
    arrays = load_cifar10(split, source=source, data_dir=data_dir,
                          mirror=mirror)
  return iterator.ArrayIterator(
      arrays, global_batch_size, mode=mode, seed=seed,
      transform=cifar10_transform(augmentation), process_index=process_index,
      process_count=process_count, num_epochs=num_epochs)
