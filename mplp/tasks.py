"""Tasks: where the inner learning problems come from.

A task is anything with `input_size`, `output_size`, `problem` ('regression' or
'classification') and a pure `sample(key, steps, batch, eval_size) -> TaskSample` that
draws one learning problem and returns its T inner batches plus held-out data from the
same problem. `sample` runs under `jit` and `vmap`, so it must be written in JAX. A task
that holds arrays (a data set) should be a pytree (e.g. `jax.tree_util.register_dataclass`)
so the arrays are passed to compiled code as arguments instead of baked in as constants.

Built in: `Sinusoid` (the paper's regression tasks) and `Classification` (inner batches
from a train split, held-out batches from the test split of an `ArrayDataset`, see
`mplp.host.datasets`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from mplp import compiling


class TaskSample(NamedTuple):
  xs: jax.Array      # [T, B, in] inner batches
  ys: jax.Array      # [T, B, out] their targets (one-hot for classification)
  x_eval: jax.Array  # [E, in] held-out inputs from the same task
  y_eval: jax.Array  # [E, out]


def jit_with_task(fn, task, *, once: bool = False):
  """`compiling.jit(fn, once=once)` for `fn(*args, task)`, returning `g(*args)`: a pytree
  task travels as an argument (its arrays are not baked into the program), any other task
  object is closed over as a constant."""
  leaves = jax.tree_util.tree_leaves(task)
  if len(leaves) == 1 and leaves[0] is task:  # not a pytree
    return compiling.jit(lambda *args: fn(*args, task), once=once)
  jitted = compiling.jit(fn, once=once)
  return lambda *args: jitted(*args, task)


class Task(Protocol):
  input_size: int
  output_size: int
  problem: str  # 'regression' | 'classification'

  def sample(self, key, steps: int, batch: int, eval_size: int) -> TaskSample:
    ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sinusoid:
  """y = A sin(x + p), A ~ U[0.1, 0.5], p ~ U[0, pi], x ~ U[-5, 5] (the paper's tasks).

  Attributes:
    eval_grid: held-out inputs on linspace(-5, 5, eval_size) (the paper's evaluation)
      instead of fresh uniform samples.
  """
  eval_grid: bool = dataclasses.field(metadata=dict(static=True), default=False)
  input_size = 1
  output_size = 1
  problem = "regression"

  def sample(self, key, steps, batch, eval_size):
    ka, kp, kx, ke = jax.random.split(key, 4)
    amp = jax.random.uniform(ka, (), minval=0.1, maxval=0.5)
    phase = jax.random.uniform(kp, (), maxval=jnp.pi)
    xs = jax.random.uniform(kx, (steps, batch, 1), minval=-5.0, maxval=5.0)
    if self.eval_grid:
      x_eval = jnp.linspace(-5.0, 5.0, eval_size)[:, None]
    else:
      x_eval = jax.random.uniform(ke, (eval_size, 1), minval=-5.0, maxval=5.0)
    f = lambda x: amp * jnp.sin(x + phase)
    return TaskSample(xs, f(xs), x_eval, f(x_eval))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Classification:
  """Classification tasks over an array data set (a pytree: the arrays are leaves).

  Inner batches are drawn (with replacement) from the train split, held-out batches from
  the test split. With `permute_classes`, every task relabels the classes with its own
  random permutation (so a rule cannot memorize the label map).

  Attributes:
    x_train: [N, D] float32; y_train: [N] int32 in [0, classes).
    x_test: [N', D]; y_test: [N'].
    classes: number of classes (static).
    permute_classes: relabel classes per task (static).
  """
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  classes: int = dataclasses.field(metadata=dict(static=True), default=10)
  permute_classes: bool = dataclasses.field(metadata=dict(static=True), default=False)
  problem = "classification"

  @property
  def input_size(self) -> int:
    return self.x_train.shape[-1]

  @property
  def output_size(self) -> int:
    return self.classes

  def sample(self, key, steps, batch, eval_size):
    k_perm, k_train, k_test = jax.random.split(key, 3)
    labels = jnp.arange(self.classes)
    if self.permute_classes:
      labels = jax.random.permutation(k_perm, self.classes)
    i = jax.random.randint(k_train, (steps, batch), 0, self.x_train.shape[0])
    j = jax.random.randint(k_test, (eval_size,), 0, self.x_test.shape[0])
    one_hot = lambda y: jax.nn.one_hot(labels[y], self.classes)
    return TaskSample(self.x_train[i], one_hot(self.y_train[i]),
                      self.x_test[j], one_hot(self.y_test[j]))
