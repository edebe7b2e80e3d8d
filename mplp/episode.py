"""One inner run, and the one home of every unroll.

An `Episode` says how a task's inner run goes: where its initial weights come from (the
learned initialization, a draw from a pool of pre-sampled networks, or a fresh draw),
T inner steps on batches of B, and E held-out examples. It is what training (the outer
loss), evaluation (the rule's and optax's curves), analysis and the statistics
measurement share; none of them needs an outer optimizer, an estimator or a mesh.

* `scan_steps(step, carry, xs, ys)` is the only `lax.scan` over inner steps in mplp:
  `step(carry, x, y) -> (carry, record)` for the rule (`Episode.run`), for an optax
  optimizer on true gradients, or for any other learner;
* `Episode.start` draws a task and its starting inner state from a key (the same key
  gives the same task, batches and initial weights to every method compared);
* `Episode.held_out` is the held-out loss (and accuracy for classification).

A trained rule is a `TrainedRule`: its trainable meta-parameters, its statistics and, for
runs that draw initial networks from a pool, that pool.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp


class TrainedRule(NamedTuple):
  """What evaluating a rule needs (a `TrainState` has the same fields)."""
  trainable: Any   # {"rule": rule params, "init": ((W [I, O], b [O]), ...) or ()}
  stats: Any       # standardization statistics (mplp.minibatch_init)
  pool: Any = ()   # ((W [P, I, O], b [P, O]), ...) to draw initial networks from, or ()


def scan_steps(step: Callable, carry, xs, ys, remat: bool = False):
  """`step(carry, x, y) -> (carry, record)` over the batches xs [T, B, in], ys [T, B, out]
  with `lax.scan`: (final carry, records with a leading [T] axis). `remat` recomputes
  each step in the backward pass (less memory, more compute)."""
  body = lambda c, batch: step(c, *batch)
  if remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, carry, (xs, ys))


@dataclasses.dataclass(frozen=True)
class Episode:
  """Attributes:
    network: the inner network with its rule.
    inner_steps: T; batch_size: B (inner batch); eval_size: E held-out examples.
    learn_init: tasks start from the learned initial weights (`trainable["init"]`).
    pool_size: otherwise from a draw of the pool of this many networks (0: a fresh draw).
  """
  network: Any
  inner_steps: int = 5
  batch_size: int = 10
  eval_size: int = 100
  learn_init: bool = False
  pool_size: int = 0

  def initial_weights(self, trainable, pool, key):
    """The inner network a task starts from: learned init, a pool draw, or fresh."""
    if self.learn_init:
      return trainable["init"]
    if self.pool_size > 0:
      i = jax.random.randint(key, (), 0, self.pool_size)
      return jax.tree_util.tree_map(lambda a: a[i], pool)
    return self.network.weights(self.network.init(key, 1))

  def start(self, trainable, pool, key, task):
    """One task's data and starting inner state: (TaskSample, state)."""
    k_task, k_init = jax.random.split(key)
    sample = task.sample(k_task, self.inner_steps, self.batch_size, self.eval_size)
    weights = self.initial_weights(trainable, pool, k_init)
    return sample, self.network.init(k_init, self.batch_size, weights=weights)

  def run(self, meta, state, xs, ys, observe: Optional[Callable] = None, remat: bool = False):
    """The rule's inner steps over xs [T, B, in], ys [T, B, out]: (final state, records
    [T, ...]). A step's record is `observe(new state, old state, step metrics, x, y)`, or
    the step metrics ({"loss": loss on the batch before the update})."""
    net = self.network

    def step(s, x, y):
      new, metrics = net.inner_step(meta, s, x, y)
      return new, (metrics if observe is None else observe(new, s, metrics, x, y))

    return scan_steps(step, state, xs, ys, remat)

  def held_out(self, state, sample, problem: str):
    """{"loss": held-out loss[, "accuracy": held-out accuracy for classification]}."""
    net = self.network
    out = {"loss": net.loss(state, sample.x_eval, sample.y_eval)}
    if problem == "classification":
      pred = net.forward(state, sample.x_eval)
      out["accuracy"] = jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(sample.y_eval, -1))
    return out


def _bytes(tree) -> int:
  return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(tree))


def inner_state_bytes(network, batch: int) -> Tuple[int, int]:
  """(bytes of one inner network's state: weights and every agent's carry for `batch`
  examples, bytes of its weights alone), from shapes only."""
  shapes = jax.eval_shape(lambda k: network.init(k, batch), jax.random.PRNGKey(0))
  return _bytes(shapes), _bytes(network.weights(shapes))
