"""IGR in MNIST MLPs (experiments/igr_mnist_sweep.py).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 5:
5-layer ReLU MLPs of widths {50, 100, 200, 400, 800, 1600} trained on MNIST
with plain SGD, batch 512, softmax cross entropy, at learning rates
h in {0.005, 0.01, 0.05, 0.1, 0.2}; one run per (width, h). Runs with
`regularizer.coefficient` mu > 0 add the explicit penalty mu ||grad L||^2
(Section 6); `sweep.regularizer_coefficient` crosses the grid with several mu.
"""
import ml_collections

from experiments import configs
from jreg import gradient_regularization as gr
from jreg.tasks import checks
from jreg.tasks import igr

PAPER_WIDTHS = (50, 100, 200, 400, 800, 1600)
PAPER_LEARNING_RATES = (0.005, 0.01, 0.05, 0.1, 0.2)


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=200, checkpoint_every=2000)
  config.num_steps = 20000          # SGD steps per run (about 170 epochs)
  config.batch_size = 512           # global training batch
  config.eval_batch_size = 2000     # batch of the final evaluation and R_IG
  config.learning_rate = 0.05       # h: constant, plain SGD (swept below)
  config.stop_train_accuracy = 0.0  # > 0: the paper's stopping rule, stop at the
                                    # first evaluation (every eval_every steps)
                                    # with this training accuracy; num_steps
                                    # is then a cap (0: train num_steps)
  config.model = ml_collections.ConfigDict()
  config.model.width = 400          # units of each hidden layer (swept below)
  config.model.num_layers = 5       # linear layers: num_layers - 1 hidden ReLU
  config.regularizer = ml_collections.ConfigDict()
  config.regularizer.coefficient = 0.0   # mu on ||grad L||^2 (0: plain SGD)
  config.regularizer.method = 'double_backprop'  # | 'hvp' | 'finite_difference'
  config.regularizer.fd_epsilon = gr.DEFAULT_FD_EPSILON  # step of 'finite_difference'
  config.data = configs.data(
      train_examples=0,             # first N training examples (0: all 60,000)
      eval_examples=0)              # first N test examples (0: all 10,000)
  config.sweep = ml_collections.ConfigDict()
  config.sweep.model_width = PAPER_WIDTHS             # one run per width ...
  config.sweep.learning_rate = PAPER_LEARNING_RATES   # ... and h ...
  config.sweep.regularizer_coefficient = (0.0,)       # ... and mu
  if preset == 'small':
    # A reduced grid on an MNIST subset: minutes on 2 CPU cores.
    config.num_steps = 600
    config.log_every = 100
    config.checkpoint_every = 200
    config.data.train_examples = 10240
    config.data.eval_examples = 5000
    config.sweep.model_width = (50, 200, 800)
    config.sweep.learning_rate = (0.01, 0.05, 0.2)
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    # Two plain and two EGR runs of a narrow MLP: seconds.
    config.num_steps = 40
    config.batch_size = 256
    config.eval_batch_size = 1024
    config.log_every = 20
    config.checkpoint_every = 20
    config.data.train_examples = 2048
    config.data.eval_examples = 1000
    config.sweep.model_width = (50,)
    config.sweep.learning_rate = (0.05, 0.2)
    config.sweep.regularizer_coefficient = (0.0, 0.02)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  checks.check_counts(config, 'model.width', 'model.num_layers', 'sweep.model_width')
  checks.check_sizes(config, 'data.train_examples', 'data.eval_examples')
  if 0 < config.data.train_examples < config.batch_size:
    raise ValueError(f'data.train_examples={config.data.train_examples} is '
                     f'smaller than one batch (batch_size={config.batch_size}).')
  checks.check_positive(config, 'sweep.learning_rate')
  if not 0 <= config.stop_train_accuracy <= 1:
    raise ValueError('stop_train_accuracy must be in [0, 1] (0: no stopping '
                     f'rule), got {config.stop_train_accuracy}.')
  if config.stop_train_accuracy and config.eval_every < 1:
    raise ValueError('stop_train_accuracy needs eval_every >= 1: the rule is '
                     'checked at each evaluation.')
  igr.check_regularizer(config.regularizer, config.sweep.regularizer_coefficient)
