"""Image normalisation and augmentation (vectorised NumPy, keyed per example).

Random choices come from one int64 key per example (see `iterator.py`), so a
batch is the same whichever process computes it and after any restore.
"""
from typing import Sequence

import numpy as np

# Per-channel statistics of the training pixels, in [0, 1] units.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """(images / 255 - mean) / std per channel, as float32.

  Args:
    images: uint8 [..., C].
    mean: C channel means in [0, 1] units.
    std: C channel standard deviations in [0, 1] units.

  Returns:
    float32 [..., C].
  """
  scale = np.float32(1 / 255) / np.asarray(std, np.float32)        # [C]
  shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  normalized = np.multiply(images, scale, dtype=np.float32)
  normalized -= shift
  return normalized


def _key_digits(keys: np.ndarray, *radices: int) -> list[np.ndarray]:
  """Splits each key into independent uniform digits in [0, radix)."""
  keys = keys.astype(np.uint64)
  digits = []
  for radix in radices:
    digits.append((keys % np.uint64(radix)).astype(np.int64))
    keys = keys // np.uint64(radix)
  return digits


def pad_crop_flip(images: np.ndarray, keys: np.ndarray,
                  padding: int = 4) -> np.ndarray:
  """Random crop after zero padding, then random horizontal flip.

  The CIFAR-10 augmentation of He et al. (2016, Sec. 4.2): pad 4 pixels on
  each side, take a random HxW crop, flip left-right with probability 1/2.
  Offsets (uniform in [0, 2*padding]) and the flip come from the key only.

  Args:
    images: [B, H, W, C] (any dtype; padding is 0).
    keys: int64 [B], one random key per image.
    padding: pixels of zero padding on each side.

  Returns:
    [B, H, W, C], same dtype.
  """
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding),
                           (0, 0)))                         # [B, H+2p, W+2p, C]
  span = 2 * padding + 1
  top, left, flip = _key_digits(keys, span, span, 2)       # [B] each
  rows = top[:, None] + np.arange(height)                  # [B, H]
  columns = np.where(flip[:, None].astype(bool),
                     left[:, None] + np.arange(width - 1, -1, -1),
                     left[:, None] + np.arange(width))     # [B, W]
  return padded[np.arange(batch)[:, None, None], rows[:, :, None],
                columns[:, None, :]]
