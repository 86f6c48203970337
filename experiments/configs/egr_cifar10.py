"""Explicit gradient regularisation of a CIFAR-10 ResNet (experiments/egr_cifar10.py).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 6:
a ResNet-18 trained on CIFAR-10 on L + mu ||grad L||^2 for several mu
(mu = 0: plain training), each with several seeds. Choices the paper leaves
open: SGD with Nesterov momentum 0.9 and a cosine-decayed learning rate from
0.1, batch 128, 100 epochs, no weight decay (so the gradient penalty is the
only explicit regulariser), pad-4 crop and flip augmentation. The penalty's
gradient by forward-over-reverse ('hvp'): the exact H grad L, and on a
2-core CPU a ResNet-20 step took 1.56 s against 2.86 s by double backprop
(plain: 0.66 s; BUILD_NOTES.md, "Reproduction report").
"""
import ml_collections

from experiments import configs
from jreg import gradient_regularization as gr
from jreg.models import resnet
from jreg.tasks import checks
from jreg.tasks import igr

NUM_TRAIN = 50000  # CIFAR-10 training examples


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=100, checkpoint_every=2000)
  config.batch_size = 128            # global training batch
  config.eval_batch_size = 500       # test batch
  config.num_steps = 100 * NUM_TRAIN // 128  # 100 epochs
  config.learning_rate = 0.1         # peak, cosine-decayed to 0
  config.optimizer = configs.optimizer('sgd', schedule='cosine', momentum=0.9,
                                       grad_clip=0.0)
  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'     # 'resnet18' | 'resnet20' | 'resnet8'
  config.regularizer = ml_collections.ConfigDict()
  config.regularizer.coefficient = 0.0   # mu on ||grad L||^2 (swept below)
  config.regularizer.method = 'hvp'  # | 'double_backprop' | 'finite_difference'
  config.regularizer.fd_epsilon = gr.DEFAULT_FD_EPSILON  # step of 'finite_difference'
  config.data = configs.data(
      train_examples=0,              # first N training examples (0: all 50,000)
      eval_examples=0)               # first N test examples (0: all 10,000)
  config.sweep = ml_collections.ConfigDict()
  config.sweep.regularizer_coefficient = (0.0, 0.001, 0.01, 0.05)  # one run per mu ...
  config.sweep.seed = (0, 1)         # ... and seed
  if preset == 'small':
    # ResNet-20 for 2,000 steps on a 10,000-image subset (a reduced run for
    # an accelerator, or a long one on a CPU).
    config.model.name = 'resnet20'
    config.num_steps = 2000
    config.checkpoint_every = 500
    config.data.train_examples = 10000
    config.data.eval_examples = 2000
    config.sweep.regularizer_coefficient = (0.0, 0.01)
    config.sweep.seed = (0,)
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    # ResNet-8 (the 6n + 2 family with n = 1), 3 steps on 256 images, plain
    # and EGR: a pipeline check in seconds, accuracies meaningless.
    config.model.name = 'resnet8'
    config.batch_size = 16
    config.eval_batch_size = 128
    config.num_steps = 3
    config.log_every = 1
    config.checkpoint_every = 0
    config.data.train_examples = 256
    config.data.eval_examples = 128
    config.sweep.regularizer_coefficient = (0.0, 0.01)
    config.sweep.seed = (0,)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  if config.model.name not in resnet.MODELS:
    raise ValueError(f'model.name must be one of {sorted(resnet.MODELS)}, got '
                     f'{config.model.name!r}.')
  checks.check_sizes(config, 'data.train_examples', 'data.eval_examples',
                  'sweep.seed')
  if 0 < config.data.train_examples < config.batch_size:
    raise ValueError(f'data.train_examples={config.data.train_examples} is '
                     f'smaller than one batch (batch_size={config.batch_size}).')
  igr.check_regularizer(config.regularizer, config.sweep.regularizer_coefficient)
