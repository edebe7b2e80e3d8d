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
  has_statistics = False

  def reduce_messages(self, messages, axis: int):
    """Backprop sums the weight agents' messages (w_ij g_j) over fan-out."""
    return jnp.sum(messages, axis=axis)

  def carry_sizes(self, layer):
    return {k: 0 for k in layer.kinds}

  def init(self, key, network) -> MetaParams:
    return MetaParams({}, ())

  def run(self, meta, index, layer, kind, inputs, carry):
    """The `mplp.contracts.Rule` contract; no statistics. Returns (update or None,
    message [..., 1], carry, None)."""
    agents = {"loss": self._loss, "activation": self._elementwise, "softmax": self._elementwise,
              "bias": self._bias, "weight": self._weight}
    if kind not in agents:
      raise ValueError(f"BackpropRule: unknown agent kind {kind!r}; allowed: {sorted(agents)}")
    update, msg = agents[kind](layer, {k: v[..., 0] for k, v in inputs.items()})
    return update, msg[..., None], carry, None

  @staticmethod
  def _loss(layer, x):  # dL/d(prediction), per example
    pred, target = x[layer.predicted], x["target"]
    _, vjp = jax.vjp(lambda p: layer.elementwise(p, target), pred)
    return None, vjp(jnp.ones_like(pred))[0]

  @staticmethod
  def _elementwise(layer, x):  # the chain rule through the layer's function
    _, vjp = jax.vjp(layer.apply, x["input"])
    return None, vjp(x["message"])[0]

  def _bias(self, layer, x):  # db = -lr mean_b g; the message passes through
    return -self.learning_rate * jnp.mean(x["message"], axis=0), x["message"]

  def _weight(self, layer, x):  # dW_ij = -lr mean_b x_i g_j; message w_ij g_j
    g = x["message"]
    return -self.learning_rate * jnp.mean(x["input"] * g, axis=0), x["value"] * g
