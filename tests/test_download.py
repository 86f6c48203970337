"""Downloads of the standard files, against an HTTP server on 127.0.0.1.

The server serves a folder of files in the published layout (the tiny
standard-format datasets of tests/conftest.py, packed as the publishers pack
them) and honours `Range` requests; it can cut a response short, ignore
`Range`, or serve truncated or corrupted bytes. The published digests in
`jreg.data.download.DATASETS` are replaced by those of the served files.
"""
import dataclasses
import hashlib
import http.server
import io
import logging as pylogging
import pathlib
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from jreg import data
from jreg.data import common
from jreg.data import download


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET of `/NAME` from `server.files`, with `Range: bytes=N-` support."""

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    name = self.path.rstrip('/').rsplit('/', 1)[-1]
    requested_range = self.headers.get('Range')
    server.requests.append((name, requested_range))
    if name not in server.files:
      self.send_error(404, 'Not Found')
      return
    content = server.files[name]
    start = 0
    if requested_range and not server.ignore_range:
      start = int(requested_range.split('=')[1].split('-')[0])
      if start >= len(content):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(content)}')
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      self.send_response(206)
      self.send_header('Content-Range',
                       f'bytes {start}-{len(content) - 1}/{len(content)}')
    else:
      self.send_response(200)
    body = content[start:]
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Accept-Ranges', 'bytes')
    self.end_headers()
    if server.cuts.get(name, 0) > 0:          # send a third, then hang up
      server.cuts[name] -= 1
      self.wfile.write(body[:max(1, len(body) // 3)])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)

  def log_message(self, *args):  # quiet
    del args


@pytest.fixture
def server():
  """A loopback HTTP server; set `.files[name] = bytes` to serve a file."""
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.files, httpd.requests, httpd.cuts = {}, [], {}
  httpd.ignore_range = False
  httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}/mirror'
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _sha256(content: bytes) -> str:
  return hashlib.sha256(content).hexdigest()


def _serve(server, monkeypatch, name, files, extracted=None):
  """Serves `files` (name -> bytes) as dataset `name` with their digests."""
  spec = download.DATASETS[name]
  remotes = tuple(
      download.RemoteFile(remote.name, remote.url,
                          _sha256(files[remote.name]))
      for remote in spec.files)
  extracted_sha256 = tuple(
      (file_name, _sha256(content))
      for file_name, content in (extracted or {}).items())
  monkeypatch.setitem(download.DATASETS, name, dataclasses.replace(
      spec, files=remotes, extracted_sha256=extracted_sha256))
  server.files.update(files)


def _mnist_files(standard_data):
  return {path.name: path.read_bytes()
          for path in sorted((standard_data / 'mnist').glob('*.gz'))}


def _cifar10_archive(standard_data) -> bytes:
  """`cifar-10-binary.tar.gz` as published: one folder `cifar-10-batches-bin/`."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as bundle:
    bundle.add(standard_data / 'cifar10' / 'cifar-10-batches-bin',
               arcname='cifar-10-batches-bin')
  return buffer.getvalue()


def _wikitext2_archive(standard_data):
  """`wikitext-2-v1.zip` as published, and its files' contents."""
  contents = {path.name: path.read_bytes() for path in
              sorted((standard_data / 'wikitext-2').glob('wiki.*.tokens'))}
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as bundle:
    for file_name, content in contents.items():
      bundle.writestr(f'wikitext-2/{file_name}', content)
  return buffer.getvalue(), contents


def _no_partial_files(root: pathlib.Path) -> bool:
  return not [path for path in root.rglob('*')
              if path.name.endswith('.part') or path.name.startswith('.extract')]


def _assert_arrays_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


# -- the three archives/layouts, end to end ----------------------------------------


