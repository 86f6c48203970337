"""Gradient-noise bias of ‖∇L_B‖² on MNIST (experiments/gradient_noise_bias.py).

Not a figure of either paper: it measures the upward bias of the minibatch
gradient-norm penalty (discretisation_drift's split-batch estimate removes
it) for a one-hidden-layer ReLU MLP, at initialisation and after `num_steps`
steps of plain SGD.
"""
import ml_collections

from experiments import configs

MNIST_TRAIN_SIZE = 60000


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=60)
  config.batch_size = 128          # SGD batch of the training phase
  config.num_steps = 300           # SGD steps before the second measurement
  config.learning_rate = 0.1       # plain SGD step
  config.data = configs.data(train_examples=0)  # population (0: all 60,000)
  config.model = ml_collections.ConfigDict()
  config.model.width = 100         # hidden units of the 784-width-10 ReLU MLP
  config.measure = ml_collections.ConfigDict()
  config.measure.batch_sizes = (16, 64, 256, 1024)  # even: split in halves
  config.measure.num_draws = 400   # random batches per batch size
  config.measure.chunk_size = 500  # examples per per-example-gradient chunk
  if preset == 'small':
    config.data.train_examples = 10000
    config.measure.num_draws = 200
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    config.data.train_examples = 2000
    config.measure.batch_sizes = (16, 128)
    config.measure.num_draws = 50
    config.num_steps = 50
    config.log_every = 10
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  for key in ('model.width', 'measure.num_draws', 'measure.chunk_size'):
    group, leaf = key.split('.')
    if config[group][leaf] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[group][leaf]}.')
  if config.data.train_examples < 0:
    raise ValueError('data.train_examples must be >= 0 (0: all).')
  sizes = config.measure.batch_sizes
  if not sizes or min(sizes) < 2 or any(b % 2 for b in sizes):
    raise ValueError('measure.batch_sizes must be even numbers >= 2 (each '
                     'batch is split into two halves).')
  population = config.data.train_examples or MNIST_TRAIN_SIZE
  if max(sizes) > population:
    raise ValueError(f'measure.batch_sizes: {max(sizes)} exceeds the '
                     f'population of {population} examples.')
  if population % config.measure.chunk_size:
    raise ValueError(f'measure.chunk_size={config.measure.chunk_size} must '
                     f'divide the population of {population} examples.')
