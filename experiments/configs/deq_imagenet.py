"""MDEQ-small with Jacobian regularisation on ImageNet (experiments/deq_imagenet.py).

`paper`: Bai, Koltun & Kolter, ICML 2021, Table 4 and Appendix A (reference
`cls_mdeq_SMALL_reg.yaml` for the rest): MDEQ-small [32, 64, 128, 256] on
224x224 images, 120 epochs of batch 112, SGD (Nesterov 0.9) at 0.05 with cosine
decay and weight decay 5e-5, Broyden 14 / 14 with absolute residuals, 510,000
unrolled pre-training steps with gamma = 0.03 on each, then gamma ramped from 2
to 3 on p = 0.1 of the steps.
`small`: the pipeline check on the imagenet-mini stand-in (10 classes) at
64 px with the tiny MDEQ (BUILD_NOTES.md (MDEQ)).
`quickstart`: two steps of a tiny MDEQ on imagenet-mini at 32 px.
"""
import ml_collections

from experiments import configs

IMAGENET_TRAIN_SIZE = 1_281_167


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=500, eval_every=20_000, checkpoint_every=5_000)
  config.batch_size = 112         # global training batch
  config.eval_batch_size = 200
  config.num_steps = 120 * (IMAGENET_TRAIN_SIZE // 112)  # 120 epochs
  config.learning_rate = 0.05     # peak, cosine decay to 0
  config.optimizer = configs.optimizer('sgd', schedule='cosine',
                                       weight_decay=5e-5, momentum=0.9)
  config.data = configs.data(
      eval_examples=0,    # validation prefix (0: all)
      image_size=224,     # side of the square training / evaluation images
      workers=8)          # grain decoding processes (0: in this process)
  config.model = configs.mdeq_model('imagenet_small')
  config.deq = configs.deq(14, 14, 1e-3, 'abs', pretrain_steps=510_000)
  config.jacobian = configs.jacobian(
      weight=2.0, probability=0.1,
      weight_final=3.0,        # gamma at the end (linear ramp from weight)
      probability_final=0.1,   # p at the end
      pretrain_weight=0.03)    # gamma on every unrolled pre-training step
  config.probe = configs.probe(40, 1_000, 50)
  if preset in ('small', 'quickstart'):
    # The tiny MDEQ with two stride-2 stem convs, in-process decoding, the
    # paper's optimiser and gamma ramp, p = 1.
    config.model.name = 'tiny'
    config.model.downsample_times = 2
    config.data.workers = 0
    config.deq = configs.deq(4, 4, 1e-3, 'abs', pretrain_steps=0)
    config.jacobian.probability = config.jacobian.probability_final = 1.0
    config.log_every, config.eval_every, config.checkpoint_every = 1, 0, 0
  if preset == 'small':
    # The imagenet-mini pipeline check of BUILD_NOTES.md (MDEQ): 64 px (16x16
    # finest equilibrium), 5 pre-training + 15 DEQ steps, batch 16.
    config.data.image_size = 64
    config.data.workers = 2
    config.data.eval_examples = 100
    config.batch_size = 16
    config.eval_batch_size = 50
    config.num_steps = 20
    config.deq.pretrain_steps = 5
    config.probe = configs.probe(6, 50, 50)
    config.log_every = 5
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    config.data.image_size = 32
    config.data.eval_examples = 16
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_steps = 2
    config.probe = configs.probe(6, 8, 8)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  from jreg.tasks import mdeq  # pylint: disable=g-import-not-at-top
  mdeq.check(config)
  if config.data.workers < 0:
    raise ValueError(f'data.workers must be >= 0, got {config.data.workers}.')
  # The number of classes comes from the data; the image size is checked here.
  num_classes = mdeq.model_config(config, 1000).num_classes
  mdeq.check_model(config, num_classes, config.data.image_size)
