"""Access to the authors' published weights and trajectories in ../shared/reference/."""

import os

import jax.numpy as jnp
import pytest

from mplp.layers import Dense

REF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
CASES = {
    # experiment: (weights, trajectory, prior)
    "sinusoid_5x10": ("sinusoid_weights_00035869.npy", "sinusoid_5x10_mplp.npz", None),
    "maml_sinusoid_2x10": ("maml_sin_net_weights_00258202.npy", "maml_sinusoid_2x10.npz",
                           "maml_sin_prior_weights_00258202.npy"),
    "mnist_20x8": ("mnist_weights_00005000.npy", "mnist_144_50_mplp.npz", None),
}


def path(name):
  p = os.path.join(REF, name)
  if not os.path.exists(p):
    pytest.skip(f"reference file {p} not present")
  return p


def state_from_pfw(network, traj, t):
  """The authors' pfw{t}_{j} list -> our inner state (same order, carries only if C > 0)."""
  arrays = [traj[f"pfw{t}_{j}"] for j in range(sum(1 for k in traj if k.startswith(f"pfw{t}_")))]
  it = iter(arrays)
  state = []
  for layer in network.layers:
    sizes = network.rule.carry_sizes(layer)
    if isinstance(layer, Dense):
      s = {"w": next(it), "b": next(it)}
      s["w_carry"] = next(it) if sizes["weight"] else None
      s["b_carry"] = next(it) if sizes["bias"] else None
    else:
      s = {"carry": next(it) if sizes[layer.kinds[0]] else None}
    state.append(s)
  assert next(it, None) is None, "trajectory has more tensors than the network"
  return state


def fill_state(reference_state, template):
  """Reference tensors where they exist, template (zero carries) elsewhere."""
  return tuple({k: jnp.asarray(r[k]) if r[k] is not None else t[k] for k in t}
               for r, t in zip(reference_state, template))
