"""The stateful cell's parameters stored as one vector (`mplp.cell_params`): the layout
against the haiku tensors it replaces, the per-tensor normalization against the one on
the 17 tensors, and files written with the 17 tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mplp import agents, cell_params, presets
from mplp.cell_params import CellParams
from mplp.host import checkpoint
from mplp.optim import normalize_per_tensor, outer_optimizer


def _haiku_tensors(key, x_size=5, c_size=9):
  """The cell's 17 tensors as haiku makes them, each shifted by noise (no two alike)."""
  net = agents.stateful(x_size, 3, c_size - 4, has_update=True)
  p = net.init(key).unpack()
  keys = iter(jax.random.split(key, 17))
  return jax.tree_util.tree_map(lambda a: a + jax.random.normal(next(keys), a.shape), p)


def test_pack_and_unpack_are_exact_inverses_with_leading_axes():
  p = _haiku_tensors(jax.random.PRNGKey(0))
  packed = CellParams.pack(p)
  assert packed.sizes == (5, 9, *agents.MLP_SIZES)
  assert packed.flat.shape == (cell_params.size(packed.sizes),)
  assert packed.flat.size == sum(a.size for a in jax.tree_util.tree_leaves(p))
  jax.tree_util.tree_map(np.testing.assert_array_equal, packed.unpack(), p)
  assert set(np.asarray(packed.flat).tolist()) == set(np.concatenate(
      [np.asarray(a).ravel() for a in jax.tree_util.tree_leaves(p)]).tolist())
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, 3 * a]), p)  # [3, ...]: ES pairs
  packed3 = CellParams.pack(stacked)
  assert packed3.flat.shape == (3, packed.flat.size)
  np.testing.assert_array_equal(packed3.flat[2], 3 * packed.flat)
  jax.tree_util.tree_map(np.testing.assert_array_equal, packed3.unpack(), stacked)


def test_the_vector_is_the_order_the_kernel_reads():
  """The gates' kernels side by side ([wzx | wrx], X rows of 2C), then their biases, then
  each MLP's kernel and bias in order, the candidate bias last (`cell_kernel.cc`)."""
  p = _haiku_tensors(jax.random.PRNGKey(1), x_size=3, c_size=4)
  flat = np.asarray(CellParams.pack(p).flat)
  g = p["gru"]
  np.testing.assert_array_equal(flat[:24].reshape(3, 8), np.concatenate([g["wzx"], g["wrx"]], 1))
  np.testing.assert_array_equal(flat[24:56].reshape(4, 8), np.concatenate([g["wzc"], g["wrc"]], 1))
  np.testing.assert_array_equal(flat[56:64], np.concatenate([g["bz"], g["br"]]))
  np.testing.assert_array_equal(flat[64:64 + 240].reshape(3, 80), p["gru/mlp_x_0"]["w"])
  np.testing.assert_array_equal(flat[-4:], g["b"])


def test_tensor_ids_name_each_value_s_tensor():
  p = _haiku_tensors(jax.random.PRNGKey(2))
  packed = CellParams.pack(p)
  ids = packed.tensor_ids()
  leaves = jax.tree_util.tree_leaves(p)
  assert ids.shape == packed.flat.shape and ids.max() == len(leaves) - 1 == 16
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(np.sort(np.asarray(packed.flat)[ids == i]), np.sort(np.asarray(leaf).ravel()))


def test_per_tensor_normalization_of_the_vector_equals_the_17_tensors():
  """In float64 (the norms are summed in another order): the vector normalized per tensor
  equals the 17 tensors normalized one by one, and Adam after it the same."""
  with jax.enable_x64(True):
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), _haiku_tensors(jax.random.PRNGKey(3)))
    grads = {"cell": CellParams.pack(p), "scale": jnp.asarray(-2.5, jnp.float64)}
    norm = normalize_per_tensor()
    out, _ = norm.update(grads, norm.init(grads))
    ref, _ = norm.update({"cell": p, "scale": grads["scale"]}, optax.EmptyState())
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                           out["cell"].unpack(), ref["cell"])
    np.testing.assert_allclose(out["scale"], -2.5 / (2.5 + 1e-8), rtol=1e-12)
    for leaf, g in zip(jax.tree_util.tree_leaves(out["cell"].unpack()), jax.tree_util.tree_leaves(p)):
      n = np.linalg.norm(g)
      np.testing.assert_allclose(np.linalg.norm(leaf), n / (n + 1e-8), rtol=1e-12)
    opt = outer_optimizer("adam", 1e-2)
    params = {"cell": CellParams.pack(p), "scale": jnp.asarray(0.3, jnp.float64)}
    upd, _ = opt.update(grads, opt.init(params), params)
    opt_ref = outer_optimizer("adam", 1e-2)
    params_ref = {"cell": p, "scale": params["scale"]}
    upd_ref, _ = opt_ref.update({"cell": p, "scale": grads["scale"]}, opt_ref.init(params_ref), params_ref)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                           upd["cell"].unpack(), upd_ref["cell"])


def test_a_file_written_with_the_17_tensors_restores_packed(tmp_path):
  """A rule and its optimizer state saved in the layout of earlier mplp versions (every
  stateful cell as its 17 tensors) restore into today's template, packed, value for value;
  a file of another configuration is still refused."""
  net = presets.network("sinusoid_5x10")
  meta = net.init_meta(jax.random.PRNGKey(0))
  opt = outer_optimizer("adam", 1e-3)
  state = {"trainable": meta.params, "opt_state": opt.init(meta.params), "stats": meta.stats}
  cells = [x for x in jax.tree_util.tree_leaves(state, is_leaf=cell_params.is_cell) if cell_params.is_cell(x)]
  assert len(cells) == 3 * 9  # params, Adam's mu and nu of the 9 agent kinds
  old = cell_params.unpack_all(state)
  assert len(jax.tree_util.tree_leaves(old)) == len(jax.tree_util.tree_leaves(state)) + 27 * 16
  path = checkpoint.save(tmp_path, 7, old, {"note": "written by an earlier mplp"})
  template = jax.eval_shape(lambda: state)
  restored, info = checkpoint.restore(path, template)
  assert info["note"] == "written by an earlier mplp"
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
  other = jax.eval_shape(lambda: {**state, "stats": ()})
  try:
    checkpoint.restore(path, other)
  except checkpoint.CheckpointError as e:
    assert "different configuration" in str(e)
  else:
    raise AssertionError("a checkpoint of another configuration was restored")
