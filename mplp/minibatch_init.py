"""Standardization statistics measured on real task data ("minibatch init").

Before meta-training, run a few inner steps with the untrained rule in measuring mode:
every agent input's scalar mean and 1/std (1 where std < 1e-5) is taken over the whole
current tensor and used at once, as is the update's centring constant (the mean over
all agents of the batch-averaged update channel). The per-step values are averaged over
the steps and stored in `meta.stats`, where they stay fixed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mplp.episode import scan_steps
from mplp.learned import MetaParams
from mplp.network import InnerState, Network


def measure(network: Network, meta: MetaParams, state: InnerState, xs, ys) -> MetaParams:
  """Measure the statistics over T inner steps.

  Args:
    network: a network whose rule is a `LearnedRule`.
    meta: its meta-parameters (their `stats` are replaced).
    state: a fresh inner state (batch B).
    xs: [T, B, in] and ys: [T, B, out], the batches of one task.
  Returns:
    `meta` with the averaged statistics.
  """
  if not getattr(network.rule, "has_statistics", False):
    raise ValueError(f"minibatch init needs a learned rule, got {type(network.rule).__name__}")
  measuring = dataclasses.replace(network, rule=dataclasses.replace(network.rule, measure=True))

  def step(s, x, y):
    s, _, used = measuring.step_with_stats(meta, s, x, y)
    return s, used

  _, used = scan_steps(step, state, xs, ys)
  stats = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), used)
  return meta._replace(stats=stats)
