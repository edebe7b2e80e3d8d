"""Forward pass, unrolls, vmap and meta-gradients of the learned protocol."""

import dataclasses

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from mplp import Activation, Dense, L2, LearnedRule, Network, minibatch_init, presets


def _sinusoid_batches(key, steps, batch):
  ka, kp, kx = jax.random.split(key, 3)
  amp = jax.random.uniform(ka, (), minval=0.1, maxval=0.5)
  phase = jax.random.uniform(kp, (), maxval=jnp.pi)
  xs = jax.random.uniform(kx, (steps, batch, 1), minval=-5, maxval=5)
  return xs, amp * jnp.sin(xs + phase)


def small_net(family="stateful"):
  layers = (Dense(8), Activation("tanh"), Dense(1), L2())
  return Network(1, layers, LearnedRule(family, msg_size=3, state_size=4))


def test_forward_equals_plain_mlp():
  net = presets.mnist_20x8()
  state = net.init(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 144))
  (w1, b1), (w2, b2) = net.weights(state)
  expected = jax.nn.softmax(jax.nn.sigmoid(x @ w1 + b1) @ w2 + b2)
  np.testing.assert_allclose(net.forward(state, x), expected, atol=1e-6, rtol=0)
  # The published initialisation: N(0, 0.05) weights, zero biases.
  assert abs(float(jnp.std(w1)) - 0.05) < 0.002 and float(jnp.abs(b1).max()) == 0.0


def test_init_shapes():
  net = presets.sinusoid_5x10()
  state = net.init(jax.random.PRNGKey(0), 10)
  chex.assert_shape(state[0]["w_carry"], (10, 1, 20, 24))
  chex.assert_shape(state[0]["b_carry"], (10, 20, 24))
  chex.assert_shape(state[1]["carry"], (10, 20, 23))
  chex.assert_shape(state[5]["carry"], (10, 1, 23))
  stateless = presets.maml_sinusoid_2x10().init(jax.random.PRNGKey(0), 10)
  chex.assert_shape(stateless[0]["w_carry"], (10, 1, 20, 0))


@pytest.mark.parametrize("family", ["stateful", "stateless"])
def test_scan_unroll_equals_python_loop(family):
  """Two computation orders, compared in float64 (their float32 rounding is the CPU's)."""
  net = small_net(family)
  with jax.enable_x64(True):
    meta = net.init_meta(jax.random.PRNGKey(0))
    state0 = net.init(jax.random.PRNGKey(1), 5)
    xs, ys = _sinusoid_batches(jax.random.PRNGKey(2), 4, 5)
    final, metrics = jax.jit(net.unroll)(meta, state0, xs, ys)
    state, losses, step = state0, [], jax.jit(net.inner_step)
    for t in range(4):
      state, m = step(meta, state, xs[t], ys[t])
      losses.append(m["loss"])
    assert final[0]["w"].dtype == jnp.float64
    chex.assert_trees_all_close(final, state, atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(metrics["loss"], jnp.stack(losses), rtol=1e-10)
    assert float(jnp.abs(final[0]["w"] - state0[0]["w"]).max()) > 1e-4


def test_vmap_over_tasks_equals_each_task():
  net = small_net()
  with jax.enable_x64(True):
    meta = net.init_meta(jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    states = jax.vmap(lambda k: net.init(k, 5))(keys)
    xs, ys = jax.vmap(lambda k: _sinusoid_batches(k, 3, 5))(keys)
    unroll = jax.jit(net.unroll)
    finals, _ = jax.jit(jax.vmap(net.unroll, in_axes=(None, 0, 0, 0)))(meta, states, xs, ys)
    for i in range(3):
      one, _ = unroll(meta, jax.tree_util.tree_map(lambda a: a[i], states), xs[i], ys[i])
      chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], finals), one, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("family", ["stateful", "stateless"])
def test_meta_gradient_matches_finite_differences(family):
  """Directional derivatives of the loss after a 5-step unroll, in float64."""
  net = small_net(family)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
    meta = to64(net.init_meta(jax.random.PRNGKey(0)))
    # A larger output scale so that the unroll depends strongly on the meta-parameters.
    meta = meta._replace(params={**meta.params, "layers": tuple(
        {k: {**v, "out_scale": jnp.asarray(0.2)} if "out_scale" in v else v for k, v in l.items()}
        for l in meta.params["layers"])})
    state = to64(net.init(jax.random.PRNGKey(1), 6))
    xs, ys = to64(_sinusoid_batches(jax.random.PRNGKey(2), 6, 6))

    def f(params):
      final, _ = net.unroll(meta._replace(params=params), state, xs[:5], ys[:5])
      return net.loss(final, xs[5], ys[5])

    flat, unravel = jax.flatten_util.ravel_pytree(meta.params)
    grad = jax.jit(lambda p: jax.flatten_util.ravel_pytree(jax.grad(f)(unravel(p)))[0])(flat)
    f_flat = jax.jit(lambda p: f(unravel(p)))  # of the flat meta-parameters
    for seed in range(3):
      direction = jax.random.normal(jax.random.PRNGKey(10 + seed), flat.shape, jnp.float64)
      analytic = jnp.vdot(grad, direction)
      h = 1e-9 if family == "stateless" else 1e-6  # tiny where relu kinks would be crossed
      numeric = (f_flat(flat + h * direction) - f_flat(flat - h * direction)) / (2 * h)
      assert abs(float(analytic)) > 1e-4, "gradient must not vanish for the check to mean anything"
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)


