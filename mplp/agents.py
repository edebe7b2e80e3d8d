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
  zero biases. C = [1 if the agent owns a parameter] + state_size + M; channel 0 of `c'` is
  the update, the last M channels are the outgoing message.
* `Stateless` — MLPs on the same input, Dense(80, relu) -> Dense(40, relu) -> Dense(k,
  tanh): one with k = 1 for the update (agents that own a parameter), one with k = M for
  the message. No carry (C = 0).

Each network is transformed once; callers get pure `init(key) -> params` and
`apply(params, parts, carry) -> (update, message, new_carry)` (`update` is None for
agents without a parameter). The stateful cell's parameters come from haiku (`_GRUCell`:
their names, shapes and initializers), stored as one vector (`mplp.cell_params.CellParams`;
`p["gru"]` etc. still read them by name); it runs as `_gru`: in float32 on the CPU, as one
fused kernel (`mplp.cell_kernel`, `_gru_fused`); otherwise (float64, other backends, no
C++ compiler, `MPLP_CELL_KERNEL=0`) as `_gru_xla`, the same equations on the flattened
agents in XLA. Both backward passes keep only the inputs and recompute the forward. The
input comes as its named parts, which may broadcast against each other: a weight agent's
message is the same for every fan-in index, so in the XLA cell its share of the first
layers is computed once per (example, output unit) and broadcast, rather than through a
[B, I, O, X] concatenation (the kernel takes the concatenation: X floats an agent).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from mplp import cell_kernel
from mplp.cell_params import CellParams

Params = Any

_GLOROT = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
MLP_SIZES = (80, 40)
CHUNK_AGENTS = 16384  # agents per slice in `apply_in_chunks` (bounds [N, 80] intermediates)


def _parts_linear(name: str, parts: Sequence[jax.Array], out: int, with_bias: bool = True):
  """Dense layer on the concatenation of `parts` without building it.

  `parts[i]: [..., k_i]` may be broadcastable rather than equal in their leading
  shape (a weight agent's message is [B, 1, O, M], its input [B, I, 1, 1]): each part
  meets its own rows of the kernel, and the results broadcast-add to the full shape.
  Same parameters (`name/w: [sum k_i, out]`, `name/b: [out]`) as an `hk.Linear`.
  """
  with hk.experimental.name_scope(name):
    width = sum(p.shape[-1] for p in parts)
    w = hk.get_parameter("w", [width, out], parts[0].dtype, _GLOROT)
    b = hk.get_parameter("b", [out], parts[0].dtype, jnp.zeros) if with_bias else 0.0
  return _parts_matmul(parts, w) + b


def _parts_matmul(parts: Sequence[jax.Array], w: jax.Array) -> jax.Array:
  """concatenate(parts, -1) @ w, as a broadcast sum of each part times its rows of w."""
  y, row = 0.0, 0
  for p in parts:
    k = p.shape[-1]
    y = y + (p * w[row] if k == 1 else p @ w[row:row + k])
    row += k
  return y


def _mlp(name: str, parts, sizes, out: int, act, out_act=None, out_bias: bool = True):
  h = act(_parts_linear(f"{name}_0", parts, sizes[0]))
  for i, n in enumerate(sizes[1:], 1):
    h = act(hk.Linear(n, w_init=_GLOROT, name=f"{name}_{i}")(h))
  h = hk.Linear(out, with_bias=out_bias, w_init=_GLOROT, name=f"{name}_{len(sizes)}")(h)
  return out_act(h) if out_act is not None else h


class _GRUCell(hk.Module):
  """The stateful agent cell's parameters (haiku names and initializers); `_gru` runs it."""

  def __init__(self, carry_size: int, name: str = "gru"):
    super().__init__(name=name)
    self.c = carry_size

  def __call__(self, parts, carry):
    x_size = sum(p.shape[-1] for p in parts)
    c = self.c
    p = lambda n, shape, init: hk.get_parameter(n, shape, carry.dtype, init)
    for side in ("z", "r"):
      p(f"w{side}x", [x_size, c], _GLOROT)
      p(f"w{side}c", [c, c], _GLOROT)
      p(f"b{side}", [c], hk.initializers.Constant(-1.0))
    p("b", [c], jnp.zeros)
    cand_x = _mlp("mlp_x", parts, MLP_SIZES, c, jnp.tanh, out_bias=False)
    cand_c = _mlp("mlp_c", [carry], MLP_SIZES, c, jnp.tanh, out_bias=False)
    return cand_x + cand_c


