"""Shared test set-up: four faked CPU devices and the datasets the tests read.

The suite runs from a fresh clone with no data folder:

- `standard_data` (session fixture): a folder of tiny datasets written in the
  standard distribution formats and layout (`mnist/*-ubyte.gz`,
  `cifar10/cifar-10-batches-bin/*.bin`, `wikitext-2/wiki.*.tokens`,
  `imagenet-mini/{train,val}/<wnid>/*.JPEG` + `classes.txt`), with learnable
  labels, so the real loaders and experiments run on them.
- `shared_data` (session fixture): the offline copies `../shared/data` when
  they are there (as in CI), else `standard_data`.
- marker `shared_data`: a test that needs the real offline files (their
  sizes, labels, statistics). Without `../shared/data` such tests are
  deselected, and the header of the run says so; with
  `JREG_REQUIRE_SHARED_DATA=1` (set by .ci/run) a missing folder is an error.
- marker `slurm`: a test that submits jobs to the one-node SLURM cluster of
  `tests/slurm/cluster.sh` (`start` it first). When that cluster is not up
  such tests are deselected, and the header says so; with
  `JREG_REQUIRE_SLURM=1` a cluster that is not up is an error. When it is
  up, every test process gets its `SLURM_CONF`.

Every test process gets `JREG_DATA_DIR` = the `shared_data` folder, so code
that uses the default data directory reads it, and `JREG_DATA_MIRROR` = a
closed port on 127.0.0.1, so no test can reach the internet (downloads are
tested against a local server, tests/test_download.py).
"""
import gzip
import io
import os
import pathlib
import shutil
import subprocess
import tempfile

# Must be set before JAX initialises its backends: every test process sees four
# CPU devices, so the data-parallel modes are exercised without accelerators.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
REQUIRE_SHARED_DATA_ENV = 'JREG_REQUIRE_SHARED_DATA'
SLURM_CLUSTER = REPO / 'tests' / 'slurm' / 'cluster.sh'
REQUIRE_SLURM_ENV = 'JREG_REQUIRE_SLURM'
# Port 9 (discard) on the loopback interface: nothing listens, so a download
# that a test did not point at its own server fails at once, offline.
UNREACHABLE_MIRROR = 'http://127.0.0.1:9/no-network-in-tests'

# Sizes of the tiny standard-format datasets.
MNIST_SIZES = {'train': 2560, 'test': 1024}
CIFAR10_BATCH_SIZE = 64         # 5 training batches + 1 test batch
CIFAR10_TEST_SIZE = 160
WIKITEXT_TOKENS = {'train': 30_000, 'valid': 4_000, 'test': 4_000}
# Over 10,000 symbols: the DEQ-Transformer's adaptive softmax cuts at 10,000.
WIKITEXT_VOCABULARY = 12_000
# Ten classes, as imagenet-mini.
IMAGENET_CLASSES = ('n01440764', 'n01443537', 'n01484850', 'n01491361',
                    'n01494475', 'n01496331', 'n01498041', 'n01514668',
                    'n01514859', 'n01518878')
IMAGENET_IMAGES = {'train': 6, 'val': 2}


# -- tiny datasets in the standard formats ----------------------------------------


