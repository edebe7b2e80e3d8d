"""The outer (meta) optimizer: optax, plus the paper's per-tensor gradient normalization.

`normalize_per_tensor()` is an optax transformation like any other (pure `init`/`update`);
`outer_optimizer(...)` chains the options a meta-training config can ask for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "rmsprop": optax.rmsprop}


def normalize_per_tensor(eps: float = 1e-8) -> optax.GradientTransformation:
  """g -> g / (||g|| + eps) for every tensor of the gradient pytree separately (the
  published meta-training's normalization). Stateless."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda g: g / (jnp.linalg.norm(g) + eps), updates), state

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