_MLP_LAYERS = tuple(range(len(MLP_SIZES) + 1))


def _gru_forward(p, parts, carry):
  """The cell on every agent at once, flattened to N agents.

  Args:
    p: the `_GRUCell` parameters ({"gru": ..., "gru/mlp_x_0": ..., ...}).
    parts: input pieces [..., k_i] broadcasting to the agents' shape S = carry.shape[:-1].
    carry: [*S, C].
  Returns:
    (new carry [N, C], intermediates for the backward pass), N = prod(S).
  """
  g, c_size = p["gru"], carry.shape[-1]
  shape = carry.shape[:-1]
  n = math.prod(shape)
  c = carry.reshape(n, c_size)

  def parts_linear(w):  # concatenate(parts) @ w broadcast to [*S, out], flattened: [N, out]
    return jnp.broadcast_to(_parts_matmul(parts, w), shape + (w.shape[1],)).reshape(n, -1)

  def mlp(prefix, first):  # first: [N, 80] pre-activation -> ([h_0 .. h_L-1], out [N, C])
    hs = [jnp.tanh(first + p[f"gru/{prefix}_0"]["b"])]
    for i in _MLP_LAYERS[1:-1]:
      hs.append(jnp.tanh(hs[-1] @ p[f"gru/{prefix}_{i}"]["w"] + p[f"gru/{prefix}_{i}"]["b"]))
    return hs, hs[-1] @ p[f"gru/{prefix}_{_MLP_LAYERS[-1]}"]["w"]

  # Both gates in one product per side (the same numbers, half the kernels).
  gates = (parts_linear(jnp.concatenate([g["wzx"], g["wrx"]], 1))
           + c @ jnp.concatenate([g["wzc"], g["wrc"]], 1))
  z = jax.nn.sigmoid(gates[:, :c_size] + g["bz"])
  r = jax.nn.sigmoid(gates[:, c_size:] + g["br"])
  hx, cand_x = mlp("mlp_x", parts_linear(p["gru/mlp_x_0"]["w"]))
  rc = r * c
  hc, cand_c = mlp("mlp_c", rc @ p["gru/mlp_c_0"]["w"])
  cand = jnp.tanh(cand_x + cand_c + g["b"])
  new = z * c + (1.0 - z) * cand
  return new, (c, z, r, rc, hx, hc, cand)


def _reduce_to(x, shape):
  """Sum x [*S, k] over the axes where `shape` (broadcastable to x's) has extent 1."""
  axes = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
  return jnp.sum(x, axes, keepdims=True) if axes else x


def _parts_linear_grad(parts, shape, w, d):
  """The cotangents of `concatenate(parts) @ w` broadcast to [*S, out] (flattened to d
  [N, out]): (dw [sum k_i, out], [d part_i, shaped like part_i]).

  The parts are broadcast to [N, sum k_i] once (a few floats an agent) so that dw is one
  product over the agents and each part's gradient is reduced over its broadcast axes
  after the product with w (on [N, k_i], not [N, out]: reducing a [*S, 80] tensor over
  its leading axis was 18 ms of a 54 ms backward on the MNIST weight agents).
  """
  n = d.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(q, shape + q.shape[-1:]).reshape(n, -1) for q in parts], 1)
  dx = d @ w.T
  grads, row = [], 0
  for q in parts:
    k = q.shape[-1]
    lead = (1,) * (len(shape) + 1 - q.ndim)  # a part may have fewer axes than the agents
    grads.append(_reduce_to(dx[:, row:row + k].reshape(shape + (k,)), lead + q.shape).reshape(q.shape))
    row += k
  return _contract_agents(x, d), grads