def test_mnist_download_matches_the_local_files(server, monkeypatch, tmp_path,
                                                standard_data):
  _serve(server, monkeypatch, 'mnist', _mnist_files(standard_data))
  monkeypatch.setenv(download.MIRROR_ENV, server.url)   # the mirror by env
  cache = tmp_path / 'cache'
  for split in ('train', 'test'):
    _assert_arrays_equal(
        data.load_mnist(split, data_dir=str(cache)),       # 'auto': downloads
        data.load_mnist(split, source='local', data_dir=str(standard_data)))
  assert sorted(name for name, _ in server.requests) == sorted(
      _mnist_files(standard_data))
  for path in (standard_data / 'mnist').glob('*.gz'):
    assert (cache / 'mnist' / path.name).read_bytes() == path.read_bytes()
  assert download.is_downloaded('mnist', str(cache))
  assert _no_partial_files(cache)
  # Verified files are reused: 'download' and 'auto' make no new request.
  requests = len(server.requests)
  data.load_mnist('test', source='download', data_dir=str(cache))
  data.load_mnist('test', data_dir=str(cache))
  assert len(server.requests) == requests


def test_cifar10_archive_is_extracted_into_the_standard_layout(
    server, monkeypatch, tmp_path, standard_data):
  _serve(server, monkeypatch, 'cifar10',
         {'cifar-10-binary.tar.gz': _cifar10_archive(standard_data)})
  cache = tmp_path / 'cache'
  train = data.load_cifar10('train', source='download', data_dir=str(cache),
                            mirror=server.url)             # the mirror by argument
  _assert_arrays_equal(train, data.load_cifar10(
      'train', source='local', data_dir=str(standard_data)))
  folder = cache / 'cifar10' / 'cifar-10-batches-bin'
  assert sorted(path.name for path in folder.iterdir()) == sorted(
      [path.name for path in
       (standard_data / 'cifar10' / 'cifar-10-batches-bin').iterdir()] +
      ['.jreg-download.json'])
  assert not (cache / 'downloads').exists()               # archive removed
  assert _no_partial_files(cache)


def test_wikitext2_archive_and_extracted_digests(server, monkeypatch, tmp_path,
                                                 standard_data):
  archive, contents = _wikitext2_archive(standard_data)
  _serve(server, monkeypatch, 'wikitext-2', {'wikitext-2-v1.zip': archive},
         extracted=contents)
  corpus = data.load_wikitext('wikitext-2', data_dir=str(tmp_path / 'cache'),
                              mirror=server.url)
  reference = data.load_wikitext('wikitext-2', source='local',
                                 data_dir=str(standard_data))
  assert corpus.vocabulary.symbols == reference.vocabulary.symbols
  for split in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(corpus.splits[split], reference.splits[split])
  # An archive whose extracted files are not the known ones is refused.
  other = tmp_path / 'other'
  _serve(server, monkeypatch, 'wikitext-2', {'wikitext-2-v1.zip': archive},
         extracted={**contents, 'wiki.test.tokens': b'another release\n'})
  with pytest.raises(data.DataError, match='wiki.test.tokens has SHA-256'):
    download.download('wikitext-2', str(other), mirror=server.url,
                      progress=False)
  assert not download.is_downloaded('wikitext-2', str(other))


# -- refused, resumed and restarted downloads ----------------------------------


def _fetch(server, tmp_path, content, **kwargs):
  remote = download.RemoteFile('t10k-labels-idx1-ubyte.gz', 'unused',
                               _sha256(content))
  return download.fetch(remote, tmp_path / 'mnist' / remote.name,
                        mirror=server.url, progress=False, **kwargs)


