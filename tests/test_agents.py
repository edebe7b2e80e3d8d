"""Agent networks: chunked execution equals the one-call execution; the GRU equations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplp import agents, cell_params


def _weight_agent_inputs(key, batch=3, n_in=12, n_out=5, m=4):
  k = jax.random.split(key, 4)
  return [jax.random.normal(k[0], (batch, 1, n_out, m)),   # message, shared over fan-in
          jax.random.normal(k[1], (1, n_in, n_out, 1)),    # own value, shared over the batch
          jax.random.normal(k[2], (batch, n_in, 1, 1))], k[3]  # forward input


@pytest.mark.parametrize("family", ["stateful", "stateless"])
def test_chunked_apply_equals_apply(family):
  net = agents.make(family, 6, 4, 7, has_update=True)
  params = net.init(jax.random.PRNGKey(0))
  parts, kc = _weight_agent_inputs(jax.random.PRNGKey(1))
  carry = jax.random.normal(kc, (3, 12, 5, net.carry_size))
  whole = net.apply(params, parts, carry)
  chunked = net.apply_in_chunks(params, parts, carry, max_agents=40)  # 180 agents in slices
  chex.assert_trees_all_close(chunked, whole, atol=1e-6)
  chex.assert_shape(whole[1], (3, 12, 5, 4))
  f = lambda p, apply: jnp.sum(apply(p, parts, carry)[0] ** 2)
  g_whole = jax.grad(f)(params, net.apply)
  g_chunk = jax.grad(f)(params, lambda p, a, c: net.apply_in_chunks(p, a, c, max_agents=40))
  chex.assert_trees_all_close(g_chunk, g_whole, atol=1e-5, rtol=1e-5)


def _cell_equations(p, parts, c):
  """The stateful cell written out in plain jnp on the concatenated input (the oracle)."""
  g = p["gru"]
  x = jnp.concatenate([jnp.broadcast_to(q, c.shape[:-1] + q.shape[-1:]) for q in parts], -1)
  mlp = lambda pre, h: jnp.tanh(jnp.tanh(h @ p[f"gru/{pre}_0"]["w"] + p[f"gru/{pre}_0"]["b"])
                                @ p[f"gru/{pre}_1"]["w"] + p[f"gru/{pre}_1"]["b"]) @ p[f"gru/{pre}_2"]["w"]
  z = jax.nn.sigmoid(x @ g["wzx"] + c @ g["wzc"] + g["bz"])
  r = jax.nn.sigmoid(x @ g["wrx"] + c @ g["wrc"] + g["br"])
  return z * c + (1 - z) * jnp.tanh(mlp("mlp_x", x) + mlp("mlp_c", r * c) + g["b"])


def test_stateful_cell_equations():
  """The cell against its equations written out in plain jnp on the concatenated input
  (float64: the two compute in different orders)."""
  with jax.enable_x64(True):
    net = agents.stateful(5, 2, 3, has_update=True)
    p = net.init(jax.random.PRNGKey(0))
    assert float(p["gru"]["bz"][0]) == -1.0 and float(p["gru"]["br"][0]) == -1.0
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 5))
    c = jax.random.normal(jax.random.PRNGKey(2), (7, 6))
    update, msg, new = net.apply(p, [x[:, :2], x[:, 2:3], x[:, 3:]], c)
    expected = _cell_equations(p, [x], c)
    np.testing.assert_allclose(new, expected, atol=1e-6)
    np.testing.assert_allclose(update, expected[:, 0], atol=1e-6)
    np.testing.assert_allclose(msg, expected[:, -2:], atol=1e-6)


@pytest.mark.parametrize("layout", ["weight", "bias", "fewer_axes", "vmapped"])
def test_stateful_backward_pass_equals_autodiff_of_the_equations(layout):
  """The cell's hand-written backward pass (it recomputes the forward and reduces each
  broadcast part's cotangent to its own shape) against `jax.grad` of the written-out
  equations: every parameter, every input part and the carry, in float64."""
  with jax.enable_x64(True):
    net = agents.make("stateful", 6, 4, 7, has_update=True)
    params = net.init(jax.random.PRNGKey(0))
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    if layout in ("weight", "vmapped"):
      parts, _ = _weight_agent_inputs(k[0])
      shape = (3, 12, 5)
    elif layout == "bias":  # message [B, O, M], value [1, O, 1], input [B, O, 1]
      parts = [jax.random.normal(k[0], (3, 5, 4)), jax.random.normal(k[1], (1, 5, 1)),
               jax.random.normal(k[2], (3, 5, 1))]
      shape = (3, 5)
    else:  # parts with fewer axes than the agents (numpy broadcasting)
      parts = [jax.random.normal(k[0], (4,)), jax.random.normal(k[1], (5, 3, 1)), jax.random.normal(k[2], (1,))]
      shape = (5, 3)
    carry = jax.random.normal(k[3], shape + (net.carry_size,))
    weights = jax.random.normal(k[4], shape + (net.carry_size,))
    loss = lambda cell: lambda p, a, c: jnp.sum(jnp.sin(cell(p, a, c)) * weights)
    mine, oracle = loss(lambda p, a, c: net.apply(p, a, c)[2]), loss(_cell_equations)
    if layout == "vmapped":  # an outer batch of 2 tasks, parameters shared
      carry = jnp.stack([carry, 2 * carry])
      batched = lambda f: lambda p, a, c: jnp.sum(jax.vmap(f, in_axes=(None, None, 0))(p, a, c))
      mine, oracle = batched(mine), batched(oracle)
    got = jax.jit(jax.grad(mine, argnums=(0, 1, 2)))(params, parts, carry)
    want = jax.grad(oracle, argnums=(0, 1, 2))(params, parts, carry)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(cell_params.unpack_all(got)))


@pytest.mark.parametrize("batch,n_in,n_out,max_agents", [
    (10, 1, 257, 2048),   # a 1-input first layer 257 wide: its fan-in axis has extent 1
    (4099, 1, 3, 2048),   # a large prime batch on a 1-input layer
    (3, 13, 5, 40),       # a prime fan-in: one row a slice
    (2, 1, 1, 1),         # one agent per example, nothing to slice but the batch
])
def test_chunked_apply_on_awkward_shapes_equals_apply(batch, n_in, n_out, max_agents):
  """Prime, large and extent-1 shapes (wide 1-input networks crashed with StopIteration):
  the slices give the unsliced numbers, values and gradients, in float64 (slicing changes
  the matmul shapes, whose float32 rounding depends on the CPU)."""
  with jax.enable_x64(True):
    net = agents.make("stateful", 6, 4, 7, has_update=True)
    params = net.init(jax.random.PRNGKey(0))
    parts, kc = _weight_agent_inputs(jax.random.PRNGKey(1), batch, n_in, n_out)
    carry = jax.random.normal(kc, (batch, n_in, n_out, net.carry_size))
    chunked = lambda p, a, c: net.apply_in_chunks(p, a, c, max_agents=max_agents)
    both = lambda apply: jax.jit(lambda p: (apply(p, parts, carry), jax.grad(
        lambda q: jnp.sum(apply(q, parts, carry)[1] ** 2))(p)))(params)
    chex.assert_trees_all_close(both(chunked), both(net.apply), rtol=1e-10, atol=1e-12)
