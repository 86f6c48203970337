"""CIFAR ResNets in Haiku: ResNet-20 (He et al. 2016) and ResNet-18 (CIFAR variant).

Shapes: B batch, H/W height/width, C channels; images are NHWC [B, 32, 32, 3].

* ResNet-20: K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for
  Image Recognition", CVPR 2016, Section 4.2: a 3x3 convolution to 16
  channels, then 3 stages of n = 3 basic blocks with 16, 32, 64 channels
  (strides 1, 2, 2), global average pooling and a 10-way linear layer;
  6n + 2 = 20 layers. Shortcuts where the shape changes are parameter-free
  ("option A": stride-2 subsampling and zero-padded channels), giving the
  paper's 0.27M parameters. `cifar_resnet(depth)` builds the 6n + 2 family
  (ResNet-8, n = 1, serves quick runs and tests).
* ResNet-18 (CIFAR): the ImageNet ResNet-18's four stages of two basic blocks
  (64, 128, 256, 512 channels, strides 1, 2, 2, 2) with the 7x7/stride-2 stem
  and max-pool replaced by one 3x3/stride-1 convolution for 32x32 inputs, and
  1x1-convolution projection shortcuts ("option B"); 11.17M parameters. This
  is the variant used for CIFAR-10 in, e.g., Barrett & Dherin (ICLR 2021,
  Section 6).

Batch normalisation (Ioffe & Szegedy 2015) follows every convolution; its
running statistics are Haiku state (`hk.transform_with_state`), updated with
decay 0.9 when `is_training` is True. Convolutions use He (fan-out, normal)
initialisation and no bias.

Convolutions are `jreg.layers.Conv2D` (the parameters, names and initialiser
of `hk.Conv2D`) with the implementation given to `make` (`conv_impl`):
'xla' (the default: `lax.conv_general_dilated` and autodiff, the fastest
for first-order training on every backend) or 'custom' (the convolution
with its own VJP). On CPU, reverse-over-reverse autodiff of 'xla'
convolutions (the exact gradient penalty, double backprop) emits
convolution forms XLA:CPU runs slowly; 'custom' keeps every derivative a
canonical convolution or a matmul: the ResNet-20 EGR step takes 3.2 s
instead of 5.7 s, but with 'custom' the plain step is slower (0.90 s
against 0.69 s in the same A/B; BUILD_NOTES.md), hence the default.
`jreg.tasks.igr.conv_implementation` chooses per run.
"""
from __future__ import annotations

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from jreg import layers

BN_DECAY = 0.9
BN_EPS = 1e-5


def _conv(channels: int, kernel: int, stride: int, name: str) -> layers.Conv2D:
  # impl=None: the implementation `make` sets for the forward pass.
  return layers.Conv2D(channels, kernel, stride=stride, padding='SAME',
                       with_bias=False, name=name,
                       w_init=hk.initializers.VarianceScaling(2.0, 'fan_out', 'normal'))


def _batch_norm(name: str) -> hk.BatchNorm:
  return hk.BatchNorm(create_scale=True, create_offset=True,
                      decay_rate=BN_DECAY, eps=BN_EPS, name=name)


class BasicBlock(hk.Module):
  """relu(x + BN(conv3x3(relu(BN(conv3x3(x)))))), He et al. 2016, Fig. 2."""

  def __init__(self, channels: int, stride: int, shortcut: str,
               name: str | None = None):
    super().__init__(name=name)
    self.channels = channels
    self.stride = stride
    self.shortcut = shortcut

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    # x: [B, H, W, C_in] -> [B, H/stride, W/stride, channels]
    out = _conv(self.channels, 3, self.stride, 'conv_0')(x)
    out = jax.nn.relu(_batch_norm('bn_0')(out, is_training))
    out = _conv(self.channels, 3, 1, 'conv_1')(out)
    out = _batch_norm('bn_1')(out, is_training)
    if self.stride != 1 or x.shape[-1] != self.channels:
      if self.shortcut == 'projection':
        x = _conv(self.channels, 1, self.stride, 'shortcut_conv')(x)
        x = _batch_norm('shortcut_bn')(x, is_training)
      else:  # 'padding' (option A): subsample, zero-pad the new channels.
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.channels - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return jax.nn.relu(out + x)


