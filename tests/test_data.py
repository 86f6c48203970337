"""Tests of the in-memory pipelines: MNIST, CIFAR-10, the 1-D task, the iterator."""
import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jreg import data
from jreg.data import augment
from jreg.data import cifar10
from jreg.data import mnist
from jreg.data import synthetic


@pytest.fixture(scope='module')
def cifar_train(shared_data):
  return data.load_cifar10('train', data_dir=str(shared_data))


def _indexed(num_examples):
  """Arrays whose 'index' field tells which example a row is."""
  return {'index': np.arange(num_examples),
          'value': np.arange(num_examples, dtype=np.float32)[:, None] * 2}


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])


# -- MNIST ---------------------------------------------------------------------


@pytest.mark.shared_data
def test_mnist_shared_data(shared_data):
  train = data.load_mnist('train', data_dir=str(shared_data))
  test = data.load_mnist('test', data_dir=str(shared_data / 'mnist'))
  assert train['image'].shape == (60000, 28, 28, 1)
  assert test['image'].shape == (10000, 28, 28, 1)
  assert train['image'].dtype == np.uint8 and train['label'].dtype == np.int32
  # The canonical files start with these labels.
  np.testing.assert_array_equal(train['label'][:5], [5, 0, 4, 1, 9])
  np.testing.assert_array_equal(test['label'][:5], [7, 2, 1, 0, 4])
  assert set(np.unique(train['label'])) == set(range(10))
  iterator = data.mnist_iterator('train', 32, arrays=train, process_index=0,
                                 process_count=1)
  batch = next(iterator)
  assert batch['image'].shape == (32, 28, 28, 1)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  whole = mnist.mnist_transform(train, None)['image']
  assert abs(whole.mean()) < 0.01 and abs(whole.std() - 1) < 0.01


def _write_idx(path, magic, array):
  header = np.array([magic, *array.shape], '>i4').tobytes()
  with gzip.open(path, 'wb') as stream:
    stream.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_layout(tmp_path):
  """A hand-written IDX pair reads back pixel for pixel (row-major)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28))
  labels = np.array([3, 9, 0])
  _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', 2051, images)
  _write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', 2049, labels)
  loaded = data.load_mnist('test', data_dir=str(tmp_path))
  np.testing.assert_array_equal(loaded['image'][..., 0], images)
  np.testing.assert_array_equal(loaded['label'], labels)


# -- CIFAR-10 -----------------------------------------------------------------


@pytest.mark.shared_data
def test_cifar10_shared_data(shared_data, cifar_train):
  test = data.load_cifar10('test', data_dir=str(shared_data))
  assert cifar_train['image'].shape == (50000, 32, 32, 3)
  assert test['image'].shape == (10000, 32, 32, 3)
  assert cifar_train['image'].dtype == np.uint8
  assert cifar_train['label'].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(cifar_train['label']), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(test['label']), [1000] * 10)
  # R, G, B plane order: the per-channel means match the published statistics.
  means = cifar_train['image'].reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(means, augment.CIFAR10_MEAN, atol=0.01)


def test_cifar10_record_layout(tmp_path):
  """Hand-written records: pixel (h, w, c) is byte 1 + c*1024 + h*32 + w."""
  rng = np.random.default_rng(1)
  records = rng.integers(0, 256, (4, 3073)).astype(np.uint8)
  records[:, 0] = [7, 0, 9, 2]
  records.tofile(tmp_path / 'test_batch.bin')
  loaded = data.load_cifar10('test', data_dir=str(tmp_path))
  np.testing.assert_array_equal(loaded['label'], [7, 0, 9, 2])
  for n, h, w, c in [(0, 0, 0, 0), (1, 0, 5, 1), (2, 31, 2, 2), (3, 17, 31, 0)]:
    assert loaded['image'][n, h, w, c] == records[n, 1 + c * 1024 + h * 32 + w]


def test_normalize_formula():
  pixels = np.array([[[0, 128, 255]]], np.uint8)                   # [1, 1, 3]
  expected = (pixels / 255 - np.array(augment.CIFAR10_MEAN)) / np.array(
      augment.CIFAR10_STD)
  result = augment.normalize(pixels, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
  assert result.dtype == np.float32
  np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_pad_crop_flip_matches_reference():
  """Each output is a crop of the zero-padded image, mirrored when flipped."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
  keys = rng.integers(0, 2**63 - 1, 64, dtype=np.int64)
  out = augment.pad_crop_flip(images, keys, padding=4)
  assert out.shape == images.shape and out.dtype == np.uint8
  seen = set()
  for image, key, result in zip(images, keys, out):
    top, left, flip = int(key % 9), int(key // 9 % 9), int(key // 81 % 2)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crop = padded[top:top + 32, left:left + 32]
    np.testing.assert_array_equal(result, crop[:, ::-1] if flip else crop)
    seen.add((top, left, flip))
  assert len(seen) > 40  # offsets and flips actually vary
  # Centre offset, no flip: the identity.
  centre_key = np.array([4 + 9 * 4], np.int64)
  np.testing.assert_array_equal(
      augment.pad_crop_flip(images[:1], centre_key), images[:1])


@pytest.mark.shared_data
def test_cifar10_iterator_eval_normalised(cifar_train):
  subset = {key: value[:5000] for key, value in cifar_train.items()}
  iterator = data.cifar10_iterator('train', 2048, mode='eval', arrays=subset,
                                   process_index=0, process_count=1)
  batches = list(iterator)
  assert [batch['mask'].sum() for batch in batches] == [2048, 2048, 904]
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  assert images.shape == (5000, 32, 32, 3) and images.dtype == np.float32
  np.testing.assert_allclose(images.mean((0, 1, 2)), 0, atol=0.02)
  # The offline copy was recovered from JPEG, which smooths the pixels: its
  # spread is about 8% below that of the original CIFAR-10 (README).
  np.testing.assert_allclose(images.std((0, 1, 2)), 1, atol=0.1)


def test_cifar10_augmented_batches_shard_and_restore(cifar_train):
  """Augmented batches: process slices make up the global batch; restore."""
  kwargs = dict(arrays=cifar_train, seed=3)
  whole = data.cifar10_iterator('train', 8, process_index=0, process_count=1,
                                **kwargs)
  halves = [data.cifar10_iterator('train', 8, process_index=p,
                                  process_count=2, **kwargs) for p in (0, 1)]
  for _ in range(3):
    batch = next(whole)
    parts = [next(half) for half in halves]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([part[key] for part in parts]))
  # Augmentation changes images: the same examples with no augmentation differ.
  plain = data.cifar10_iterator('train', 8, process_index=0, process_count=1,
                                augmentation=False, **kwargs)
  _take(plain, 3)
  plain_batch, augmented_batch = next(plain), next(whole)
  np.testing.assert_array_equal(plain_batch['label'], augmented_batch['label'])
  assert not np.allclose(plain_batch['image'], augmented_batch['image'])
  state = json.loads(json.dumps(whole.get_state()))
  expected = _take(whole, 2)
  restored = data.cifar10_iterator('train', 8, process_index=0,
                                   process_count=1, **kwargs)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 2), expected)


