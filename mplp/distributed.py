"""Many devices and many hosts: the device mesh, multi-process start-up, and moving
pytrees between hosts and the mesh.

One process per host (or per GPU) runs the same program; `initialize` connects them
(`jax.distributed.initialize`), after which `jax.devices()` lists every device of every
process and `mesh(n)` spans them. Parameters live replicated on the mesh (`replicate`),
the outer batch of tasks is split along its 'tasks' axis (`MetaTrainer.mesh`), and only
process 0 writes files (`is_writer`).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(coordinator: str, num_processes: int, process_id: int):
  """Join a multi-process run: `coordinator` is HOST:PORT of process 0."""
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def mesh(devices: int, outer_batch: int) -> Optional[Mesh]:
  """A 1-D mesh ('tasks') over `devices` devices (0: as many of all devices as divide
  `outer_batch`); None when that is one device. Raises ValueError naming `run.devices`
  when more are asked for than exist or they do not divide the outer batch."""
  available = jax.devices()
  if devices < 0:
    raise ValueError(f"run.devices: {devices} is out of range; must be >= 0 (0: all devices)")
  if devices > len(available):
    raise ValueError(f"run.devices: {devices} requested but only {len(available)} "
                     f"{available[0].platform} device(s) exist")
  if devices == 0:
    devices = max(n for n in range(1, len(available) + 1) if outer_batch % n == 0)
  elif outer_batch % devices:
    raise ValueError(f"run.devices: {devices} devices do not divide meta.outer_batch = {outer_batch}; "
                     f"use a divisor of it (or 0 to pick one)")
  if devices == 1:
    return None
  return Mesh(np.array(available[:devices]), ("tasks",))


def replicate(tree, mesh: Optional[Mesh]):
  """Place every array of `tree` (identical in every process) replicated on `mesh`."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(to_host(a))), tree)


def to_host(tree):
  """numpy copies of (replicated) arrays, readable in every process."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree_util.tree_map(one, tree)


def is_writer() -> bool:
  """Only process 0 writes checkpoints, metrics and W&B."""
  return jax.process_index() == 0
