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

Windows (the estimator's `truncation = K < T`, learned_optimization's "truncated step"):
every task of the outer batch is an inner run in progress (`mplp.estimators.Unroll`: its
task key, the inner steps done, its inner state; the estimator keeps them). A meta-step
advances each run by one window of K steps and takes the meta-gradient of that window's
loss (hint over the window, held-out after it);
the inner state crosses into the next window without a gradient. A run that reaches T
starts over on a fresh task. With K = T this is exactly the full meta-gradient.

Sharding: with a `mesh` (axis 'tasks'), the outer batch (and the runs in progress) is
split across its devices; parameters are replicated and XLA inserts the all-reduce of the
mean over tasks. The same code runs on several hosts after `jax.distributed.initialize`.
Over more than one device the agents' cell runs in XLA, not as the fused kernel
(`mplp.cell_kernel.disabled`: XLA's partitioner cannot split the kernel's call).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mplp import cell_kernel, minibatch_init
from mplp.contracts import Estimator
from mplp.episode import Episode
from mplp.estimators import Backprop, Unroll, check_window
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


def _sq_distance(network, a, b):
  return sum(jnp.sum((wa - wb) ** 2) + jnp.sum((ba - bb) ** 2)
             for (wa, ba), (wb, bb) in zip(network.weights(a), network.weights(b)))