def _contract_agents(a, b):
  """a.T @ b for a [N, k], b [N, m]: [k, m], a sum over the agents.

  XLA's CPU backend copies the transposed operand before the product; this transposes
  the narrower one (and the small [m, k] result). Measured in the MNIST meta-step's
  profile: those copies' kernel time 103 -> 87 ms a step; its wall time within noise.
  """
  return a.T @ b if a.shape[1] <= b.shape[1] else (b.T @ a).T


def _mlp_grad(p, prefix, hs, d_out):
  """Backward through `mlp` (its tanh outputs hs) from d_out [N, C]: the cotangents of
  every layer but the first one's kernel, and of the first pre-activation [N, 80]."""
  last = _MLP_LAYERS[-1]
  grads = {f"gru/{prefix}_{last}": {"w": _contract_agents(hs[-1], d_out)}}
  d = d_out @ p[f"gru/{prefix}_{last}"]["w"].T
  for i in reversed(_MLP_LAYERS[1:-1]):
    d = d * (1.0 - hs[i] * hs[i])                                  # through tanh
    grads[f"gru/{prefix}_{i}"] = {"w": _contract_agents(hs[i - 1], d), "b": jnp.sum(d, 0)}
    d = d @ p[f"gru/{prefix}_{i}"]["w"].T
  d = d * (1.0 - hs[0] * hs[0])
  grads[f"gru/{prefix}_0"] = {"b": jnp.sum(d, 0)}
  return grads, d


def _gru(p: CellParams, parts, carry):
  """The stateful cell: the fused kernel (`mplp.cell_kernel`) where it applies, else XLA
  (on the tensors sliced from `p`)."""
  if cell_kernel.applies(carry.dtype):
    return _gru_fused(p, parts, carry)
  return _gru_xla(p.unpack(), parts, carry)


def _gru_fused(p: CellParams, parts, carry):
  """The cell as one `mplp.cell_kernel` call on the agents flattened to [1, N, *]: the
  parts are broadcast and concatenated (X floats an agent); autodiff reduces their
  cotangents over the broadcast axes; `p.flat` is the kernel's parameter vector as it is.
  Measured on the MNIST layer-1 weight agents ([8, 144, 50], C = 12; 2 Xeon cores),
  forward + gradient: 23.1 ms, against 28.8 ms for `_gru_xla` in slices (same minutes)."""
  shape = carry.shape[:-1]
  n = math.prod(shape)
  x = jnp.concatenate([jnp.broadcast_to(q, shape + q.shape[-1:]) for q in parts], -1)
  new = cell_kernel.cell(p.flat[None], x.reshape(1, n, -1),
                         carry.reshape(1, n, -1), *MLP_SIZES)
  return new.reshape(carry.shape)


@jax.custom_vjp
def _gru_xla(p, parts, carry):
  """The stateful cell (module docstring): new carry [*S, C] from parts and carry [*S, C].

  Written on the flattened agents with a hand-written backward pass that keeps only the
  inputs and recomputes the forward. Measured on the MNIST layer-1 weight agents
  ([8, 144, 50], C = 12; 2 Xeon cores): the haiku cell in 2,048-agent slices took 15.7 ms
  forward and 68 ms forward + gradient; this one 9.5 and 54 ms unsliced, 12 and 39-46 ms
  in `CHUNK_AGENTS` slices (the same forward numbers).
  """
  return _gru_forward(p, parts, carry)[0].reshape(carry.shape)


def _gru_fwd(p, parts, carry):
  return _gru_xla(p, parts, carry), (p, parts, carry)