def write_idx_gz(path: pathlib.Path, magic: int, array: np.ndarray) -> None:
  """An IDX file (big-endian int32 magic and dims, then uint8 data), gzipped."""
  header = np.array([magic, *array.shape], '>i4').tobytes()
  with gzip.open(path, 'wb', compresslevel=1) as stream:
    stream.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder: pathlib.Path, seed: int = 0) -> None:
  """The four MNIST IDX .gz files; label k draws a bright band at rows 2k+4."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    size = MNIST_SIZES[split]
    labels = rng.integers(0, 10, size)
    images = rng.integers(0, 64, (size, 28, 28))
    for row in range(2):
      images[np.arange(size), 2 * labels + 4 + row, 4:24] = 255
    write_idx_gz(folder / f'{prefix}-images-idx3-ubyte.gz', 2051, images)
    write_idx_gz(folder / f'{prefix}-labels-idx1-ubyte.gz', 2049, labels)


def cifar10_records(size: int, rng: np.random.Generator) -> np.ndarray:
  """`size` CIFAR-10 binary records [size, 3073]: label byte, R, G, B planes.

  Label k brightens a 4-pixel band at rows 3k..3k+3 of plane k % 3.
  """
  labels = rng.integers(0, 10, size)
  planes = rng.integers(0, 128, (size, 3, 32, 32))
  for index, label in enumerate(labels):
    planes[index, label % 3, 3 * label:3 * label + 4] = 255
  return np.concatenate([labels[:, None], planes.reshape(size, -1)],
                        axis=1).astype(np.uint8)


def write_cifar10(folder: pathlib.Path, seed: int = 0) -> None:
  """`data_batch_{1..5}.bin`, `test_batch.bin` and `batches.meta.txt`."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for index in range(1, 6):
    cifar10_records(CIFAR10_BATCH_SIZE, rng).tofile(
        folder / f'data_batch_{index}.bin')
  cifar10_records(CIFAR10_TEST_SIZE, rng).tofile(folder / 'test_batch.bin')
  (folder / 'batches.meta.txt').write_text(
      'airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n')


def wikitext_lines(num_tokens: int, words: list[str],
                   rng: np.random.Generator) -> list[str]:
  """WikiText-style lines: ' = Heading = ', blank lines and paragraphs."""
  weights = 1.0 / np.arange(1, len(words) + 1)           # Zipf's law
  weights /= weights.sum()
  lines, count = [], 0
  while count < num_tokens:
    length = int(rng.integers(5, 40))
    tokens = list(rng.choice(words, length, p=weights))
    if rng.random() < 0.1:
      lines.extend(['', f' = {tokens[0]} = ', ''])
      count += 3
    else:
      lines.append(' ' + ' '.join(tokens) + ' ')
      count += length
  return lines


def write_wikitext(folder: pathlib.Path, seed: int = 0) -> None:
  """`wiki.{train,valid,test}.tokens`; every valid/test word is in train."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = ['<unk>', 'the', ',', '.', '@-@'] + [
      f'w{index}' for index in range(WIKITEXT_VOCABULARY - 5)]
  for split, num_tokens in WIKITEXT_TOKENS.items():
    lines = wikitext_lines(num_tokens, words, rng)
    if split == 'train':
      lines.append(' ' + ' '.join(words) + ' ')
    (folder / f'wiki.{split}.tokens').write_text('\n'.join(lines) + '\n',
                                                 encoding='utf-8')


def write_imagenet(folder: pathlib.Path, seed: int = 0) -> None:
  """`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` (64x64) and `classes.txt`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, count in IMAGENET_IMAGES.items():
    for label, wnid in enumerate(IMAGENET_CLASSES):
      class_folder = folder / split / wnid
      class_folder.mkdir(parents=True, exist_ok=True)
      for index in range(count):
        pixels = rng.integers(0, 96, (64, 64, 3))
        pixels[:, :, label % 3] += 120 + 30 * (label // 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, 'JPEG',
                                                       quality=90)
        (class_folder / f'{wnid}_{index}.JPEG').write_bytes(buffer.getvalue())
  (folder / 'classes.txt').write_text(''.join(
      f'{wnid}\tclass {label}\n' for label, wnid in enumerate(IMAGENET_CLASSES)))


def write_standard_data(root: pathlib.Path) -> pathlib.Path:
  """All the tiny datasets under `root`, in the layout of `../shared/data`."""
  write_mnist(root / 'mnist')
  write_cifar10(root / 'cifar10' / 'cifar-10-batches-bin')
  write_wikitext(root / 'wikitext-2')
  write_imagenet(root / 'imagenet-mini')
  return root


# -- pytest hooks ------------------------------------------------------------------

_STANDARD_DATA: list[pathlib.Path] = []