@pytest.mark.parametrize('damage', ['corrupted', 'truncated'])
def test_bad_bytes_are_refused_and_nothing_is_left(server, tmp_path,
                                                   standard_data, damage):
  content = (standard_data / 'mnist' / 't10k-labels-idx1-ubyte.gz').read_bytes()
  served = bytearray(content)
  if damage == 'corrupted':
    served[len(served) // 2] ^= 0xFF
  else:
    del served[len(served) // 2:]
  server.files['t10k-labels-idx1-ubyte.gz'] = bytes(served)
  with pytest.raises(data.DataError) as error:
    _fetch(server, tmp_path, content)
  message = str(error.value)
  assert '\n' not in message and message.endswith('.')
  assert 'SHA-256' in message and 'deleted' in message
  assert not (tmp_path / 'mnist').exists()  # nor the folder made for it


def test_cut_download_resumes_with_a_range_request(server, tmp_path,
                                                   standard_data):
  content = (standard_data / 'mnist' / 't10k-images-idx3-ubyte.gz').read_bytes()
  server.files['t10k-labels-idx1-ubyte.gz'] = content
  server.cuts['t10k-labels-idx1-ubyte.gz'] = 2      # two cuts, then whole
  path = _fetch(server, tmp_path, content)
  assert path.read_bytes() == content
  ranges = [requested for _, requested in server.requests]
  first_cut = len(content) // 3
  second_cut = first_cut + (len(content) - first_cut) // 3
  assert ranges == [None, f'bytes={first_cut}-', f'bytes={second_cut}-']
  assert _no_partial_files(tmp_path)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path,
                                                standard_data):
  content = (standard_data / 'mnist' / 't10k-images-idx3-ubyte.gz').read_bytes()
  server.files['t10k-labels-idx1-ubyte.gz'] = content
  server.cuts['t10k-labels-idx1-ubyte.gz'] = 1
  server.ignore_range = True                          # answers 200, whole file
  assert _fetch(server, tmp_path, content).read_bytes() == content
  assert len(server.requests) == 2 and server.requests[1][1] is not None


def test_repeatedly_cut_download_resumes_on_the_next_call(server, tmp_path,
                                                          standard_data):
  content = (standard_data / 'mnist' / 't10k-images-idx3-ubyte.gz').read_bytes()
  server.files['t10k-labels-idx1-ubyte.gz'] = content
  server.cuts['t10k-labels-idx1-ubyte.gz'] = 2
  with pytest.raises(data.DataError, match='cut off 2 times'):
    _fetch(server, tmp_path, content, attempts=2)
  folder = tmp_path / 'mnist'
  (part,) = folder.iterdir()                 # only the temporary name exists
  assert part.name == 't10k-labels-idx1-ubyte.gz.part'
  received = part.stat().st_size
  assert 0 < received < len(content)
  assert _fetch(server, tmp_path, content).read_bytes() == content
  assert server.requests[-1][1] == f'bytes={received}-'  # resumed, not restarted
  requests = len(server.requests)
  _fetch(server, tmp_path, content)        # verified file in place: no request
  assert len(server.requests) == requests
  assert [path.name for path in folder.iterdir()] == [
      't10k-labels-idx1-ubyte.gz']


def test_http_error_and_offline_are_one_sentence(server, tmp_path):
  remote = download.RemoteFile('missing.gz', 'unused', '0' * 64)
  with pytest.raises(data.DataError) as error:
    download.fetch(remote, tmp_path / 'missing.gz', mirror=server.url,
                   progress=False)
  assert 'HTTP 404' in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(data.DataError) as error:
    download.fetch(remote, tmp_path / 'missing.gz',
                   mirror='http://127.0.0.1:9', progress=False)
  assert 'could not download http://127.0.0.1:9/missing.gz' in str(error.value)
  assert 'offline' in str(error.value)
  assert not list(tmp_path.iterdir())


def test_refused_download_leaves_no_empty_folders(server, tmp_path):
  remote = download.RemoteFile('missing.gz', 'unused', '0' * 64)
  for mirror in (server.url, 'http://127.0.0.1:9'):
    with pytest.raises(data.DataError):
      download.fetch(remote, tmp_path / 'data' / 'mnist' / 'missing.gz',
                     mirror=mirror, progress=False)
    assert not list(tmp_path.iterdir())
  with pytest.raises(data.DataError):
    data.load_mnist('test', source='download', data_dir=str(tmp_path / 'data'),
                    mirror=server.url)
  assert not list(tmp_path.iterdir())


def test_stale_partial_download_is_not_blamed_on_the_server(
    server, tmp_path, standard_data, caplog):
  """Bytes kept from an earlier try that do not belong to the file (another
  version of it) are dropped and the file is fetched from its first byte."""
  content = (standard_data / 'mnist' / 't10k-images-idx3-ubyte.gz').read_bytes()
  server.files['t10k-labels-idx1-ubyte.gz'] = content
  folder = tmp_path / 'mnist'
  folder.mkdir()
  stale = bytearray(content[:len(content) // 3])
  stale[10] ^= 0xFF
  (folder / 't10k-labels-idx1-ubyte.gz.part').write_bytes(bytes(stale))
  with caplog.at_level(pylogging.WARNING):
    assert _fetch(server, tmp_path, content).read_bytes() == content
  assert [requested for _, requested in server.requests] == [
      f'bytes={len(stale)}-', None]
  assert any('earlier download' in r.getMessage() for r in caplog.records)
  assert [path.name for path in folder.iterdir()] == ['t10k-labels-idx1-ubyte.gz']


def test_imagenet_is_a_manual_download(tmp_path):
  with pytest.raises(data.DataError) as error:
    download.download('imagenet', str(tmp_path))
  message = str(error.value)
  for fragment in ('licence', 'image-net.org', 'ILSVRC2012_img_train.tar',
                   'ILSVRC2012_img_val.tar', str(tmp_path / 'imagenet'),
                   'valprep.sh', 'JREG_DATA_DIR'):
    assert fragment in message, message
  with pytest.raises(data.DataError, match='image-net.org'):
    data.imagenet_source('train', data_dir=str(tmp_path))


def test_command_line(server, monkeypatch, tmp_path, standard_data, capsys):
  _serve(server, monkeypatch, 'mnist', _mnist_files(standard_data))
  assert download.main(['--data_dir', str(tmp_path), '--mirror', server.url,
                        'mnist']) == 0
  assert capsys.readouterr().out.strip() == f'mnist: {tmp_path / "mnist"}'
  assert download.main(['--data_dir', str(tmp_path / 'x'), 'cifar10']) == 1
  error = capsys.readouterr().err.strip()
  assert error.startswith('error: could not download') and '\n' not in error


# -- the data directory and the other sources ----------------------------------


def test_default_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('JREG_DATA_DIR', str(tmp_path / 'data'))
  assert data.default_data_dir() == str(tmp_path / 'data')
  monkeypatch.delenv('JREG_DATA_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert data.default_data_dir() == str(tmp_path / 'xdg' / 'jreg')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert data.default_data_dir() == str(tmp_path / 'home' / '.cache' / 'jreg')
  assert data.SOURCES == ('auto', 'local', 'download', 'tfds')


def test_auto_uses_local_files_from_the_default_data_dir(monkeypatch,
                                                         standard_data):
  monkeypatch.setenv('JREG_DATA_DIR', str(standard_data))
  monkeypatch.setenv(download.MIRROR_ENV, 'http://127.0.0.1:9')
  loaded = data.load_mnist('test')                     # no request is made
  assert loaded['image'].shape[1:] == (28, 28, 1)


def test_tfds_source_reads_only_prepared_directories(monkeypatch, tmp_path):
  with pytest.raises(data.DataError) as error:
    data.load_mnist('train', source='tfds', data_dir=str(tmp_path))
  message = str(error.value)
  assert 'no prepared tensorflow-datasets' in message and '\n' not in message
  assert 'needs TensorFlow' in message and "source='auto'" in message
  monkeypatch.setitem(sys.modules, 'importlib_resources', None)
  with pytest.raises(data.DataError, match="'importlib_resources'"):
    common.tfds_data_source('mnist', 'train', str(tmp_path))


@pytest.mark.shared_data
def test_embedded_wikitext2_digests_match_the_offline_files(shared_data):
  """The extracted-file digests are those of the byte-exact offline copies."""
  sums = dict(reversed(line.split()) for line in
              (shared_data / 'SHA256SUMS').read_text().splitlines())
  for file_name, digest in download.DATASETS['wikitext-2'].extracted_sha256:
    assert sums[f'wikitext-2/{file_name}'] == digest
    assert hashlib.sha256((shared_data / 'wikitext-2' / file_name).read_bytes()
                          ).hexdigest() == digest
