"""Multiscale deep equilibrium model (MDEQ) for image classification, in Haiku.

The model of Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models"
(NeurIPS 2020, Sec. 3 and Fig. 2), with the settings used by Bai, Koltun &
Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization" (ICML 2021,
Table 4 and Appendix A). The layout follows the authors' reference code
(locuslab/deq, `MDEQ-Vision/lib/models/mdeq_core.py` and `mdeq.py`):

  images --stem--> x (injection, finest scale only)
  z* = f_theta(z*; x)           the multiscale equilibrium cell `MDEQCell`
  logits = head(z*)             `ClassificationHead`

The cell f_theta is, for every scale i (Sec. 3.2 of the MDEQ paper):
  1. a residual block per resolution (`ResidualBlock`, the reference's
     BasicBlock: 3x3 conv to E*C_i channels, GroupNorm, ReLU, 3x3 conv back to
     C_i, variational dropout, + injection, GroupNorm, + z_i, ReLU, GroupNorm);
  2. multi-resolution fusion: y_i = sum_j fuse_{j->i}(block_j), where a coarser
     scale j > i is upsampled (1x1 conv, GroupNorm, nearest upsampling by
     2^(j-i)) and a finer one j < i is downsampled (j-i strided 3x3 convs with
     GroupNorm, ReLU between them);
  3. post-fusion: ReLU, 1x1 conv, GroupNorm (no affine).

The convolutions of the residual blocks and of the post-fusion step carry
weight normalisation (`WeightNormConv2D`, w = g * v / ||v||), as in the
reference (`WNORM: true`).

Deviations from the reference, all deliberate (see BUILD_NOTES.md (MDEQ)):
  * The stem uses GroupNorm where the reference uses BatchNorm (it feeds the
    equilibrium; per-example normalisation keeps f_theta independent of the
    batch). The head uses BatchNorm as the reference does: with GroupNorm
    there the reduced CIFAR-10 model did not learn (BUILD_NOTES.md (MDEQ)). Under
    `pmap` the head's batch statistics are per device (averaged by the
    engine's pmean of the model state).
  * Conv paddings follow PyTorch's explicit (k-1)/2 convention. The cell's
    convolutions are initialised N(0, 0.01) as in the reference
    `init_weights`; the stem's and head's with fan-in variance scaling (with
    N(0, 0.01) there, training at Adam 1e-3 collapsed to chance here).

Glossary of shape letters::

  B: batch size.
  H, W: image height and width; H_i = H0 / 2**i, W_i = W0 / 2**i at scale i,
    where H0 = H / 2**downsample_times is the finest equilibrium resolution.
  C: image channels (3).
  C_i: channels of scale i (`num_channels[i]`); E: expansion factor of the
    residual block (inner channels E * C_i).
  S: number of scales (`len(num_channels)`).
  K: number of classes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from jreg import deq as deq_lib
from jreg import layers

# The cell's convolutions are initialised N(0, 0.01) as in the reference
# (MDEQClsNet.init_weights). The stem and head use fan-in scaling instead: with
# N(0, 0.01) there and Adam at 1e-3, the reduced-scale CIFAR-10 model collapsed
# to chance within 20 steps (BUILD_NOTES.md (MDEQ)).
_CELL_INIT = hk.initializers.RandomNormal(stddev=0.01)
_CONV_INIT = hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')


@dataclasses.dataclass(frozen=True)
class MDEQConfig:
  """Architecture of an MDEQ classifier (the reference's MODEL section)."""
  # Channels C_i of each scale, finest first; S = len(num_channels).
  num_channels: tuple[int, ...]
  # Bottleneck widths of the head's per-scale blocks (output is 4x these).
  head_channels: tuple[int, ...]
  # Channels of the head's final 1x1 conv before pooling.
  final_channels: int
  num_classes: int
  # Inner width of the residual block is int(expansion * C_i).
  expansion: float = 5.0
  # GroupNorm groups in the cell (the post-fusion norm uses num_groups // 2).
  num_groups: int = 8
  # Variational dropout rate inside the residual blocks.
  dropout: float = 0.0
  weight_norm: bool = True
  # Stride-2 convs in the stem (0 for CIFAR-10, 2 for ImageNet 224x224).
  downsample_times: int = 0
  # Affine parameters of the GroupNorms (reference: BLOCK/FUSE/POST_GN_AFFINE).
  block_gn_affine: bool = True
  fuse_gn_affine: bool = True
  post_gn_affine: bool = False
  # Depth of the unrolled weight-tied pre-training phase (reference NUM_LAYERS).
  num_layers: int = 4
  # Input image side (for documentation and shape checks only).
  image_size: int = 32

  @property
  def num_scales(self) -> int:
    return len(self.num_channels)

  def replace(self, **changes) -> 'MDEQConfig':
    return dataclasses.replace(self, **changes)


def mdeq_config(name: str) -> MDEQConfig:
  """Named MDEQ architectures.

  Args:
    name: one of::

      'cifar10': the JR paper's CIFAR-10 MDEQ (Table 4: 4 scales, channels
        [28, 56, 112, 224]; expansion 5, 4 groups (28 is not divisible by
        the reference 8), weight norm as in the
        reference `cls_mdeq_LARGE_reg.yaml`; head [14, 28, 56, 112] -> 1680;
        dropout 0.22; 8 unrolled pre-training layers).
      'imagenet_small': MDEQ-small on ImageNet (reference
        `cls_mdeq_SMALL_reg.yaml`: channels [32, 64, 128, 256], two stride-2
        stem convs, head [28, 56, 112, 224] -> 2048, dropout 0.02, 5 layers).
      'cifar10_small': a reduced CIFAR-10 model for the 2-core reduced-scale
        runs (3 scales [8, 16, 32], expansion 2, one stride-2 stem conv so
        that the finest equilibrium is 16x16).
      'tiny': a 2-scale model with 8x8 inputs for tests.

  Returns:
    The `MDEQConfig`.
  """
  configs = {
      'cifar10': MDEQConfig(
          num_channels=(28, 56, 112, 224), head_channels=(14, 28, 56, 112),
          final_channels=1680, num_classes=10, expansion=5.0, num_groups=4,
          dropout=0.22, weight_norm=True, downsample_times=0, num_layers=8,
          image_size=32),
      'imagenet_small': MDEQConfig(
          num_channels=(32, 64, 128, 256), head_channels=(28, 56, 112, 224),
          final_channels=2048, num_classes=1000, expansion=5.0, num_groups=8,
          dropout=0.02, weight_norm=True, downsample_times=2, num_layers=5,
          image_size=224),
      'cifar10_small': MDEQConfig(
          num_channels=(8, 16, 32), head_channels=(4, 8, 16),
          final_channels=128, num_classes=10, expansion=2.0, num_groups=4,
          dropout=0.0, weight_norm=True, downsample_times=1, num_layers=4,
          image_size=32),
      'tiny': MDEQConfig(
          num_channels=(4, 8), head_channels=(2, 4), final_channels=16,
          num_classes=3, expansion=2.0, num_groups=2, dropout=0.0,
          weight_norm=True, downsample_times=0, num_layers=3, image_size=8),
  }
  if name not in configs:
    raise ValueError(f'Unknown MDEQ configuration {name!r}; known: '
                     f'{sorted(configs)}.')
  return configs[name]


def _padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style symmetric padding (k - 1) / 2 on both spatial axes."""
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


class WeightNormConv2D(hk.Module):
  """2-D convolution with weight normalisation (Salimans & Kingma, 2016).

  w[..., o] = g[o] * v[..., o] / ||v[..., o]||_2, the norm taken over the
  kernel's spatial and input-channel axes for each output channel o (PyTorch's
  `weight_norm(dim=0)`, as used by the MDEQ reference). g is initialised to
  ||v|| so that w = v at initialisation.
  """

  def __init__(self, output_channels: int, kernel_size: int, stride: int = 1,
               with_bias: bool = False, name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.with_bias = with_bias

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs: [B, H, W, C_in] -> [B, H / stride, W / stride, C_out]."""
    k, c_in = self.kernel_size, inputs.shape[-1]
    v = hk.get_parameter('v', [k, k, c_in, self.output_channels],
                         inputs.dtype, init=_CELL_INIT)  # [k, k, C_in, C_out]
    v_norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2)))  # [C_out]
    g = hk.get_parameter('g', [self.output_channels], inputs.dtype,
                         init=lambda shape, dtype: v_norm.astype(dtype))
    w = v * (g / v_norm)  # [k, k, C_in, C_out]
    out = layers.conv2d(inputs, w, (self.stride, self.stride), _padding(k))
    if self.with_bias:
      out = out + hk.get_parameter('b', [self.output_channels], inputs.dtype,
                                   init=jnp.zeros)
    return out