def standard_data_root() -> pathlib.Path:
  """This process's folder of tiny datasets, written on first use."""
  if not _STANDARD_DATA:
    root = pathlib.Path(tempfile.mkdtemp(prefix='jreg-standard-data-'))
    _STANDARD_DATA.append(write_standard_data(root))
  return _STANDARD_DATA[0]


_SLURM_STATUS: list[str] = []


def slurm_status() -> str:
  """'' when the test cluster takes jobs, else why not (asked once)."""
  if not _SLURM_STATUS:
    try:
      result = subprocess.run(['bash', str(SLURM_CLUSTER), 'status'],
                              capture_output=True, text=True, timeout=60,
                              check=False)
      _SLURM_STATUS.append('' if result.returncode == 0 else
                           result.stdout.strip() or result.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as error:
      _SLURM_STATUS.append(f'{SLURM_CLUSTER} status failed ({error})')
  return _SLURM_STATUS[0]


def pytest_configure(config):
  del config  # the markers `shared_data` and `slurm` are in pytest.ini
  data_dir = SHARED_DATA if SHARED_DATA.is_dir() else standard_data_root()
  os.environ['JREG_DATA_DIR'] = str(data_dir)
  os.environ['JREG_DATA_MIRROR'] = UNREACHABLE_MIRROR
  if not slurm_status():
    conf = subprocess.run(['bash', str(SLURM_CLUSTER), 'env'],
                          capture_output=True, text=True, check=True).stdout
    os.environ['SLURM_CONF'] = conf.strip().partition('=')[2]


def pytest_unconfigure(config):
  del config
  for root in _STANDARD_DATA:
    shutil.rmtree(root, ignore_errors=True)


def pytest_report_header(config):
  del config
  if SHARED_DATA.is_dir():
    lines = [f'offline datasets: {SHARED_DATA}']
  else:
    lines = [f'offline datasets: {SHARED_DATA} is missing, so the tests marked '
             'shared_data are deselected and the others read tiny '
             'standard-format files written by tests/conftest.py']
  if slurm_status():
    lines.append(f'SLURM test cluster: not up ({slurm_status()}), so the tests '
                 'marked slurm are deselected; start it with '
                 'tests/slurm/cluster.sh start')
  else:
    lines.append(f'SLURM test cluster: up (SLURM_CONF={os.environ["SLURM_CONF"]})')
  return lines


def pytest_collection_modifyitems(config, items):
  _deselect_slurm(config, items)
  if SHARED_DATA.is_dir():
    return
  marked = [item for item in items if item.get_closest_marker('shared_data')]
  if not marked:
    return
  if os.environ.get(REQUIRE_SHARED_DATA_ENV) == '1':
    raise pytest.UsageError(
        f'{SHARED_DATA} is missing but {REQUIRE_SHARED_DATA_ENV}=1 asks for '
        f'the {len(marked)} tests marked shared_data to run.')
  config.hook.pytest_deselected(items=marked)
  items[:] = [item for item in items
              if not item.get_closest_marker('shared_data')]


def _deselect_slurm(config, items):
  """Drops the tests marked slurm when the test cluster is not up."""
  marked = [item for item in items if item.get_closest_marker('slurm')]
  if not marked or not slurm_status():
    return
  if os.environ.get(REQUIRE_SLURM_ENV) == '1':
    raise pytest.UsageError(
        f'the SLURM test cluster is not up ({slurm_status()}) but '
        f'{REQUIRE_SLURM_ENV}=1 asks for the {len(marked)} tests marked slurm '
        'to run; start it with tests/slurm/cluster.sh start.')
  config.hook.pytest_deselected(items=marked)
  items[:] = [item for item in items if not item.get_closest_marker('slurm')]


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope='session')
def standard_data() -> pathlib.Path:
  """Tiny datasets in the standard formats and layout (see module doc)."""
  return standard_data_root()


@pytest.fixture(scope='session')
def shared_data(standard_data) -> pathlib.Path:
  """`../shared/data` when present (as in CI), else `standard_data`."""
  return SHARED_DATA if SHARED_DATA.is_dir() else standard_data
