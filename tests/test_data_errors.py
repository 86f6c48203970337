"""Bad data gets one `DataError` sentence naming the file, the fault, the fix."""
import gzip
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
