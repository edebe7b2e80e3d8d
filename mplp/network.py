"""A network of MP layers ending in a loss, run as a society of agents.

`Network(input_size, layers, rule)` is static configuration; everything that changes is a
pytree passed in and returned:

* inner state: a tuple with one dict per layer (`Dense`: w [I, O], b [O],
  w_carry [B, I, O, Cw], b_carry [B, O, Cb]; elementwise layers and the loss:
  carry [B, U, C]);
* meta-parameters: whatever `rule.init` returns (`MetaParams` for learned rules).

`inner_step` = forward, loss, message passing from the loss back to the input, and
updates; `unroll` scans it over T batches. All functions are pure: `jit`, `vmap` (over
tasks) and `grad` (with respect to the meta-parameters, through an unroll) apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from mplp.contracts import Layer, Rule
from mplp.episode import scan_steps
from mplp.layers import Dense
from mplp.losses import _Loss

InnerState = Tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Network:
  """A sequential network `layers` (the last one a loss) with agents from `rule`.

  Attributes:
    input_size: width of the input x [B, input_size].
    layers: e.g. (Dense(20), Activation('relu'), Dense(1), L2()).
    rule: a `LearnedRule`, a `BackpropRule`, or anything that keeps the `mplp.contracts.Rule`
      contract.
  """
  input_size: int
  layers: Tuple[Layer, ...]
  rule: Rule

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if not isinstance(self.input_size, int) or self.input_size < 1:
      raise ValueError(f"Network.input_size must be a positive int, got {self.input_size!r}")
    if not self.layers:
      raise ValueError("Network.layers is empty: give at least one layer and a loss")
    for i, layer in enumerate(self.layers[:-1]):
      if isinstance(layer, _Loss):
        raise ValueError(
            f"layer {i} ({type(layer).__name__}) is a loss but is not last: a loss must be "
            f"the last layer (network has {len(self.layers)} layers)")
    if not isinstance(self.layers[-1], _Loss):
      raise ValueError(
          f"the last layer must be a loss (L2, L1 or CrossEntropy), got "
          f"{type(self.layers[-1]).__name__} at layer {len(self.layers) - 1}")
    widths = [self.input_size]
    for layer in self.layers[:-1]:
      widths.append(layer.out_width(widths[-1]))
    object.__setattr__(self, "widths", tuple(widths))

  @property
  def output_size(self) -> int:
    return self.widths[-1]

  @property
  def dense_layers(self) -> Tuple[int, ...]:
    """Indices of the Dense layers."""
    return tuple(i for i, l in enumerate(self.layers) if isinstance(l, Dense))

  def init_meta(self, key):
    """Fresh meta-parameters of the rule for this network."""
    return self.rule.init(key, self)

  def init(self, key, batch_size: int, weights: Optional[Sequence[Tuple[Any, Any]]] = None) -> InnerState:
    """A fresh inner state: W ~ N(0, 0.05), b = 0 (or `weights`, one (W, b) per Dense
    layer, e.g. a learned prior), carries 0 with batch dimension `batch_size`."""
    if weights is not None and len(weights) != len(self.dense_layers):
      raise ValueError(
          f"init: weights has {len(weights)} (W, b) pairs but the network has "
          f"{len(self.dense_layers)} Dense layers")
    keys = jax.random.split(key, len(self.layers))
    state, k = [], 0
    for i, layer in enumerate(self.layers):
      s = layer.init_state(keys[i], self.widths[i], batch_size, self.rule.carry_sizes(layer))
      if isinstance(layer, Dense) and weights is not None:
        w, b = (jnp.asarray(a, float) for a in weights[k])
        if w.shape != s["w"].shape or b.shape != s["b"].shape:
          raise ValueError(
              f"init: layer {i} (Dense) expects W {s['w'].shape} and b {s['b'].shape}, "
              f"got W {w.shape} and b {b.shape}")
        s = {**s, "w": w, "b": b}
        k += 1
      state.append(s)
    return tuple(state)

  def weights(self, state: InnerState):
    """The (W, b) pairs of the Dense layers."""
    return tuple((state[i]["w"], state[i]["b"]) for i in self.dense_layers)

  def with_weights(self, state: InnerState, weights) -> InnerState:
    """`state` with the Dense layers' (W, b) replaced by `weights` (carries kept)."""
    state = list(state)
    for i, (w, b) in zip(self.dense_layers, weights):
      state[i] = {**state[i], "w": w, "b": b}
    return tuple(state)

  def _check(self, state, x, y=None):
    batch = state[0]["w_carry"].shape[0] if isinstance(self.layers[0], Dense) else state[0]["carry"].shape[0]
    if x.ndim != 2 or x.shape[1] != self.input_size:
      raise ValueError(
          f"input x has shape {x.shape} but layer 0 ({type(self.layers[0]).__name__}) takes "
          f"[batch, {self.input_size}]")
    if x.shape[0] != batch:
      raise ValueError(
          f"input x has batch {x.shape[0]} but the inner state was made for batch {batch} "
          f"(carries are per example); x shape {x.shape}")
    if y is not None and (y.ndim != 2 or y.shape != (x.shape[0], self.output_size)):
      raise ValueError(
          f"targets y have shape {y.shape} but the loss (layer {len(self.layers) - 1}, "
          f"{type(self.layers[-1]).__name__}) expects [{x.shape[0]}, {self.output_size}]")

  def forward(self, state: InnerState, x):
    """x: [B, in] -> prediction [B, out] (the input of the loss)."""
    if x.ndim != 2 or x.shape[1] != self.input_size:
      raise ValueError(
          f"input x has shape {x.shape} but layer 0 ({type(self.layers[0]).__name__}) takes "
          f"[batch, {self.input_size}]")
    h = x
    for layer, s in zip(self.layers[:-1], state[:-1]):
      h, _ = layer.forward(s, h)
    return h

  def loss(self, state: InnerState, x, y):
    """The scalar inner loss (sum over outputs, mean over the batch)."""
    return self.layers[-1].value(self.forward(state, x), y)

  def step_with_stats(self, meta, state: InnerState, x, y):
    """`inner_step` that also returns the statistics each agent kind used
    (per layer, per kind; what `mplp.minibatch_init` averages)."""
    new_state, metrics, used, _ = self.step_traced(meta, state, x, y)
    return new_state, metrics, used

  def step_traced(self, meta, state: InnerState, x, y):
    """`step_with_stats` that also returns the message every layer received: a tuple,
    for each layer but the loss, of [B, U, M] (U = the layer's output width), the
    message about its output (what `mplp.analysis` compares with dL/d output)."""
    self._check(state, x, y)
    n = len(self.layers)
    h, memories = x, []
    for layer, s in zip(self.layers[:-1], state[:-1]):
      h, mem = layer.forward(s, h)
      memories.append(mem)
    loss_layer = self.layers[-1]
    _, mem = loss_layer.forward(state[-1], h, y)
    new_state, used, received = [None] * n, [None] * n, [None] * (n - 1)
    new_state[-1], msg, used[-1] = loss_layer.backward(self.rule, meta, n - 1, state[-1], mem)
    for i in reversed(range(n - 1)):
      received[i] = msg
      new_state[i], msg, used[i] = self.layers[i].backward(
          self.rule, meta, i, state[i], memories[i], msg)
    metrics = {"loss": loss_layer.value(h, y)}
    return tuple(new_state), metrics, tuple(used), tuple(received)

  def inner_step(self, meta, state: InnerState, x, y):
    """One step of learning on a batch.

    Args:
      meta: the rule's meta-parameters.
      state: the inner state (see module docstring).
      x: [B, in] inputs; y: [B, out] targets.
    Returns:
      (new state, {"loss": loss on this batch before the update}).
    """
    new_state, metrics, _ = self.step_with_stats(meta, state, x, y)
    return new_state, metrics

  def unroll(self, meta, state: InnerState, xs, ys):
    """T inner steps (`mplp.episode.scan_steps`). xs: [T, B, in], ys: [T, B, out] ->
    (final state, metrics with a leading [T] axis)."""
    return scan_steps(lambda s, x, y: self.inner_step(meta, s, x, y), state, xs, ys)