# -- the generic iterator -------------------------------------------------------


def test_iterator_deterministic_and_reshuffled():
  arrays = _indexed(40)
  first = data.ArrayIterator(arrays, 8, seed=5, process_index=0,
                             process_count=1)
  second = data.ArrayIterator(arrays, 8, seed=5, process_index=0,
                              process_count=1)
  other_seed = data.ArrayIterator(arrays, 8, seed=6, process_index=0,
                                  process_count=1)
  batches = _take(first, 10)  # two epochs of five batches
  _assert_batches_equal(batches, _take(second, 10))
  epochs = [np.concatenate([b['index'] for b in batches[:5]]),
            np.concatenate([b['index'] for b in batches[5:]])]
  for order in epochs:  # every example exactly once per epoch
    np.testing.assert_array_equal(np.sort(order), np.arange(40))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  assert not np.array_equal(epochs[0], np.arange(40))  # shuffled
  other = np.concatenate([next(other_seed)['index'] for _ in range(5)])
  assert not np.array_equal(other, epochs[0])
  np.testing.assert_array_equal(batches[0]['value'][:, 0],
                                2 * batches[0]['index'])


def test_iterator_drops_remainder_and_stops_after_num_epochs():
  iterator = data.ArrayIterator(_indexed(10), 4, seed=0, num_epochs=2,
                                process_index=0, process_count=1)
  assert iterator.steps_per_epoch == 2
  batches = list(iterator)
  assert len(batches) == 4
  assert all(b['index'].shape == (4,) for b in batches)


