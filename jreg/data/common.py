"""What every loader shares: the bad-data error, the data directory, sources.

Each dataset comes from one of these sources, chosen by `source`:

- `'auto'` (the default): the standard distribution files under the data
  directory when they are there, otherwise `'download'`.
- `'local'`: a directory holding the dataset's standard distribution files
  exactly as distributed (the layout written by `'download'`:
  `mnist/*.gz`, `cifar10/cifar-10-batches-bin/*.bin`,
  `wikitext-2/wiki.*.tokens`, `imagenet/{train,val}/<wnid>/*.JPEG`).
- `'download'`: fetches the standard files from their publishers (or from
  the mirror in `$JREG_DATA_MIRROR`), checks their published SHA-256 and
  extracts them into the data directory (`jreg.data.download`); files a
  previous download verified are reused. ImageNet cannot be downloaded (its
  licence asks for a sign-in): its error says how to get it.
- `'tfds'`: reads a dataset that tensorflow-datasets has already prepared
  under `data_dir` (ArrayRecord files, read without TensorFlow). Preparing
  MNIST or CIFAR-10 with tfds needs TensorFlow, which jreg does not install;
  tfds also orders the examples differently from the standard files.

The data directory is `data_dir` when given, else `$JREG_DATA_DIR`, else the
cache directory `$XDG_CACHE_HOME/jreg` (`~/.cache/jreg` when
`$XDG_CACHE_HOME` is unset); it is never derived from where jreg is installed.
"""
import hashlib
import os
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from jreg.errors import UserError

SOURCES = ('auto', 'local', 'download', 'tfds')
DEFAULT_SOURCE = 'auto'
DATA_DIR_ENV = 'JREG_DATA_DIR'


class DataError(UserError, ValueError):
  """A dataset file is missing or not what its format promises.

  The message is one sentence that names the file, says what is wrong and how
  to get the data.
  """


