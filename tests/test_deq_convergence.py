"""Unconverged DEQ solves warn or raise; mismatched states are refused in one sentence."""
import re
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreg import deq
from jreg import errors
import readme_blocks

BUDGET = 5
# Per example f(z) = a * w * z + c with w = 1, solved by fixed-point iteration
# from 0: a = 0 reaches its fixed point c at the second evaluation (residual
# exactly 0); for a = 0.5 the rel. residual after k + 1 evaluations is
# 0.5^k / (1 - 0.5^(k+1)), 0.065 for BUDGET = 5 and below 1e-12 for 50. The
# backward system u = a u + g is the same. So exactly 3 of 8 examples
# converge within BUDGET, both ways, and all within 50.
A = np.array([0.0, 0.5, 0.0, 0.5, 0.5, 0.0, 0.5, 0.5], np.float32)
FEW = re.escape('5 of 8 examples unconverged (62.5%)')


@pytest.fixture(autouse=True)
def _fresh_reports():
  deq.reset_convergence_reports()
  yield
  deq.reset_convergence_reports()


def _inputs():
  c = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)[:, None] * jnp.ones((8, 3))
  return {'a': jnp.asarray(A)[:, None], 'c': c}


def _cell(z, x):
  w = hk.get_parameter('w', [], init=jnp.ones)
  return x['a'] * w * z + x['c']


def _model(forward_budget=BUDGET, backward_budget=BUDGET, **kwargs):
  def forward(x):
    layer = deq.DEQ(
        _cell,
        forward=deq.SolverConfig('fixed_point', max_iter=forward_budget,
                                 tol=1e-5),
        backward=deq.BackwardConfig(solver=deq.SolverConfig(
            'fixed_point', max_iter=backward_budget, tol=1e-5)),
        **kwargs)
    z_star, info = layer(x, jnp.zeros_like(x['c']))
    return jnp.sum(z_star ** 2), info
  return hk.transform(forward)


def _grad_fn(model):
  def loss_fn(params, model_state, rng, batch):
    loss, info = model.apply(params, rng, batch)
    return loss, (model_state, info)
  return jax.jit(deq.value_and_grad(loss_fn))


def _messages(record):
  return [str(w.message) for w in record
          if issubclass(w.category, deq.ConvergenceWarning)]


def test_under_budget_warns_with_the_fraction_forward_and_backward():
  model, x = _model(), _inputs()
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('always')
    params = model.init(jax.random.PRNGKey(0), x)   # init says nothing
    assert not _messages(record)
    (_, (_, metrics)), _ = _grad_fn(model)(params, {}, None, x)
    jax.block_until_ready(metrics)
  messages = _messages(record)
  assert len(messages) == 2, messages
  for direction in ('forward', 'backward'):
    text, = [m for m in messages if f'the {direction} solve' in m]
    assert re.match(f"DEQ 'deq': the {direction} solve left {FEW}", text), text
    assert f'{BUDGET} evaluations of a budget of max_iter={BUDGET}' in text
    assert 'rel residual up to 0.' in text and 'tol=1e-05' in text
  assert float(metrics['forward_converged_fraction']) == pytest.approx(3 / 8)
  assert float(metrics['backward_converged_fraction']) == pytest.approx(3 / 8)
  assert float(metrics['forward_max_iter']) == BUDGET
  assert float(metrics['backward_max_iter']) == BUDGET


def test_plain_jax_grad_warns_for_the_backward_solve():
  model, x = _model(forward_budget=50), _inputs()  # forward converges
  params = model.init(jax.random.PRNGKey(0), x)
  with pytest.warns(deq.ConvergenceWarning, match=f'backward solve left {FEW}'):
    grads = jax.jit(jax.grad(lambda p: model.apply(p, None, x)[0]))(params)
    jax.block_until_ready(grads)


def test_converged_solves_do_not_warn():
  model, x = _model(forward_budget=50, backward_budget=50), _inputs()
  params = model.init(jax.random.PRNGKey(0), x)
  with warnings.catch_warnings():
    warnings.simplefilter('error', deq.ConvergenceWarning)
    (_, (_, metrics)), _ = _grad_fn(model)(params, {}, None, x)
    jax.block_until_ready(metrics)
  assert float(metrics['forward_converged_fraction']) == 1.0
  assert float(metrics['backward_converged_fraction']) == 1.0


def test_throw_raises_the_same_sentence():
  model, x = _model(on_unconverged='raise'), _inputs()
  params = model.init(jax.random.PRNGKey(0), x)   # init never raises
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r'ConvergenceError: DEQ .deq.: the forward solve '
                           rf'left {FEW}'):
    jax.block_until_ready(jax.jit(model.apply)(params, None, x))


def test_raise_for_the_backward_solve_only():
  strict, x = hk.transform(_strict_backward), _inputs()
  params = strict.init(jax.random.PRNGKey(0), x)
  jax.block_until_ready(jax.jit(strict.apply)(params, None, x))  # forward: fine
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=rf'the backward solve left {FEW}'):
    jax.block_until_ready(jax.jit(jax.grad(
        lambda p: strict.apply(p, None, x)[0]))(params))


def _strict_backward(x):
  layer = deq.DEQ(
      _cell, forward=deq.SolverConfig('fixed_point', max_iter=50, tol=1e-5),
      backward=deq.BackwardConfig(solver=deq.SolverConfig(
          'fixed_point', max_iter=BUDGET, tol=1e-5, on_unconverged='raise')))
  z_star, info = layer(x, jnp.zeros_like(x['c']))
  return jnp.sum(z_star ** 2), info


