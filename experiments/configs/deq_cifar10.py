"""MDEQ with Jacobian regularisation on CIFAR-10 (experiments/deq_cifar10.py).

`paper`: Bai, Koltun & Kolter, ICML 2021, Table 4 and Appendix A (the
reference `cls_mdeq_LARGE_reg.yaml` for what the table leaves out): the
4-scale MDEQ [28, 56, 112, 224], 200 epochs of batch 96, Adam 1e-3 with cosine
decay, Broyden forward / backward budgets 7 / 8, 16,000 unrolled pre-training
steps, gamma = 0.5 on p = 0.05 of the steps.
`small`: the reduced-scale run of BUILD_NOTES.md (MDEQ) (2 CPU cores).
`quickstart`: a few steps of a tiny MDEQ on a CIFAR-10 subset.
"""
import ml_collections

from experiments import configs

CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_LABELS = 10
IMAGE_SIZE = 32


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=100, eval_every=2_000, checkpoint_every=2_000)
  config.batch_size = 96          # global training batch
  config.eval_batch_size = 500
  config.num_steps = 200 * (CIFAR10_TRAIN_SIZE // 96)  # 200 epochs
  config.learning_rate = 1e-3     # peak, cosine decay to 0
  config.optimizer = configs.optimizer('adam', schedule='cosine', momentum=0.9)
  config.data = configs.data(train_examples=0,  # training prefix (0: all 50,000)
                             eval_examples=0)   # test prefix (0: all 10,000)
  config.model = configs.mdeq_model('cifar10')
  config.deq = configs.deq(7, 8, 1e-3, 'rel', pretrain_steps=16_000)
  config.jacobian = configs.jacobian(
      weight=0.5, probability=0.05,
      weight_final=0.5,        # gamma at the end (linear ramp from weight)
      probability_final=0.05,  # p at the end
      pretrain_weight=0.0)     # gamma on every unrolled pre-training step
  configs.adaptive_jacobian(config.jacobian, target=6.0, gain=0.05,
                            weight_min=0.01, weight_max=50.0)
  config.probe = configs.probe(40, 500, 50)
  if preset == 'small':
    config.model.name = 'cifar10_small'
    config.batch_size = 32
    config.num_steps = 400
    config.deq = configs.deq(10, 10, 1e-3, 'rel', pretrain_steps=100)
    config.probe = configs.probe(30, 200, 50)
    config.data.eval_examples = 500
    config.eval_batch_size = 250
    config.jacobian.probability = config.jacobian.probability_final = 0.5
    config.log_every, config.eval_every, config.checkpoint_every = 10, 100, 0
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    config.model.name = 'tiny'
    config.model.num_classes = CIFAR10_LABELS
    config.batch_size = 8
    config.num_steps = 3
    config.deq = configs.deq(4, 4, 1e-3, 'rel', pretrain_steps=0)
    config.probe = configs.probe(6, 16, 16)
    config.data.train_examples, config.data.eval_examples = 64, 32
    config.eval_batch_size = 32
    config.jacobian.probability = config.jacobian.probability_final = 1.0
    config.log_every, config.eval_every, config.checkpoint_every = 1, 0, 0
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  from jreg.tasks import mdeq  # pylint: disable=g-import-not-at-top
  mdeq.check(config)
  mdeq.check_model(config, CIFAR10_LABELS, IMAGE_SIZE)
