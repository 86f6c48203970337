r"""Experiment configs: one file per experiment, `get_config(preset) -> ConfigDict`.

    python -m experiments.NAME --workdir=W \
        --config=experiments/configs/NAME.py:PRESET --config.KEY=VALUE

Presets: `paper` (the default: the paper's hyperparameters), `small` (a
reduced-scale run that finishes on a laptop CPU) and `quickstart` (seconds to
a few minutes; what `experiments.quickstart` runs). Each file also has
`validate(config)`, raising `ValueError` with one sentence for a value out of
range; `jreg.cli.validate` runs it with the range checks common to every
experiment.

One naming scheme across every experiment (a key that exists in two
experiments means the same thing in both):

  seed                  random seed (>= 0)
  num_steps             training length in optimiser steps (never epochs)
  batch_size            global training batch, split over devices and hosts
  eval_batch_size       global evaluation batch
  learning_rate         peak learning rate (> 0)
  optimizer.*           name, schedule, warmup_steps, weight_decay, momentum,
                        grad_clip
  data.*                source ('auto' | 'local' | 'download' | 'tfds'), dir
                        (None: the loaders' default), name, train_examples,
                        eval_examples (0: all)
  parallel              'single' | 'sharded' | 'pmap'
  log_every, eval_every, checkpoint_every   intervals in steps (0: at the end)
  checkpoint_minutes    also checkpoint every this many minutes of training
                        (0: off; on in `paper` and `small`, off in
                        `quickstart`)
  model.*               the architecture
  deq.forward.*, deq.backward.*             solver, max_iter, tol, stop_mode
                        (damping: the 'reversible' solver's beta)
  deq.compute_dtype     dtype of the equilibrium cell: 'float32' | 'bfloat16'
                        | 'float16' (mixed precision; float32 master weights)
  jacobian.*            weight (gamma), probability (p), their *_final values,
                        num_vectors; adaptive, target, gain, weight_min,
                        weight_max, ema, radius_iters (the gamma controller)
  probe.*               NFE / accuracy-at-NFE probes
  sweep.KEY             multi-run experiments: a tuple of values of KEY (a
                        top-level key, or GROUP_LEAF for GROUP.LEAF, e.g.
                        sweep.jacobian_weight sets jacobian.weight); the runs
                        are the cross product, named `key=value,...`, each in
                        W/runs/<name>/

The helpers below build the groups every experiment shares, so their keys and
comments exist once.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = ('paper', 'small', 'quickstart')


def check_preset(preset: str) -> str:
  """Returns `preset`, or raises ValueError naming the presets."""
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; the presets are {PRESETS}.')
  return preset


CHECKPOINT_MINUTES = 10.0  # time-based checkpoints of `paper` and `small`


def base(*, log_every: int = 50, eval_every: int = 0,
         checkpoint_every: int = 0, seed: int = 0,
         checkpoint_minutes: float = CHECKPOINT_MINUTES
         ) -> ml_collections.ConfigDict:
  """The keys of every run: seed, parallel mode, the step intervals and the
  time-based checkpoint interval (a `quickstart` preset sets it to 0)."""
  config = ml_collections.ConfigDict()
  config.seed = seed                  # random seed of the run (>= 0)
  config.parallel = 'single'          # 'single': jax.jit on one device;
                                      # 'sharded': jit over a device mesh;
                                      # 'pmap': jax.pmap with pmean
  config.log_every = log_every        # steps between logged records (>= 1)
  config.eval_every = eval_every      # steps between evaluations (0: at the end)
  config.checkpoint_every = checkpoint_every  # steps between checkpoints (0: end)
  config.checkpoint_minutes = float(checkpoint_minutes)  # also checkpoint every
                                      # this many minutes (0: off); pre-emption
                                      # (SIGTERM, SIGUSR1) checkpoints anyway
  return config


def data(**extra) -> ml_collections.ConfigDict:
  """`data.source`, `data.dir` and the experiment's own data keys (`extra`)."""
  group = ml_collections.ConfigDict()
  group.source = 'auto'   # 'auto': local files when present, else download;
                          # 'local' | 'download' | 'tfds'
  group.dir = config_dict.placeholder(str)  # None: the loaders' default folder
  for key, value in extra.items():
    group[key] = value
  return group


def optimizer(name: str = 'adam', *, schedule: str = 'cosine',
              warmup_steps: int = 0, weight_decay: float = 0.0,
              **extra) -> ml_collections.ConfigDict:
  """`optimizer.*`: the optax optimiser and its learning-rate schedule."""
  group = ml_collections.ConfigDict()
  group.name = name                  # 'adam' | 'sgd' (Nesterov momentum)
  group.schedule = schedule          # 'constant' | 'cosine' | 'warmup_cosine'
  group.warmup_steps = warmup_steps  # linear warm-up steps (warmup_cosine)
  group.weight_decay = weight_decay  # L2 coefficient added to the gradient
  for key, value in extra.items():
    group[key] = value
  return group