def _gru_bwd(res, d_new):
  p, parts, carry = res
  g, c_size = p["gru"], carry.shape[-1]
  shape = carry.shape[:-1]
  _, (c, z, r, rc, hx, hc, cand) = _gru_forward(p, parts, carry)
  d_new = d_new.reshape(c.shape)
  # new = z * c + (1 - z) * cand,  cand = tanh(cand_x + cand_c + b)
  d_z = d_new * (c - cand)
  d_c = d_new * z
  d_pre = d_new * (1.0 - z) * (1.0 - cand * cand)
  grads_x, d_x0 = _mlp_grad(p, "mlp_x", hx, d_pre)
  grads_c, d_c0 = _mlp_grad(p, "mlp_c", hc, d_pre)
  grads_x["gru/mlp_x_0"]["w"], d_parts_x = _parts_linear_grad(parts, shape, p["gru/mlp_x_0"]["w"], d_x0)
  grads_c["gru/mlp_c_0"]["w"] = _contract_agents(rc, d_c0)
  d_rc = d_c0 @ p["gru/mlp_c_0"]["w"].T
  d_c = d_c + d_rc * r
  d_gates = jnp.concatenate([d_z * z * (1.0 - z), d_rc * c * r * (1.0 - r)], 1)
  d_c = d_c + d_gates @ jnp.concatenate([g["wzc"], g["wrc"]], 1).T
  d_wgc = _contract_agents(c, d_gates)
  d_wgx, d_parts_g = _parts_linear_grad(parts, shape, jnp.concatenate([g["wzx"], g["wrx"]], 1), d_gates)
  d_bg = jnp.sum(d_gates, 0)
  d_p = {"gru": {"wzx": d_wgx[:, :c_size], "wrx": d_wgx[:, c_size:],
                 "wzc": d_wgc[:, :c_size], "wrc": d_wgc[:, c_size:],
                 "bz": d_bg[:c_size], "br": d_bg[c_size:], "b": jnp.sum(d_pre, 0)},
         **grads_x, **grads_c}
  d_parts = [a + b for a, b in zip(d_parts_x, d_parts_g)]
  return d_p, d_parts, d_c.reshape(carry.shape)


