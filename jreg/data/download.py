"""Downloading the datasets' standard distribution files.

`download(name)` fetches the files each dataset is published as (the same
files the local loaders read), checks each against its published SHA-256,
extracts archives, and lays them out under the data directory as the
`'local'` source expects:

| name           | files fetched                     | laid out as                            |
| -------------- | --------------------------------- | -------------------------------------- |
| `mnist`        | the four IDX `.gz` files          | `DATA_DIR/mnist/*-ubyte.gz`            |
| `cifar10`      | `cifar-10-binary.tar.gz`          | `DATA_DIR/cifar10/cifar-10-batches-bin/` |
| `wikitext-2`   | `wikitext-2-v1.zip`               | `DATA_DIR/wikitext-2/wiki.*.tokens`    |
| `wikitext-103` | `wikitext-103-v1.zip`             | `DATA_DIR/wikitext-103/wiki.*.tokens`  |

ImageNet is not downloadable (its licence asks for a sign-in): `download`
raises a `DataError` listing the manual steps.

Every file is written to `NAME.part` and renamed to `NAME` only after its
digest matches, so a finished name always holds verified bytes. A download
cut off mid-way is resumed with an HTTP `Range` request (up to `attempts`
tries per call, and again on the next call, from the `.part` file); a server
that ignores `Range` makes it restart from the first byte. A file whose
digest does not match (corrupt or truncated on the server) is deleted and
refused. Archives are extracted into a temporary folder beside the target and
moved into place file by file; the archive is deleted afterwards. A
`.jreg-download.json` file in the dataset folder records what was verified,
so a later `download` of the same dataset returns at once.

The base URL of every file can be replaced by a mirror holding the same file
names in one folder (`mirror=`, or the environment variable
`JREG_DATA_MIRROR`): `MIRROR/train-images-idx3-ubyte.gz`,
`MIRROR/cifar-10-binary.tar.gz`, `MIRROR/wikitext-2-v1.zip`, ...

Digests: MNIST and CIFAR-10 from tensorflow-datasets 4.9.10's URL checksum
lists; the WikiText archives from their Julia DataDeps registrations; the
extracted WikiText-2 token files are also checked against their known digests.
"""
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import socket
import tarfile
import tempfile
from typing import Optional, Sequence
import urllib.error
import urllib.request
import zipfile

from absl import logging
import tqdm

from jreg.data import common

MIRROR_ENV = 'JREG_DATA_MIRROR'
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60
_RECORD = '.jreg-download.json'


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One published file: its name, where it is published, its SHA-256."""
  name: str
  url: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A downloadable dataset.

  Attributes:
    folder: the dataset folder, relative to the data directory.
    files: the published files.
    archive_folder: for an archive, the folder inside it that holds the
      files (moved to `folder`); None for files used as downloaded.
    extracted_sha256: known digests of extracted files, checked after
      extraction.
  """
  folder: str
  files: tuple[RemoteFile, ...]
  archive_folder: Optional[str] = None
  extracted_sha256: tuple[tuple[str, str], ...] = ()


_MNIST_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
_WIKITEXT_URL = 'https://wikitext.smerity.com/'

DATASETS = {
    'mnist': Dataset('mnist', (
        RemoteFile('train-images-idx3-ubyte.gz',
                   _MNIST_URL + 'train-images-idx3-ubyte.gz',
                   '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609'),
        RemoteFile('train-labels-idx1-ubyte.gz',
                   _MNIST_URL + 'train-labels-idx1-ubyte.gz',
                   '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c'),
        RemoteFile('t10k-images-idx3-ubyte.gz',
                   _MNIST_URL + 't10k-images-idx3-ubyte.gz',
                   '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6'),
        RemoteFile('t10k-labels-idx1-ubyte.gz',
                   _MNIST_URL + 't10k-labels-idx1-ubyte.gz',
                   'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6'),
    )),
    'cifar10': Dataset(
        'cifar10/cifar-10-batches-bin',
        (RemoteFile('cifar-10-binary.tar.gz',
                    'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
                    'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd'),),
        archive_folder='cifar-10-batches-bin'),
    'wikitext-2': Dataset(
        'wikitext-2',
        (RemoteFile('wikitext-2-v1.zip', _WIKITEXT_URL + 'wikitext-2-v1.zip',
                    '92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c'),),
        archive_folder='wikitext-2',
        extracted_sha256=(
            ('wiki.train.tokens',
             '9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f'),
            ('wiki.valid.tokens',
             'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8'),
            ('wiki.test.tokens',
             'd790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0'),
        )),
    'wikitext-103': Dataset(
        'wikitext-103',
        (RemoteFile('wikitext-103-v1.zip', _WIKITEXT_URL + 'wikitext-103-v1.zip',
                    '242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590'),),
        archive_folder='wikitext-103'),
}


