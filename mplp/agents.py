"""The learned agent networks: the only module that uses haiku.

Every agent of one kind in one layer runs the same network. Networks are written for
one agent (`x: [X]`, `carry: [C]`) and applied to any leading shape (`[B, in, out, X]`
for weight agents) in one vectorized call: every op acts on the last axis.

Two families, as in the published protocol:

* `Stateful` — a GRU-like cell whose candidate branches are MLPs::

      z    = sigmoid(x Wzx + c Wzc + bz)          (bz starts at -1)
      r    = sigmoid(x Wrx + c Wrc + br)          (br starts at -1)
      cand = tanh(MLPx(x) + MLPc(r * c) + b)
      c'   = z * c + (1 - z) * cand

  MLP = Dense(80, tanh) -> Dense(40, tanh) -> Dense(C, no bias); glorot-uniform kernels,
  zero biases. C = [1 if the agent owns a parameter] + hidden + M; channel 0 of `c'` is
  the update, the last M channels are the outgoing message.
* `Stateless` — MLPs on the same input, Dense(80, relu) -> Dense(40, relu) -> Dense(k,
  tanh): one with k = 1 for the update (agents that own a parameter), one with k = M for
  the message. No carry (C = 0).

Each network is transformed once; callers get pure `init(key) -> params` and
`apply(params, x, carry) -> (update, message, new_carry)` (`update` is None for agents
without a parameter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

Params = Any

_GLOROT = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
MLP_SIZES = (80, 40)


def _mlp(name: str, sizes, out: int, act, out_act=None, out_bias: bool = True):
  layers = []
  for i, n in enumerate(sizes):
    layers += [hk.Linear(n, w_init=_GLOROT, name=f"{name}_{i}"), act]
  layers.append(hk.Linear(out, with_bias=out_bias, w_init=_GLOROT, name=f"{name}_{len(sizes)}"))
  if out_act is not None:
    layers.append(out_act)
  return hk.Sequential(layers, name=name)


class _GRUCell(hk.Module):
  """The stateful agent cell; see the module docstring for the equations."""

  def __init__(self, carry_size: int, name: str = "gru"):
    super().__init__(name=name)
    self.c = carry_size

  def __call__(self, x, carry):
    x_size = x.shape[-1]
    c = self.c
    p = lambda n, shape, init: hk.get_parameter(n, shape, x.dtype, init)
    wzx = p("wzx", [x_size, c], _GLOROT)
    wzc = p("wzc", [c, c], _GLOROT)
    bz = p("bz", [c], hk.initializers.Constant(-1.0))
    wrx = p("wrx", [x_size, c], _GLOROT)
    wrc = p("wrc", [c, c], _GLOROT)
    br = p("br", [c], hk.initializers.Constant(-1.0))
    b = p("b", [c], jnp.zeros)
    mlp_x = _mlp("mlp_x", MLP_SIZES, c, jnp.tanh, out_bias=False)
    mlp_c = _mlp("mlp_c", MLP_SIZES, c, jnp.tanh, out_bias=False)
    # One matmul for both gates on each side (same numbers, fewer kernel launches).
    gates = x @ jnp.concatenate([wzx, wrx], 1) + carry @ jnp.concatenate([wzc, wrc], 1)
    z = jax.nn.sigmoid(gates[..., :c] + bz)
    r = jax.nn.sigmoid(gates[..., c:] + br)
    cand = jnp.tanh(mlp_x(x) + mlp_c(r * carry) + b)
    return z * carry + (1.0 - z) * cand


@dataclasses.dataclass(frozen=True)
class AgentNet:
  """A transformed agent network for one agent kind.

  Attributes:
    input_size: X, the width of the standardized agent input.
    msg_size: M, the width of the outgoing message.
    carry_size: C, the per-agent state width (0 for stateless).
    has_update: whether the agent owns a parameter (weights, biases).
  """
  input_size: int
  msg_size: int
  carry_size: int
  has_update: bool
  _init: Any = dataclasses.field(repr=False, compare=False)
  _apply: Any = dataclasses.field(repr=False, compare=False)

  def init(self, key) -> Params:
    x = jnp.zeros([1, self.input_size], jnp.float32)
    c = jnp.zeros([1, self.carry_size], jnp.float32)
    return self._init(key, x, c)

  def apply(self, params: Params, x, carry):
    """x: [..., X], carry: [..., C] -> (update [...] or None, message [..., M], carry [..., C])."""
    return self._apply(params, x, carry)


def stateful(input_size: int, msg_size: int, hidden: int, has_update: bool) -> AgentNet:
  """The GRU-like agent with carry [update? | hidden | message]."""
  if msg_size < 1:
    raise ValueError(f"message size must be >= 1, got {msg_size}")
  if hidden < 0:
    raise ValueError(f"hidden size must be >= 0, got {hidden}")
  c = int(has_update) + hidden + msg_size

  def f(x, carry):
    new = _GRUCell(c)(x, carry)
    update = new[..., 0] if has_update else None
    return update, new[..., c - msg_size:], new

  t = hk.without_apply_rng(hk.transform(f))
  return AgentNet(input_size, msg_size, c, has_update, t.init, t.apply)


def stateless(input_size: int, msg_size: int, has_update: bool) -> AgentNet:
  """Two MLPs (update, message) on the same input; no carry."""
  if msg_size < 1:
    raise ValueError(f"message size must be >= 1, got {msg_size}")

  def f(x, carry):
    update = None
    if has_update:
      update = _mlp("update", MLP_SIZES, 1, jax.nn.relu, jnp.tanh)(x)[..., 0]
    msg = _mlp("message", MLP_SIZES, msg_size, jax.nn.relu, jnp.tanh)(x)
    return update, msg, carry

  t = hk.without_apply_rng(hk.transform(f))
  return AgentNet(input_size, msg_size, 0, has_update, t.init, t.apply)


def make(kind: str, input_size: int, msg_size: int, hidden: int, has_update: bool) -> AgentNet:
  """An agent network by family name: 'stateful' or 'stateless'."""
  if kind == "stateful":
    return stateful(input_size, msg_size, hidden, has_update)
  if kind == "stateless":
    return stateless(input_size, msg_size, has_update)
  raise ValueError(f"agent network kind must be 'stateful' or 'stateless', got {kind!r}")
