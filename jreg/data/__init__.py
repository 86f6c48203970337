"""Data pipelines: loaders, iterators with a saveable position, augmentation.

Every iterator yields dicts of NumPy arrays holding this process's slice of the
global batch and has `get_state() -> dict` (JSON) / `set_state(dict)`.
Datasets come from `source='auto'` (the default: the standard distribution
files under the data directory, downloaded and verified when missing),
`'local'`, `'download'` or `'tfds'` (an already prepared tfds directory); see
`jreg.data.common` for the sources and the data directory, and
`jreg.data.download` for the downloads; docs/data.md for the formats.
"""
from jreg.data.augment import normalize
from jreg.data.augment import pad_crop_flip
from jreg.data.cifar10 import cifar10_iterator
from jreg.data.cifar10 import load_cifar10
from jreg.data.common import DataError
from jreg.data.common import first_examples
from jreg.data.common import cache_dir
from jreg.data.common import default_data_dir
from jreg.data.common import SOURCES
from jreg.data.iterator import ArrayIterator
from jreg.data.mnist import load_mnist
from jreg.data.mnist import mnist_iterator
from jreg.data.synthetic import load_synthetic_1d
from jreg.data.synthetic import synthetic_1d_iterator
from jreg.data.wikitext import LMOrderedIterator
from jreg.data.wikitext import load_wikitext
from jreg.data.wikitext import Vocabulary
from jreg.data.wikitext import WikiTextCorpus
from jreg.data.wikitext import wikitext_iterator

__all__ = (
    'ArrayIterator', 'DataError', 'ImageNetIterator', 'LMOrderedIterator',
    'SOURCES', 'Vocabulary', 'WikiTextCorpus', 'cache_dir', 'cifar10_iterator',
    'default_data_dir', 'first_examples', 'imagenet_iterator',
    'imagenet_source', 'load_cifar10', 'load_mnist', 'load_synthetic_1d',
    'load_wikitext', 'mnist_iterator', 'normalize', 'pad_crop_flip',
    'synthetic_1d_iterator', 'wikitext_iterator',
)

# ImageNet needs grain (about 1.5 s to import): loaded on first use.
_IMAGENET_NAMES = ('imagenet_iterator', 'imagenet_source', 'ImageNetIterator')


def __getattr__(name):
  if name in _IMAGENET_NAMES:
    from jreg.data import imagenet  # pylint: disable=g-import-not-at-top
    return getattr(imagenet, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
