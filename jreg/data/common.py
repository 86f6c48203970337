"""What every loader shares: the bad-data error, default paths, tfds access.

Each dataset comes from one of two sources, chosen by `source`:

- `'local'`: a directory holding the dataset's standard distribution files
  exactly as distributed (the layout of `../shared/data`, see its README).
- `'tfds'`: `tfds.data_source(name, split=..., data_dir=...)` from
  tensorflow-datasets, which reads prepared ArrayRecord files without
  TensorFlow (what a user with internet gets).
"""
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from jreg.errors import UserError

SOURCES = ('local', 'tfds')

# `<repo>/../shared/data`: where the offline copies live beside the repository.
_REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = _REPO.parent / 'shared' / 'data'


class DataError(UserError, ValueError):
  """A dataset file is missing or not what its format promises.

  The message is one sentence that names the file, says what is wrong and how
  to get the data.
  """


def default_data_dir() -> Optional[str]:
  """`<repo>/../shared/data` if it exists, else None."""
  return str(SHARED_DATA_DIR) if SHARED_DATA_DIR.is_dir() else None


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f'data source {source!r} is not one of {SOURCES}.')


def dataset_dir(data_dir: Optional[str], subdirs: Sequence[str], marker: str,
                how_to_get: Callable[[pathlib.Path], str]) -> pathlib.Path:
  """The folder that holds one dataset's distribution files.

  Accepts the root of a `shared/data`-style tree (the files are then in
  `data_dir/<one of subdirs>`) or the dataset's own folder (files directly in
  `data_dir`).

  Args:
    data_dir: root data directory, or None for `default_data_dir()`.
    subdirs: the dataset's possible folders under the root, first the one of
      `shared/data` (e.g. ('mnist',)).
    marker: a file or folder name that must exist in the dataset folder; used
      to tell the layouts apart.
    how_to_get: folder -> the clause telling the user how to get the data
      into that folder.

  Returns:
    The dataset folder.

  Raises:
    DataError: no candidate folder holds `marker`.
  """
  if data_dir is None:
    data_dir = default_data_dir()
    if data_dir is None:
      raise DataError(
          f'no data directory was given and {SHARED_DATA_DIR} does not exist: '
          f'{how_to_get(SHARED_DATA_DIR / subdirs[0])}.')
  root = pathlib.Path(data_dir).expanduser()
  for candidate in [root / subdir for subdir in subdirs] + [root]:
    if (candidate / marker).exists():
      return candidate
  raise DataError(
      f'{root / subdirs[0] / marker} is missing (nor is it in {root}): '
      f'{how_to_get(root / subdirs[0])}.')


def require_file(path: pathlib.Path, how_to_get: str) -> pathlib.Path:
  """`path` if it is an existing file, else a DataError naming it."""
  if not path.is_file():
    raise DataError(f'{path} is missing: {how_to_get}.')
  return path


def tfds_data_source(name: str, split: str, data_dir: Optional[str],
                     **kwargs) -> Any:
  """`tfds.data_source(name, split=split, data_dir=data_dir)`.

  Imported lazily: the local source does not need tensorflow-datasets. Reading
  a prepared dataset needs no TensorFlow; preparing one (the first call, with
  internet) follows tfds's own rules for that dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, split=split, data_dir=data_dir, **kwargs)


def tfds_to_arrays(source: Any, fields: Mapping[str, Callable[[Any], Any]],
                   progress_name: str = '') -> dict[str, np.ndarray]:
  """Reads every record of a random-access tfds source into NumPy arrays.

  Args:
    source: a `tfds.data_source(...)` split (len() and [i]).
    fields: output name -> function of one record giving that field.
    progress_name: logged with a count every 10,000 records when non-empty.

  Returns:
    A dict of stacked arrays, one row per record.
  """
  columns = {key: [] for key in fields}
  for index in range(len(source)):
    record = source[index]
    for key, extract in fields.items():
      columns[key].append(np.asarray(extract(record)))
    if progress_name and (index + 1) % 10_000 == 0:
      logging.info('%s: read %d/%d records', progress_name, index + 1,
                   len(source))
  return {key: np.stack(values) for key, values in columns.items()}


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