def test_inner_step_compiles_once():
  net = small_net()
  meta = net.init_meta(jax.random.PRNGKey(0))
  state = net.init(jax.random.PRNGKey(1), 5)
  xs, ys = _sinusoid_batches(jax.random.PRNGKey(2), 3, 5)
  step = jax.jit(chex.assert_max_traces(net.inner_step, n=1))
  for t in range(3):
    state, _ = step(meta, state, xs[t], ys[t])


def test_minibatch_init_measures_the_current_tensors():
  net = small_net()
  meta = net.init_meta(jax.random.PRNGKey(0))
  state = net.init(jax.random.PRNGKey(1), 5)
  xs, ys = _sinusoid_batches(jax.random.PRNGKey(2), 1, 5)
  measured = minibatch_init.measure(net, meta, state, xs, ys)
  s = measured.stats
  x = xs[0]
  # Dense 0 weight agents: [message, own value, forward input].
  np.testing.assert_allclose(s[0]["weight"]["in_mean"][1], jnp.mean(state[0]["w"]), rtol=1e-5)
  np.testing.assert_allclose(s[0]["weight"]["in_scale"][1], 1 / jnp.std(state[0]["w"]), rtol=1e-4)
  np.testing.assert_allclose(s[0]["weight"]["in_mean"][2], jnp.mean(x), rtol=1e-5)
  np.testing.assert_allclose(s[0]["weight"]["in_scale"][2], 1 / jnp.std(x), rtol=1e-4)
  # Biases start at zero: std 0 < 1e-5 gives scale 1.
  np.testing.assert_allclose(s[0]["bias"]["in_scale"][1], 1.0)
  # Loss agents: [loss, prediction, target, target - prediction].
  pred = net.forward(state, x)
  np.testing.assert_allclose(s[3]["loss"]["in_mean"][0], jnp.mean(0.5 * (ys[0] - pred) ** 2), rtol=1e-5)
  np.testing.assert_allclose(s[3]["loss"]["in_mean"][2], jnp.mean(ys[0]), rtol=1e-5)
  # The centring constant is used at once: the measured step's weight deltas average to 0.
  after = _measured_step(net, meta, state, xs, ys)
  delta = after[0]["w"] - state[0]["w"]
  assert float(jnp.abs(delta).max()) > 1e-6
  np.testing.assert_allclose(float(jnp.mean(delta)), 0.0, atol=1e-9)
  # Averaging over steps: two steps give the mean of the per-step statistics.
  xs2, ys2 = _sinusoid_batches(jax.random.PRNGKey(4), 2, 5)
  two = minibatch_init.measure(net, meta, state, xs2, ys2).stats
  one_a = minibatch_init.measure(net, meta, state, xs2[:1], ys2[:1]).stats
  np.testing.assert_allclose(two[0]["weight"]["in_mean"][1] * 2 - one_a[0]["weight"]["in_mean"][1],
                             jnp.mean(_measured_step(net, meta, state, xs2, ys2)[0]["w"]), rtol=1e-4)


def _measured_step(net, meta, state, xs, ys):
  """The state after one inner step in measuring mode on the first batch."""
  measuring = dataclasses.replace(net, rule=dataclasses.replace(net.rule, measure=True))
  return measuring.inner_step(meta, state, xs[0], ys[0])[0]


@pytest.mark.parametrize("hidden,batch", [((257, 3), 10), ((3,), 4099)])
def test_wide_networks_and_large_batches_equal_the_unsliced_step(hidden, batch, monkeypatch):
  """A 1-input network 257 wide, or a prime batch of 4,099 (both crashed when the agent
  slicing found no divisor): two inner steps equal the unsliced computation (float64)."""
  from mplp import agents
  with jax.enable_x64(True):
    net = presets.network("sinusoid_5x10", hidden=hidden)
    meta = net.init_meta(jax.random.PRNGKey(0))
    xs, ys = _sinusoid_batches(jax.random.PRNGKey(1), 2, batch)
    state = net.init(jax.random.PRNGKey(2), batch)
    sliced = jax.jit(lambda *a: net.unroll(*a))(meta, state, xs, ys)  # a fresh trace each
    monkeypatch.setattr(agents, "CHUNK_AGENTS", 1 << 40)
    whole = jax.jit(lambda *a: net.unroll(*a))(meta, state, xs, ys)
    chex.assert_trees_all_close(sliced, whole, rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(sliced[0][0]["w"] - state[0]["w"]).max()) > 0  # the rule moved the weights
