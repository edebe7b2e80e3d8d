"""Import of the authors' published MPLP weights (flat float32 `.npy` vectors).

The flat vector concatenates, row-major, for each layer in order (the loss last), for
each agent kind (dense layers: weight agents, then bias agents):
the input standardizer `[1/std per input..., -mean per input...]`, the learner (unless
shared), and for agents that own a parameter the output standardizer
`[out_scale, out_mean]` (a stateless learner puts it between its update MLP and its
message MLP); then the shared learners (weight, then bias, then activation).
A stateful learner is: update gate (input kernel, carry kernel, bias), reset gate (same),
candidate bias, input MLP (kernel, bias, kernel, bias, kernel), carry MLP (same).

`load_published(path, experiment)` returns `(network, meta)` that run the published
protocol in mplp; `load_prior(path, network)` reads a learned initial network
(W1, b1, W2, b2, ... flattened in that order).
"""

from __future__ import annotations

import os
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mplp import cell_params, presets
from mplp.learned import PARAM_KINDS, MetaParams
from mplp.network import Network

_MLP = lambda prefix, n, last_bias: [
    (f"{prefix}_{i}", p) for i in range(n) for p in (("w", "b") if i < n - 1 or last_bias else ("w",))]
_STATEFUL = ([("gru", k) for k in ("wzx", "wzc", "bz", "wrx", "wrc", "br", "b")]
             + _MLP("gru/mlp_x", 3, False) + _MLP("gru/mlp_c", 3, False))


def _kind_order(layer):
  # Dense layers store weight agents before bias agents.
  return ("weight", "bias") if "weight" in layer.kinds else layer.kinds


def _slots(network: Network, meta: MetaParams) -> List[Tuple[Tuple, Tuple[int, ...], bool]]:
  """The flat vector's tensors in order: (where in `meta`, shape, negate)."""
  rule = network.rule
  out = []

  def net(where, family, has_update, part=None):
    if family == "stateful":
      order = _STATEFUL
    elif part == "update":
      order = _MLP("update", 3, True)
    else:
      order = _MLP("message", 3, True)
    for module, name in order:
      out.append((where + (module, name), None, False))

  for i, layer in enumerate(network.layers):
    for kind in _kind_order(layer):
      n = len(layer.entries[kind])
      out.append((("stats", i, kind, "in_scale"), (n,), False))
      out.append((("stats", i, kind, "in_mean"), (n,), True))
      where = ("params", "layers", i, kind, "net")
      owns = kind in PARAM_KINDS
      scale = [(("params", "layers", i, kind, "out_scale"), (), False),
               (("stats", i, kind, "out_mean"), (), False)]
      if kind in rule.shared:
        out.extend(scale if owns else [])
      elif rule.family == "stateful":
        net(where, "stateful", owns)
        out.extend(scale if owns else [])
      else:
        if owns:
          net(where, "stateless", True, "update")
          out.extend(scale)
        net(where, "stateless", owns, "message")
  for kind in ("weight", "bias", "activation"):
    if kind in rule.shared:
      where = ("params", "shared", kind)
      if rule.family == "stateful":
        net(where, "stateful", kind in PARAM_KINDS)
      else:
        if kind in PARAM_KINDS:
          net(where, "stateless", True, "update")
        net(where, "stateless", False, "message")
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  """Functional update of nested dicts/tuples/NamedTuples."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(tree, MetaParams):
    return tree._replace(**{head: _set(getattr(tree, head), rest, value)})
  if isinstance(tree, tuple):
    items = list(tree)
    items[head] = _set(items[head], rest, value)
    return tuple(items)
  return {**tree, head: _set(tree[head], rest, value)}


def _root(meta, path):
  return _get(getattr(meta, path[0]), path[1:])


def flat_size(network: Network) -> int:
  """Number of values in the published flat vector for `network`."""
  meta = cell_params.unpack_all(network.init_meta(jax.random.PRNGKey(0)))
  return sum(int(np.prod(np.shape(_root(meta, p)))) for p, _, _ in _slots(network, meta))


def _check_finite(flat: np.ndarray, what: str):
  bad = np.flatnonzero(~np.isfinite(flat))
  if bad.size:
    raise ValueError(f"{what} hold {bad.size} non-finite values (NaN or inf; the first at index "
                     f"{bad[0]}); allowed: finite float32 values only")


def import_flat(flat: np.ndarray, network: Network) -> MetaParams:
  """The published flat vector -> `MetaParams` for `network`."""
  flat = np.asarray(flat, np.float32).ravel()
  template = network.init_meta(jax.random.PRNGKey(0))
  meta = cell_params.unpack_all(template)  # the stateful cells' tensors by name
  slots = _slots(network, meta)
  sizes = [int(np.prod(np.shape(_root(meta, p)))) for p, _, _ in slots]
  if flat.size != sum(sizes):
    raise ValueError(
        f"the published weights have {flat.size} values but this architecture needs "
        f"{sum(sizes)}; is it the right experiment?")
  _check_finite(flat, "the published weights")
  offset = 0
  for (path, _, negate), size in zip(slots, sizes):
    shape = np.shape(_root(meta, path))
    value = flat[offset:offset + size].reshape(shape)
    offset += size
    meta = _set(meta, path, jnp.asarray(-value if negate else value))
  return cell_params.pack_like(meta, template)


def load_published(path: str, experiment: str, **overrides) -> Tuple[Network, MetaParams]:
  """Read the authors' `.npy` for one of `presets.PRESETS` -> (network, meta)."""
  network = presets.network(experiment, **overrides)
  if not os.path.exists(path):
    raise FileNotFoundError(f"published weights file not found: {path}")
  flat = np.load(path, allow_pickle=False)
  return network, import_flat(flat, network)


def load_prior(path: str, network: Network):
  """A learned initial inner network (flat W1, b1, W2, b2, ...) -> ((W, b), ...)."""
  flat = np.asarray(np.load(path, allow_pickle=False), np.float32).ravel()
  shapes = []
  for i in network.dense_layers:
    units = network.layers[i].units
    shapes += [(network.widths[i], units), (units,)]
  need = sum(int(np.prod(s)) for s in shapes)
  if flat.size != need:
    raise ValueError(f"the prior has {flat.size} values but the network's dense layers need {need}")
  _check_finite(flat, "the prior")
  arrays, offset = [], 0
  for s in shapes:
    n = int(np.prod(s))
    arrays.append(jnp.asarray(flat[offset:offset + n].reshape(s)))
    offset += n
  return tuple(zip(arrays[0::2], arrays[1::2]))
