"""Meta-training: the outer loss over an outer batch of tasks and one pure `step`.

`MetaTrainer` is static configuration; `TrainState` is everything that changes (and
everything a checkpoint holds). `trainer.step(state, task) -> (state, metrics)` is pure:
`jax.jit` it once and call it in a host loop (see `mplp.host.train`).

Per task (`task_loss`): start the task's `mplp.episode.Episode` (its initial inner weights
a draw from the pool of pre-sampled networks, or the learned initialization), run its T
inner steps (`Episode.run`, one `lax.scan`), and mix
  hint     * mean_t loss(theta_{t+1}; batch_t)      (after each step, on that step's batch)
  heldout  * loss(theta_T; held-out batch)          (after the last step)
  remember * mean_t loss(theta_T; batch_t)          (optional)
  update_l2 * mean_t ||theta_{t+1} - theta_t||^2    (optional).
A step whose loss or meta-gradient is not finite leaves parameters and optimizer state
untouched; it is counted in `bad_steps` (consecutive) and `skipped` (total).

Truncated backprop (`truncation = K < T`, learned_optimization's "truncated step"): every
task of the outer batch is an inner run in progress (`Unroll`: its task key, the inner
steps done, its inner state). A meta-step advances each run by one window of K steps and
takes the meta-gradient of that window's loss (hint over the window, held-out after it);
the inner state crosses into the next window without a gradient. A run that reaches T
starts over on a fresh task. With K = T this is exactly the full meta-gradient.

Sharding: with a `mesh` (axis 'tasks'), the outer batch (and the runs in progress) is
split across its devices; parameters are replicated and XLA inserts the all-reduce of the
mean over tasks. The same code runs on several hosts after `jax.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mplp import minibatch_init
from mplp.contracts import Estimator
from mplp.episode import Episode
from mplp.estimators import Backprop
from mplp.learned import MetaParams
from mplp.network import Network


@dataclasses.dataclass(frozen=True)
class OuterLoss:
  """Weights of the outer-loss terms (the paper: hint 0.7, held-out 0.3)."""
  hint: float = 0.7
  heldout: float = 0.3
  remember: float = 0.0
  update_l2: float = 0.0


class TrainState(NamedTuple):
  step: jax.Array       # [] int32, meta-steps taken
  rng: jax.Array        # [2] uint32, base key; step t uses fold_in(rng, t)
  trainable: Any        # {"rule": rule params, "init": ((W [I, O], b [O]), ...) or ()}
  stats: Any            # standardization statistics (fixed, see mplp.minibatch_init)
  opt_state: Any        # outer optimizer state
  pool: Any             # ((W [P, I, O], b [P, O]), ...) initial inner networks, or ()
  bad_steps: jax.Array  # [] int32, consecutive skipped (non-finite) steps
  skipped: jax.Array    # [] int32, all skipped steps
  unrolls: Any = ()     # the estimator's carry: () for whole unrolls; Unroll [outer_batch]
                        # (truncated backprop) or PESCarry [pairs, outer_batch] (PES)


class Unroll(NamedTuple):
  """An inner run in progress (truncated backprop); t == 0 means "start a new task"."""
  key: jax.Array   # [2] uint32, the task key of the run
  t: jax.Array     # [] int32, inner steps done
  state: Any       # its inner state


def _sq_distance(network, a, b):
  return sum(jnp.sum((wa - wb) ** 2) + jnp.sum((ba - bb) ** 2)
             for (wa, ba), (wb, bb) in zip(network.weights(a), network.weights(b)))


@dataclasses.dataclass(frozen=True)
class MetaTrainer:
  """Attributes:
    network: the inner network with its learned rule.
    optimizer: the outer optax optimizer.
    inner_steps: T; batch_size: B (inner batch); eval_size: held-out examples per task.
    outer_batch: tasks per meta-step.
    loss: outer-loss weights.
    learn_init: meta-train the initial inner weights too (MAML-style).
    pool_size: number of pre-sampled initial networks (0: a fresh draw per task).
    remat: recompute each inner step in the backward pass (less memory, more compute).
    truncation: K, inner steps per meta-gradient window (0: the whole unroll, K = T);
      must divide `inner_steps`.
    mesh: a `Mesh` with axis 'tasks' to split the outer batch over (None: no sharding).
    estimator: how the meta-gradient is estimated (`mplp.estimators`: `Backprop()`, the
      whole unroll or, with `truncation`, one window; `ES(sigma, pairs)`, or PES with
      `truncation`).
  """
  network: Network
  optimizer: optax.GradientTransformation
  inner_steps: int = 5
  batch_size: int = 10
  eval_size: int = 100
  outer_batch: int = 4
  loss: OuterLoss = OuterLoss()
  learn_init: bool = False
  pool_size: int = 128
  remat: bool = False
  truncation: int = 0
  mesh: Optional[Mesh] = None
  estimator: Estimator = Backprop()

  def __post_init__(self):
    if self.truncation and self.inner_steps % self.truncation:
      raise ValueError(f"meta.truncation: {self.truncation} must divide task.inner_steps "
                       f"({self.inner_steps}); allowed: a divisor of it, or 0 for the whole unroll")
    if self.mesh is not None:
      n = self.mesh.shape["tasks"]
      if self.outer_batch % n:
        raise ValueError(f"meta.outer_batch: {self.outer_batch} tasks do not split evenly over "
                         f"{n} devices; use a multiple of {n} or run.devices dividing it")

  @property
  def window(self) -> int:
    return self.truncation or self.inner_steps

  def _shard_tasks(self, tree):
    """Split the leading [outer_batch] axis over the mesh (no-op without a mesh)."""
    if self.mesh is None:
      return tree
    spec = NamedSharding(self.mesh, PartitionSpec("tasks"))
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, spec), tree)

  def init(self, key, task) -> TrainState:
    """Fresh meta-parameters, learned init and pool; statistics measured on one task."""
    k_meta, k_pool, k_init, k_task, k_net, k_rng = jax.random.split(key, 6)
    net = self.network
    meta = net.init_meta(k_meta)
    pool = ()
    if self.pool_size > 0:
      draw = lambda k: net.weights(net.init(k, 1))
      pool = jax.vmap(draw)(jax.random.split(k_pool, self.pool_size))
    init = net.weights(net.init(k_init, 1)) if self.learn_init else ()
    sample = task.sample(k_task, self.inner_steps, self.batch_size, self.eval_size)
    first = init if self.learn_init else (jax.tree_util.tree_map(lambda a: a[0], pool) if pool else None)
    if net.rule.has_statistics:  # learned rules; BackpropRule (plain MAML) has none
      meta = minibatch_init.measure(net, meta, net.init(k_net, self.batch_size, weights=first or None),
                                    sample.xs, sample.ys)
    trainable = {"rule": meta.params, "init": init}
    zero = jnp.zeros([], jnp.int32)
    unrolls = ()
    if self.truncation:
      blank = net.init(k_net, self.batch_size)
      unrolls = jax.tree_util.tree_map(
          lambda a: jnp.zeros((self.outer_batch,) + a.shape, a.dtype),
          Unroll(jax.random.PRNGKey(0), zero, blank))
    unrolls = self.estimator.init_carry(unrolls, trainable)
    return TrainState(zero, k_rng, trainable, meta.stats, self.optimizer.init(trainable),
                      pool, zero, zero, unrolls)

  @property
  def episode(self) -> Episode:
    """The inner run this trainer meta-trains (what evaluation and analysis take)."""
    return Episode(self.network, self.inner_steps, self.batch_size, self.eval_size,
                   self.learn_init, self.pool_size)

  def task_loss(self, trainable, stats, pool, key, task, unroll=None):
    """Outer loss of one task's window and its metrics (scalars).

    Without `unroll`: the whole unroll from a fresh task drawn with `key`. With an
    `Unroll`: the next window of the run in progress (a new task from `key` if its t is
    0). Returns (loss, (metrics, the run advanced by one window or None)).
    """
    net = self.network
    meta = MetaParams(trainable["rule"], stats)
    t0 = 0
    if unroll is not None:
      restart = unroll.t == 0
      key = jnp.where(restart, key, unroll.key)
      t0 = unroll.t
    episode = self.episode
    sample, state0 = episode.start(trainable, pool, key, task)
    if unroll is not None:
      state0 = jax.tree_util.tree_map(lambda a, b: jnp.where(restart, a, b), state0, unroll.state)
    xs = jax.lax.dynamic_slice_in_dim(sample.xs, t0, self.window)
    ys = jax.lax.dynamic_slice_in_dim(sample.ys, t0, self.window)
    observe = lambda new, old, m, x, y: (m["loss"], net.loss(new, x, y), _sq_distance(net, new, old))
    final, (before, hint, moved) = episode.run(meta, state0, xs, ys, observe, self.remat)
    held = episode.held_out(final, sample, task.kind)
    heldout = held["loss"]
    total = self.loss.hint * jnp.mean(hint) + self.loss.heldout * heldout
    metrics = {"heldout": heldout, "heldout_before": net.loss(state0, sample.x_eval, sample.y_eval),
               "hint": jnp.mean(hint), "first_batch_loss": before[0], "update_sq": jnp.mean(moved)}
    if self.loss.remember:
      remember = jnp.mean(jax.vmap(lambda x, y: net.loss(final, x, y))(xs, ys))
      total += self.loss.remember * remember
      metrics["remember"] = remember
    if self.loss.update_l2:
      total += self.loss.update_l2 * jnp.mean(moved)
    if "accuracy" in held:
      metrics["heldout_accuracy"] = held["accuracy"]
    advanced = None
    if unroll is not None:
      advanced = Unroll(key, (t0 + self.window) % self.inner_steps, jax.lax.stop_gradient(final))
    return total, (metrics, advanced)

  def outer_loss(self, trainable, stats, pool, key, task, unrolls=()):
    """Mean outer loss over `outer_batch` tasks (vmapped, sharded over the mesh):
    (loss, (mean metrics, advanced unrolls or ()))."""
    keys = self._shard_tasks(jax.random.split(key, self.outer_batch))
    if self.truncation:
      fn = lambda k, u: self.task_loss(trainable, stats, pool, k, task, u)
      losses, (metrics, unrolls) = jax.vmap(fn)(keys, self._shard_tasks(unrolls))
    else:
      fn = lambda k: self.task_loss(trainable, stats, pool, k, task)
      losses, (metrics, _) = jax.vmap(fn)(keys)
    return jnp.mean(losses), (jax.tree_util.tree_map(jnp.mean, metrics), unrolls)

  def meta_gradient(self, trainable, stats, pool, key, task, carry):
    """The estimator's (loss, metrics, meta-gradient, carry) of the outer loss of the
    outer batch drawn with `key`; the estimator sees the loss as a function only."""
    loss = lambda tr, c: self.outer_loss(tr, stats, pool, key, task, c)
    return self.estimator.estimate(loss, trainable, key, carry)

  def step(self, state: TrainState, task):
    """One meta-step: (state, task) -> (new state, metrics). Pure; jit it."""
    key = jax.random.fold_in(state.rng, state.step)
    loss, metrics, grads, unrolls = self.meta_gradient(state.trainable, state.stats, state.pool, key,
                                                       task, state.unrolls)
    grad_norm = optax.tree_utils.tree_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = state._replace(
        step=state.step + 1,
        trainable=keep(trainable, state.trainable),
        opt_state=keep(opt_state, state.opt_state),
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        unrolls=self.estimator.restart(unrolls, ok))  # a non-finite window restarts every run
    metrics = {"meta_loss": loss, **metrics, "grad_norm": grad_norm,
               "skipped": new.skipped, "finite": ok}
    return new, metrics
