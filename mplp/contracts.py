"""The contracts between mplp's parts, as typed Protocols (cf. optax's `TransformInitFn`).

* `Rule` — what a `Network`'s layers call for their agents: the learned rule
  (`mplp.learned.LearnedRule`) and the backprop oracle (`mplp.backprop.BackpropRule`).
* `Layer` — an MP layer (`mplp.layers.Dense`, `Activation`, `Softmax`; losses are layers
  too, with a `value`): an ordinary forward, a backward that hands its agents to the rule.
* `Estimator` — a meta-gradient estimator (`mplp.estimators`), which sees the outer loss
  only as a function.

Shapes: B inner batch, M message size, C an agent kind's carry size; a kind's agents
have a leading shape such as [B, I, O] (weight agents) or [B, U] (elementwise units).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple

import jax

Array = jax.Array


class Rule(Protocol):
  has_statistics: bool  # standardization statistics measured by mplp.minibatch_init

  def carry_sizes(self, layer: "Layer") -> Dict[str, int]:
    """C for each agent kind of `layer`."""

  def init(self, key: Array, network: Any) -> Any:
    """Fresh meta-parameters for every layer of `network` (`MetaParams`)."""

  def reduce_messages(self, messages: Array, axis: int) -> Array:
    """How a dense layer combines its weight agents' messages over fan-out (the axis of
    O in [B, I, O, M]): a mean for learned agents, a sum for backprop."""

  def run(self, meta: Any, index: int, layer: "Layer", kind: str, inputs: Mapping[str, Array],
          carry: Array) -> Tuple[Optional[Array], Array, Array, Any]:
    """All agents of one kind in one layer.

    Args:
      meta: the meta-parameters; index: the layer's position in the network.
      inputs: `{name: [B, ..., k]}` in the order of `layer.entries[kind]`.
      carry: [B, ..., C].
    Returns:
      (update of the layer's parameter or None, outgoing message [B, ..., M],
       new carry [B, ..., C], the statistics used or None).
    """


class Layer(Protocol):
  kinds: Tuple[str, ...]                   # agent kinds, in backward order
  entries: Dict[str, Tuple[str, ...]]      # per kind, the named inputs its agents read

  def out_width(self, in_width: int) -> int:
    ...

  def init_state(self, key: Array, in_width: int, batch: int, carry_sizes: Dict[str, int]) -> Dict[str, Array]:
    """Parameters and every agent's carry (zeros) for a batch of `batch` examples."""

  def forward(self, state: Dict[str, Array], x: Array) -> Tuple[Array, Dict[str, Array]]:
    """x [B, in] -> (y [B, out], what its agents remember for the backward)."""

  def backward(self, rule: Rule, meta: Any, index: int, state: Dict[str, Array], memory: Dict[str, Array],
               msg: Array) -> Tuple[Dict[str, Array], Array, Dict[str, Any]]:
    """msg [B, out, M] -> (new state, message for the layer below [B, in, M], statistics)."""


LossFn = Callable[[Any, Any], Tuple[Array, Tuple[Dict[str, Array], Any]]]
"""`loss(trainable, carry) -> (mean outer loss [], (metrics {name: []}, advanced carry))`."""


class Estimator(Protocol):
  truncation: int  # K inner steps per meta-gradient window; 0: whole unrolls

  def init_carry(self, blank: Any, outer_batch: int, trainable: Any) -> Any:
    """What the estimator keeps between meta-steps (() for whole unrolls; with a window,
    `outer_batch` runs in progress whose inner states are shaped like `blank`)."""

  def estimate(self, loss: LossFn, trainable: Any, key: Array, carry: Any) -> Tuple[Array, Dict[str, Array], Any, Any]:
    """(loss [], metrics, meta-gradient like `trainable`, new carry)."""

  def restart(self, carry: Any, ok: Array) -> Any:
    """The carry after a step whose loss or gradient was not finite (`ok` False)."""