def solver(name: str, max_iter: int, tol: float, stop_mode: str = 'rel',
           damping: float | None = None) -> ml_collections.ConfigDict:
  """One fixed-point solve (`jreg.deq.SolverConfig`)."""
  group = ml_collections.ConfigDict()
  group.solver = name          # 'broyden' | 'anderson' | 'fixed_point' | 'reversible'
  group.max_iter = max_iter    # evaluation budget (NFE), >= 1
  group.tol = tol              # residual tolerance (> 0)
  group.stop_mode = stop_mode  # 'abs' | 'rel' residual
  if damping is not None:
    group.damping = damping    # 'reversible': beta in (0, 2), not 1
  return group


def jacobian(weight: float = 0.0, probability: float = 0.0, *,
             num_vectors: int = 1, **extra) -> ml_collections.ConfigDict:
  """`jacobian.*`: gamma ||J_f(z*)||_F^2 / d on a fraction p of the steps."""
  group = ml_collections.ConfigDict()
  group.weight = weight            # gamma (>= 0; 0: no Jacobian term)
  group.probability = probability  # p, fraction of steps with the term, [0, 1]
  group.num_vectors = num_vectors  # Hutchinson vectors per estimate (>= 1)
  for key, value in extra.items():
    group[key] = value
  return group


def adaptive_jacobian(group: ml_collections.ConfigDict, *, target: float,
                      gain: float, weight_min: float, weight_max: float,
                      ema: float = 0.9, radius_iters: int = 20) -> None:
  """Adds the gamma controller's keys to a `jacobian` group (jreg.deq.adaptive)."""
  group.adaptive = 'none'          # 'none': the fixed / ramped gamma;
                                   # 'nfe' | 'spectral_radius': adapt gamma to
                                   # hold the training forward NFE or
                                   # rho(J_f(z*)) at `target`
  group.target = target            # the held value (> 0)
  group.gain = gain                # k: log gamma += k * (m - target) / target
  group.weight_min = weight_min    # gamma's bounds (0 < min <= weight <= max);
  group.weight_max = weight_max    # the run starts at gamma = weight
  group.ema = ema                  # EMA decay of the measurement, [0, 1)
  group.radius_iters = radius_iters  # power iterations per rho estimate


def mdeq_model(name: str) -> ml_collections.ConfigDict:
  """`model.*`: a named MDEQ architecture and fields that replace its values."""
  group = ml_collections.ConfigDict()
  group.name = name                   # jreg.models.mdeq.mdeq_config name:
                                      # 'cifar10' | 'cifar10_small' |
                                      # 'imagenet_small' | 'tiny'
  group.network = 'mdeq'              # 'mdeq' | 'explicit' (untied unrolled cells)
  group.explicit_num_layers = 4       # L of the explicit network
  # None keeps the named architecture's value (jreg.models.mdeq.MDEQConfig):
  group.num_channels = config_dict.placeholder(tuple)   # C_i per scale
  group.head_channels = config_dict.placeholder(tuple)  # head bottlenecks
  group.final_channels = config_dict.placeholder(int)   # head's last 1x1 conv
  group.num_classes = config_dict.placeholder(int)      # K (must match labels)
  group.expansion = config_dict.placeholder(float)      # residual block width E
  group.num_groups = config_dict.placeholder(int)       # GroupNorm groups
  group.dropout = config_dict.placeholder(float)        # variational dropout
  group.weight_norm = config_dict.placeholder(bool)
  group.downsample_times = config_dict.placeholder(int)  # stride-2 stem convs
  group.block_gn_affine = config_dict.placeholder(bool)
  group.fuse_gn_affine = config_dict.placeholder(bool)
  group.post_gn_affine = config_dict.placeholder(bool)
  group.num_layers = config_dict.placeholder(int)       # unrolled pre-training depth
  group.image_size = config_dict.placeholder(int)       # documentation only
  return group


def deq(forward_nfe: int, backward_nfe: int, tol: float, stop_mode: str,
        pretrain_steps: int) -> ml_collections.ConfigDict:
  """`deq.*` of an MDEQ: Broyden forward / backward, evaluation budget, pre-training."""
  group = ml_collections.ConfigDict()
  group.forward = solver('broyden', forward_nfe, tol, stop_mode)
  group.backward = solver('broyden', backward_nfe, tol, stop_mode)
  group.backward.mode = 'implicit'     # 'implicit' | 'phantom' | 'jfb' | 'reversible'
  group.eval_max_iter = forward_nfe    # forward budget when testing
  group.pretrain_steps = pretrain_steps  # unrolled weight-tied phase
  group.compute_dtype = 'float32'  # DEQ cell dtype: 'float32' | 'bfloat16' |
                                   # 'float16' (params, grads, solvers stay
                                   # float32; faster on accelerators only)
  return group


def probe(max_iter: int, examples: int, batch_size: int) -> ml_collections.ConfigDict:
  """`probe.*`: NFE needed to reach `tol` on the first `examples` test images."""
  group = ml_collections.ConfigDict()
  group.max_iter = max_iter      # budget of the NFE-to-tolerance probe
  group.tol = 1e-3               # its tolerance (relative residual)
  group.examples = examples      # test examples probed (0: no probe)
  group.batch_size = batch_size
  return group