def imagenet_how_to_get(directory: pathlib.Path) -> str:
  """The manual steps for ImageNet (ILSVRC2012), as one clause."""
  return (
      'ImageNet cannot be downloaded automatically because its licence asks '
      'for a sign-in, so (1) sign in at https://image-net.org/download-images'
      '.php and download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, '
      f'(2) extract the training tar into {directory}/train/ and each class '
      f'tar inside it into {directory}/train/<wnid>/, (3) extract the '
      f'validation tar into {directory}/val/ and move each image into '
      f'{directory}/val/<wnid>/ after its label (for example with the '
      'valprep.sh script of the PyTorch ImageNet example), and (4) pass that '
      'data directory (or set JREG_DATA_DIR)')


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as stream:
    for block in iter(lambda: stream.read(_CHUNK_BYTES), b''):
      digest.update(block)
  return digest.hexdigest()


def file_url(remote: RemoteFile, mirror: Optional[str]) -> str:
  """The URL to fetch `remote` from: `MIRROR/NAME`, or its publisher's URL."""
  mirror = mirror or os.environ.get(MIRROR_ENV)
  if mirror:
    return mirror.rstrip('/') + '/' + remote.name
  return remote.url


class _CutShort(Exception):
  """The connection ended before the promised bytes arrived."""


def _receive(url: str, part: pathlib.Path, progress: bool) -> None:
  """Appends the bytes of `url` missing from `part` (one HTTP request).

  Raises:
    _CutShort: the response ended early (the caller retries).
    urllib.error.URLError / OSError: the server could not be reached.
  """
  offset = part.stat().st_size if part.exists() else 0
  request = urllib.request.Request(url, headers={'User-Agent': 'jreg'})
  if offset:
    request.add_header('Range', f'bytes={offset}-')
  try:
    response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
  except urllib.error.HTTPError as error:
    if error.code == 416 and offset:  # nothing left to send, or a stale part
      part.unlink()
      raise _CutShort('range not satisfiable; restarting') from None
    raise
  with response:
    if offset and response.status != 206:  # Range ignored: start again
      offset = 0
    length = response.headers.get('Content-Length')
    total = offset + int(length) if length is not None else None
    received = offset
    with open(part, 'ab' if offset else 'wb') as stream, tqdm.tqdm(
        total=total, initial=offset, unit='B', unit_scale=True,
        unit_divisor=1024, desc=part.name[:-len('.part')],
        disable=not progress, leave=False) as bar:
      try:
        while block := response.read(_CHUNK_BYTES):
          stream.write(block)
          received += len(block)
          bar.update(len(block))
      except (http.client.IncompleteRead, ConnectionError, socket.timeout,
              TimeoutError) as error:
        raise _CutShort(str(error) or type(error).__name__) from None
  if total is not None and received < total:
    raise _CutShort(f'{received} of {total} bytes')


