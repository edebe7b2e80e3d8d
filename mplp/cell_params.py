"""A stateful agent cell's meta-parameters stored as one vector: `CellParams`.

The cell (`mplp.agents`) has 17 tensors: the two gates' input and carry kernels and
biases, the candidate bias and two 3-layer MLPs. Stored as 17 leaves, every program that
trains them handles each tensor apart: the meta-step's backward pass accumulates 17
cotangents per agent kind, the outer optimizer updates 17 tensors (and their moments) per
kind, and XLA compiles a kernel for each distinct shape and role. Stored as one vector in
the order the fused kernel (`mplp.cell_kernel`) reads, they are one leaf, which the kernel
takes as it is and whose cotangent it returns as it is. Measured on the sinusoid_5x10
meta-step (this kind's 2-core EPYC): 460 -> 304 distinct XLA kernels (see the README's
benchmark section for the compile times).

`CellParams(flat [..., P], sizes=(X, C, H1, H2))` is a pytree whose one leaf is `flat`
(leading axes, such as a stack of ES pairs, are kept by every method):

* `pack(p)` from the haiku names (`{"gru": {wzx, wrx, wzc, wrc, bz, br, b},
  "gru/mlp_x_0": {w, b}, ..., "gru/mlp_c_2": {w}}`), `unpack()` back (exact: slices);
* `tensor_ids()`: for each value of `flat`, the index of its tensor, so that a per-tensor
  operation (the outer optimizer's per-tensor normalization) acts on the same 17 tensors;
* `unpack_all(tree)` / `pack_like(tree, template)`: the same over a whole pytree (what
  `mplp.host.checkpoint` uses to read files written with the 17 tensors).

P = (X + C) 2C + 2C + X H1 + H1 + H1 H2 + H2 + H2 C (twice, the second with C for X) + C.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Sizes = Tuple[int, int, int, int]  # (X input width, C carry width, H1, H2 MLP widths)


def _layout(sizes: Sizes):
  """The vector's pieces in order: (name, shape) with "gates_x" = [wzx | wrx] [X, 2C],
  "gates_c" = [wzc | wrc] [C, 2C], "gates_b" = [bz | br] [2C] as the kernel reads them."""
  x, c, h1, h2 = sizes
  pieces = [("gates_x", (x, 2 * c)), ("gates_c", (c, 2 * c)), ("gates_b", (2 * c,))]
  for side, first in (("x", x), ("c", c)):
    pieces += [(f"gru/mlp_{side}_0/w", (first, h1)), (f"gru/mlp_{side}_0/b", (h1,)),
               (f"gru/mlp_{side}_1/w", (h1, h2)), (f"gru/mlp_{side}_1/b", (h2,)),
               (f"gru/mlp_{side}_2/w", (h2, c))]
  return pieces + [("gru/b", (c,))]


def _pieces(p: Dict[str, Any]) -> list:
  """The haiku dict's tensors as the layout's pieces (gate pairs side by side)."""
  g = p["gru"]
  pair = lambda a, b: jnp.concatenate([a, b], -1)
  out = [pair(g["wzx"], g["wrx"]), pair(g["wzc"], g["wrc"]), pair(g["bz"], g["br"])]
  for name, _ in _layout((0, 0, 0, 0))[3:-1]:
    module, key = name.rsplit("/", 1)
    out.append(p[module][key])
  return out + [g["b"]]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class CellParams:
  """A stateful cell's parameters as one vector `flat` [..., P]; `sizes` = (X, C, H1, H2)
  is static (module docstring)."""
  flat: Any
  sizes: Sizes

  def tree_flatten(self):
    return (self.flat,), self.sizes

  @classmethod
  def tree_unflatten(cls, sizes, children):
    return cls(children[0], sizes)

  @classmethod
  def pack(cls, p: Dict[str, Any]) -> "CellParams":
    """From the haiku dict (any leading axes, the same on every tensor)."""
    wzx = p["gru"]["wzx"]
    lead = wzx.shape[:-2]
    sizes = (wzx.shape[-2], wzx.shape[-1], p["gru/mlp_x_0"]["w"].shape[-1], p["gru/mlp_x_1"]["w"].shape[-1])
    return cls(jnp.concatenate([q.reshape(lead + (-1,)) for q in _pieces(p)], -1), sizes)

  def unpack(self) -> Dict[str, Any]:
    """The haiku dict (slices of `flat`, leading axes kept)."""
    lead, c = self.flat.shape[:-1], self.sizes[1]
    out, at = {"gru": {}}, 0
    for name, shape in _layout(self.sizes):
      size = math.prod(shape)
      value = self.flat[..., at:at + size].reshape(lead + shape)
      at += size
      if name.startswith("gates_"):
        side = name[-1]
        if side == "b":
          out["gru"]["bz"], out["gru"]["br"] = value[..., :c], value[..., c:]
        else:
          out["gru"][f"wz{side}"], out["gru"][f"wr{side}"] = value[..., :c], value[..., c:]
      elif name == "gru/b":
        out["gru"]["b"] = value
      else:
        module, key = name.rsplit("/", 1)
        out.setdefault(module, {})[key] = value
    return out

  def __getitem__(self, module: str):
    """`p["gru"]`, `p["gru/mlp_x_0"]`: read access by the haiku names (slices)."""
    return self.unpack()[module]

  def tensor_ids(self) -> np.ndarray:
    """[P] int32: the index (0..16, the haiku dict's leaf order) of each value's tensor."""
    return _tensor_ids(self.sizes)


@functools.lru_cache(maxsize=None)
def _tensor_ids(sizes: Sizes) -> np.ndarray:
  positions = CellParams(np.arange(size(sizes)), sizes).unpack()  # each tensor's places in flat
  ids = np.empty(size(sizes), np.int32)
  for i, where in enumerate(jax.tree_util.tree_leaves(positions)):
    ids[where.ravel()] = i
  ids.setflags(write=False)
  return ids


def size(sizes: Sizes) -> int:
  """P for (X, C, H1, H2)."""
  return sum(math.prod(shape) for _, shape in _layout(sizes))


def is_cell(x) -> bool:
  return isinstance(x, CellParams)


def unpack_all(tree):
  """`tree` with every `CellParams` replaced by its haiku dict (of arrays, or of
  `jax.ShapeDtypeStruct`s where `flat` is one)."""
  def one(x):
    if not is_cell(x):
      return x
    if isinstance(x.flat, jax.ShapeDtypeStruct):
      return jax.eval_shape(lambda f: CellParams(f, x.sizes).unpack(), x.flat)
    return x.unpack()
  return jax.tree_util.tree_map(one, tree, is_leaf=is_cell)


def pack_like(tree, template):
  """`tree`, which holds haiku dicts where `template` holds `CellParams`, with those
  dicts packed (the inverse of `unpack_all`)."""
  return jax.tree_util.tree_map(lambda t, x: CellParams.pack(x) if is_cell(t) else x,
                                template, tree, is_leaf=is_cell)
