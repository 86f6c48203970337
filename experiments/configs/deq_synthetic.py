"""Synthetic 1-D DEQ with Jacobian regularisation (experiments/deq_synthetic.py).

Bai, Koltun & Kolter, ICML 2021, Sec. 5 / Fig. 5, Appendix A.1 / Table 4: a
scalar DEQ f(z; x) = W2^T ReLU(W1 z + U x + b) with 50 hidden units, trained
on y = 1.5x^3 + x^2 - 5x + 2 sin x - 3 + delta for 50 epochs (batch 64, Adam
1e-3 with cosine decay), Broyden forward / backward with 6 / 6 NFE and
tolerances 1e-3 / 1e-4, the Jacobian term on p = 0.4 of the steps, one run per
gamma in {0, 1, 2, 4}.
"""
import ml_collections

from experiments import configs
from jreg.tasks import deq as deq_task
from jreg.tasks import runs as runs_lib

NUM_TRAIN = 4096  # jreg.data.synthetic.NUM_TRAIN: training examples


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=64)
  config.batch_size = 64            # global training batch
  config.eval_batch_size = 250      # validation batch
  config.num_steps = 50 * (NUM_TRAIN // 64)  # 50 epochs
  config.learning_rate = 1e-3       # Adam peak, cosine-decayed to 0
  config.optimizer = configs.optimizer('adam', schedule='cosine')
  config.model = ml_collections.ConfigDict()
  config.model.hidden = 50          # hidden units of f
  config.model.init_std = 0.1       # N(0, 0.01) read as variance 0.01
  config.deq = ml_collections.ConfigDict()
  # z is a scalar, so the residuals are absolute.
  config.deq.forward = configs.solver('broyden', 6, 1e-3, 'abs')
  config.deq.backward = configs.solver('broyden', 6, 1e-4, 'abs')
  config.deq.compute_dtype = 'float32'  # cell dtype: 'float32' | 'bfloat16' |
                                        # 'float16' (params, grads, solvers
                                        # stay float32; faster on accelerators)
  config.jacobian = configs.jacobian(weight=0.0, probability=0.4)
  configs.adaptive_jacobian(config.jacobian, target=0.3, gain=0.05,
                            weight_min=0.1, weight_max=100.0)
  config.probe = ml_collections.ConfigDict()
  config.probe.max_iter = 100       # the "high limit" of the NFE-to-tolerance probe
  config.sweep = ml_collections.ConfigDict()
  config.sweep.jacobian_weight = (0.0, 1.0, 2.0, 4.0)  # gamma, one run each
  config.sweep.seed = (0,)          # seeds, one run each
  if preset == 'small':
    config.num_steps = 10 * (NUM_TRAIN // 64)  # 10 epochs
    config.learning_rate = 1e-2
  elif preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    # A larger step, so that 3 epochs already fit the cubic.
    config.num_steps = 3 * (NUM_TRAIN // 64)
    config.learning_rate = 1e-2
    config.log_every = 32
    config.sweep.jacobian_weight = (0.0, 2.0)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  deq_task.solver_config(config.deq.forward, 'deq.forward')
  deq_task.backward_config(config.deq.backward, 'deq.backward')
  deq_task.compute_dtype(config.deq)
  deq_task.check_jacobian(config.jacobian)
  for run in runs_lib.expand(config):  # gamma of each run (adaptive bounds)
    deq_task.check_jacobian(run.config.jacobian)
  if min(config.sweep.jacobian_weight) < 0:
    raise ValueError('sweep.jacobian_weight (gamma) values must be >= 0, got '
                     f'{config.sweep.jacobian_weight}.')
  if config.model.hidden < 1 or config.model.init_std <= 0:
    raise ValueError('model.hidden must be >= 1 and model.init_std > 0.')
  if config.probe.max_iter < 1:
    raise ValueError(f'probe.max_iter must be >= 1, got {config.probe.max_iter}.')