def fetch(remote: RemoteFile, destination: pathlib.Path, *,
          mirror: Optional[str] = None, attempts: int = 3,
          progress: bool = True) -> pathlib.Path:
  """Downloads one file to `destination`, verified by its SHA-256.

  Args:
    remote: what to fetch.
    destination: the final path; `destination.part` holds the bytes while
      they arrive.
    mirror: base URL replacing the publisher's (default `$JREG_DATA_MIRROR`).
    attempts: HTTP requests to make before giving up on a cut connection;
      each one resumes from the bytes already received.
    progress: show a tqdm progress bar.

  Returns:
    `destination` (at once when it already holds the published bytes).
    Bytes kept in `destination.part` by an earlier call are resumed from; if
    they and the rest do not make the published digest, they are deleted
    and the file is downloaded once more from its first byte.

  Raises:
    DataError: the server cannot be reached, answers with an error, keeps
      cutting the connection, or sends bytes with another digest (then
      nothing is left behind). A refused download removes the folders it
      made while they are still empty.
  """
  if destination.is_file() and _sha256(destination) == remote.sha256:
    return destination       # put there by hand, or fetched before
  # The folders made for the download, removed again if it is refused
  # while they are still empty.
  made = [folder for folder in (destination.parent, *destination.parent.parents)
          if not folder.exists()]
  destination.parent.mkdir(parents=True, exist_ok=True)
  try:
    return _fetch(remote, destination, mirror=mirror, attempts=attempts,
                  progress=progress)
  except common.DataError:
    for folder in made:  # deepest first
      try:
        folder.rmdir()
      except OSError:
        break            # not empty (a partial download kept), or not ours
    raise


def _fetch(remote: RemoteFile, destination: pathlib.Path, *,
           mirror: Optional[str], attempts: int, progress: bool) -> pathlib.Path:
  """`fetch` once `destination`'s folder exists."""
  url = file_url(remote, mirror)
  part = destination.with_name(destination.name + '.part')
  # Bytes left by an earlier, interrupted call: the download resumes after them.
  kept = part.stat().st_size if part.is_file() else 0
  where = (f'put {remote.name} (SHA-256 {remote.sha256}) into '
           f'{destination.parent} yourself, or set {MIRROR_ENV} to a mirror '
           'that holds it')
  for attempt in range(1, attempts + 1):
    try:
      _receive(url, part, progress)
      break
    except _CutShort as error:
      logging.warning('download of %s cut short (%s); attempt %d of %d',
                      url, error, attempt, attempts)
    except urllib.error.HTTPError as error:
      raise common.DataError(
          f'{url} answered HTTP {error.code} ({error.reason}): {where}.'
      ) from None
    except (urllib.error.URLError, OSError) as error:
      reason = getattr(error, 'reason', None) or error
      raise common.DataError(
          f'could not download {url} ({reason}; is this machine offline?): '
          f'{where}.') from None
  else:
    raise common.DataError(
        f'the download of {url} was cut off {attempts} times ({part} keeps '
        f'the bytes received, and the next try resumes from them): {where}.')
  found = _sha256(part)
  if found != remote.sha256 and kept:
    # The stale bytes of an earlier try (e.g. of another version of the file)
    # are as likely to blame as the server: download once from the first byte.
    part.unlink()
    logging.warning('%s: the %d bytes kept in %s from an earlier download and '
                    'those received after them have SHA-256 %s instead of the '
                    'published %s; deleted them and downloading from the '
                    'first byte.', url, kept, part, found, remote.sha256)
    return _fetch(remote, destination, mirror=mirror, attempts=attempts,
                  progress=progress)
  if found != remote.sha256:
    part.unlink()
    raise common.DataError(
        f'{url} sent a file with SHA-256 {found} instead of the published '
        f'{remote.sha256} (corrupt or truncated; it was deleted): {where}.')
  os.replace(part, destination)
  return destination


def _extract(archive: pathlib.Path, inner: str,
             target: pathlib.Path) -> None:
  """Extracts `inner/` of a .tar.gz or .zip and moves its files into `target`."""
  with tempfile.TemporaryDirectory(prefix='.extract-',
                                   dir=archive.parent) as scratch:
    try:
      if archive.name.endswith('.zip'):
        with zipfile.ZipFile(archive) as bundle:
          bundle.extractall(scratch)  # zipfile drops '..' and absolute parts
      else:
        with tarfile.open(archive, 'r:*') as bundle:
          bundle.extractall(scratch, filter='data')
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
      raise common.DataError(
          f'{archive} could not be extracted ({error}); delete it and '
          'download again.') from None
    source = pathlib.Path(scratch) / inner
    if not source.is_dir():
      raise common.DataError(
          f'{archive} holds no folder {inner!r} (not the published archive); '
          'delete it and download again.')
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
      os.replace(path, target / path.name)


def _record_path(folder: pathlib.Path) -> pathlib.Path:
  return folder / _RECORD


def _expected_record(spec: Dataset) -> dict:
  return {'files': {remote.name: remote.sha256 for remote in spec.files}}