def _conv(output_channels: int, kernel_size: int, stride: int = 1, *,
          weight_norm: bool = False, with_bias: bool = False,
          cell: bool = False, name: str | None = None):
  """A conv with PyTorch padding; weight-normalised if `weight_norm`; the
  reference's N(0, 0.01) initialisation if `cell`. Both run on
  `jreg.layers.conv2d` (own VJP; `jreg.layers.implementation('xla')` selects
  plain autodiff)."""
  if weight_norm:
    return WeightNormConv2D(output_channels, kernel_size, stride,
                            with_bias=with_bias, name=name)
  return layers.Conv2D(output_channels, kernel_size, stride=stride,
                   padding=_padding(kernel_size), with_bias=with_bias,
                   w_init=_CELL_INIT if cell else _CONV_INIT, name=name)


def _group_norm(groups: int, affine: bool, name: str | None = None):
  return layers.GroupNorm(groups, create_scale=affine, create_offset=affine,
                          name=name)


def _upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """[B, H, W, C] -> [B, H * factor, W * factor, C] (nearest neighbour)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def dropout_mask_shapes(config: MDEQConfig, batch_size: int,
                        image_size: int) -> list[tuple[int, ...]]:
  """Shapes [B, H_i, W_i, C_i] of the equilibrium state z at every scale."""
  side = image_size // 2**config.downsample_times
  return [(batch_size, side // 2**i, side // 2**i, c)
          for i, c in enumerate(config.num_channels)]


def variational_dropout_masks(rng: jax.Array, shapes: Sequence[tuple[int, ...]],
                              rate: float) -> list[jax.Array]:
  """Variational (recurrent) dropout masks, one per scale.

  m = Bernoulli(1 - rate) / (1 - rate), of the full state shape [B, H_i, W_i,
  C_i]. They are sampled once per forward pass and passed into the cell as part
  of its input x, so the same mask multiplies every solver iteration (Gal &
  Ghahramani 2016; the reference's VariationalHidDropout2d.reset_mask).
  """
  keys = jax.random.split(rng, len(shapes))
  return [jax.random.bernoulli(key, 1.0 - rate, shape).astype(jnp.float32)
          / (1.0 - rate) for key, shape in zip(keys, shapes)]


class ResidualBlock(hk.Module):
  """The per-resolution residual block of the MDEQ cell (reference BasicBlock).

  out = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + injection) + z))
  """

  def __init__(self, config: MDEQConfig, channels: int,
               name: str | None = None):
    super().__init__(name=name)
    self.config = config
    self.channels = channels

  def __call__(self, z: jax.Array, injection: jax.Array | None,
               dropout_mask: jax.Array | None) -> jax.Array:
    """z, injection, dropout_mask: [B, H_i, W_i, C_i] -> [B, H_i, W_i, C_i]."""
    cfg = self.config
    inner = int(cfg.expansion * self.channels)
    out = _conv(inner, 3, weight_norm=cfg.weight_norm, name='conv1')(z)
    out = jax.nn.relu(_group_norm(cfg.num_groups, cfg.block_gn_affine,
                                  name='gn1')(out))  # [B, H_i, W_i, E*C_i]
    out = _conv(self.channels, 3, weight_norm=cfg.weight_norm,
                name='conv2')(out)  # [B, H_i, W_i, C_i]
    if dropout_mask is not None:
      out = out * dropout_mask
    if injection is not None:
      out = out + injection
    out = _group_norm(cfg.num_groups, cfg.block_gn_affine, name='gn2')(out)
    out = jax.nn.relu(out + z)
    return _group_norm(cfg.num_groups, cfg.block_gn_affine, name='gn3')(out)


class MDEQCell(hk.Module):
  """The multiscale equilibrium cell f_theta(z; x) (MDEQ paper Sec. 3.2).

  `z` is a list of S per-resolution states [B, H_i, W_i, C_i]; `x` is a dict
  with 'injection' ([B, H_0, W_0, C_0], added at the finest scale only, as in
  the reference) and optionally 'dropout_masks' (a list of S masks, or absent
  when there is no dropout). Returns the list f_theta(z; x) with z's shapes.
  """

  def __init__(self, config: MDEQConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, z: Sequence[jax.Array], x: dict[str, Any]) -> list[jax.Array]:
    cfg = self.config
    num_scales = cfg.num_scales
    masks = x.get('dropout_masks') or [None] * num_scales
    # Step 1: a residual block per resolution.
    blocks = [
        ResidualBlock(cfg, cfg.num_channels[i], name=f'block_{i}')(
            z[i], x['injection'] if i == 0 else None, masks[i])
        for i in range(num_scales)]  # S x [B, H_i, W_i, C_i]
    # Step 2: multi-resolution fusion, y_i = sum_j fuse_{j->i}(blocks[j]).
    outputs = []
    for i in range(num_scales):
      fused = blocks[i]
      for j in range(num_scales):
        if j > i:  # coarser -> finer: 1x1 conv, GN, nearest upsampling.
          y = _conv(cfg.num_channels[i], 1, cell=True,
                    name=f'fuse_{j}_to_{i}_conv')(
              blocks[j])
          y = _group_norm(cfg.num_groups, cfg.fuse_gn_affine,
                          name=f'fuse_{j}_to_{i}_gn')(y)
          fused = fused + _upsample_nearest(y, 2**(j - i))
        elif j < i:  # finer -> coarser: (i - j) stride-2 3x3 convs.
          y = blocks[j]
          for k in range(i - j):
            last = k == i - j - 1
            channels = cfg.num_channels[i] if last else cfg.num_channels[j]
            y = _conv(channels, 3, stride=2, cell=True,
                      name=f'fuse_{j}_to_{i}_down{k}_conv')(y)
            y = _group_norm(cfg.num_groups, cfg.fuse_gn_affine,
                            name=f'fuse_{j}_to_{i}_down{k}_gn')(y)
            if not last:
              y = jax.nn.relu(y)
          fused = fused + y  # [B, H_i, W_i, C_i]
      # Step 3: post-fusion ReLU, 1x1 conv (weight-normalised), GroupNorm.
      y = _conv(cfg.num_channels[i], 1, weight_norm=cfg.weight_norm,
                name=f'post_fuse_{i}_conv')(jax.nn.relu(fused))
      y = _group_norm(max(cfg.num_groups // 2, 1), cfg.post_gn_affine,
                      name=f'post_fuse_{i}_gn')(y)
      outputs.append(y)
    return outputs


class Stem(hk.Module):
  """Input injection: images -> x at the finest equilibrium scale.

  conv3x3(C -> C_0, stride 2 if downsample_times >= 1), GN, ReLU,
  conv3x3(C_0 -> C_0, stride 2 if downsample_times >= 2), GN, ReLU, further
  stride-2 convs for downsample_times > 2, and then (reference `stage0`) a 1x1
  conv, GN, ReLU.
  """

  def __init__(self, config: MDEQConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, images: jax.Array) -> jax.Array:
    """images: [B, H, W, C] -> injection [B, H_0, W_0, C_0]."""
    cfg = self.config
    c0 = cfg.num_channels[0]
    x = images
    for k in range(max(2, cfg.downsample_times)):
      stride = 2 if cfg.downsample_times >= k + 1 else 1
      x = _conv(c0, 3, stride=stride, name=f'conv{k}')(x)
      x = jax.nn.relu(_group_norm(cfg.num_groups, True, name=f'gn{k}')(x))
    x = _conv(c0, 1, name='injection_conv')(x)
    return jax.nn.relu(_group_norm(cfg.num_groups, True,
                                   name='injection_gn')(x))


def _batch_norm(affine: bool = True, name: str | None = None):
  """BatchNorm of the head (reference BN_MOMENTUM 0.1, i.e. decay 0.9)."""
  return hk.BatchNorm(create_scale=affine, create_offset=affine,
                      decay_rate=0.9, eps=1e-5, name=name)


class Bottleneck(hk.Module):
  """The head's bottleneck block (reference mdeq.py Bottleneck, expansion 4).

  out = ReLU(BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(y)))))))) + proj(y)),
  the three inner BatchNorms without affine parameters as in the reference.
  """

  def __init__(self, planes: int, name: str | None = None):
    super().__init__(name=name)
    self.planes = planes

  def __call__(self, y: jax.Array, is_training: bool) -> jax.Array:
    """y: [B, H_i, W_i, C_i] -> [B, H_i, W_i, 4 * planes]."""
    bn = lambda x, affine=False: _batch_norm(affine)(x, is_training)  # noqa: E731
    out = jax.nn.relu(bn(_conv(self.planes, 1)(y)))
    out = jax.nn.relu(bn(_conv(self.planes, 3)(out)))
    out = bn(_conv(4 * self.planes, 1)(out))
    residual = y
    if y.shape[-1] != 4 * self.planes:
      residual = bn(_conv(4 * self.planes, 1, name='proj')(y), True)
    return jax.nn.relu(out + residual)


class ClassificationHead(hk.Module):
  """MDEQ's classification head (reference MDEQClsNet.predict).

  y = incre_0(z_0); y = incre_{i+1}(z_{i+1}) + down_i(y) for each coarser
  scale; then a 1x1 conv to `final_channels`, BN, ReLU, global average pooling
  and a linear layer to K logits. BatchNorm as in the reference (the head is
  outside the equilibrium, so batch statistics do not interfere with the
  fixed point); its running statistics are Haiku state.
  """

  def __init__(self, config: MDEQConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, z: Sequence[jax.Array], is_training: bool) -> jax.Array:
    """z: S x [B, H_i, W_i, C_i] -> logits [B, K]."""
    cfg = self.config
    y = Bottleneck(cfg.head_channels[0], name='incre_0')(z[0], is_training)
    for i in range(1, cfg.num_scales):
      down = _conv(4 * cfg.head_channels[i], 3, stride=2, with_bias=True,
                   name=f'downsample_{i}')(y)
      down = jax.nn.relu(_batch_norm()(down, is_training))
      y = Bottleneck(cfg.head_channels[i], name=f'incre_{i}')(
          z[i], is_training) + down  # [B, H_i, W_i, 4h_i]
    y = _conv(cfg.final_channels, 1, with_bias=True, name='final_conv')(y)
    y = jax.nn.relu(_batch_norm()(y, is_training))  # [B, H_S, W_S, F]
    pooled = jnp.mean(y, axis=(1, 2))  # [B, F]
    return hk.Linear(cfg.num_classes, name='classifier')(pooled)  # [B, K]


def initial_state(config: MDEQConfig, injection: jax.Array) -> list[jax.Array]:
  """z^0 = 0 at every scale, shapes [B, H_0 / 2**i, W_0 / 2**i, C_i]."""
  b, h, w, _ = injection.shape
  return [jnp.zeros((b, h // 2**i, w // 2**i, c), injection.dtype)
          for i, c in enumerate(config.num_channels)]


class ExplicitMDEQ(hk.Module):
  """An explicit network built from the MDEQ cell: L cells with untied weights.

  z^{l+1} = f_{theta_l}(z^l; x), z^0 = 0, l = 0..L-1, followed by the same
  head. With `expansion` shrunk by the caller the parameter count can be made
  close to a weight-tied MDEQ's (see `explicit_config`); this is the explicit
  network of similar size used by the benchmarks.
  """

  def __init__(self, config: MDEQConfig, num_layers: int,
               name: str | None = None):
    super().__init__(name=name)
    self.config = config
    self.num_layers = num_layers

  def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
    """images [B, H, W, C] -> logits [B, K]."""
    injection = Stem(self.config, name='stem')(images)
    z = initial_state(self.config, injection)
    for layer in range(self.num_layers):
      z = MDEQCell(self.config, name=f'cell_{layer}')(z, {'injection': injection})
    return ClassificationHead(self.config, name='head')(z, is_training)


def explicit_config(config: MDEQConfig, num_layers: int) -> MDEQConfig:
  """Shrinks the residual blocks' expansion so L untied cells have about the
  parameter count of one weight-tied cell: E' = max(E / L, 1 / min(C_i)),
  rounded so that E' * C_i stays divisible by the GroupNorm groups."""
  c_min = min(config.num_channels)
  target = config.expansion / num_layers
  # Smallest inner width for the finest scale that is a positive multiple of
  # num_groups, closest to target * c_min.
  inner0 = max(config.num_groups,
               int(round(target * c_min / config.num_groups)) * config.num_groups)
  return config.replace(expansion=inner0 / c_min)