_gru_xla.defvjp(_gru_fwd, _gru_bwd)


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
  saves_inputs_only: bool = False  # its backward pass keeps only the inputs (recomputes)
  fused: Any = dataclasses.field(default=lambda dtype: False, repr=False, compare=False)
  # fused(dtype): whether `apply` runs as one fused kernel (mplp.cell_kernel), which tiles
  # the agents itself: `apply_in_chunks` then does not slice

  def init(self, key) -> Params:
    x = [jnp.zeros([1, self.input_size], float)]
    c = jnp.zeros([1, self.carry_size], float)
    return self._init(key, x, c)

  def apply(self, params: Params, parts: Sequence[jax.Array], carry):
    """The agents' step.

    Args:
      parts: the agent input as a list of pieces `[..., k_i]` (sum k_i = X) whose
        leading shapes broadcast to the agents' shape `[...]` (e.g. [B, I, O]).
      carry: [..., C] (C = 0 for stateless agents).
    Returns:
      (update [...] or None, message [..., M], new carry [..., C]).
    """
    return self._apply(params, list(parts), carry)

  def apply_in_chunks(self, params: Params, parts: Sequence[jax.Array], carry,
                      max_agents: Optional[int] = None):
    """`apply`, computed over slices of one axis of the agents' shape with `lax.map`.

    Many agents at once ([8, 144, 50] weight agents: [57600, 80] intermediates) leave
    the CPU's caches; slices of at most `max_agents` agents (default `CHUNK_AGENTS`)
    bound the memory of a wide layer and keep part of the work in cache. Measured on
    the MNIST layer-1 weight agents (57,600; 2 Xeon cores), forward + gradient: slices
    of 1,600 agents 55 ms, 14,400 39-46 ms, unsliced 54 ms; the products' rate falls
    with the slice (a [1600, 80] x [80, 40] product in a loop 81 GFLOP/s, the same
    over 57,600 rows at once 252). Same numbers as `apply`. The sliced axis is axis 1 (a weight
    agent's fan-in) or, where that has extent 1 (the first layer of a 1-input network),
    the longest axis; a part whose extent on it is 1 is shared by every slice. The
    slice count is the smallest divisor of the axis giving at most `max_agents` agents
    a slice, or the axis' extent where none does (a prime fan-in: one row a slice).
    Where the network runs as the fused kernel (`fused(carry.dtype)`: it tiles the agents
    itself, in cache), nothing is sliced: MNIST meta-step 0.72 s sliced, 0.60 s not.
    """
    max_agents = CHUNK_AGENTS if max_agents is None else max_agents
    shape = carry.shape[:-1]
    total = math.prod(shape)
    if len(shape) < 2 or total <= max_agents or self.fused(carry.dtype):
      return self.apply(params, parts, carry)
    axis = 1 if shape[1] > 1 else max(range(len(shape)), key=lambda a: shape[a])
    extent = shape[axis]
    n = next((d for d in range(2, extent) if extent % d == 0 and total // d <= max_agents), extent)

    def split(t):  # [..., E, ...] -> [n, ..., E / n, ...]
      t = t.reshape(t.shape[:axis] + (n, extent // n) + t.shape[axis + 1:])
      return jnp.moveaxis(t, axis, 0)

    def merge(t):  # [n, ..., E / n, ...] -> [..., E, ...]
      t = jnp.moveaxis(t, 0, axis)
      return t.reshape(t.shape[:axis] + (extent,) + t.shape[axis + 2:])

    sliced = [i for i, p in enumerate(parts) if p.shape[axis] == extent]

    def one(chunk):
      chunk_parts, chunk_carry = chunk
      ps = list(parts)
      for i, p in zip(sliced, chunk_parts):
        ps[i] = p
      return self.apply(params, ps, chunk_carry)

    # Checkpointed slices (unless the network's backward pass already recomputes): the
    # backward pass recomputes each slice's forward instead of stacking every slice's
    # intermediates (measured on the MNIST layer-1 weight agents: gradient 186 -> 106 ms).
    body = one if self.saves_inputs_only else jax.checkpoint(one)
    out = jax.lax.map(body, ([split(parts[i]) for i in sliced], split(carry)))
    return jax.tree_util.tree_map(merge, out)


def stateful(input_size: int, msg_size: int, state_size: int, has_update: bool) -> AgentNet:
  """The GRU-like agent with carry [update? | state_size own channels | message]."""
  if msg_size < 1:
    raise ValueError(f"message size must be >= 1, got {msg_size}")
  if state_size < 0:
    raise ValueError(f"state size must be >= 0, got {state_size}")
  c = int(has_update) + state_size + msg_size

  def apply(params, parts, carry):
    new = _gru(params, list(parts), carry)
    update = new[..., 0] if has_update else None
    return update, new[..., c - msg_size:], new

  haiku_init = hk.without_apply_rng(hk.transform(lambda parts, carry: _GRUCell(c)(parts, carry))).init
  init = lambda key, parts, carry: CellParams.pack(haiku_init(key, parts, carry))
  return AgentNet(input_size, msg_size, c, has_update, init, apply, saves_inputs_only=True,
                  fused=cell_kernel.applies)


def stateless(input_size: int, msg_size: int, has_update: bool) -> AgentNet:
  """Two MLPs (update, message) on the same input; no carry."""
  if msg_size < 1:
    raise ValueError(f"message size must be >= 1, got {msg_size}")

  def f(parts, carry):
    update = None
    if has_update:
      update = _mlp("update", parts, MLP_SIZES, 1, jax.nn.relu, jnp.tanh)[..., 0]
    msg = _mlp("message", parts, MLP_SIZES, msg_size, jax.nn.relu, jnp.tanh)
    shape = jnp.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return update, jnp.broadcast_to(msg, shape + (msg_size,)), carry

  t = hk.without_apply_rng(hk.transform(f))
  return AgentNet(input_size, msg_size, 0, has_update, t.init, t.apply)


@functools.lru_cache(maxsize=None)
def make(family: str, input_size: int, msg_size: int, state_size: int, has_update: bool) -> AgentNet:
  """An agent network by family name: 'stateful' or 'stateless' (built once per
  signature: layers ask for it at every trace)."""
  if family == "stateful":
    return stateful(input_size, msg_size, state_size, has_update)
  if family == "stateless":
    return stateless(input_size, msg_size, has_update)
  raise ValueError(f"agent network family must be 'stateful' or 'stateless', got {family!r}")
