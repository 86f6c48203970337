"""The DEQ speed paths: jreg.layers inside DEQ cells (against plain autodiff
and unrolled differentiation), DEQ under hk.transform, MDEQ old vs new path."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from jreg import deq
from jreg import layers
from jreg.models import mdeq
from jreg.tasks import mdeq as mdeq_task


def _conv_cell(z, x):  # z, x: [B, 6, 6, 4]
  y = layers.Conv2D(8, 3, with_bias=False, name='conv1',
                    w_init=hk.initializers.RandomNormal(0.15))(z)
  y = layers.GroupNorm(2, name='gn1')(jax.nn.relu(y))
  # A small second conv keeps f a strong contraction (GN1 is scale-invariant).
  y = layers.Conv2D(4, 3, stride=2, with_bias=False, name='conv2',
                    w_init=hk.initializers.RandomNormal(0.02))(y)    # [B, 3, 3, 4]
  y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)               # [B, 6, 6, 4]
  return 0.5 * jnp.tanh(layers.GroupNorm(2, name='gn2')(x + y)) + 0.3 * z


def _loss(tol=1e-6, jacobian=True):
  def forward(images):
    x = layers.Conv2D(4, 3, name='stem')(images)
    layer = deq.DEQ(_conv_cell, forward=deq.SolverConfig('anderson', 40, tol),
                    backward=deq.BackwardConfig(solver=deq.SolverConfig(
                        'fixed_point', 60, tol)),
                    name='deq')
    z, info = layer(x, jnp.zeros_like(x), jacobian_loss=jacobian,
                    rng=jax.random.PRNGKey(7))
    loss = jnp.mean(jnp.square(z - 0.1))
    return loss + (0.5 * info['jacobian_loss'] if jacobian else 0.0)
  return hk.transform(forward)


IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)),
                     jnp.float32)
MODEL = _loss()
PARAMS = MODEL.init(jax.random.PRNGKey(0), IMAGES)


def _grads(model, impl):
  with layers.implementation(impl):
    return jax.jit(jax.grad(lambda p: model.apply(p, None, IMAGES)))(PARAMS)


def _assert_trees_close(got, want, rtol, atol):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=str(path))


def _unrolled_grads(num_steps=60):
  """Autodiff through num_steps weight-tied cell applications (a scan)."""
  stem = hk.without_apply_rng(hk.transform(
      lambda images: layers.Conv2D(4, 3, name='stem')(images)))
  cell = hk.without_apply_rng(hk.transform(_conv_cell))

  def loss(stem_params, cell_params):
    x = stem.apply(stem_params, IMAGES)
    z = jax.lax.fori_loop(0, num_steps,
                          lambda i, z: cell.apply(cell_params, z, x),
                          jnp.zeros_like(x))
    return jnp.mean(jnp.square(z - 0.1))

  with layers.implementation('xla'):
    g_stem, g_cell = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        {'stem': PARAMS['stem']}, deq.cell_params(PARAMS, 'deq'))
  return dict(g_stem, **{f'deq/cell/{k}': v for k, v in g_cell.items()})


def test_conv_deq_gradient_custom_layers_match_xla_and_unrolled():
  """Implicit gradient with the Jacobian term: custom layers = autodiff path;
  without it, = autodiff through 60 weight-tied steps."""
  custom = _grads(MODEL, 'custom')
  _assert_trees_close(custom, _grads(MODEL, 'xla'), 1e-3, 2e-5)
  no_jr = _grads(_loss(jacobian=False), 'custom')
  _assert_trees_close(no_jr, _unrolled_grads(), 2e-3, 2e-5)
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-4 for a, b in zip(
      jax.tree.leaves(custom), jax.tree.leaves(no_jr)))  # the term is in


def test_spectral_radius_through_custom_conv_cell():
  def f(images):
    x = layers.Conv2D(4, 3, name='stem')(images)
    return deq.DEQ(_conv_cell, forward=deq.SolverConfig('anderson', 40, 1e-6),
                   spectral_radius_iters=30, name='deq')(
                       x, jnp.zeros_like(x), spectral_radius=True,
                       rng=jax.random.PRNGKey(1))[1]['spectral_radius']
  model = hk.transform(f)
  rho = float(jax.jit(lambda p: model.apply(p, None, IMAGES))(PARAMS))
  assert 0.1 < rho < 1.0  # a contraction: 0.3 I plus a small conv term


def _tiny_deq_model(with_state):
  def forward(x):
    inj = hk.Linear(4, name='stem')(x)
    layer = deq.DEQ(lambda z, u: jnp.tanh(hk.Linear(4)(z) + u),
                    forward=deq.SolverConfig('anderson', 30, 1e-6),
                    backward=deq.BackwardConfig(solver=deq.SolverConfig(
                        'fixed_point', 40, 1e-6)), name='deq')
    z, info = layer(inj, jnp.zeros_like(inj), jacobian_loss=True,
                    rng=jax.random.PRNGKey(3))
    return jnp.mean(z ** 2) + info['jacobian_loss'], info
  return (hk.transform_with_state(forward) if with_state
          else hk.transform(forward))


def test_deq_under_transform_without_state():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
  stateless, stateful = _tiny_deq_model(False), _tiny_deq_model(True)
  params = stateless.init(jax.random.PRNGKey(0), x)
  params2, state = stateful.init(jax.random.PRNGKey(0), x)
  assert not state  # no probe (nor anything else) in the state
  want = jax.grad(lambda p: stateful.apply(p, state, None, x)[0][0])(params2)
  got = jax.grad(lambda p: stateless.apply(p, None, x)[0])(params)
  _assert_trees_close(got, want, 1e-6, 0.0)

  def loss_fn(params, model_state, rng, batch):
    loss, info = stateless.apply(params, rng, batch)
    return loss, (model_state, info)
  (_, (_, metrics)), grads = deq.value_and_grad(loss_fn)(params, {}, None, x)
  _assert_trees_close(grads, want, 1e-6, 0.0)
  assert 1 <= float(metrics['backward_nfe']) <= 40
  assert float(metrics['backward_converged_fraction']) == 1.0


def test_mdeq_old_and_new_layer_paths_agree():
  config = mdeq.mdeq_config('tiny')
  settings = mdeq_task.TrainingSettings(
      forward=deq.SolverConfig('broyden', 8, 1e-6),
      backward=deq.BackwardConfig(solver=deq.SolverConfig('fixed_point', 8,
                                                          1e-6)),
      jacobian_weight=0.5, jacobian_weight_final=0.5, jacobian_prob=1.0,
      jacobian_prob_final=1.0)
  fns = mdeq_task.build_classifier(config, settings, (8, 8, 3))
  params, state = fns.init_fn(jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  batch = {'image': rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
           'label': np.array([0, 2], np.int32)}
  results = {}
  for impl in ('custom', 'xla'):
    with layers.implementation(impl):
      results[impl] = jax.jit(fns.grad_fn)(params, state, jax.random.PRNGKey(1),
                                           batch)
  (loss_c, (_, metrics_c)), grads_c = results['custom']
  (loss_x, (_, metrics_x)), grads_x = results['xla']
  np.testing.assert_allclose(loss_c, loss_x, rtol=1e-5)
  assert float(metrics_c['jacobian_applied']) == 1.0
  assert float(metrics_c['backward_nfe']) == float(metrics_x['backward_nfe'])
  _assert_trees_close(grads_c, grads_x, 2e-3, 1e-6)
