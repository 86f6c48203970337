"""Tests of the ImageNet pipeline (grain) on imagenet-mini and on tfds mock data."""
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from jreg import data
from jreg.data import augment
from jreg.data import imagenet


@pytest.fixture(scope='module')
def train_records(shared_data):
  return data.imagenet_source('train', data_dir=str(shared_data))


def _iterator(records, **kwargs):
  settings = dict(image_size=32, process_index=0, process_count=1, seed=4)
  settings.update(kwargs)
  return data.imagenet_iterator('train', 16, records=records, **settings)


def _assert_same(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.shared_data
def test_imagenet_mini_layout(shared_data, train_records):
  wnids = [line.split('\t')[0] for line in
           (shared_data / 'imagenet-mini' / 'classes.txt').read_text().splitlines()]
  assert train_records.classes == sorted(wnids) and len(wnids) == 10
  assert len(train_records) == 5000
  np.testing.assert_array_equal(np.bincount(train_records.labels), [500] * 10)
  validation = data.imagenet_source('validation',
                                    data_dir=str(shared_data / 'imagenet-mini'))
  assert len(validation) == 500
  np.testing.assert_array_equal(np.bincount(validation.labels), [50] * 10)
  record = validation[0]
  assert record['path'].endswith('.JPEG') and int(record['label']) == 0


def test_train_batches_deterministic_and_sharded(train_records):
  first = _iterator(train_records)
  batches = [next(first) for _ in range(2)]
  assert batches[0]['image'].shape == (16, 32, 32, 3)
  assert batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].dtype == np.int32
  again = _iterator(train_records)
  _assert_same(batches, [next(again) for _ in range(2)])
  other = next(_iterator(train_records, seed=5))
  assert not np.array_equal(other['label'], batches[0]['label'])
  # Process p takes rows p, p + 2, ... of the global batch.
  halves = [_iterator(train_records, process_index=p, process_count=2)
            for p in (0, 1)]
  for batch in batches:
    for p, half in enumerate(halves):
      part = next(half)
      np.testing.assert_array_equal(part['image'], batch['image'][p::2])
      np.testing.assert_array_equal(part['label'], batch['label'][p::2])


class _NumberedImages:
  """40 tiny PNG records whose label is their index."""

  def __init__(self):
    buffers = []
    for index in range(40):
      stream = io.BytesIO()
      Image.new('RGB', (8, 6), (index, 0, 0)).save(stream, format='PNG')
      buffers.append(stream.getvalue())
    self._buffers = buffers

  def __len__(self):
    return len(self._buffers)

  def __getitem__(self, index):
    return {'image': self._buffers[index], 'label': index}

  def __repr__(self):
    return 'NumberedImages(40)'


def test_each_epoch_is_a_new_permutation():
  epochs = data.imagenet_iterator('train', 8, image_size=4, seed=1,
                                  records=_NumberedImages(), process_index=0,
                                  process_count=1, num_epochs=2)
  assert len(epochs) == 5
  orders = [np.concatenate([next(epochs)['label'] for _ in range(5)])
            for _ in range(2)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(40))
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[0], np.arange(40))
  with pytest.raises(StopIteration):
    next(epochs)


def test_restore_is_exact(train_records):
  original = _iterator(train_records)
  for _ in range(3):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  expected = [next(original) for _ in range(2)]
  restored = _iterator(train_records)
  restored.set_state(state)
  _assert_same([next(restored) for _ in range(2)], expected)


def test_worker_processes_decode_the_same_batches(train_records):
  """Two decoding processes give the batches of in-process decoding; restore."""
  reference = _iterator(train_records)
  expected = [next(reference) for _ in range(4)]
  with _iterator(train_records, worker_count=2) as parallel:
    produced = [next(parallel) for _ in range(2)]
    state = parallel.get_state()
  assert state['worker_count'] == 2
  with _iterator(train_records, worker_count=2) as restored:
    restored.set_state(json.loads(json.dumps(state)))
    produced += [next(restored) for _ in range(2)]
  _assert_same(produced, expected)


def test_eval_resize_centre_crop_and_coverage(shared_data):
  source = data.imagenet_source('validation', data_dir=str(shared_data))
  size = len(source)
  batch_size = 96 if size > 192 else 6  # several batches, the last one padded
  iterator = data.imagenet_iterator(
      'validation', batch_size, image_size=56, mode='eval', process_index=0,
      process_count=1, data_dir=str(shared_data))
  batches = list(iterator)
  assert len(batches) == len(iterator) == math.ceil(size / batch_size)
  assert all(b['image'].shape == (batch_size, 56, 56, 3) for b in batches)
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, source.labels)
  assert batches[-1]['mask'].sum() == size - (len(batches) - 1) * batch_size
  # Reference: 64x64 image -> shorter side round(56 / 0.875) = 64 -> centre 56.
  picture = Image.open(source[0]['path']).convert('RGB')
  assert picture.size == (64, 64)
  expected = augment.normalize(np.asarray(picture)[4:60, 4:60],
                               augment.IMAGENET_MEAN, augment.IMAGENET_STD)
  np.testing.assert_allclose(batches[0]['image'][0], expected, atol=1e-5)


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  fractions, ratios = [], []
  for _ in range(500):
    left, top, width, height = imagenet.random_resized_crop_box(400, 300, rng)
    assert 0 <= left and left + width <= 400 and 0 <= top and top + height <= 300
    fractions.append(width * height / (400 * 300))
    ratios.append(width / height)
  assert 0.07 < min(fractions) < 0.15 and max(fractions) > 0.9
  assert 0.74 < min(ratios) < 0.8 and 1.25 < max(ratios) < 1.35
  # A very wide image falls back to the centre crop with ratio 4/3.
  box = imagenet.random_resized_crop_box(1000, 10, np.random.default_rng(0),
                                         scale=(0.9, 1.0))
  assert box == ((1000 - 13) // 2, 0, 13, 10)
  assert math.isclose(13 / 10, 4 / 3, rel_tol=0.03)


def test_imagenet_from_tfds_mock():
  with tfds.testing.mock_data(num_examples=10,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.imagenet_iterator('train', 4, image_size=24, source='tfds',
                                   manual_dir='/nonexistent/manual',
                                   process_index=0, process_count=1)
    batch = next(train)
    evaluation = data.imagenet_iterator(
        'validation', 4, image_size=24, mode='eval', source='tfds',
        process_index=0, process_count=1)
    batches = list(evaluation)
  assert batch['image'].shape == (4, 24, 24, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 10