def is_downloaded(name: str, data_dir: Optional[str] = None) -> bool:
  """Whether `download(name, data_dir)` already verified and laid out the files."""
  spec = DATASETS[name]
  folder = pathlib.Path(data_dir or common.default_data_dir()).expanduser()
  record = _record_path(folder / spec.folder)
  try:
    return json.loads(record.read_text()) == _expected_record(spec)
  except (OSError, ValueError):
    return False


def download(name: str, data_dir: Optional[str] = None, *,
             mirror: Optional[str] = None, progress: bool = True,
             attempts: int = 3) -> pathlib.Path:
  """Fetches, verifies and lays out one dataset's standard files.

  Args:
    name: 'mnist', 'cifar10', 'wikitext-2' or 'wikitext-103' ('imagenet'
      raises a DataError with the manual steps).
    data_dir: the data directory (default `common.default_data_dir()`).
    mirror: base URL of a mirror (default `$JREG_DATA_MIRROR`, else the
      publishers' URLs).
    progress: show progress bars.
    attempts: see `fetch`.

  Returns:
    The dataset folder, as the `'local'` source finds it.

  Raises:
    DataError: see `fetch`; or an extracted file with an unexpected digest.
  """
  root = pathlib.Path(data_dir or common.default_data_dir()).expanduser()
  if name in ('imagenet', 'imagenet2012'):
    raise common.DataError(
        f'{root / "imagenet"} holds no ImageNet: '
        f'{imagenet_how_to_get(root / "imagenet")}.')
  if name not in DATASETS:
    raise ValueError(f'dataset {name!r} is not one of {sorted(DATASETS)}.')
  spec = DATASETS[name]
  folder = root / spec.folder
  if is_downloaded(name, str(root)):
    return folder
  logging.info('downloading %s into %s', name, folder)
  if spec.archive_folder is None:
    for remote in spec.files:
      fetch(remote, folder / remote.name, mirror=mirror, progress=progress,
            attempts=attempts)
  else:
    (remote,) = spec.files
    downloads = root / 'downloads'
    archive = fetch(remote, downloads / remote.name, mirror=mirror,
                    progress=progress, attempts=attempts)
    _extract(archive, spec.archive_folder, folder)
    archive.unlink()
    if not any(downloads.iterdir()):
      downloads.rmdir()
  for file_name, digest in spec.extracted_sha256:
    found = _sha256(folder / file_name)
    if found != digest:
      raise common.DataError(
          f'{folder / file_name} has SHA-256 {found} instead of {digest} '
          '(the archive is not the published one); delete the folder and '
          'download again.')
  _record_path(folder).write_text(json.dumps(_expected_record(spec)))
  return folder


def download_all(names: Sequence[str] = ('mnist', 'cifar10', 'wikitext-2'),
                 data_dir: Optional[str] = None, *,
                 mirror: Optional[str] = None) -> dict[str, pathlib.Path]:
  """`download` of each name; returns name -> dataset folder."""
  return {name: download(name, data_dir, mirror=mirror) for name in names}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m jreg.data.download [--data_dir=DIR] [--mirror=URL] NAME...`.

  Fetches datasets ahead of time (for example on a cluster's login node, when
  the compute nodes have no internet); prints one sentence and returns 1 on a
  DataError.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m jreg.data.download',
      description='Download and verify the standard dataset files.')
  parser.add_argument('names', nargs='*', default=['mnist', 'cifar10',
                                                    'wikitext-2'],
                      choices=sorted(DATASETS), metavar='NAME',
                      help=f'datasets, of {sorted(DATASETS)} (default: '
                      'mnist cifar10 wikitext-2)')
  parser.add_argument('--data_dir', default=None,
                      help='data directory (default $JREG_DATA_DIR, else '
                      '$XDG_CACHE_HOME/jreg or ~/.cache/jreg)')
  parser.add_argument('--mirror', default=None,
                      help=f'mirror base URL (default ${MIRROR_ENV})')
  args = parser.parse_args(argv)
  try:
    folders = download_all(args.names, args.data_dir, mirror=args.mirror)
  except common.DataError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  for name, folder in folders.items():
    print(f'{name}: {folder}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
