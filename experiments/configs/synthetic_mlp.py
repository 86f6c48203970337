"""Explicit-depth baseline on the synthetic 1-D task (experiments/synthetic_mlp.py).

The task of Bai, Koltun & Kolter (ICML 2021), Sec. 5 and Appendix A.1; a
ReLU MLP trained like the paper's DEQ (experiments/configs/deq_synthetic.py):
50 epochs, batch 64, Adam 1e-3 with cosine decay.
"""
import ml_collections

from experiments import configs
from jreg.tasks import checks

NUM_TRAIN = 4096  # jreg.data.synthetic: training pairs


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=64)
  config.batch_size = 64             # global training batch
  config.eval_batch_size = 250       # validation batch
  config.num_steps = 50 * (NUM_TRAIN // 64)  # 50 epochs
  config.learning_rate = 1e-3        # Adam peak, cosine-decayed to 0
  config.optimizer = configs.optimizer('adam', schedule='cosine')
  config.model = ml_collections.ConfigDict()
  config.model.hidden_sizes = (50, 50)  # ReLU layers before the scalar output
  if preset == 'small':
    config.num_steps = 10 * (NUM_TRAIN // 64)  # 10 epochs
    config.learning_rate = 1e-2
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    # A larger step, so that a few epochs already fit the cubic.
    config.num_steps = 5 * (NUM_TRAIN // 64)   # 5 epochs
    config.learning_rate = 1e-2
    config.log_every = 32
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  checks.check_counts(config, 'model.hidden_sizes')
