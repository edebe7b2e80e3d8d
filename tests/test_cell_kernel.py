"""The fused cell kernel (mplp.cell_kernel) against the cell's XLA path.

The kernel is float32 only, so its numbers are held against the float64 XLA cell (the
oracle) with a tolerance measured in the same test: the float32 XLA cell's own error
against that oracle (its noise floor on this CPU), times a margin.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplp import agents, cell_kernel, cell_params

pytestmark = pytest.mark.skipif(not cell_kernel.applies(jnp.float32),
                                reason="the cell kernel does not apply here (no compiler or not CPU)")

MARGIN = 8.0  # the kernel's error may be this many times the float32 XLA cell's


def _xla(p, parts, carry):
  return agents._gru_xla(p.unpack(), parts, carry)  # on the tensors sliced from the vector


def _fused(p, parts, carry):
  return agents._gru_fused(p, parts, carry)


def _loss(cell):
  def loss(p, parts, carry):
    new = cell(p, parts, carry)
    return jnp.sum(new[..., 0]) + jnp.sum(jnp.sin(new) * 0.3) + jnp.sum(new * new)
  return loss


def _case(layout, x_size=6, c_size=12, seed=0):
  """(params, parts, carry) in float32 for an agent layout: weight agents [B, I, O] with
  broadcast parts, bias agents [B, O], or one flat axis of agents."""
  net = agents.stateful(x_size, 3, c_size - 4, has_update=True)
  assert net.carry_size == c_size
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  p = net.init(k[0])
  p = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(k[5], a.shape), p)
  if layout == "weight":  # 3 * 37 * 5 = 555 agents: tail tiles
    B, I, O = 3, 37, 5
    parts = [jax.random.normal(k[1], (B, 1, O, x_size - 2)), jax.random.normal(k[2], (1, I, O, 1)),
             jax.random.normal(k[3], (B, I, 1, 1))]
    shape = (B, I, O)
  elif layout == "bias":
    parts = [jax.random.normal(k[1], (4, 9, x_size - 1)), jax.random.normal(k[2], (9, 1))]
    shape = (4, 9)
  else:
    parts = [jax.random.normal(k[1], (70, x_size))]
    shape = (70,)
  carry = jax.random.normal(k[4], shape + (c_size,)) * 0.5
  return p, parts, carry


def _f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _err(a, b):
  """max |a - b| over each leaf, relative to the leaf's largest |b| (each of a cell's 17
  tensors a leaf)."""
  a, b = cell_params.unpack_all(a), cell_params.unpack_all(b)
  errs = jax.tree_util.tree_map(lambda u, v: np.max(np.abs(np.asarray(u, np.float64) - v)) / (np.max(np.abs(v)) + 1e-30), a, b)
  return max(jax.tree_util.tree_leaves(errs))


def _oracle(fn, *args):
  with jax.enable_x64(True):
    args64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), args)
    return _f64(jax.jit(fn)(*args64))


@pytest.mark.parametrize("layout,x_size,c_size", [("weight", 6, 12), ("bias", 5, 7), ("flat", 10, 24)])
def test_kernel_matches_the_float64_cell_within_the_float32_noise_floor(layout, x_size, c_size):
  """Forward and every cotangent (parameters, each broadcast part, carry)."""
  _check_against_oracle(layout, x_size, c_size)


def test_kernel_with_hidden_sizes_off_the_vector_width(monkeypatch):
  """Hidden sizes that are no multiple of 8 or 16 (H1 = 36, 2 H2 = 40): the backward's
  agent-major copies are padded, and the padding must not reach any cotangent."""
  monkeypatch.setattr(agents, "MLP_SIZES", (36, 20))
  _check_against_oracle("weight", 6, 12)


def _check_against_oracle(layout, x_size, c_size):
  p, parts, carry = _case(layout, x_size, c_size)
  grad = lambda cell: jax.grad(_loss(cell), argnums=(0, 1, 2))
  ref_new, ref_grad = _oracle(_xla, p, parts, carry), _oracle(grad(_xla), p, parts, carry)
  floor_new = _err(jax.jit(_xla)(p, parts, carry), ref_new)
  floor_grad = _err(jax.jit(grad(_xla))(p, parts, carry), ref_grad)
  eps = float(jnp.finfo(jnp.float32).eps)
  assert _err(jax.jit(_fused)(p, parts, carry), ref_new) <= MARGIN * max(floor_new, eps)
  assert _err(jax.jit(grad(_fused))(p, parts, carry), ref_grad) <= MARGIN * max(floor_grad, eps)


def test_kernel_is_what_agents_run_in_float32():
  """The stateful net's apply goes through the kernel (its jaxpr holds the FFI call),
  and does not slice the agents."""
  net = agents.make("stateful", 6, 3, 8, True)
  p, parts, carry = _case("weight")
  jaxpr = str(jax.make_jaxpr(lambda p, a, c: net.apply_in_chunks(p, a, c, max_agents=40))(p, parts, carry))
  assert "mplp_cell_forward" in jaxpr
  assert "while" not in jaxpr and "scan" not in jaxpr
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
    assert "mplp_cell" not in str(jax.make_jaxpr(net.apply)(p64, [jnp.asarray(a, jnp.float64) for a in parts],
                                                            jnp.asarray(carry, jnp.float64)))


@pytest.mark.parametrize("batched_params", [False, True])
def test_vmapped_kernel_equals_one_call_per_task(batched_params):
  """vmap over tasks (params shared, or one set per task as under ES/PES): the forward
  is the same per agent whatever the grouping (bitwise), and the gradients equal the
  per-task calls' to float32 summation order (held against the float64 oracle)."""
  p, parts, carry = _case("weight")
  tasks = 3
  k = jax.random.split(jax.random.PRNGKey(9), 3)
  carries = carry[None] + 0.1 * jax.random.normal(k[0], (tasks,) + carry.shape)
  ps = jax.tree_util.tree_map(lambda a: a[None] + 0.1 * jax.random.normal(k[1], (tasks,) + a.shape), p)
  p_axis = 0 if batched_params else None
  params = ps if batched_params else p
  new = jax.jit(jax.vmap(_fused, in_axes=(p_axis, None, 0)))(params, parts, carries)
  for t in range(tasks):
    p_t = jax.tree_util.tree_map(lambda a: a[t], ps) if batched_params else p
    np.testing.assert_array_equal(new[t], jax.jit(_fused)(p_t, parts, carries[t]))

  def total(cell):
    return lambda q, c: jnp.sum(jax.vmap(lambda qq, cc: _loss(cell)(qq, parts, cc), in_axes=(p_axis, 0))(q, c))
  g_fused = jax.jit(jax.grad(total(_fused), argnums=(0, 1)))(params, carries)
  g_xla = jax.jit(jax.grad(total(_xla), argnums=(0, 1)))(params, carries)
  ref = _oracle(jax.grad(total(_xla), argnums=(0, 1)), params, carries)
  eps = float(jnp.finfo(jnp.float32).eps)
  assert _err(g_fused, ref) <= MARGIN * max(_err(g_xla, ref), eps)


