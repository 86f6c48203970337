"""IGR in a two-parameter model (experiments/igr_two_parameter.py).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 4 and
Fig. 1: the loss E(a, b) = 1/2 (y - a b x)^2 of one data point, gradient
descent from (a0, b0) = (2.8, 3.5) against the exact flow of E and the
modified flow of E + (h/4)||grad E||^2. The paper gives the start point, not
x and y; x = 1, y = 3 keep h up to ~0.075 stable at the start.
"""
import ml_collections

from experiments import configs
from jreg.tasks import checks


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict()
  config.data.x = 1.0              # the one data point (x, y); minima a b = y/x
  config.data.y = 3.0
  config.start = ml_collections.ConfigDict()
  config.start.a = 2.8             # theta_0 = (a0, b0), as in [BD21] Fig. 1
  config.start.b = 3.5
  config.horizon = 20.0            # time T = n h of the trajectories and endpoints
  config.rk4_substeps = 20000      # RK4 steps per flow integration (float64)
  config.phase_plane = ml_collections.ConfigDict()
  config.phase_plane.small_learning_rate = 0.005    # h_S: GD near the exact flow
  config.phase_plane.moderate_learning_rate = 0.03  # h_M: GD near the modified flow
  config.orders = ml_collections.ConfigDict()
  config.orders.time = 0.5         # T at which the error orders are measured
  config.orders.num_steps = (20, 40, 80, 160, 320, 640)  # n; h = T / n
  config.endpoints = ml_collections.ConfigDict()
  # GD run to the horizon at each h, up to ~2/lambda_max(hess E(theta_0)) = 0.075.
  config.endpoints.learning_rates = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06)
  if preset == 'small':
    config.rk4_substeps = 8000
  elif preset == 'quickstart':
    config.rk4_substeps = 4000
    config.orders.num_steps = (20, 40, 80, 160, 320)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  checks.check_positive(config, 'data.x', 'horizon', 'orders.time',
                     'phase_plane.small_learning_rate',
                     'phase_plane.moderate_learning_rate',
                     'endpoints.learning_rates')
  if not config.data.y / config.data.x > 0:
    raise ValueError('data.y / data.x must be > 0 so that the minima a b = y/x '
                     'have a balanced point a = b.')
  checks.check_counts(config, 'orders.num_steps')
  if len(config.orders.num_steps) < 3:
    raise ValueError('orders.num_steps needs at least 3 values to fit a slope.')
  if config.rk4_substeps < 10:
    raise ValueError(f'rk4_substeps must be >= 10, got {config.rk4_substeps}.')