class MDEQClassifier(hk.Module):
  """Stem -> multiscale DEQ (`jreg.deq.DEQ` around `MDEQCell`) -> head.

  Call: `logits, info = MDEQClassifier(...)(images, is_training=...,
  unrolled=False, jacobian_loss=False)`; `info` is the DEQ layer's dict of
  scalars (forward NFE and residuals, Jacobian term when requested).
  """

  def __init__(self, config: MDEQConfig, *,
               forward: deq_lib.SolverConfig,
               backward: deq_lib.BackwardConfig,
               jacobian_vectors: int = 1,
               compute_dtype=None,
               spectral_radius_iters: int = 50,
               name: str | None = None):
    super().__init__(name=name)
    self.config = config
    self.forward = forward
    self.backward = backward
    self.jacobian_vectors = jacobian_vectors
    self.compute_dtype = compute_dtype  # the cell's dtype (jreg.deq.DEQ)
    self.spectral_radius_iters = spectral_radius_iters

  def __call__(self, images: jax.Array, *, is_training: bool,
               unrolled: bool = False, jacobian_loss=False,
               spectral_radius=False):
    """images [B, H, W, C] -> (logits [B, K], info dict of scalars)."""
    cfg = self.config
    injection = Stem(cfg, name='stem')(images)  # [B, H_0, W_0, C_0]
    z0 = initial_state(cfg, injection)  # S x [B, H_i, W_i, C_i]
    x = {'injection': injection}
    if is_training and cfg.dropout > 0:
      # One mask per forward pass, fixed across all solver iterations.
      x['dropout_masks'] = variational_dropout_masks(
          hk.next_rng_key(), [z.shape for z in z0], cfg.dropout)
    deq = deq_lib.DEQ(lambda z, inputs: MDEQCell(cfg, name='mdeq_cell')(z, inputs),
                      forward=self.forward, backward=self.backward,
                      unrolled_steps=cfg.num_layers,
                      jacobian_vectors=self.jacobian_vectors,
                      compute_dtype=self.compute_dtype,
                      spectral_radius_iters=self.spectral_radius_iters,
                      name='deq')
    z_star, info = deq(x, z0, unrolled=unrolled, jacobian_loss=jacobian_loss,
                       spectral_radius=spectral_radius)
    return ClassificationHead(cfg, name='head')(z_star, is_training), info
