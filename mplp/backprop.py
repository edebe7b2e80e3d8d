"""Hand-written agents that compute exact backprop messages and SGD updates.

Plugged into the same layers as the learned agents, they turn a network's inner step
into one step of SGD on the scalar inner loss (sum over outputs, mean over the batch):
a test oracle for the wiring of the message passing (messages reach the right agents
with the right reductions), and a baseline rule. Messages have one channel: the
per-example gradient of the loss with respect to the layer's output.

Every agent is local except the softmax agents, whose exact backward message needs the
whole row (p * (g - sum_j p_j g_j)); this oracle lets them see it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mplp.learned import MetaParams


@dataclasses.dataclass(frozen=True)
class BackpropRule:
  """SGD with `learning_rate` expressed as MPLP agents (message size 1, no carry)."""
  learning_rate: float = 0.1
  reduce = "sum"  # backprop sums the weight agents' messages over fan-out

  def carry_sizes(self, layer):
    return {k: 0 for k in layer.kinds}

  def init(self, key, network) -> MetaParams:
    return MetaParams({}, ())

  def run(self, meta, index, layer, kind, inputs, carry):
    """Same contract as `LearnedRule.run`; no statistics."""
    if kind == "loss":
      names = layer.entries["loss"]
      pred, target = inputs[names[1]][..., 0], inputs["target"][..., 0]
      _, vjp = jax.vjp(lambda p: layer.elementwise(p, target), pred)
      (g,) = vjp(jnp.ones_like(pred))
      return None, g[..., None], carry, None
    g = inputs["message"][..., 0]
    if kind in ("activation", "softmax"):
      _, vjp = jax.vjp(layer.apply, inputs["input"][..., 0])
      (out,) = vjp(g)
      return None, out[..., None], carry, None
    if kind == "bias":
      return -self.learning_rate * jnp.mean(g, axis=0), g[..., None], carry, None
    if kind == "weight":
      w, x = inputs["value"][..., 0], inputs["input"][..., 0]
      delta = -self.learning_rate * jnp.mean(x * g, axis=0)
      return delta, (w * g)[..., None], carry, None
    raise ValueError(f"BackpropRule: unknown agent kind {kind!r}")