@dataclasses.dataclass(frozen=True)
class MetaTrainer:
  """Init and step of meta-training over (episode, objective, optimizer, estimator, mesh).

  Attributes:
    episode: the inner run of one task (`mplp.episode.Episode`: network and rule, T inner
      steps of B examples, E held-out, where tasks start: learned init, pool or fresh).
    optimizer: the outer optax optimizer.
    estimator: how the meta-gradient is estimated, with its window (`mplp.estimators`:
      `Backprop()` through the whole unroll, `Backprop(truncation=K)` through windows of K
      steps of runs in progress, `ES(sigma, pairs)`, or PES with `truncation`).
    objective: the outer-loss weights.
    outer_batch: tasks per meta-step.
    remat: recompute each inner step in the backward pass (less memory, more compute).
    mesh: a `Mesh` with axis 'tasks' to split the outer batch over (None: no sharding).
  """
  episode: Episode
  optimizer: optax.GradientTransformation
  estimator: Estimator = Backprop()
  objective: OuterLoss = OuterLoss()
  outer_batch: int = 4
  remat: bool = False
  mesh: Optional[Mesh] = None

  def __post_init__(self):
    check_window(self.estimator.truncation, self.episode.inner_steps)
    if self.mesh is not None:
      n = self.mesh.shape["tasks"]
      if self.outer_batch % n:
        raise ValueError(f"meta.outer_batch: {self.outer_batch} tasks do not split evenly over "
                         f"{n} devices; use a multiple of {n} or run.devices dividing it")

  @property
  def network(self) -> Network:
    return self.episode.network

  @property
  def window(self) -> int:
    """Inner steps per meta-gradient: the estimator's truncation, or the whole unroll."""
    return self.estimator.truncation or self.episode.inner_steps

  def _shard_tasks(self, tree):
    """Split the leading [outer_batch] axis over the mesh (no-op without a mesh)."""
    if self.mesh is None:
      return tree
    spec = NamedSharding(self.mesh, PartitionSpec("tasks"))
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, spec), tree)

  def init(self, key, task) -> TrainState:
    """Fresh meta-parameters, learned init and pool; statistics measured on one task."""
    k_meta, k_pool, k_init, k_task, k_net, k_rng = jax.random.split(key, 6)
    ep, net = self.episode, self.episode.network
    meta = net.init_meta(k_meta)
    pool = ()
    if ep.pool_size > 0:
      draw = lambda k: net.weights(net.init(k, 1))
      pool = jax.vmap(draw)(jax.random.split(k_pool, ep.pool_size))
    init = net.weights(net.init(k_init, 1)) if ep.learn_init else ()
    sample = task.sample(k_task, ep.inner_steps, ep.batch_size, ep.eval_size)
    first = init if ep.learn_init else (jax.tree_util.tree_map(lambda a: a[0], pool) if pool else None)
    if net.rule.has_statistics:  # learned rules; BackpropRule (plain MAML) has none
      meta = minibatch_init.measure(net, meta, net.init(k_net, ep.batch_size, weights=first or None),
                                    sample.xs, sample.ys)
    trainable = {"rule": meta.params, "init": init}
    zero = jnp.zeros([], jnp.int32)
    blank = jax.eval_shape(lambda: net.init(k_net, ep.batch_size))
    unrolls = self.estimator.init_carry(blank, self.outer_batch, trainable)
    return TrainState(zero, k_rng, trainable, meta.stats, self.optimizer.init(trainable),
                      pool, zero, zero, unrolls)

  def task_loss(self, trainable, stats, pool, key, task, unroll=None):
    """Outer loss of one task's window and its metrics (scalars).

    Without `unroll`: the whole unroll from a fresh task drawn with `key`. With an
    `Unroll`: the next window of the run in progress (a new task from `key` if its t is
    0). Returns (loss, (metrics, the run advanced by one window or None)).
    """
    episode, net = self.episode, self.episode.network
    meta = MetaParams(trainable["rule"], stats)
    t0 = 0
    if unroll is not None:
      restart = unroll.t == 0
      key = jnp.where(restart, key, unroll.key)
      t0 = unroll.t
    sample, state0 = episode.start(trainable, pool, key, task)
    if unroll is not None:
      state0 = jax.tree_util.tree_map(lambda a, b: jnp.where(restart, a, b), state0, unroll.state)
    xs = jax.lax.dynamic_slice_in_dim(sample.xs, t0, self.window)
    ys = jax.lax.dynamic_slice_in_dim(sample.ys, t0, self.window)
    observe = lambda new, old, m, x, y: (m["loss"], net.loss(new, x, y), _sq_distance(net, new, old))
    final, (before, hint, moved) = episode.run(meta, state0, xs, ys, observe, self.remat)
    held = episode.held_out(final, sample, task.problem)
    heldout = held["loss"]
    total = self.objective.hint * jnp.mean(hint) + self.objective.heldout * heldout
    metrics = {"heldout": heldout, "heldout_before": net.loss(state0, sample.x_eval, sample.y_eval),
               "hint": jnp.mean(hint), "first_batch_loss": before[0], "update_sq": jnp.mean(moved)}
    if self.objective.remember:
      remember = jnp.mean(jax.vmap(lambda x, y: net.loss(final, x, y))(xs, ys))
      total += self.objective.remember * remember
      metrics["remember"] = remember
    if self.objective.update_l2:
      total += self.objective.update_l2 * jnp.mean(moved)
    if "accuracy" in held:
      metrics["heldout_accuracy"] = held["accuracy"]
    advanced = None
    if unroll is not None:
      advanced = Unroll(key, (t0 + self.window) % episode.inner_steps, jax.lax.stop_gradient(final))
    return total, (metrics, advanced)

  def outer_loss(self, trainable, stats, pool, key, task, unrolls=()):
    """Mean outer loss over `outer_batch` tasks (vmapped, sharded over the mesh):
    (loss, (mean metrics, advanced unrolls or ()))."""
    if self.mesh is not None and self.mesh.size > 1:
      with cell_kernel.disabled():  # XLA's partitioner cannot split the fused kernel
        return self._outer_loss(trainable, stats, pool, key, task, unrolls)
    return self._outer_loss(trainable, stats, pool, key, task, unrolls)

  def _outer_loss(self, trainable, stats, pool, key, task, unrolls):
    keys = self._shard_tasks(jax.random.split(key, self.outer_batch))
    if self.estimator.truncation:
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
