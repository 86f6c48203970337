"""Cost of the gradient penalty (experiments/bench_gradient_penalty.py).

The engine's SGD update step of the MNIST MLP of [BD21] Section 5 (5 linear
layers, batch 512) timed plain and with each penalty method of
`jreg.gradient_regularization`, as ratios to the plain step measured in the
same run (goals on a 2-core CPU: finite difference <= 2.1x, HVP and double
backprop <= 2.8x); and the accuracy of the finite-difference penalty term
against the exact one for several epsilon.
"""
import ml_collections

from experiments import configs
from jreg import gradient_regularization as gr
from jreg.tasks import checks


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = ml_collections.ConfigDict()
  config.seed = 0                    # parameters and random inputs
  config.batch_size = 512            # examples per timed step
  config.learning_rate = 0.05        # SGD step h (and the logged lambda = h m / 4)
  config.model = ml_collections.ConfigDict()
  config.model.widths = (400, 1600)  # MLP widths benchmarked, one after another
  config.model.num_layers = 5        # linear layers
  config.regularizer = ml_collections.ConfigDict()
  config.regularizer.methods = gr.METHODS   # penalty methods timed against plain
  config.regularizer.coefficient = 0.01     # mu on ||grad L||^2 (> 0)
  config.regularizer.fd_epsilon = gr.DEFAULT_FD_EPSILON  # step of 'finite_difference'
  config.timing = ml_collections.ConfigDict()
  config.timing.enabled = True       # False: only the finite-difference accuracy
  config.timing.repeats = 15         # timed repeats per variant (median)
  config.timing.steps_per_repeat = 5  # steps per timed repeat
  config.finite_difference = ml_collections.ConfigDict()
  config.finite_difference.epsilons = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5)
  config.finite_difference.width = 400      # MLP width of the accuracy study
  config.finite_difference.batches = 4      # MNIST batches averaged over
  config.finite_difference.warmup_steps = 20  # plain SGD steps before measuring
  config.data = configs.data()
  if preset == 'small':
    config.model.widths = (400,)
    config.timing.repeats = 7
  elif preset == 'quickstart':
    config.model.widths = (64,)
    config.batch_size = 128
    config.timing.repeats = 3
    config.timing.steps_per_repeat = 2
    config.finite_difference.width = 64
    config.finite_difference.epsilons = (1e-2, 1e-3)
    config.finite_difference.batches = 2
    config.finite_difference.warmup_steps = 2
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  checks.check_counts(config, 'model.widths', 'model.num_layers',
                      'timing.repeats', 'timing.steps_per_repeat',
                      'finite_difference.width', 'finite_difference.batches')
  checks.check_sizes(config, 'finite_difference.warmup_steps')
  checks.check_positive(config, 'regularizer.coefficient',
                        'regularizer.fd_epsilon', 'finite_difference.epsilons')
  unknown = sorted(set(config.regularizer.methods) - set(gr.METHODS))
  if not config.regularizer.methods or unknown:
    raise ValueError(f'regularizer.methods must be a non-empty tuple of '
                     f'{gr.METHODS}, got {config.regularizer.methods!r}.')
