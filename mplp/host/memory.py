"""What a meta-training configuration needs in memory, estimated before anything compiles.

A configuration whose arrays cannot fit (a `task.eval_size`, `task.batch_size` or
`network.hidden` a few orders too large, a data set with a million labels) used to reach
XLA, compile for tens of seconds, then fail with `RESOURCE_EXHAUSTED: Out of memory
allocating ... bytes`. `estimate` adds up the arrays a meta-step must hold at once, from
their shapes alone (`jax.eval_shape`: nothing is allocated); `check` compares the total
with the memory this machine has available and refuses, naming the keys that drive the
largest part. The estimate is a lower bound (XLA's temporaries come on top), so a refusal
is never a false alarm for the memory it counts; `force` skips the check.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional, Tuple

import jax.numpy as jnp

from mplp.episode import inner_state_bytes
from mplp.host.config import ConfigError


class Part(NamedTuple):
  bytes: int
  what: str  # what the memory holds, naming the config keys that size it


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def estimate(cfg, network) -> Dict[str, Part]:
  """The arrays one meta-step of `cfg` holds at once, by cause (bytes)."""
  t, m = cfg.task, cfg.meta
  item = jnp.dtype(float).itemsize
  one, weights = inner_state_bytes(network, t.batch_size)
  sized = (f"task.batch_size {t.batch_size}, network.hidden {list(cfg.network.hidden)}, "
           f"{network.output_size} outputs")
  perturbed = 2 * m.es_pairs if m.estimator in ("es", "pes") else 1
  tasks = m.outer_batch * perturbed
  saved = {"backprop": t.inner_steps, "truncated": m.truncation}.get(m.estimator, 0)  # es/pes: forward only
  parts = {
      "pool": Part(m.pool_size * weights, f"meta.pool_size {m.pool_size} initial networks' weights "
                   f"(network.hidden {list(cfg.network.hidden)}, {network.output_size} outputs)"),
      # Backprop keeps each inner step's state (the agents' carries) for the backward
      # pass; the XLA cell also keeps the agents' broadcast inputs (about as much again),
      # the fused cell kernel only their X-float concatenation: one state a step is the
      # bound for both.
      "unroll": Part(tasks * (saved + 1) * one,
                     f"meta.outer_batch {m.outer_batch} x {saved} saved inner steps (task.inner_steps "
                     f"{t.inner_steps}, meta.estimator {m.estimator!r}) of one network ({sized})"),
      "held-out": Part(tasks * t.eval_size * (2 * sum(network.widths) + network.input_size) * item,
                       f"task.eval_size {t.eval_size} held-out examples through {list(network.widths)} "
                       f"per task"),
      "batches": Part(tasks * t.inner_steps * t.batch_size * (network.input_size + network.output_size) * item,
                      f"task.inner_steps {t.inner_steps} x task.batch_size {t.batch_size} examples per task"),
  }
  return parts


def available_bytes() -> Optional[int]:
  """Memory this machine can give a new allocation now (Linux MemAvailable), or None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


class TooLarge(ConfigError):
  """The configuration's estimated memory exceeds what the machine has."""


def check(cfg, network, force: bool = False, available: Optional[int] = None) -> Tuple[int, Dict[str, Part]]:
  """Raise `TooLarge` (naming the largest part's keys and the estimate) when the estimate
  exceeds `available` (default: this machine's available memory); returns (total, parts)."""
  parts = estimate(cfg, network)
  total = sum(p.bytes for p in parts.values())
  available = available_bytes() if available is None else available
  if force or available is None or total <= available:
    return total, parts
  big = max(parts.values(), key=lambda p: p.bytes)
  raise TooLarge(f"this configuration needs at least {_gb(total)} of memory, more than the "
                 f"{_gb(available)} this machine has available; the largest part is {_gb(big.bytes)} "
                 f"for {big.what}. Lower those keys, or pass --force to try anyway (nothing was written)")
