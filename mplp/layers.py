"""MP layers: an ordinary forward rule plus a learned backward rule.

A layer is a frozen dataclass (static under `jit`); its state is a dict of arrays. The
backward rule gathers what the layer's agents see (the incoming message and what they
remembered in the forward pass) and hands it to the `Rule` (learned agents, or the
backprop oracle), one call per agent kind covering every agent of that kind.

Shapes: B = inner batch, I/O = fan-in/fan-out of a dense layer, U = units of an
elementwise layer, M = message size, C = carry size of the agent kind.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Union

import jax
import jax.numpy as jnp

Array = jax.Array
State = Dict[str, Array]

INIT_STD = 0.05  # W ~ Normal(0, 0.05), b = 0 (the published initialisation)


def _step_fn(x):
  """The non-differentiable step activation max(0, sign(x))."""
  return jnp.maximum(0.0, jnp.sign(x))


ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "step": _step_fn,
    "identity": lambda x: x,
}


def _ch(x: Array) -> Array:
  """[...] -> [..., 1]: a remembered tensor as one input channel."""
  return x[..., None]


@dataclasses.dataclass(frozen=True)
class Dense:
  """y = x @ W + b with weight agents [B, I, O] and bias agents [B, O].

  Backward: the bias agents run first on the incoming message [B, O, M]; their message
  (not the raw incoming one) is what weight agent (i, j) reads, together with W_ij and
  x_i. The weight agents' messages [B, I, O, M] are reduced over O (the rule's
  `reduce_messages`: mean for learned agents) to give the message [B, I, M] for the layer below.
  """
  units: int
  kinds = ("bias", "weight")
  entries = {"bias": ("message", "value", "input"), "weight": ("message", "value", "input")}

  def __post_init__(self):
    if not isinstance(self.units, int) or self.units < 1:
      raise ValueError(f"Dense.units must be a positive int, got {self.units!r}")

  def out_width(self, in_width: int) -> int:
    return self.units

  def init_state(self, key, in_width: int, batch: int, carry_sizes) -> State:
    """W [I, O] ~ N(0, 0.05), b [O] = 0, carries [B, I, O, Cw] and [B, O, Cb] = 0."""
    return {
        "w": INIT_STD * jax.random.normal(key, (in_width, self.units), float),
        "b": jnp.zeros((self.units,), float),
        "w_carry": jnp.zeros((batch, in_width, self.units, carry_sizes["weight"]), float),
        "b_carry": jnp.zeros((batch, self.units, carry_sizes["bias"]), float),
    }

  def forward(self, state: State, x: Array):
    """x: [B, I] -> y [B, O]; remembers x and x @ W."""
    xw = x @ state["w"]
    return xw + state["b"], {"x": x, "xw": xw}

  def backward(self, rule, meta, index: int, state: State, memory, msg: Array):
    """msg: [B, O, M] -> (new state, message [B, I, M], statistics used per kind)."""
    b, w, x, xw = state["b"], state["w"], memory["x"], memory["xw"]
    # Inputs stay unbroadcast ([1, O, 1] for the bias values); agents broadcast them.
    bias_in = {"message": msg, "value": _ch(b[None]), "input": _ch(xw)}
    db, b_msg, b_carry, b_stats = rule.run(meta, index, self, "bias", bias_in, state["b_carry"])
    weight_in = {                              # broadcast to [B, I, O, .] by the agents
        "message": b_msg[:, None],             # [B, 1, O, M]
        "value": _ch(w[None]),                 # [1, I, O, 1]
        "input": _ch(x[:, :, None]),           # [B, I, 1, 1]
    }
    dw, w_msg, w_carry, w_stats = rule.run(meta, index, self, "weight", weight_in, state["w_carry"])
    new = {"w": w + dw, "b": b + db, "w_carry": w_carry, "b_carry": b_carry}
    return new, rule.reduce_messages(w_msg, axis=2), {"bias": b_stats, "weight": w_stats}


@dataclasses.dataclass(frozen=True)
class _Elementwise:
  """A parameter-free layer with one agent per unit per example ([B, U])."""
  kinds = ("activation",)

  def out_width(self, in_width: int) -> int:
    return in_width

  def init_state(self, key, in_width: int, batch: int, carry_sizes) -> State:
    kind = self.kinds[0]
    return {"carry": jnp.zeros((batch, in_width, carry_sizes[kind]), float)}

  def backward(self, rule, meta, index: int, state: State, memory, msg: Array):
    """msg: [B, U, M] -> (new state, message [B, U, M], statistics used per kind)."""
    inputs = {"message": msg, **{k: _ch(v) for k, v in memory.items()}}
    kind = self.kinds[0]
    _, out, carry, stats = rule.run(meta, index, self, kind, inputs, state["carry"])
    return {"carry": carry}, out, {kind: stats}


@dataclasses.dataclass(frozen=True)
class Activation(_Elementwise):
  """y = fn(x) elementwise; agents see the message and the pre-activation x.

  `fn` is a name from `ACTIVATIONS` (relu, sigmoid, tanh, step, identity) or any
  elementwise callable (give it a `__name__`).
  """
  fn: Union[str, Callable[[Array], Array]] = "relu"
  entries = {"activation": ("message", "input")}

  def __post_init__(self):
    if isinstance(self.fn, str) and self.fn not in ACTIVATIONS:
      raise ValueError(
          f"Activation: unknown activation {self.fn!r}; allowed: {sorted(ACTIVATIONS)} "
          "or an elementwise callable")
    if not isinstance(self.fn, str) and not callable(self.fn):
      raise ValueError(f"Activation.fn must be a name or a callable, got {self.fn!r}")

  @property
  def function(self) -> Callable[[Array], Array]:
    return ACTIVATIONS[self.fn] if isinstance(self.fn, str) else self.fn

  def apply(self, x: Array) -> Array:
    return self.function(x)

  def forward(self, state: State, x: Array):
    """x: [B, U] -> fn(x) [B, U]; remembers x."""
    return self.function(x), {"input": x}


@dataclasses.dataclass(frozen=True)
class Softmax(_Elementwise):
  """Row softmax; agents see the message, the input, the max-shifted input, the
  exponentials and their sum (broadcast to every unit)."""
  kinds = ("softmax",)
  entries = {"softmax": ("message", "input", "shifted", "exps", "sum")}

  def apply(self, x: Array) -> Array:
    return jax.nn.softmax(x, axis=-1)

  def forward(self, state: State, x: Array):
    """x: [B, U] -> softmax(x) [B, U]."""
    shifted = x - jnp.max(x, axis=-1, keepdims=True)
    exps = jnp.exp(shifted)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    mem = {"input": x, "shifted": shifted, "exps": exps, "sum": jnp.broadcast_to(total, x.shape)}
    return exps / total, mem
