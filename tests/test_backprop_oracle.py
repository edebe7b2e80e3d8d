"""Hand-written backprop agents in the MP layers reproduce optax.sgd exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mplp import Activation, BackpropRule, CrossEntropy, Dense, L2, Network, Softmax


def _plain_loss(params, x, y, acts, softmax, loss):
  h = x
  for k, (w, b) in enumerate(params):
    h = h @ w + b
    if k < len(params) - 1:
      h = acts(h)
  if softmax:
    h = jax.nn.softmax(h)
  return jnp.mean(jnp.sum(loss(h, y), axis=-1))


CASES = {
    "relu_l2": dict(sizes=(1, 20, 20, 1), act="relu", softmax=False, lr=0.05, batch=10),
    "sigmoid_softmax_ce": dict(sizes=(64, 32, 10), act="sigmoid", softmax=True, lr=0.5, batch=16),
}


def _data(case, key, steps):
  sizes, batch = case["sizes"], case["batch"]
  kx, ky = jax.random.split(key)
  xs = jax.random.normal(kx, (steps, batch, sizes[0]))
  if case["softmax"]:
    ys = jax.nn.one_hot(jax.random.randint(ky, (steps, batch), 0, sizes[-1]), sizes[-1])
  else:
    ys = jnp.sin(3 * xs)  # a non-linear target
  return xs, ys


@pytest.mark.parametrize("name", list(CASES))
def test_backprop_agents_equal_optax_sgd(name):
  case = CASES[name]
  sizes, steps = case["sizes"], 10
  layers = []
  for n in sizes[1:-1]:
    layers += [Dense(n), Activation(case["act"])]
  layers.append(Dense(sizes[-1]))
  if case["softmax"]:
    layers += [Softmax(), CrossEntropy()]
  else:
    layers.append(L2())
  net = Network(sizes[0], tuple(layers), BackpropRule(case["lr"]))
  # He-scaled initial weights so that ten steps move them well beyond the tolerance.
  keys = jax.random.split(jax.random.PRNGKey(1), len(sizes) - 1)
  init = [(jax.random.normal(k, (a, b)) * (2 / a) ** 0.5, 0.1 * jnp.ones(b))
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
  state = net.init(jax.random.PRNGKey(1), case["batch"], weights=init)
  meta = net.init_meta(jax.random.PRNGKey(2))
  xs, ys = _data(case, jax.random.PRNGKey(3), steps)

  params = [tuple(p) for p in net.weights(state)]
  opt = optax.sgd(case["lr"])
  opt_state = opt.init(params)
  act = net.layers[1].function
  loss_fn = net.layers[-1].elementwise
  grad = jax.jit(jax.grad(lambda p, x, y: _plain_loss(p, x, y, act, case["softmax"], loss_fn)))
  for t in range(steps):
    updates, opt_state = opt.update(grad(params, xs[t], ys[t]), opt_state)
    params = optax.apply_updates(params, updates)

  final, metrics = jax.jit(net.unroll)(meta, state, xs, ys)
  for (w, b), (w_ref, b_ref) in zip(net.weights(final), params):
    np.testing.assert_allclose(w, w_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b, b_ref, atol=1e-5, rtol=0)
  # Learning happened, far beyond the tolerance, and the loss went down.
  moved = max(float(jnp.abs(w - w0).max()) for (w, _), (w0, _) in zip(net.weights(final), net.weights(state)))
  assert moved > 1e-2
  assert metrics["loss"][-1] < metrics["loss"][0]
