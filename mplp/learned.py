"""The learned rule: shared agent networks, their standardization, their updates.

`LearnedRule` is what `Network` calls for every agent kind of every layer. Its
meta-parameters are a `MetaParams(params, stats)` pytree:

* `params` (meta-trained): `{"layers": (per layer: {kind: {"net": ..., "out_scale": []}}),
  "shared": {kind: net}}` — "net" is absent for kinds whose network is shared across
  layers; "out_scale" exists for agents that own a parameter (weights, biases).
* `stats` (measured once by `mplp.minibatch_init`, then fixed): per layer, per kind,
  `in_mean [n]`, `in_scale [n]` (one scalar pair per named input) and, for agents that
  own a parameter, `out_mean []` (the update's centring constant).

An agent input is the concatenation of its standardized named inputs,
`(v - in_mean[i]) * in_scale[i]`; a parameter moves by
`(mean over the batch of the update channel - out_mean) * out_scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from mplp import agents

PARAM_KINDS = ("weight", "bias")
SHAREABLE = ("weight", "bias", "activation")
MIN_STD = 1e-5  # a measured std below this gives a scale of 1


class MetaParams(NamedTuple):
  params: Any  # meta-trained
  stats: Any   # measured, then fixed


@dataclasses.dataclass(frozen=True)
class LearnedRule:
  """Learned agents for every layer of a network.

  Attributes:
    family: 'stateful' (GRU-like cell with a carry) or 'stateless' (two MLPs).
    msg_size: M, the message width (>= 1).
    state_size: the stateful cell's own carry channels, between the update channel and the
      message (ignored when stateless; `network.hidden` is the inner network's widths).
    shared: agent kinds (of 'weight', 'bias', 'activation') whose network is shared by
      all layers; each layer keeps its own statistics and output scale.
    out_scale: initial value of the learned output scale (0.05 / 5 in the paper).
    measure: measure the statistics from the current tensors instead of using the
      stored ones (`mplp.minibatch_init` builds such a rule; not for training).
  """
  family: str = "stateful"
  msg_size: int = 8
  state_size: int = 15
  shared: Tuple[str, ...] = ()
  out_scale: float = 0.01
  measure: bool = False
  has_statistics = True

  def reduce_messages(self, messages, axis: int):
    """Weight agents' messages are averaged over fan-out."""
    return jnp.mean(messages, axis=axis)

  def __post_init__(self):
    if self.family not in ("stateful", "stateless"):
      raise ValueError(f"LearnedRule.family must be 'stateful' or 'stateless', got {self.family!r}")
    if not isinstance(self.msg_size, int) or self.msg_size < 1:
      raise ValueError(f"LearnedRule.msg_size (message size) must be an int >= 1, got {self.msg_size!r}")
    if not isinstance(self.state_size, int) or self.state_size < 0:
      raise ValueError(f"LearnedRule.state_size must be an int >= 0, got {self.state_size!r}")
    bad = [k for k in self.shared if k not in SHAREABLE]
    if bad:
      raise ValueError(f"LearnedRule.shared: unknown agent kinds {bad}; allowed: {list(SHAREABLE)}")
    object.__setattr__(self, "shared", tuple(self.shared))

  def agent_net(self, layer, kind: str) -> agents.AgentNet:
    entries = layer.entries[kind]
    width = sum(self.msg_size if e == "message" else 1 for e in entries)
    return agents.make(self.family, width, self.msg_size, self.state_size, kind in PARAM_KINDS)

  def carry_sizes(self, layer):
    return {k: self.agent_net(layer, k).carry_size for k in layer.kinds}

  def init(self, key, network) -> MetaParams:
    """Fresh meta-parameters: glorot nets, out_scale 0.01, identity statistics."""
    layers, stats, shared = [], [], {}
    for layer in network.layers:
      lp, ls = {}, {}
      for kind in layer.kinds:
        net = self.agent_net(layer, kind)
        key, sub = jax.random.split(key)
        entry = {}
        if kind in self.shared:
          if kind not in shared:
            shared[kind] = net.init(sub)
        else:
          entry["net"] = net.init(sub)
        n = len(layer.entries[kind])
        ls[kind] = {"in_mean": jnp.zeros([n]), "in_scale": jnp.ones([n])}
        if kind in PARAM_KINDS:
          entry["out_scale"] = jnp.asarray(self.out_scale, float)
          ls[kind]["out_mean"] = jnp.zeros([], float)
        lp[kind] = entry
      layers.append(lp)
      stats.append(ls)
    return MetaParams({"layers": tuple(layers), "shared": shared}, tuple(stats))

  def run(self, meta: MetaParams, index: int, layer, kind: str, inputs, carry):
    """All agents of one kind in one layer, in one call.

    Args:
      inputs: ordered {name: [B, ..., k]} as in `layer.entries[kind]` (k = M for the
        message, 1 otherwise); leading shapes may broadcast to the agents' shape (a
        mean or std over a broadcast tensor equals the one over its source).
      carry: [B, ..., C].
    Returns:
      (delta [...] for the layer's parameter or None, message [B, ..., M],
       new carry [B, ..., C], statistics used {in_mean, in_scale[, out_mean]}).
    """
    net = self.agent_net(layer, kind)
    entry = meta.params["layers"][index][kind]
    params = meta.params["shared"][kind] if kind in self.shared else entry["net"]
    stats = dict(meta.stats[index][kind])
    values = list(inputs.values())
    if self.measure:
      means = jnp.stack([jnp.mean(v) for v in values])
      stds = jnp.stack([jnp.std(v) for v in values])
      stats["in_mean"] = means
      stats["in_scale"] = jnp.where(stds < MIN_STD, 1.0, 1.0 / jnp.maximum(stds, MIN_STD))
    parts = [(v - stats["in_mean"][i]) * stats["in_scale"][i] for i, v in enumerate(values)]
    update, msg, new_carry = net.apply_in_chunks(params, parts, carry)
    delta = None
    if update is not None:
      u = jnp.mean(update, axis=0)
      if self.measure:
        stats["out_mean"] = jnp.mean(u)
      delta = (u - stats["out_mean"]) * entry["out_scale"]
    return delta, msg, new_carry, stats
