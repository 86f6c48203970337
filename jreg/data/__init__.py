"""Data pipelines: loaders, iterators with a saveable position, augmentation.

Every iterator yields dicts of NumPy arrays holding this process's slice of the
global batch and has `get_state() -> dict` (JSON) / `set_state(dict)`.
See notes/data.md for the API and the choices made.
"""
from jreg.data.augment import normalize
from jreg.data.augment import pad_crop_flip
from jreg.data.cifar10 import cifar10_iterator
from jreg.data.cifar10 import load_cifar10
from jreg.data.common import DataError
from jreg.data.common import default_data_dir
from jreg.data.common import SOURCES
from jreg.data.iterator import ArrayIterator
from jreg.data.mnist import load_mnist
from jreg.data.mnist import mnist_iterator
from jreg.data.synthetic import load_synthetic_1d
from jreg.data.synthetic import synthetic_1d_iterator
