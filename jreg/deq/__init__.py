"""Deep equilibrium layers with Jacobian regularisation (Bai et al., 2019; 2021).

Public API (stable; additions only)::

  solvers     SolverConfig, SolverStats, solve, fixed_point_iteration,
              anderson, broyden, flatten_batch; the solver registry:
              register_solver, unregister_solver, registered_solvers,
              get_solver, RegisteredSolver; for writing solvers:
              fixed_point_loop, point_stats, residuals
  krylov      gmres, bicgstab (affine maps only: the backward solve;
              registered as 'gmres', 'bicgstab')
  implicit    BackwardConfig, fixed_point, unrolled_fixed_point,
              probe_to_metrics, STATS_PROBE_SIZE, fixed_point_states;
              unconverged solves and mismatched states: ConvergenceWarning,
              ConvergenceError, StateMismatchError,
              reset_convergence_reports
  correction  fp_correction, correction_weights, state_indices
  reversible  reversible_iteration, reversible_fixed_point (exact O(1)-memory
              backward of BackwardConfig(mode='reversible'))
  precision   mixed_precision_cell (a cell evaluated in bfloat16 / float16)
  jacobian    jacobian_frobenius_estimate, jacobian_frobenius_exact,
              spectral_radius, regularization_gate
  adaptive    ControllerConfig, ControllerState, init, weight, update,
              haiku_weight (the adaptive gamma; use as jreg.deq.adaptive.*)
  module      DEQ (Haiku), value_and_grad (grad_fn with backward stats),
              cell_params (the cell's params out of a model's params),
              step_count (Haiku-state step counter for schedules)
"""
from jreg.deq import adaptive
from jreg.deq.correction import correction_weights
from jreg.deq.correction import fp_correction
from jreg.deq.correction import state_indices
from jreg.deq.implicit import BackwardConfig
from jreg.deq.implicit import ConvergenceError
from jreg.deq.implicit import ConvergenceWarning
from jreg.deq.implicit import fixed_point
from jreg.deq.implicit import fixed_point_states
from jreg.deq.implicit import probe_to_metrics
from jreg.deq.implicit import reset_convergence_reports
from jreg.deq.implicit import StateMismatchError
from jreg.deq.implicit import STATS_PROBE_SIZE
from jreg.deq.implicit import unrolled_fixed_point
from jreg.deq.jacobian import jacobian_frobenius_estimate
from jreg.deq.jacobian import jacobian_frobenius_exact
from jreg.deq.jacobian import regularization_gate
from jreg.deq.jacobian import spectral_radius
from jreg.deq.krylov import bicgstab
from jreg.deq.krylov import gmres
from jreg.deq.module import cell_params
from jreg.deq.module import DEQ
from jreg.deq.module import step_count
from jreg.deq.module import value_and_grad
from jreg.deq.precision import mixed_precision_cell
from jreg.deq.reversible import reversible_fixed_point
from jreg.deq.reversible import reversible_iteration
from jreg.deq.solvers import anderson
from jreg.deq.solvers import broyden
from jreg.deq.solvers import fixed_point_iteration
from jreg.deq.solvers import fixed_point_loop
from jreg.deq.solvers import flatten_batch
from jreg.deq.solvers import get_solver
from jreg.deq.solvers import point_stats
from jreg.deq.solvers import register_solver
from jreg.deq.solvers import registered_solvers
from jreg.deq.solvers import RegisteredSolver
from jreg.deq.solvers import residuals
from jreg.deq.solvers import solve
from jreg.deq.solvers import SolverConfig
from jreg.deq.solvers import SolverStats
from jreg.deq.solvers import unregister_solver

__all__ = (
    'BackwardConfig', 'DEQ', 'adaptive', 'cell_params', 'SolverConfig', 'SolverStats',
    'STATS_PROBE_SIZE',
    'anderson', 'broyden', 'fixed_point', 'fixed_point_iteration',
    'flatten_batch', 'jacobian_frobenius_estimate', 'jacobian_frobenius_exact',
    'mixed_precision_cell',
    'probe_to_metrics', 'regularization_gate', 'reversible_fixed_point',
    'reversible_iteration', 'solve', 'spectral_radius',
    'step_count', 'unrolled_fixed_point', 'value_and_grad',
    'correction_weights', 'fixed_point_states', 'fp_correction',
    'state_indices',
    'RegisteredSolver', 'bicgstab', 'fixed_point_loop', 'get_solver', 'gmres',
    'point_stats', 'register_solver', 'registered_solvers', 'residuals',
    'unregister_solver',
    'ConvergenceError', 'ConvergenceWarning', 'StateMismatchError',
    'reset_convergence_reports',
)
