"""The outer (meta) optimizer: optax, plus the paper's per-tensor gradient normalization.

`normalize_per_tensor()` is an optax transformation like any other (pure `init`/`update`);
`outer_optimizer(...)` chains the options a meta-training config can ask for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mplp.cell_params import CellParams, is_cell

OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "rmsprop": optax.rmsprop}


def normalize_per_tensor(eps: float = 1e-8) -> optax.GradientTransformation:
  """g -> g / (||g|| + eps) for every tensor of the gradient pytree separately (the
  published meta-training's normalization); a stateful cell's vector (`CellParams`, one
  leaf) is normalized tensor by tensor, its 17 as when they were leaves. Stateless."""
  def one(g):
    if not is_cell(g):
      return g / (jnp.linalg.norm(g) + eps)
    ids = g.tensor_ids()  # [P]: each value's tensor
    norms = jnp.sqrt(jax.ops.segment_sum(g.flat * g.flat, ids, int(ids.max()) + 1))
    return CellParams(g.flat / (norms[ids] + eps), g.sizes)

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(one, updates, is_leaf=is_cell), state

  return optax.GradientTransformation(init, update)


def outer_optimizer(name: str = "adam", learning_rate: float = 1e-4,
                    per_tensor_norm: bool = True, clip_global_norm: float = 0.0,
                    lr_drop_step: int = 0, lr_after_drop: float = 0.0) -> optax.GradientTransformation:
  """normalize (optional) -> clip by global norm (optional) -> `name` with a learning
  rate that drops from `learning_rate` to `lr_after_drop` at `lr_drop_step` (0: no drop)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"meta.optimizer: unknown optimizer {name!r}; allowed: {sorted(OPTIMIZERS)}")
  lr = learning_rate
  if lr_drop_step > 0:
    lr = optax.piecewise_constant_schedule(learning_rate, {lr_drop_step: lr_after_drop / learning_rate})
  parts = []
  if per_tensor_norm:
    parts.append(normalize_per_tensor())
  if clip_global_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_global_norm))
  parts.append(OPTIMIZERS[name](lr))
  return optax.chain(*parts)
