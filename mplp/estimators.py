"""Meta-gradient estimators: how `MetaTrainer.step` gets d(outer loss) / d(trainable).

An estimator is a frozen dataclass with pure methods (cf. learned_optimization's
gradient estimators, one per file there). It owns its truncation (`truncation = K`
inner steps per meta-gradient window, 0 for whole unrolls) and what it carries between
meta-steps, and sees the outer loss only as a function, never the trainer:

    init_carry(blank, outer_batch, trainable) -> carry   (what it keeps between meta-steps)
    estimate(loss, trainable, key, carry)
        -> (loss [], metrics {name: []}, grads (like trainable), carry)
    restart(carry, ok) -> carry                          (after a non-finite step)

`loss(trainable, runs) -> (scalar, (metrics, advanced runs))` is the mean outer loss of
one outer batch of tasks (`MetaTrainer.outer_loss` with the statistics, pool, task key
and task bound). `runs` is () for whole unrolls; with a window K it is the runs in
progress (`Unroll` [outer_batch], `blank` giving the shape of one run's inner state),
each meta-step advancing them by K inner steps.

* `Backprop` — `jax.grad` through the unroll: the whole one (the config's `backprop`) or
  one window of runs in progress (`truncated`; biased: the window's dependence on earlier
  windows is cut).
* `ES` — antithetic evolution strategies: `pairs` perturbations eps ~ N(0, sigma^2 I) of
  every trainable tensor; every pair evaluates the same outer batch of tasks (common
  random numbers) at trainable +- eps and estimates
      g = mean_pairs (L(+eps) - L(-eps)) / (2 sigma^2) * eps,
  an unbiased gradient of the Gaussian-smoothed outer loss. It needs no derivative of
  the inner network, so it works through a step activation. With a window it is
  persistent ES (PES, Vicol et al. 2021): each pair keeps its own +/- runs in progress
  and the sum of its perturbations since the run started, and multiplies the window's
  loss difference by that sum, which makes the estimate unbiased across truncations.
  Pairs are `vmap`ped; inside each, the outer batch is split over the mesh as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp


class Unroll(NamedTuple):
  """An inner run in progress (windows of K steps); t == 0 means "start a new task"."""
  key: jax.Array   # [2] uint32, the task key of the run
  t: jax.Array     # [] int32, inner steps done
  state: Any       # its inner state


def _tree_stack(tree, n):
  return jax.tree_util.tree_map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), tree)


def _runs(blank, outer_batch: int) -> Unroll:
  """`outer_batch` runs in progress, none started: Unroll [outer_batch] of zeros."""
  zero = jnp.zeros([], jnp.int32)
  return _tree_stack(Unroll(jax.random.PRNGKey(0), zero, blank), outer_batch)


def check_window(truncation: int, inner_steps: int) -> None:
  """A window of `truncation` steps must divide the unroll of `inner_steps` (0: none)."""
  if truncation and inner_steps % truncation:
    raise ValueError(f"meta.truncation: {truncation} must divide task.inner_steps "
                     f"({inner_steps}); allowed: a divisor of it, or 0 for the whole unroll")


def _check_truncation(truncation) -> None:
  if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 0:
    raise ValueError(f"meta.truncation: must be an int >= 0 (0: whole unrolls), got {truncation!r}")


@dataclasses.dataclass(frozen=True)
class Backprop:
  """Reverse-mode gradient through the unroll (or through windows of K steps of it).

  Attributes:
    truncation: K, inner steps per meta-gradient window (0: the whole unroll).
  """
  truncation: int = 0

  def __post_init__(self):
    _check_truncation(self.truncation)

  def init_carry(self, blank, outer_batch: int, trainable):
    del trainable
    return _runs(blank, outer_batch) if self.truncation else ()

  def estimate(self, loss, trainable, key, carry):
    del key
    (value, (metrics, carry)), grads = jax.value_and_grad(loss, has_aux=True)(trainable, carry)
    return value, metrics, grads, carry

  def restart(self, carry, ok):
    """After a non-finite step, start every run in progress over on a fresh task."""
    return carry._replace(t=jnp.where(ok, carry.t, 0)) if carry else carry


class PESCarry(NamedTuple):
  """Persistent ES state: the antithetic runs in progress of every pair."""
  pos: Any    # Unroll [pairs, outer_batch, ...] at trainable + eps
  neg: Any    # Unroll [pairs, outer_batch, ...] at trainable - eps
  noise: Any  # like trainable, [pairs, ...]: the sum of eps since the runs started


@dataclasses.dataclass(frozen=True)
class ES:
  """Antithetic ES (whole unrolls) or PES (windows of runs in progress).

  Attributes:
    sigma: standard deviation of the perturbation of every trainable value.
    pairs: antithetic pairs per meta-step (2 * pairs * outer_batch inner runs).
    truncation: K, inner steps per window of the runs in progress (PES); 0: whole unrolls.
  """
  sigma: float = 0.01
  pairs: int = 8
  truncation: int = 0

  def __post_init__(self):
    if not self.sigma > 0:
      raise ValueError(f"meta.es_sigma: must be > 0, got {self.sigma!r}")
    if not isinstance(self.pairs, int) or self.pairs < 1:
      raise ValueError(f"meta.es_pairs: must be an int >= 1, got {self.pairs!r}")
    _check_truncation(self.truncation)

  def init_carry(self, blank, outer_batch: int, trainable):
    if not self.truncation:  # whole unrolls: nothing to carry
      return ()
    runs = _tree_stack(_runs(blank, outer_batch), self.pairs)
    return PESCarry(runs, runs, _tree_stack(trainable, self.pairs))

  def _noise(self, key, trainable):
    """eps [pairs, ...] for every trainable tensor, drawn in one call: [pairs, n] for the
    n trainable values, then cut into the tensors. One draw per tensor made a loop per
    tensor in the compiled program; drawn in float32 in every precision (a perturbation
    needs no more, and float64's inverse erf is a large program). Measured on a 3-pair ES
    estimate of a ~100-tensor rule in float64: 18.4 s of compile before, 7.5 s now."""
    flat, unravel = jax.flatten_util.ravel_pytree(trainable)
    eps = self.sigma * jax.random.normal(key, (self.pairs,) + flat.shape, jnp.float32).astype(flat.dtype)
    return jax.vmap(unravel)(eps)

  def estimate(self, loss, trainable, key, carry):
    eps = self._noise(jax.random.fold_in(key, 1), trainable)
    shift = lambda sign, e: jax.tree_util.tree_map(lambda t, d: t + sign * d, trainable, e)

    if carry:  # PES: windows of runs in progress
      restart = carry.pos.t[:, 0] == 0  # [pairs]: runs of a pair start and advance together
      noise = jax.tree_util.tree_map(
          lambda acc, e: jnp.where(restart.reshape((-1,) + (1,) * (e.ndim - 1)), 0, acc) + e,
          carry.noise, eps)

      def pair(e, pos, neg):
        lp, (mp, pos) = loss(shift(+1, e), pos)
        ln, (mn, neg) = loss(shift(-1, e), neg)
        return lp, ln, mp, mn, pos, neg

      lp, ln, mp, mn, pos, neg = jax.vmap(pair)(eps, carry.pos, carry.neg)
      carry = PESCarry(pos, neg, noise)
    else:
      noise = eps

      def pair(e):
        lp, (mp, _) = loss(shift(+1, e), ())
        ln, (mn, _) = loss(shift(-1, e), ())
        return lp, ln, mp, mn

      lp, ln, mp, mn = jax.vmap(pair)(eps)
    weight = (lp - ln) / (2 * self.sigma ** 2)  # [pairs]
    grads = jax.tree_util.tree_map(
        lambda n: jnp.tensordot(weight, n, axes=1) / self.pairs, noise)
    metrics = jax.tree_util.tree_map(lambda a, b: (jnp.mean(a) + jnp.mean(b)) / 2, mp, mn)
    metrics["es_loss_gap"] = jnp.mean(jnp.abs(lp - ln))
    return (jnp.mean(lp) + jnp.mean(ln)) / 2, metrics, grads, carry

  def restart(self, carry, ok):
    if not carry:
      return carry
    fix = lambda u: u._replace(t=jnp.where(ok, u.t, 0))
    return carry._replace(pos=fix(carry.pos), neg=fix(carry.neg))


ESTIMATORS = ("backprop", "truncated", "es", "pes")
WINDOWED = ("truncated", "pes")


def make(name: str, truncation: int, inner_steps: int, sigma: float = 0.01, pairs: int = 8):
  """The estimator a config names (`meta.estimator`), with its window (`meta.truncation`,
  which `truncated` and `pes` need and `backprop` and `es` must leave at 0) checked
  against the unroll of `inner_steps`. Bad values raise ValueError naming the field."""
  if name not in ESTIMATORS:
    raise ValueError(f"meta.estimator: {name!r} is not allowed; allowed: {list(ESTIMATORS)}")
  _check_truncation(truncation)
  check_window(truncation, inner_steps)
  if name in WINDOWED and not truncation:
    raise ValueError(f"meta.truncation: meta.estimator = {name!r} needs a window; "
                     f"allowed: a divisor of task.inner_steps ({inner_steps})")
  if name not in WINDOWED and truncation:
    raise ValueError(f"meta.estimator: {name!r} uses whole unrolls but meta.truncation = "
                     f"{truncation}; allowed with a window: 'truncated' or 'pes' "
                     "(or set meta.truncation = 0)")
  if name in ("backprop", "truncated"):
    return Backprop(truncation)
  return ES(sigma, pairs, truncation)