def test_repeated_solves_warn_at_the_1st_and_10th():
  model, x = _model(), _inputs()
  params = model.init(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('always')
    for _ in range(10):
      jax.block_until_ready(apply(params, None, x))
  messages = _messages(record)
  assert len(messages) == 2, messages
  assert 'solve number' not in messages[0]
  assert 'unconverged forward solve number 10 of this layer' in messages[1]


def test_ignore_and_zero_tolerance_say_nothing():
  x = _inputs()
  cell = lambda p, z, x: x['a'] * p * z + x['c']
  with warnings.catch_warnings():
    warnings.simplefilter('error', deq.ConvergenceWarning)
    for config in (deq.SolverConfig('fixed_point', max_iter=3, tol=0.0),
                   deq.SolverConfig('fixed_point', max_iter=3, tol=1e-5,
                                    on_unconverged='ignore')):
      _, stats = jax.jit(lambda p, c=config: deq.fixed_point(
          cell, p, x, jnp.zeros_like(x['c']), forward=c))(jnp.float32(1.0))
      jax.block_until_ready(stats)
      assert not bool(stats.all_converged)


def test_fixed_point_function_warns_and_vmap_counts_each_slice():
  x = _inputs()
  cell = lambda p, z, x: x['a'] * p * z + x['c']
  config = deq.SolverConfig('fixed_point', max_iter=BUDGET, tol=1e-5)
  solve = lambda p: deq.fixed_point(cell, p, x, jnp.zeros_like(x['c']),
                                    forward=config)[1].converged
  with pytest.warns(deq.ConvergenceWarning,
                    match=f'^jreg.deq.fixed_point: the forward solve left {FEW}'):
    jax.block_until_ready(jax.jit(jax.vmap(solve))(jnp.ones(2, jnp.float32)))


def test_shape_mismatch_is_one_sentence():
  x = jnp.ones((4, 1, 8))
  model = hk.transform(lambda x, z0: deq.DEQ(
      lambda z, x: jnp.tanh(hk.Linear(8)(z) + x))(x, z0))
  z0 = jnp.zeros((4, 1, 5))
  with pytest.raises(deq.StateMismatchError) as caught:
    model.init(jax.random.PRNGKey(0), x, z0)
  message = str(caught.value)
  assert message == (
      "DEQ 'deq': the cell maps z0 of (4, 1, 5) float32 to an output of "
      '(4, 1, 8) float32, with x of (4, 1, 8) float32; a fixed point needs '
      'the output shaped and typed like z0, so give z0 the shape and dtype of '
      "the cell's output or change the cell.")
  assert isinstance(caught.value, errors.UserError)
  assert isinstance(caught.value, ValueError)


def test_dtype_mismatch_names_both_dtypes():
  cell = lambda p, z, x: jnp.tanh(p * z.astype(jnp.float32) + x)
  x = jnp.ones((2, 3))
  with pytest.raises(deq.StateMismatchError,
                     match=r'z0 of \(2, 3\) bfloat16 to an output of '
                           r'\(2, 3\) float32'):
    deq.fixed_point(cell, jnp.float32(0.5), x, jnp.zeros((2, 3), jnp.bfloat16))


def test_readme_deq_example_converges():
  blocks = [b for b in readme_blocks.python_blocks() if 'jreg.deq.DEQ(' in b]
  assert len(blocks) == 1
  with warnings.catch_warnings():
    warnings.simplefilter('error', deq.ConvergenceWarning)  # raised in the run
    exec(compile(blocks[0], 'README.md', 'exec'), {'__name__': 'readme'})  # pylint: disable=exec-used


def test_task_logs_a_line_for_unconverged_training_steps(caplog):
  from jreg.tasks import deq as deq_task  # pylint: disable=g-import-not-at-top

  def grad_fn(params, model_state, rng, batch, axis_name=None):
    del rng, axis_name
    metrics = {'forward_converged_fraction': 1.0 - batch,
               'forward_rel_residual': 0.01 * batch,
               'backward_converged_fraction': jnp.ones([])}
    return (jnp.zeros([]), (model_state, metrics)), params

  step = jax.jit(deq_task.log_unconverged(
      grad_fn, log_every=3, forward_max_iter=20, backward_max_iter=30))
  with caplog.at_level('WARNING'):
    for fraction in (0.0, 0.25, 0.125, 0.0, 0.0, 0.0):
      jax.block_until_ready(step({}, {}, None, jnp.float32(fraction)))
  lines = [r.getMessage() for r in caplog.records if 'DEQ solves' in r.getMessage()]
  assert lines == [
      'DEQ solves were unconverged in 2 of the last 3 training steps: forward '
      'up to 25.0% of examples (mean rel residual up to 0.0025, budget '
      'deq.forward.max_iter=20).']


@pytest.mark.parametrize('module, preset', [('deq_cifar10', 'small'),
                                            ('deq_wikitext', 'small')])
def test_task_budgets_come_from_the_config(module, preset):
  import importlib  # pylint: disable=g-import-not-at-top
  from jreg.tasks import deq as deq_task  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'experiments.configs.{module}').get_config(preset)
  wrapped = deq_task.log_unconverged_from_config(lambda *a: None, config)
  assert wrapped.monitor.forward_max_iter == config.deq.forward.max_iter
  assert wrapped.monitor.log_every == config.log_every