@pytest.mark.parametrize('process_count', [2, 4])
def test_iterator_process_slices_partition_global_batch(process_count):
  arrays = _indexed(50)
  whole = data.ArrayIterator(arrays, 8, seed=1, process_index=0,
                             process_count=1)
  shards = [data.ArrayIterator(arrays, 8, seed=1, process_index=p,
                               process_count=process_count)
            for p in range(process_count)]
  for _ in range(9):  # crosses an epoch boundary (6 steps per epoch)
    batch = next(whole)['index']
    parts = [next(shard)['index'] for shard in shards]
    assert all(part.shape == (8 // process_count,) for part in parts)
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == 8  # disjoint
    np.testing.assert_array_equal(joined, batch)


def test_iterator_defaults_to_jax_process():
  iterator = data.ArrayIterator(_indexed(16), 8)
  assert iterator.batch_size == 8  # one process in tests
  with pytest.raises(ValueError, match='multiple of process_count'):
    data.ArrayIterator(_indexed(16), 6, process_index=0, process_count=4)


@pytest.mark.parametrize('steps_before', [0, 3, 5, 11])
def test_iterator_restores_exactly(steps_before):
  arrays = _indexed(30)
  original = data.ArrayIterator(arrays, 6, seed=9, process_index=1,
                                process_count=2)
  _take(original, steps_before)
  state = json.loads(json.dumps(original.get_state()))
  expected = _take(original, 7)  # crosses at least one epoch boundary
  restored = data.ArrayIterator(arrays, 6, seed=9, process_index=1,
                                process_count=2)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 7), expected)


def test_iterator_rejects_foreign_state():
  iterator = data.ArrayIterator(_indexed(30), 6, seed=9, process_index=0,
                                process_count=1)
  state = iterator.get_state()
  other = data.ArrayIterator(_indexed(30), 6, seed=8, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)


@pytest.mark.parametrize('process_count', [1, 2])
def test_iterator_eval_covers_each_example_once(process_count):
  arrays = _indexed(23)
  seen = []
  for p in range(process_count):
    iterator = data.ArrayIterator(arrays, 10, mode='eval', process_index=p,
                                  process_count=process_count)
    assert len(iterator) == 3
    batches = list(iterator)
    assert len(batches) == 3
    for batch in batches:
      assert batch['index'].shape == (10 // process_count,)
      assert batch['mask'].dtype == bool
      seen.extend(batch['index'][batch['mask']].tolist())
    # Only the last batch is padded.
    assert batches[0]['mask'].all() and batches[1]['mask'].all()
  assert sorted(seen) == list(range(23))


# -- the synthetic 1-D task -----------------------------------------------------


def test_synthetic_1d():
  train = data.load_synthetic_1d('train', seed=0)
  validation = data.load_synthetic_1d('validation', seed=0)
  assert train['x'].shape == (4096, 1) and train['y'].shape == (4096, 1)
  assert validation['x'].shape == (1000, 1)
  assert train['x'].dtype == np.float32 and train['y'].dtype == np.float32
  np.testing.assert_array_equal(train['y'], data.load_synthetic_1d('train')['y'])
  assert not np.array_equal(train['x'],
                            data.load_synthetic_1d('train', seed=1)['x'])
  assert train['x'].min() >= -2 and train['x'].max() <= 2
  x = np.concatenate([train['x'], validation['x']])[:, 0].astype(np.float64)
  y = np.concatenate([train['y'], validation['y']])[:, 0].astype(np.float64)
  residual = y - (1.5 * x**3 + x**2 - 5 * x + 2 * np.sin(x) - 3)
  # Noise variance 0.05: the estimate from 5096 draws has std 0.05*sqrt(2/n).
  assert abs(residual.mean()) < 4 * np.sqrt(0.05 / len(x))
  assert abs(residual.var() - 0.05) < 4 * 0.05 * np.sqrt(2 / len(x))
  noiseless = data.load_synthetic_1d('train', noise_variance=0.0)
  np.testing.assert_allclose(noiseless['y'],
                             synthetic.target_function(noiseless['x']),
                             rtol=1e-5, atol=1e-5)
  batch = next(data.synthetic_1d_iterator('train', 64, process_index=0,
                                          process_count=1))
  assert batch['x'].shape == (64, 1) and batch['y'].dtype == np.float32


# -- tensorflow-datasets source (mocked, no network) ----------------------------


def test_mnist_and_cifar10_from_tfds_mock(tmp_path):
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    mnist_arrays = data.load_mnist('train', source='tfds',
                                   data_dir=str(tmp_path))
    cifar_arrays = data.load_cifar10('test', source='tfds',
                                     data_dir=str(tmp_path))
    reference = tfds.data_source('cifar10', split='test')
    np.testing.assert_array_equal(cifar_arrays['image'][5],
                                  reference[5]['image'])
    iterator = data.cifar10_iterator('test', 4, source='tfds',
                                     process_index=0, process_count=1)
    batch = next(iterator)
  assert mnist_arrays['image'].shape == (12, 28, 28, 1)
  assert mnist_arrays['image'].dtype == np.uint8
  assert mnist_arrays['label'].dtype == np.int32
  assert cifar_arrays['image'].shape == (12, 32, 32, 3)
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['image'].dtype == np.float32


def test_unknown_source_rejected():
  with pytest.raises(ValueError, match='data source'):
    data.load_mnist('train', source='internet')
  with pytest.raises(ValueError, match='split'):
    cifar10.load_cifar10('validation')
