"""Loss layers: the last layer of a network; their agents emit the first message.

A loss agent (one per output unit per example, [B, O]) reads the per-element loss value
(in the role of the incoming message) and what the loss remembered, and emits a message
[B, O, M] for the layer below. The scalar inner loss is the per-example sum over O,
averaged over the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mplp.layers import _Elementwise, _ch

Array = jax.Array
CE_EPS = 1e-7  # probabilities are clipped to [1e-7, 1 - 1e-7]


@dataclasses.dataclass(frozen=True)
class _Loss(_Elementwise):
  kinds = ("loss",)
  predicted = "prediction"  # the entry that holds what the network predicted

  def elementwise(self, pred: Array, target: Array) -> Array:
    """Per-element loss [B, O]."""
    raise NotImplementedError

  def forward(self, state, pred: Array, target: Array):
    """pred, target: [B, O] -> (per-element loss [B, O], memory)."""
    raise NotImplementedError

  def value(self, pred: Array, target: Array) -> Array:
    """The scalar loss: sum over outputs, mean over the batch."""
    return jnp.mean(jnp.sum(self.elementwise(pred, target), axis=-1))

  def backward(self, rule, meta, index: int, state, memory, msg=None):
    """-> (new state, first message [B, O, M], statistics used)."""
    inputs = {k: _ch(v) for k, v in memory.items()}
    _, out, carry, stats = rule.run(meta, index, self, "loss", inputs, state["carry"])
    return {"carry": carry}, out, {"loss": stats}


@dataclasses.dataclass(frozen=True)
class L2(_Loss):
  """(target - pred)^2 / 2; agents see loss, prediction, target, target - prediction."""
  entries = {"loss": ("loss", "prediction", "target", "difference")}

  def elementwise(self, pred, target):
    return 0.5 * jnp.square(target - pred)

  def forward(self, state, pred, target):
    diff = target - pred
    loss = 0.5 * jnp.square(diff)
    return loss, {"loss": loss, "prediction": pred, "target": target, "difference": diff}


@dataclasses.dataclass(frozen=True)
class L1(_Loss):
  """|target - pred|; agents see loss, prediction, target, target - prediction."""
  entries = {"loss": ("loss", "prediction", "target", "difference")}

  def elementwise(self, pred, target):
    return jnp.abs(target - pred)

  def forward(self, state, pred, target):
    diff = target - pred
    loss = jnp.abs(diff)
    return loss, {"loss": loss, "prediction": pred, "target": target, "difference": diff}


@dataclasses.dataclass(frozen=True)
class CrossEntropy(_Loss):
  """-target * log(clip(p)) on probabilities (put a Softmax before it); agents see
  loss, clipped probability, target, log of the clipped probability."""
  entries = {"loss": ("loss", "probability", "target", "log_probability")}
  predicted = "probability"

  def elementwise(self, pred, target):
    return -target * jnp.log(jnp.clip(pred, CE_EPS, 1.0 - CE_EPS))

  def forward(self, state, pred, target):
    p = jnp.clip(pred, CE_EPS, 1.0 - CE_EPS)
    logp = jnp.log(p)
    loss = -target * logp
    return loss, {"loss": loss, "probability": p, "target": target, "log_probability": logp}
