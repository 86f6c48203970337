"""Bad data gets one `DataError` sentence naming the file, the fault, the fix."""
import gzip
import hashlib
import shutil

import numpy as np
import pytest

from jreg import data


def _check_message(error, *fragments):
  message = str(error.value)
  assert '\n' not in message and message.endswith('.')
  assert 'download' in message or 'replace' in message  # how to get the data
  for fragment in fragments:
    assert fragment in message, message


def _copy_mnist(shared_data, folder):
  folder.mkdir()
  for path in (shared_data / 'mnist').glob('t10k-*.gz'):
    shutil.copy(path, folder / path.name)
  return folder


def test_data_error_is_a_value_error():
  assert issubclass(data.DataError, ValueError)


def test_mnist_missing_file(shared_data, tmp_path):
  folder = _copy_mnist(shared_data, tmp_path / 'mnist')
  (folder / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(data.DataError) as error:
    data.load_mnist('test', data_dir=str(tmp_path))
  _check_message(error, str(folder / 't10k-labels-idx1-ubyte.gz'), 'missing',
                 "source='auto'")
  with pytest.raises(data.DataError) as error:
    data.load_mnist('train', source='local',
                    data_dir=str(tmp_path / 'nowhere'))
  _check_message(error, 'train-images-idx3-ubyte.gz', 'missing')
  # 'auto' downloads what is missing; offline (here: the closed loopback
  # mirror that tests/conftest.py sets) that is one sentence too.
  with pytest.raises(data.DataError) as error:
    data.load_mnist('train', data_dir=str(tmp_path / 'nowhere'))
  _check_message(error, 'could not download', 'offline',
                 'train-images-idx3-ubyte.gz', 'JREG_DATA_MIRROR')
  assert not list((tmp_path / 'nowhere').rglob('*-ubyte.gz*'))


def test_mnist_wrong_magic_number(shared_data, tmp_path):
  folder = _copy_mnist(shared_data, tmp_path / 'mnist')
  path = folder / 't10k-images-idx3-ubyte.gz'
  with gzip.open(path, 'rb') as stream:
    content = bytearray(stream.read())
  content[2:4] = (2049).to_bytes(2, 'big')[0:2]  # 0x0801: a labels file
  with gzip.open(path, 'wb', compresslevel=1) as stream:
    stream.write(bytes(content))
  with pytest.raises(data.DataError) as error:
    data.load_mnist('test', data_dir=str(folder))
  _check_message(error, str(path), 'magic number 2049', '2051')


def test_mnist_truncated_and_not_gzip(shared_data, tmp_path):
  folder = _copy_mnist(shared_data, tmp_path / 'mnist')
  path = folder / 't10k-labels-idx1-ubyte.gz'
  with gzip.open(path, 'rb') as stream:
    content = stream.read()
  with gzip.open(path, 'wb', compresslevel=1) as stream:
    stream.write(content[:-10])
  with pytest.raises(data.DataError) as error:
    data.load_mnist('test', data_dir=str(folder))
  _check_message(error, str(path), 'truncated')
  path.write_bytes(content)  # uncompressed: not a gzip file
  with pytest.raises(data.DataError) as error:
    data.load_mnist('test', data_dir=str(folder))
  _check_message(error, str(path), 'gzip')


def test_cifar10_truncated_record_file(shared_data, tmp_path):
  folder = tmp_path / 'cifar-10-batches-bin'
  folder.mkdir()
  original = shared_data / 'cifar10' / 'cifar-10-batches-bin' / 'test_batch.bin'
  records = np.fromfile(original, np.uint8, count=3073 * 5)
  records[:3073 * 4 + 100].tofile(folder / 'test_batch.bin')
  with pytest.raises(data.DataError) as error:
    data.load_cifar10('test', data_dir=str(tmp_path))
  _check_message(error, str(folder / 'test_batch.bin'), '12392 bytes',
                 'multiple of the 3073-byte record', 'cifar-10-binary.tar.gz')
  records.tofile(folder / 'test_batch.bin')  # five whole records read fine
  assert data.load_cifar10('test', data_dir=str(folder))['label'].shape == (5,)
  with pytest.raises(data.DataError) as error:
    data.load_cifar10('train', source='local', data_dir=str(folder))
  _check_message(error, 'data_batch_1.bin', 'missing')


def _first_jpegs(shared_data, count):
  """The first class folder of imagenet-mini's train split, and `count` files."""
  folder = sorted((shared_data / 'imagenet-mini' / 'train').iterdir())[0]
  return folder.name, sorted(folder.glob('*.JPEG'))[:count]


def test_imagenet_empty_class_folder(shared_data, tmp_path):
  wnid, paths = _first_jpegs(shared_data, 2)
  for name in (wnid, 'n07749582'):
    (tmp_path / 'train' / name).mkdir(parents=True)
  for path in paths:
    shutil.copy(path, tmp_path / 'train' / wnid / path.name)
  with pytest.raises(data.DataError) as error:
    data.imagenet_source('train', data_dir=str(tmp_path))
  _check_message(error, str(tmp_path / 'train' / 'n07749582'),
                 'empty class folder', 'image-net.org')
  with pytest.raises(data.DataError) as error:
    data.imagenet_source('validation', data_dir=str(tmp_path))
  _check_message(error, 'val', 'missing')


def test_imagenet_corrupt_jpeg(shared_data, tmp_path):
  wnid, (path,) = _first_jpegs(shared_data, 1)
  folder = tmp_path / 'train' / wnid
  folder.mkdir(parents=True)
  content = path.read_bytes()
  (folder / 'a.JPEG').write_bytes(content[:40])
  iterator = data.imagenet_iterator('train', 1, image_size=8,
                                    data_dir=str(tmp_path), process_index=0,
                                    process_count=1)
  with pytest.raises(data.DataError) as error:
    next(iterator)
  _check_message(error, str(folder / 'a.JPEG'), 'not a readable image')


def test_wikitext_token_file_with_no_lines(tmp_path):
  folder = tmp_path / 'wikitext-103'
  folder.mkdir()
  for split in ('train', 'valid', 'test'):
    (folder / f'wiki.{split}.tokens').write_text(' a b\n', encoding='utf-8')
  (folder / 'wiki.train.tokens').write_text('', encoding='utf-8')
  with pytest.raises(data.DataError) as error:
    data.load_wikitext('wikitext-103', data_dir=str(tmp_path))
  _check_message(error, str(folder / 'wiki.train.tokens'), 'no lines',
                 'wikitext-103-v1.zip')
  (folder / 'wiki.train.tokens').write_text('a\n', encoding='utf-8')
  (folder / 'wiki.test.tokens').unlink()
  with pytest.raises(data.DataError) as error:
    data.load_wikitext('wikitext-103', data_dir=str(tmp_path))
  _check_message(error, str(folder / 'wiki.test.tokens'), 'missing')


def test_wikitext_binary_token_file(tmp_path):
  for split in ('train', 'valid', 'test'):
    (tmp_path / f'wiki.{split}.tokens').write_text('a b\n', encoding='utf-8')
  (tmp_path / 'wiki.valid.tokens').write_bytes(b'a b\n\xff\xfe c\n')
  with pytest.raises(data.DataError) as error:
    data.load_wikitext('wikitext-2', data_dir=str(tmp_path))
  _check_message(error, str(tmp_path / 'wiki.valid.tokens'), 'not UTF-8')


def _cifar10_copy(folder, records_per_file, test_records, seed=0):
  """A CIFAR-10 folder in the standard format (records of random bytes)."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for name, count in [(f'data_batch_{i}.bin', records_per_file)
                      for i in range(1, 6)] + [('test_batch.bin', test_records)]:
    records = rng.integers(0, 256, (count, 3073)).astype(np.uint8)
    records[:, 0] %= 10
    records.tofile(folder / name)
  return folder


def test_cifar10_file_with_the_wrong_record_count(tmp_path):
  """A file one record short (its size still a whole number of records), or
  a test file of half the records, is refused in one sentence naming it; a
  folder of complete files, or a deliberately small copy whose files all
  hold at most SMALL_COPY_RECORDS records, is read."""
  folder = _cifar10_copy(tmp_path / 'cifar-10-batches-bin', 10_000, 10_000)
  assert data.load_cifar10('test', data_dir=str(tmp_path))['label'].shape == (10_000,)
  short = folder / 'data_batch_3.bin'
  short.write_bytes(short.read_bytes()[:-3073])
  with pytest.raises(data.DataError) as error:
    data.load_cifar10('train', data_dir=str(tmp_path))
  _check_message(error, str(short), '9,999 records instead of the 10,000',
                 'cifar-10-binary.tar.gz')
  shutil.rmtree(folder)
  folder = _cifar10_copy(folder, 10_000, 5_000)
  with pytest.raises(data.DataError) as error:
    data.load_cifar10('test', data_dir=str(tmp_path))
  _check_message(error, str(folder / 'test_batch.bin'), '5,000 records')
  small = _cifar10_copy(tmp_path / 'small' / 'cifar-10-batches-bin', 64, 160)
  assert data.load_cifar10('train', data_dir=str(small.parent))['label'].shape == (320,)


def test_cifar10_file_unlike_its_listed_sha256(tmp_path):
  """A SHA256SUMS beside the data (as in the shared data folder) lists the
  files' digests: a file with one byte changed is refused, naming it."""
  folder = _cifar10_copy(tmp_path / 'cifar10' / 'cifar-10-batches-bin', 8, 8)
  lines = [f'{hashlib.sha256(path.read_bytes()).hexdigest()}  '
           f'{path.relative_to(tmp_path).as_posix()}'
           for path in sorted(folder.iterdir())]
  (tmp_path / 'SHA256SUMS').write_text('\n'.join(lines) + '\n')
  assert data.load_cifar10('test', data_dir=str(tmp_path))['label'].shape == (8,)
  path = folder / 'test_batch.bin'
  content = bytearray(path.read_bytes())
  content[100] ^= 1
  path.write_bytes(bytes(content))
  with pytest.raises(data.DataError) as error:
    data.load_cifar10('test', data_dir=str(tmp_path))
  _check_message(error, str(path), 'SHA256SUMS lists', 'cifar-10-binary.tar.gz')