class CifarResNet(hk.Module):
  """A ResNet for 32x32 images: 3x3 stem, stages of basic blocks, pool, linear.

  Args:
    blocks_per_stage: basic blocks in each stage.
    stage_channels: channels of each stage (the stem has the first stage's).
    shortcut: 'projection' (1x1 conv + BN) or 'padding' (parameter-free).
    num_classes: outputs.
  """

  def __init__(self, blocks_per_stage: Sequence[int],
               stage_channels: Sequence[int], shortcut: str,
               num_classes: int = 10, name: str | None = None):
    super().__init__(name=name)
    if len(blocks_per_stage) != len(stage_channels):
      raise ValueError('blocks_per_stage and stage_channels must have the '
                       'same length.')
    if shortcut not in ('projection', 'padding'):
      raise ValueError(f"shortcut must be 'projection' or 'padding', got "
                       f'{shortcut!r}.')
    self.blocks_per_stage = tuple(blocks_per_stage)
    self.stage_channels = tuple(stage_channels)
    self.shortcut = shortcut
    self.num_classes = num_classes

  def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
    # images: [B, 32, 32, 3] -> logits [B, num_classes]
    x = _conv(self.stage_channels[0], 3, 1, 'stem_conv')(images)
    x = jax.nn.relu(_batch_norm('stem_bn')(x, is_training))
    for stage, (blocks, channels) in enumerate(
        zip(self.blocks_per_stage, self.stage_channels)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(channels, stride, self.shortcut,
                       name=f'stage{stage}_block{block}')(x, is_training)
    x = jnp.mean(x, axis=(1, 2))  # [B, C]
    return hk.Linear(self.num_classes, name='logits')(x)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
  """He et al. (2016) Section 4.2 family, depth 6n + 2: 3 stages of n blocks,
  16/32/64 channels, parameter-free shortcuts (ResNet-20: n = 3)."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'depth must be 6n + 2 with n >= 1, got {depth}.')
  n = (depth - 2) // 6
  return CifarResNet((n, n, n), (16, 32, 64), 'padding', num_classes,
                     name=f'resnet{depth}')


def resnet20(num_classes: int = 10) -> CifarResNet:
  """He et al. (2016) ResNet-20 for CIFAR: 3 x 3 blocks, 16/32/64 channels."""
  return cifar_resnet(20, num_classes)


def resnet8(num_classes: int = 10) -> CifarResNet:
  """The smallest of the family (n = 1): for quick runs and tests."""
  return cifar_resnet(8, num_classes)


def resnet18(num_classes: int = 10) -> CifarResNet:
  """ResNet-18, CIFAR variant: 4 x 2 blocks, 64..512 channels, 3x3 stem."""
  return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), 'projection',
                     num_classes, name='resnet18')


MODELS = {'resnet8': resnet8, 'resnet20': resnet20, 'resnet18': resnet18}


def make(name: str, num_classes: int = 10,
         conv_impl: str = 'xla') -> hk.TransformedWithState:
  """`hk.transform_with_state` of `MODELS[name]`: apply(params, state, rng,
  images [B, 32, 32, 3], is_training) -> (logits [B, num_classes], state).
  `conv_impl`: the convolutions' implementation, 'xla' or 'custom' (module
  docstring); the parameters are the same either way."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {sorted(MODELS)}.')
  if conv_impl not in layers.IMPLEMENTATIONS:
    raise ValueError(f'conv_impl must be one of {layers.IMPLEMENTATIONS}, got '
                     f'{conv_impl!r}.')

  def forward(images, is_training):
    with layers.implementation(conv_impl):
      return MODELS[name](num_classes)(images, is_training)

  return hk.transform_with_state(forward)