def cache_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/jreg`, or `~/.cache/jreg` when that variable is unset."""
  base = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
  return pathlib.Path(base).expanduser() / 'jreg'


def default_data_dir() -> str:
  """`$JREG_DATA_DIR` when set, else `cache_dir()`."""
  return str(pathlib.Path(
      os.environ.get(DATA_DIR_ENV) or cache_dir()).expanduser())


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f'data source {source!r} is not one of {SOURCES}.')


def find_dataset_dir(data_dir: Optional[str], subdirs: Sequence[str],
                     marker: str) -> Optional[pathlib.Path]:
  """The folder under `data_dir` that holds `marker`, or None.

  Accepts the root of a data tree (the files are then in
  `data_dir/<one of subdirs>`) or the dataset's own folder (files directly in
  `data_dir`).
  """
  root = pathlib.Path(data_dir or default_data_dir()).expanduser()
  for candidate in [root / subdir for subdir in subdirs] + [root]:
    if (candidate / marker).exists():
      return candidate
  return None


def dataset_dir(data_dir: Optional[str], subdirs: Sequence[str], marker: str,
                how_to_get: Callable[[pathlib.Path], str]) -> pathlib.Path:
  """The folder that holds one dataset's distribution files (`'local'`).

  Args:
    data_dir: root data directory, or None for `default_data_dir()`.
    subdirs: the dataset's possible folders under the root, first the standard
      one (e.g. ('mnist',)).
    marker: a file or folder name that must exist in the dataset folder; used
      to tell the layouts apart.
    how_to_get: folder -> the clause telling the user how to get the data
      into that folder.

  Returns:
    The dataset folder.

  Raises:
    DataError: no candidate folder holds `marker`.
  """
  found = find_dataset_dir(data_dir, subdirs, marker)
  if found is not None:
    return found
  root = pathlib.Path(data_dir or default_data_dir()).expanduser()
  raise DataError(
      f'{root / subdirs[0] / marker} is missing (nor is it in {root}): '
      f'{how_to_get(root / subdirs[0])}.')


def resolve_dataset_dir(dataset: str, source: str, data_dir: Optional[str],
                        subdirs: Sequence[str], marker: str,
                        how_to_get: Callable[[pathlib.Path], str],
                        mirror: Optional[str] = None) -> pathlib.Path:
  """The dataset folder for the file-based sources 'auto', 'local', 'download'.

  'auto' uses the files under the data directory when `marker` is there and
  downloads otherwise; 'download' always goes through
  `jreg.data.download.download` (which reuses files it verified before).
  """
  if source == 'local':
    return dataset_dir(data_dir, subdirs, marker, how_to_get)
  if source == 'auto':
    found = find_dataset_dir(data_dir, subdirs, marker)
    if found is not None:
      return found
  from jreg.data import download  # pylint: disable=g-import-not-at-top
  return download.download(dataset, data_dir=data_dir, mirror=mirror)


def require_file(path: pathlib.Path, how_to_get: str) -> pathlib.Path:
  """`path` if it is an existing file, else a DataError naming it."""
  if not path.is_file():
    raise DataError(f'{path} is missing: {how_to_get}.')
  return path


SHA256SUMS_FILE = 'SHA256SUMS'


def _listed_sha256(path: pathlib.Path, levels: int = 3) -> Optional[str]:
  """The SHA-256 that a `SHA256SUMS` file (`sha256sum`'s format) in the
  folder of `path` or in one of its `levels` parents lists for it, or None."""
  path = path.resolve()
  for folder in list(path.parents)[:levels + 1]:
    sums = folder / SHA256SUMS_FILE
    if not sums.is_file():
      continue
    relative = path.relative_to(folder).as_posix()
    for line in sums.read_text(errors='replace').splitlines():
      digest, _, name = line.strip().partition(' ')
      if name.strip().lstrip('*') in (relative, './' + relative):
        return digest.lower()
  return None


def check_listed_sha256(path: pathlib.Path, how_to_get: str) -> None:
  """Refuses `path` if a `SHA256SUMS` beside the data lists another digest.

  Raises:
    DataError: the digests differ (a damaged or replaced file), naming it.
  """
  expected = _listed_sha256(path)
  if expected is None:
    return
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  if digest.hexdigest() != expected:
    raise DataError(
        f'{path} has SHA-256 {digest.hexdigest()}, not the {expected} that '
        f'{SHA256SUMS_FILE} lists for it (a damaged or replaced file): '
        f'{how_to_get}.')


_TFDS_HOW = ("jreg reads tensorflow-datasets directories that are already "
             "prepared (preparing MNIST or CIFAR-10 needs TensorFlow: "
             "`pip install tensorflow` then `tfds build NAME --data_dir=DIR`), "
             "or use source='auto' to download the standard files instead")


def tfds_data_source(name: str, split: str, data_dir: Optional[str],
                     **kwargs) -> Any:
  """`tfds.data_source(name, split=split, data_dir=data_dir, download=False)`.

  Reads an already prepared dataset (ArrayRecord files) without TensorFlow.
  Imported lazily: the other sources do not need tensorflow-datasets.

  Raises:
    DataError: tensorflow-datasets or its `importlib_resources` dependency is
      missing, or no prepared dataset is under `data_dir`.
  """
  try:
    # tfds 4.9.10 imports importlib_resources lazily, on first use.
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as error:
    raise DataError(
        f"source='tfds' needs the Python module {error.name!r}, which is not "
        f"installed (`pip install -e .` installs jreg's pinned set, "
        f"importlib_resources included), or use source='auto'.") from None
  kwargs = dict(kwargs)
  kwargs.setdefault('download', False)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, **kwargs)
  except ModuleNotFoundError as error:
    raise DataError(
        f'preparing tensorflow-datasets {name!r} needs the Python module '
        f'{error.name!r} (TensorFlow is not among jreg\'s requirements): '
        f'{_TFDS_HOW}.') from None
  except (AssertionError, RuntimeError, OSError, ValueError) as error:
    where = data_dir or 'the default tfds directory'
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(
        f'no prepared tensorflow-datasets {name!r} split {split!r} could be '
        f'read from {where} ({reason}): {_TFDS_HOW}.') from None


def tfds_image_classification(name: str, split: str, data_dir: Optional[str],
                              image_shape: tuple[int, ...]
                              ) -> dict[str, np.ndarray]:
  """Reads a prepared tfds image-classification split into NumPy arrays.

  Every record of `tfds.data_source(name, split=split)` (random access, no
  TensorFlow) is read; a count is logged every 10,000 records.

  Args:
    name: the tfds dataset ('mnist', 'cifar10').
    split: its split.
    data_dir: tfds's data folder (None: tfds's default).
    image_shape: the shape of one image, [H, W, C].

  Returns:
    {'image': uint8 [N, *image_shape], 'label': int32 [N]}.
  """
  source = tfds_data_source(name, split, data_dir)
  images, labels = [], []
  for index in range(len(source)):
    record = source[index]
    images.append(np.asarray(record['image']))
    labels.append(np.asarray(record['label']))
    if (index + 1) % 10_000 == 0:
      logging.info('%s/%s: read %d/%d records', name, split, index + 1,
                   len(source))
  return {'image': np.stack(images).astype(np.uint8).reshape(-1, *image_shape),
          'label': np.stack(labels).astype(np.int32)}


def resolve_process(process_index: Optional[int],
                    process_count: Optional[int]) -> tuple[int, int]:
  """Fills in `jax.process_index()` / `jax.process_count()` and checks them."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  return int(process_index), int(process_count)


def resolve_batch_sharding(mode: str, global_batch_size: int,
                           process_index: Optional[int],
                           process_count: Optional[int]) -> tuple[int, int]:
  """Checks an iterator's mode and global batch; returns this process's slice.

  Returns:
    `(process_index, process_count)`, defaulting to JAX's.

  Raises:
    ValueError: an unknown mode, or a global batch that is not a positive
      multiple of the number of processes.
  """
  if mode not in ('train', 'eval'):
    raise ValueError(f"mode {mode!r} is not one of ('train', 'eval').")
  process_index, process_count = resolve_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple '
        f'of process_count={process_count}.')
  return process_index, process_count


class EpochStepPosition:
  """`get_state`/`set_state` of an iterator whose position is (epoch, step).

  Subclasses keep `self._epoch`, `self._step` and the attributes named in
  `_IDENTITY` (as `self._<name>`); a saved state is only accepted by an
  iterator over the same data and configuration.
  """
  _IDENTITY: tuple[str, ...] = ()

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict."""
    return dict({'epoch': self._epoch, 'step': self._step},
                **{key: getattr(self, '_' + key) for key in self._IDENTITY})

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position saved by `get_state` of a like iterator."""
    for key in self._IDENTITY:
      if state[key] != getattr(self, '_' + key):
        raise ValueError(
            f'iterator state has {key}={state[key]!r} but this iterator has '
            f'{getattr(self, "_" + key)!r}; it was saved by a different '
            'dataset or configuration.')
    self._epoch = int(state['epoch'])
    self._step = int(state['step'])



def first_examples(arrays: Mapping[str, np.ndarray], size: int) -> dict:
  """The first `size` examples of each array (all of them when `size` is 0);
  experiments use it for reduced-scale runs on a prefix of a split."""
  return dict(arrays) if not size else {k: v[:size] for k, v in arrays.items()}
