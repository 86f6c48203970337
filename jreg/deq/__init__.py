"""Deep equilibrium layers with Jacobian regularisation (Bai et al., 2019; 2021).

Public API (stable; additions only):

  solvers     SolverConfig, SolverStats, solve, fixed_point_iteration,
              anderson, broyden, flatten_batch
  implicit    BackwardConfig, fixed_point, unrolled_fixed_point,
              probe_to_metrics, STATS_PROBE_SIZE
  jacobian    jacobian_frobenius_estimate, jacobian_frobenius_exact,
              spectral_radius, regularization_gate
  adaptive    ControllerConfig, ControllerState, init, weight, update,
              haiku_weight (the adaptive gamma; use as jreg.deq.adaptive.*)
  module      DEQ (Haiku), value_and_grad (grad_fn with backward stats),
              cell_params (the cell's params out of a model's params),
              step_count (Haiku-state step counter for schedules)
"""
from jreg.deq import adaptive
from jreg.deq.implicit import BackwardConfig
from jreg.deq.implicit import fixed_point
from jreg.deq.implicit import probe_to_metrics
from jreg.deq.implicit import STATS_PROBE_SIZE
from jreg.deq.implicit import unrolled_fixed_point
from jreg.deq.jacobian import jacobian_frobenius_estimate
from jreg.deq.jacobian import jacobian_frobenius_exact
from jreg.deq.jacobian import regularization_gate
from jreg.deq.jacobian import spectral_radius
from jreg.deq.module import cell_params
from jreg.deq.module import DEQ
from jreg.deq.module import step_count
from jreg.deq.module import value_and_grad
from jreg.deq.solvers import anderson
from jreg.deq.solvers import broyden
from jreg.deq.solvers import fixed_point_iteration
from jreg.deq.solvers import flatten_batch
from jreg.deq.solvers import solve
from jreg.deq.solvers import SolverConfig
from jreg.deq.solvers import SolverStats

__all__ = (
    'BackwardConfig', 'DEQ', 'adaptive', 'cell_params', 'SolverConfig', 'SolverStats',
    'STATS_PROBE_SIZE',
    'anderson', 'broyden', 'fixed_point', 'fixed_point_iteration',
    'flatten_batch', 'jacobian_frobenius_estimate', 'jacobian_frobenius_exact',
    'probe_to_metrics', 'regularization_gate', 'solve', 'spectral_radius',
    'step_count', 'unrolled_fixed_point', 'value_and_grad',
)
