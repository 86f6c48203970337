"""ImageNet (ILSVRC-2012) classification with parallel JPEG decoding (grain).

Sources:
- 'auto', 'local', 'download': an extracted ImageNet folder,
  `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`; class index = position of
  the wnid in the sorted list of `train/` sub-folders (the usual
  `ImageFolder` convention). ImageNet's licence forbids automatic download:
  when the folder is missing the error lists the manual steps.
- 'tfds': an already prepared `tfds.data_source('imagenet2012')`; with
  `manual_dir` (the archives downloaded by hand) tfds prepares it first,
  which needs TensorFlow.

Pipeline (grain 0.2.18): a random-access source -> `grain.python.IndexSampler`
(one global shuffle per epoch, `seed`) -> `grain.python.DataLoader` with
`worker_count` decoding processes and `ShardOptions(process_index,
process_count)` -> per-process batches. The DataLoader hands process p the
sampler positions `i * P + p`, so batch k of process p holds rows p, p+P,
p+2P, ... of global batch k (positions [k*G, (k+1)*G) of the sampler); the
process slices are disjoint and together make the global batch.

Augmentation (the standard ResNet/Inception recipe; Szegedy et al. 2015,
torchvision `RandomResizedCrop`): train = random crop of area fraction
U[0.08, 1] and aspect ratio log-uniform in [3/4, 4/3] (10 tries, then a
centre crop), resized to `image_size`, horizontal flip with p = 1/2; eval =
resize the shorter side to `image_size / 0.875` and take the centre
`image_size` square. Both then normalise with the ImageNet mean/std. The
random choices come from grain's per-record generator
`Philox(key=seed + global sampler position)`, so batches do not depend on the
number of workers or processes and are reproduced exactly after a restore.
"""
import io
import json
import math
import pathlib
from typing import Any, Mapping, Optional

from absl import flags
import grain.python as grain
import numpy as np
from PIL import Image

from jreg.data import augment
from jreg.data import common

SPLITS = ('train', 'validation')
_FOLDERS = {'train': 'train', 'validation': 'val'}
_TFDS_SPLITS = {'train': 'train', 'validation': 'validation'}
_EXTENSIONS = ('.jpeg', '.jpg', '.png')
EVAL_CROP_FRACTION = 0.875


def _how_to_get(directory: pathlib.Path) -> str:
  from jreg.data import download  # pylint: disable=g-import-not-at-top
  return download.imagenet_how_to_get(directory)


