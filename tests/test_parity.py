"""Parity with the authors' implementation: their weights, their trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplp import reference
import reference_data as rd


@pytest.mark.parametrize("experiment", list(rd.CASES))
def test_inner_steps_reproduce_reference_trajectory(experiment):
  weights, trajectory, _ = rd.CASES[experiment]
  net, meta = reference.load_published(rd.path(weights), experiment)
  traj = np.load(rd.path(trajectory))
  steps, batch = traj["x"].shape[:2]
  template = net.init(jax.random.PRNGKey(0), batch)
  state = rd.fill_state(rd.state_from_pfw(net, traj, 0), template)
  step = jax.jit(net.inner_step)
  checked = 0
  for t in range(steps + 1):
    pred = net.forward(state, jnp.asarray(traj["x_eval"]))
    np.testing.assert_allclose(pred, traj[f"pred{t}"], rtol=1e-4, atol=1e-4, err_msg=f"pred{t}")
    for i, (ours, ref) in enumerate(zip(state, rd.state_from_pfw(net, traj, t))):
      for k, r in ref.items():
        if r is None:
          continue
        np.testing.assert_allclose(ours[k], r, rtol=1e-4, atol=1e-4,
                                   err_msg=f"pfw{t} layer {i} {k}")
        checked += 1
    if t < steps:
      state, _ = step(meta, state, jnp.asarray(traj["x"][t]), jnp.asarray(traj["y"][t]))
  # The trajectory really moves: step 0 and the last step differ by far more than the tolerance.
  first, last = rd.state_from_pfw(net, traj, 0)[0]["w"], rd.state_from_pfw(net, traj, steps)[0]["w"]
  assert np.abs(first - last).max() > 1e-2
  assert checked >= (steps + 1) * 6


def test_maml_prior_is_the_trajectory_start():
  weights, trajectory, prior = rd.CASES["maml_sinusoid_2x10"]
  net, _ = reference.load_published(rd.path(weights), "maml_sinusoid_2x10")
  loaded = reference.load_prior(rd.path(prior), net)
  state = net.init(jax.random.PRNGKey(0), 10, weights=loaded)
  traj = np.load(rd.path(trajectory))
  for i, (ours, ref) in enumerate(zip(state, rd.state_from_pfw(net, traj, 0))):
    if "w" in ours:
      np.testing.assert_array_equal(ours["w"], ref["w"])
      np.testing.assert_array_equal(ours["b"], ref["b"])


def _layout_shapes(name):
  rows = []
  with open(rd.path(name)) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      shape = line.split("\t")[3]
      rows.append(tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()))
  return rows


@pytest.mark.parametrize("experiment,layout", [
    ("sinusoid_5x10", "sinusoid_weights_00035869_layout.txt"),
    ("maml_sinusoid_2x10", "maml_sin_net_weights_00258202_layout.txt"),
    ("mnist_20x8", "mnist_weights_00005000_layout.txt"),
])
def test_import_layout_matches_published_layout(experiment, layout):
  """Our tensor order reproduces every shape of the authors' layout, in order."""
  from mplp import presets
  net = presets.network(experiment)
  meta = net.init_meta(jax.random.PRNGKey(0))
  ours = []
  for path, _, _ in reference._slots(net, meta):
    shape = tuple(np.shape(reference._root(meta, path)))
    # The published layout lists each standardizer scalar as its own row.
    ours += [()] * shape[0] if path[-1] in ("in_scale", "in_mean") else [shape]
  assert ours == _layout_shapes(layout)


def test_wrong_size_is_refused(tmp_path):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros(123, np.float32))
  with pytest.raises(ValueError, match="123 values but this architecture needs 115081"):
    reference.load_published(str(bad), "sinusoid_5x10")
  with pytest.raises(ValueError, match="unknown experiment 'nope'; known:"):
    reference.load_published(str(bad), "nope")
