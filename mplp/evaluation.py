"""Held-out curves of a learned rule and of optax optimizers on the same tasks.

Everything here takes an `mplp.episode.Episode` (how a task starts and runs) and a rule
(`TrainedRule`, or a `TrainState`): no outer optimizer, estimator or mesh. For N task
keys every method sees the same tasks, initial weights and inner batches
(`Episode.start`). A curve is the held-out metric before learning and after each of the
T inner steps: `loss` [N, T + 1] and, for classification, `accuracy`. SGD and Adam get
their learning rate tuned on separate tuning tasks over a grid (the whole grid runs as
one `vmap`).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mplp import compiling
from mplp.episode import Episode, inner_state_bytes, scan_steps
from mplp.learned import MetaParams

LR_GRIDS = {
    "sgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "adam": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
}
DEFAULT_GRID = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "nadam", "adabelief", "lamb")


def optax_optimizer(name: str) -> Callable:
  """An optax optimizer by name (learning rate as its first argument)."""
  if name not in OPTIMIZER_NAMES:
    raise ValueError(f"--optimizers: unknown optimizer {name!r}; allowed: {list(OPTIMIZER_NAMES)}")
  return getattr(optax, name)


def _with_start(first, rest):
  return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


TASKS_BYTES = 2e9  # rule_curves runs at most this much inner state at once (tasks in batches)


def tasks_at_once(episode: Episode, n: int) -> int:
  """How many of `n` tasks `rule_curves` vmaps at once: all of them unless their inner
  states (and about as much again for a step's working set, twice) exceed `TASKS_BYTES`
  (a 784-100-10 network: 31 MB a task, so 16 at once, instead of 12 GB for 100 tasks)."""
  per_task = 4 * inner_state_bytes(episode.network, episode.batch_size)[0]
  return int(max(1, min(n, TASKS_BYTES // per_task)))


def rule_curves(episode: Episode, trainable, stats, pool, task, keys) -> Dict[str, jax.Array]:
  """The learned rule: {metric: [N, T + 1]} (tasks vmapped, in batches of
  `tasks_at_once`)."""
  meta = MetaParams(trainable["rule"], stats)

  def one(key):
    sample, state0 = episode.start(trainable, pool, key, task)
    observe = lambda new, old, m, x, y: episode.held_out(new, sample, task.problem)
    _, after = episode.run(meta, state0, sample.xs, sample.ys, observe)
    return _with_start(episode.held_out(state0, sample, task.problem), after)
  at_once = tasks_at_once(episode, len(keys))
  if at_once >= len(keys):
    return jax.vmap(one)(keys)
  return jax.lax.map(one, keys, batch_size=at_once)


def _optax_curve(episode: Episode, trainable, pool, task, make_opt: Callable, lr, key) -> Dict[str, jax.Array]:
  """One task (`key`) learned by `make_opt(lr)` on true gradients: {metric: [T + 1]}."""
  net = episode.network
  sample, state0 = episode.start(trainable, pool, key, task)
  opt = make_opt(lr)
  loss = lambda w, x, y: net.loss(net.with_weights(state0, w), x, y)
  w0 = net.weights(state0)

  def step(carry, x, y):
    w, opt_state = carry
    updates, opt_state = opt.update(jax.grad(loss)(w, x, y), opt_state, w)
    w = optax.apply_updates(w, updates)
    return (w, opt_state), episode.held_out(net.with_weights(state0, w), sample, task.problem)

  _, after = scan_steps(step, (w0, opt.init(w0)), sample.xs, sample.ys)
  return _with_start(episode.held_out(state0, sample, task.problem), after)


def optax_curves(episode: Episode, trainable, pool, task, keys, make_opt: Callable, lrs) -> Dict[str, jax.Array]:
  """An optax optimizer on the network's weights by true gradients:
  {metric: [L, N, T + 1]} for each learning rate in `lrs` [L]."""
  one = lambda lr, key: _optax_curve(episode, trainable, pool, task, make_opt, lr, key)
  return jax.vmap(lambda lr: jax.vmap(lambda k: one(lr, k))(keys))(jnp.asarray(lrs, float))


def _paired_runner(episode: Episode, trainable, pool, task, make_opt: Callable):
  """`run(lrs [n], keys [n], length) -> {metric: [n, T + 1]}`: task i learned at lrs[i],
  the batch padded to `length` (repeating its last pair) so that calls with different n
  share one compile."""
  jitted = compiling.jit(jax.vmap(lambda lr, key: _optax_curve(episode, trainable, pool, task, make_opt, lr, key)))

  def run(lrs, keys, length):
    n = len(keys)
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], length - n, axis=0)]) if length > n else a
    out = jitted(pad(jnp.asarray(lrs, float)), pad(keys))
    return jax.tree_util.tree_map(lambda a: a[:n], out)
  return run


def _final_score(curves, problem):
  """Mean final held-out metric per learning rate, as a loss (lower is better)."""
  if problem == "classification":
    score = -jnp.mean(curves["accuracy"][..., -1], axis=-1)
  else:
    score = jnp.mean(curves["loss"][..., -1], axis=-1)
  return jnp.where(jnp.isfinite(score), score, jnp.inf)


def curve_summary(curve) -> Dict[str, list]:
  """[N, T + 1] -> per-step mean, sd and 95% interval half-width of the mean."""
  c = np.asarray(curve, np.float64)
  sd = c.std(axis=0, ddof=1) if len(c) > 1 else np.zeros(c.shape[1])
  return {"mean": c.mean(0).tolist(), "sd": sd.tolist(), "ci95": (1.96 * sd / np.sqrt(len(c))).tolist()}


def phase_count(optimizers: Sequence[str] = ("sgd", "adam"), others: Sequence = ()) -> int:
  """How many phases `compare` reports to `on_phase`: each rule, then each optimizer."""
  return 1 + len(others) + len(optimizers)


def compare(episode: Episode, rule, task, key, n_tasks: int, tune_tasks: int,
            optimizers: Sequence[str] = ("sgd", "adam"), others: Sequence = (),
            on_phase: Callable[[str], None] = lambda what: None) -> Dict:
  """The rule vs tuned optax optimizers (and other trained rules) on `n_tasks` fresh tasks.

  `rule`: a `TrainedRule` (or `TrainState`). `others`: `(name, episode, rule)` of other
  trained rules for the same task (e.g. plain MAML against the MAML-style rule); they run
  on the same task keys, so they see the same tasks and batches (their own learned
  initialization, if they have one).
  `on_phase(what)` is called as each of the `phase_count` phases starts (progress).
  Returns {"methods": {name: {metric: summary}}, "learning_rates": {opt: chosen},
  "grids": {opt: grid}, "tasks": n_tasks}.
  """
  task = jax.tree_util.tree_map(jnp.asarray, task)  # numpy data cannot be indexed by traced keys
  k_eval, k_tune = jax.random.split(key)
  eval_keys = jax.random.split(k_eval, n_tasks)
  tune_keys = jax.random.split(k_tune, tune_tasks)
  methods = {}
  for name, ep, st in (("mplp", episode, rule), *others):
    on_phase(f"{name} on {n_tasks} tasks")
    curves = compiling.jit(lambda keys, ep=ep, st=st: rule_curves(ep, st.trainable, st.stats, st.pool, task, keys))(eval_keys)
    methods[name] = {m: curve_summary(c) for m, c in curves.items()}
  chosen = {}
  grids = {name: LR_GRIDS.get(name, DEFAULT_GRID) for name in optimizers}
  for name in optimizers:
    # The tuning grid on the tuning tasks and the chosen rate on the evaluation tasks, both
    # as one flat batch of (learning rate, task) padded to one length: one compile.
    grid = grids[name]
    on_phase(f"{name}: {len(grid)} learning rates x {tune_tasks} tuning tasks, then {n_tasks} tasks")
    run = _paired_runner(episode, rule.trainable, rule.pool, task, optax_optimizer(name))
    length = max(len(grid) * tune_tasks, n_tasks)
    tuned = run(np.repeat(grid, tune_tasks), jnp.tile(tune_keys, (len(grid), 1)), length)
    tuned = jax.tree_util.tree_map(lambda a: a.reshape((len(grid), tune_tasks) + a.shape[1:]), tuned)
    lr = grid[int(jnp.argmin(_final_score(tuned, task.problem)))]
    chosen[name] = lr
    best = run(np.full(n_tasks, lr), eval_keys, length)
    methods[f"{name}(lr={lr:g})"] = {m: curve_summary(c) for m, c in best.items()}
  return {"methods": methods, "learning_rates": chosen, "grids": {n: list(g) for n, g in grids.items()},
          "tasks": n_tasks, "tune_tasks": tune_tasks}


def rule_predictions(episode: Episode, trainable, stats, pool, task, key):
  """One task's fit along the rule's inner run: (TaskSample, predictions on x_eval
  before and after each step [T + 1, E, out])."""
  net = episode.network
  meta = MetaParams(trainable["rule"], stats)
  sample, state0 = episode.start(trainable, pool, key, task)
  observe = lambda new, old, m, x, y: net.forward(new, sample.x_eval)
  _, after = episode.run(meta, state0, sample.xs, sample.ys, observe)
  return sample, jnp.concatenate([net.forward(state0, sample.x_eval)[None], after])