def test_without_a_compiler_the_cell_runs_in_xla_with_a_warning(tmp_path):
  """A machine where the kernel cannot be built: a RuntimeWarning that says why, and the
  cell still runs (the XLA path: no FFI call in the program)."""
  code = (
      "import json, warnings, jax, jax.numpy as jnp\n"
      "from mplp import agents, cell_kernel\n"
      "with warnings.catch_warnings(record=True) as w:\n"
      "  warnings.simplefilter('always')\n"
      "  ok = cell_kernel.applies(jnp.float32)\n"
      "net = agents.make('stateful', 3, 2, 1, True)\n"
      "p = net.init(jax.random.PRNGKey(0))\n"
      "out = net.apply(p, [jnp.ones((4, 3))], jnp.zeros((4, 4)))\n"
      "print(json.dumps([ok, [str(x.message) for x in w if x.category is RuntimeWarning],\n"
      "                  float(out[2].sum())]))\n")
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), MPLP_KERNEL_CACHE=str(tmp_path / "cache"))
  run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  ok, warned, total = json.loads(run.stdout)
  assert ok is False
  assert len(warned) == 1 and warned[0].startswith("mplp: the fused agent-cell kernel is unavailable")
  assert "no-such-compiler" in warned[0]
  assert np.isfinite(total)


def test_backward_is_the_same_whichever_thread_runs_which_chunk():
  """The backward's tiles are cut into chunks that the pool's threads take as they come
  free, so which thread sums which agents changes from call to call; the parameter
  cotangent must not (each chunk's share is added in chunk order). 3 groups of 555 agents:
  chunks that span groups; repeated calls must agree bitwise."""
  x_size, c_size = 6, 12
  p, _, _ = _case("flat", x_size, c_size)
  flat = p.flat
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(k[0], (3, 555, x_size))
  c = 0.5 * jax.random.normal(k[1], (3, 555, c_size))
  d_new = jax.random.normal(k[2], (3, 555, c_size))
  backward = jax.jit(cell_kernel._calls(*agents.MLP_SIZES)[1])
  first = [np.asarray(a) for a in backward(x, c, flat[None], d_new)]
  for _ in range(40):
    again = backward(x, c, flat[None], d_new)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, np.asarray(b))
