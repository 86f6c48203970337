"""The quickstart (experiments/quickstart.py): every experiment at its quickstart preset.

Only the settings that every experiment shares are here; they are forwarded to
each experiment's config. Anything else is set per experiment with that
experiment's own command.
"""
import ml_collections

from experiments import configs

# (name, module, what it shows). Order: cheapest first.
EXPERIMENTS = (
    ('synthetic_mlp', 'experiments.synthetic_mlp',
     'explicit-depth MLP baseline on the synthetic 1-D task'),
    ('igr_two_parameter', 'experiments.igr_two_parameter',
     'IGR: gradient descent against the exact and the modified flow'),
    ('igr_mnist_sweep', 'experiments.igr_mnist_sweep',
     'IGR: MNIST MLP sweep over width and learning rate, with EGR runs'),
    ('egr_cifar10', 'experiments.egr_cifar10',
     'EGR: CIFAR-10 ResNet with and without the gradient penalty'),
    ('deq_synthetic', 'experiments.deq_synthetic',
     'DEQ + Jacobian regularisation on the synthetic 1-D task'),
    ('deq_cifar10', 'experiments.deq_cifar10',
     'MDEQ with Jacobian regularisation on CIFAR-10'),
    ('deq_imagenet', 'experiments.deq_imagenet',
     'MDEQ-small pipeline end to end on the ImageNet-layout subset'),
    ('deq_wikitext', 'experiments.deq_wikitext',
     'DEQ-Transformer with Jacobian regularisation on WikiText-2'),
)


def selected(config: ml_collections.ConfigDict) -> list[str]:
  """The experiment names of `config.only` (all when empty)."""
  names = [name.strip() for name in config.only.split(',') if name.strip()]
  return names or [name for name, _, _ in EXPERIMENTS]


def get_config(preset: str = 'quickstart') -> ml_collections.ConfigDict:
  """The quickstart's config; every preset is the same (each experiment runs
  its own `quickstart` preset)."""
  if preset != 'paper':
    configs.check_preset(preset)
  config = ml_collections.ConfigDict()
  config.only = ''               # comma-separated experiment names ('': all)
  config.data = configs.data()   # forwarded to every experiment that reads data
  config.parallel = 'single'     # forwarded to every experiment
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for an unknown experiment name."""
  names = [name for name, _, _ in EXPERIMENTS]
  unknown = sorted(set(selected(config)) - set(names))
  if unknown:
    raise ValueError(f'config.only names unknown experiments {unknown}; the '
                     f'experiments are {names}.')