class ImageFolderSource(grain.RandomAccessDataSource):
  """`split/<wnid>/*.JPEG` files as records `{'image': bytes, 'label': int}`."""

  def __init__(self, root: str, split: str):
    """Lists the files (sorted) of one split.

    Args:
      root: the folder holding `train/` and `val/`.
      split: 'train' or 'validation' (folder `val/`).

    Raises:
      DataError: missing split folder, no class folders, or a class folder
        without images.
    """
    root_path = pathlib.Path(root)
    how = _how_to_get(root_path)
    folder = root_path / _FOLDERS[split]
    if not folder.is_dir():
      raise common.DataError(f'{folder} is missing: {how}.')
    class_root = root_path / 'train' if (root_path / 'train').is_dir() else folder
    self.classes = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if not self.classes:
      raise common.DataError(f'{class_root} holds no class folders: {how}.')
    class_index = {wnid: index for index, wnid in enumerate(self.classes)}
    names, labels = [], []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
      if class_folder.name not in class_index:
        raise common.DataError(
            f'{class_folder} is a class missing from {class_root}: {how}.')
      files = sorted(p.name for p in class_folder.iterdir()
                     if p.suffix.lower() in _EXTENSIONS)
      if not files:
        raise common.DataError(f'{class_folder} holds no images (empty class '
                               f'folder): {how}.')
      names.extend(f'{class_folder.name}/{name}' for name in files)
      labels.extend([class_index[class_folder.name]] * len(files))
    if not names:
      raise common.DataError(f'{folder} holds no class folders: {how}.')
    self._root = str(root_path)
    self._folder = str(folder)
    self._split = split
    # One byte-string array, not a list of str: it is sent (pickled by
    # multiprocessing) to every decoding process, 1.28M names for ImageNet.
    self._names = np.array([name.encode() for name in names])
    self._labels = np.asarray(labels, np.int32)

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def __len__(self) -> int:
    return len(self._names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = f'{self._folder}/{self._names[index].decode()}'
    try:
      with open(path, 'rb') as stream:
        content = stream.read()
    except OSError as error:
      raise common.DataError(f'{path} cannot be read ({error}): '
                             f'{_how_to_get(pathlib.Path(self._root))}.'
                             ) from error
    return {'image': content, 'label': self._labels[index], 'path': path}

  def __repr__(self) -> str:  # grain validates restored states with repr()
    return (f'ImageFolderSource(root={self._root!r}, split={self._split!r}, '
            f'num_records={len(self._names)})')


class _EvalPaddedSource(grain.RandomAccessDataSource):
  """Pads a source to `length` records with copies of record 0, plus a mask."""

  def __init__(self, source, length: int):
    self._source = source
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    valid = index < len(self._source)
    record = dict(self._source[index if valid else 0])
    record['mask'] = np.bool_(valid)
    return record

  def __repr__(self) -> str:
    return f'EvalPadded({self._source!r}, length={self._length})'


def _decode(image: Any, what: str,
            draft_size: Optional[int] = None) -> Image.Image:
  """Encoded bytes (local) or a decoded uint8 array (tfds) -> RGB PIL image.

  `draft_size`: let the JPEG decoder shrink by a power of two while keeping
  both sides >= draft_size (eval only: it changes no output geometry).
  """
  if isinstance(image, (bytes, bytearray)):
    try:
      picture = Image.open(io.BytesIO(image))
      if draft_size is not None and picture.format == 'JPEG':
        picture.draft('RGB', (draft_size, draft_size))
      picture.load()
    except OSError as error:
      raise common.DataError(
          f'{what} is not a readable image ({error}): replace the file with '
          'the one from the original archive.') from error
    return picture.convert('RGB')
  return Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """(left, top, crop_width, crop_height) of an Inception-style random crop.

  Area fraction ~ U[scale], aspect ratio w/h ~ log-U[ratio]; 10 tries, then
  the centre crop with the aspect ratio clamped to `ratio` (torchvision's
  `RandomResizedCrop.get_params`).
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect)))
    crop_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return left, top, crop_width, crop_height
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_width, crop_height = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_width, crop_height = int(round(height * max(ratio))), height
  else:
    crop_width, crop_height = width, height
  return ((width - crop_width) // 2, (height - crop_height) // 2, crop_width,
          crop_height)


class TrainTransform(grain.RandomMapTransform):
  """Decode, random resized crop, flip -> uint8 [S, S, 3] (module docstring)."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def random_map(self, element, rng: np.random.Generator):
    picture = _decode(element['image'], element.get('path', 'an image'))
    left, top, crop_width, crop_height = random_resized_crop_box(
        picture.width, picture.height, rng)
    picture = picture.resize(
        (self.image_size, self.image_size), Image.BILINEAR,
        box=(left, top, left + crop_width, top + crop_height))
    if rng.random() < 0.5:
      picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    return {'image': np.asarray(picture, np.uint8),       # [S, S, 3]
            'label': np.int32(element['label'])}


class EvalTransform(grain.MapTransform):
  """Decode, resize shorter side to S/0.875, centre crop -> uint8 [S, S, 3]."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element):
    resize = int(round(self.image_size / EVAL_CROP_FRACTION))
    picture = _decode(element['image'], element.get('path', 'an image'),
                      draft_size=resize)
    scale = resize / min(picture.width, picture.height)
    width = max(self.image_size, int(round(picture.width * scale)))
    height = max(self.image_size, int(round(picture.height * scale)))
    picture = picture.resize((width, height), Image.BILINEAR)
    left = (width - self.image_size) // 2
    top = (height - self.image_size) // 2
    picture = picture.crop((left, top, left + self.image_size,
                            top + self.image_size))
    output = {'image': np.asarray(picture, np.uint8),     # [S, S, 3]
              'label': np.int32(element['label'])}
    if 'mask' in element:
      output['mask'] = element['mask']
    return output


class _TfdsImageSource(grain.RandomAccessDataSource):
  """A tfds imagenet2012 split as records `{'image': uint8 array, 'label'}`."""

  def __init__(self, records):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[index]
    return {'image': record['image'], 'label': record['label']}

  def __repr__(self) -> str:
    return f'TfdsImageSource({self._records!r}, num_records={len(self)})'


def imagenet_source(split: str, *, source: str = common.DEFAULT_SOURCE,
                    data_dir: Optional[str] = None,
                    manual_dir: Optional[str] = None,
                    tfds_name: str = 'imagenet2012'):
  """The random-access records of one split (before decoding).

  Args:
    split: 'train' or 'validation'.
    source: 'auto', 'local' or 'download' (folders under `data_dir/imagenet/`,
      `data_dir/imagenet-mini/` or `data_dir/`; never downloaded) or 'tfds'.
    data_dir: local root, or tfds's data dir; None:
      `common.default_data_dir()` or tfds's default.
    manual_dir: tfds only: where the ILSVRC2012 archives were downloaded;
      given, tfds prepares the dataset (which needs TensorFlow).
    tfds_name: tfds only: the builder name.
  """
  common.check_source(source)
  if split not in SPLITS:
    raise ValueError(f'ImageNet split {split!r} is not one of {SPLITS}.')
  if source == 'tfds':
    kwargs = {}
    if manual_dir is not None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      kwargs['download'] = True
      kwargs['download_and_prepare_kwargs'] = {
          'download_config': tfds.download.DownloadConfig(
              manual_dir=manual_dir)}
    return _TfdsImageSource(common.tfds_data_source(
        tfds_name, _TFDS_SPLITS[split], data_dir, **kwargs))
  root = common.dataset_dir(data_dir, ('imagenet', 'imagenet-mini'),
                            _FOLDERS[split], _how_to_get)
  return ImageFolderSource(str(root), split)


class ImageNetIterator:
  """A grain DataLoader iterator with a JSON-serialisable dict position.

  Yields `{'image': float32 [B, S, S, 3], 'label': int32 [B]}` (+ `'mask'`
  bool [B] in eval mode). Call `close()` (or use it as a context manager) to
  stop the worker processes.
  """

  def __init__(self, records, global_batch_size: int, *, image_size: int,
               mode: str, seed: int, worker_count: int,
               process_index: int, process_count: int,
               num_epochs: Optional[int]):
    batch_size = global_batch_size // process_count
    if mode == 'train':
      if global_batch_size > len(records):
        raise ValueError(f'global_batch_size={global_batch_size} exceeds the '
                         f'{len(records)} images of the split.')
      sampler = grain.IndexSampler(
          num_records=len(records), shard_options=grain.NoSharding(),
          shuffle=True, num_epochs=num_epochs, seed=seed)
      transform = TrainTransform(image_size)
      self._steps_per_epoch = len(records) // global_batch_size
    else:
      num_batches = -(-len(records) // global_batch_size)
      records = _EvalPaddedSource(records, num_batches * global_batch_size)
      sampler = grain.IndexSampler(
          num_records=len(records), shard_options=grain.NoSharding(),
          shuffle=False, num_epochs=1, seed=seed)
      transform = EvalTransform(image_size)
      self._steps_per_epoch = num_batches
    if worker_count > 0 and not flags.FLAGS.is_parsed():
      # grain's worker processes read its absl flags; outside an absl app
      # (tests, notebooks) they take their default values.
      flags.FLAGS.mark_as_parsed()
    # Records (not batches) leave the workers, in sampler order whatever the
    # number of workers; this process stacks B of them into a batch. So a
    # batch does not depend on `worker_count`.
    self._loader = grain.DataLoader(
        data_source=records, sampler=sampler, operations=[transform],
        worker_count=worker_count, worker_buffer_size=max(batch_size, 2),
        shard_options=grain.ShardOptions(shard_index=process_index,
                                         shard_count=process_count,
                                         drop_remainder=True))
    self._iterator = iter(self._loader)
    self.batch_size = batch_size
    self.global_batch_size = global_batch_size
    self.num_examples = len(records) if mode == 'train' else None

  @property
  def steps_per_epoch(self) -> int:
    """Train: floor(N / G) (batches run across epoch ends); eval: ceil(N / G)."""
    return self._steps_per_epoch

  def __len__(self) -> int:
    return self._steps_per_epoch

  def __iter__(self) -> 'ImageNetIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    # With `num_epochs`, a last partial batch is dropped (StopIteration); in
    # eval mode the padded length is a multiple of G, so none is partial.
    records = [next(self._iterator) for _ in range(self.batch_size)]
    batch = {key: np.stack([record[key] for record in records])
             for key in records[0]}
    batch['image'] = augment.normalize(batch['image'], augment.IMAGENET_MEAN,
                                       augment.IMAGENET_STD)  # [B, S, S, 3]
    return batch

  def get_state(self) -> dict[str, Any]:
    return json.loads(self._iterator.get_state().decode())

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(json.dumps(dict(state)).encode())

  def close(self) -> None:
    close = getattr(self._iterator._iterator, 'close', None)  # pylint: disable=protected-access
    if close is not None:
      close()

  def __enter__(self) -> 'ImageNetIterator':
    return self

  def __exit__(self, *unused_exc) -> None:
    self.close()


def imagenet_iterator(split: str, global_batch_size: int, *,
                      image_size: int = 224, mode: str = 'train',
                      seed: int = 0, worker_count: int = 0,
                      source: str = common.DEFAULT_SOURCE,
                      data_dir: Optional[str] = None,
                      manual_dir: Optional[str] = None,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None,
                      num_epochs: Optional[int] = None,
                      records=None) -> ImageNetIterator:
  """ImageNet batches decoded by `worker_count` processes (see module doc).

  Args:
    split: 'train' or 'validation'.
    global_batch_size: images per step over all processes.
    image_size: side S of the square output images.
    mode: 'train' (shuffled each epoch, augmented, endless unless
      `num_epochs`) or 'eval' (one ordered pass, resize + centre crop, last
      batch padded, `'mask'`).
    seed: shuffling/augmentation seed (a non-negative 32-bit integer).
    worker_count: decoding processes (0: decode in this process).
    source, data_dir, manual_dir: see `imagenet_source`.
    process_index, process_count: this process's slice (default: jax's).
    num_epochs: train mode: stop after this many epochs.
    records: an `imagenet_source(...)` result to reuse (skips listing files).
  """
  if image_size < 1:
    raise ValueError(f'image_size={image_size} must be positive.')
  process_index, process_count = common.resolve_batch_sharding(
      mode, global_batch_size, process_index, process_count)
  if records is None:
    records = imagenet_source(split, source=source, data_dir=data_dir,
                              manual_dir=manual_dir)
  return ImageNetIterator(
      records, global_batch_size, image_size=image_size, mode=mode, seed=seed,
      worker_count=worker_count, process_index=process_index,
      process_count=process_count, num_epochs=num_epochs)
