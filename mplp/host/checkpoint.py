"""Checkpoints: a pytree of arrays plus JSON metadata in one `.npz` file.

* Safe to load: plain arrays read with `allow_pickle=False`, metadata as JSON; the
  structure comes from a template pytree the caller builds (nothing executes on load).
* Atomic: written to `NAME.tmp`, fsynced, then renamed; a kill during a write leaves the
  previous checkpoint as it was.
* Verified: a SHA-256 over every array's bytes (and zip's own CRCs) is checked on load,
  as are leaf count, shapes and dtypes against the template; anything off raises
  `CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from mplp import cell_params

FORMAT = "mplp-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8,})\.npz$")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (corrupted, truncated, or not matching)."""


def _digest(leaves) -> str:
  h = hashlib.sha256()
  for a in leaves:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def path_for(directory, step: int) -> Path:
  return Path(directory) / f"ckpt_{step:08d}.npz"


def write(path, tree: Any, metadata: Dict[str, Any]) -> Path:
  """Write `tree` (arrays) and `metadata` (JSON-able) to `path` atomically."""
  path = Path(path)
  leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]
  info = {"format": FORMAT, "version": VERSION, **metadata,
          "leaves": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in leaves],
          "sha256": _digest(leaves)}
  arrays = {f"leaf_{i:05d}": a for i, a in enumerate(leaves)}
  arrays["__meta__"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk, an interrupt: leave no partial file behind
    tmp.unlink(missing_ok=True)
    raise
  fd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  return path


def save(directory, step: int, tree: Any, metadata: Dict[str, Any], keep: int = 3) -> Path:
  """Write checkpoint `step` of `tree` into `directory`; keep the newest `keep`."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  final = write(path_for(directory, step), tree, {"step": int(step), **metadata})
  for old in list_checkpoints(directory)[:-keep]:
    old.unlink(missing_ok=True)
  return final


def remove_partial(directory) -> List[Path]:
  """Delete the `.tmp` files a killed writer left in `directory`; returns them."""
  found = sorted(Path(directory).glob("*.tmp")) if Path(directory).is_dir() else []
  for p in found:
    p.unlink(missing_ok=True)
  return found


def step_of(path) -> int:
  """The meta-step in a checkpoint's file name (`path_for`'s inverse)."""
  return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(directory) -> List[Path]:
  """Checkpoint files in `directory`, oldest first (unfinished `.tmp` files ignored)."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=step_of)


def read(path) -> Tuple[List[np.ndarray], Dict[str, Any]]:
  """Leaves and metadata of a checkpoint, verified; raises `CheckpointError`."""
  path = Path(path)
  hint = "delete it to resume from an earlier checkpoint, or start a new run"
  try:
    with np.load(path, allow_pickle=False) as f:
      info = json.loads(bytes(f["__meta__"]).decode())
      if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mplp checkpoint (format {info.get('format')!r})")
      leaves = [f[f"leaf_{i:05d}"] for i in range(len(info["leaves"]))]
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, json.JSONDecodeError,
          UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: "
                          f"{e}); {hint}") from None
  if info.get("version") != VERSION:
    raise CheckpointError(f"{path}: checkpoint version {info.get('version')} is not supported "
                          f"(this mplp reads version {VERSION})")
  if _digest(leaves) != info.get("sha256"):
    raise CheckpointError(f"checkpoint {path} is corrupted: its arrays do not match the "
                          f"recorded SHA-256; {hint}")
  return leaves, info


def restore(path, template: Any) -> Tuple[Any, Dict[str, Any]]:
  """The checkpoint's arrays in the structure of `template` (same leaf count, shapes
  and dtypes, else `CheckpointError`) and its metadata.

  A file written before the stateful cells' parameters were stored as one vector
  (`mplp.cell_params`; its 17 tensors per cell as leaves) is read into the template's
  tensors and packed: older runs resume, older rule files load."""
  leaves, info = read(path)
  ref, treedef = jax.tree_util.tree_flatten(template)
  if len(ref) != len(leaves):
    old_ref, old_treedef = jax.tree_util.tree_flatten(cell_params.unpack_all(template))
    if len(old_ref) == len(leaves):
      tree, info = _restore(path, leaves, info, old_ref, old_treedef)
      return cell_params.pack_like(tree, template), info
  return _restore(path, leaves, info, ref, treedef)


def _restore(path, leaves, info, ref, treedef):
  if len(ref) != len(leaves):
    raise CheckpointError(f"{path} holds {len(leaves)} arrays but this run's state has "
                          f"{len(ref)}: it was written by a different configuration")
  for i, (a, r) in enumerate(zip(leaves, ref)):
    r = np.asarray(r) if not hasattr(r, "shape") else r
    if tuple(a.shape) != tuple(r.shape) or a.dtype != r.dtype:
      raise CheckpointError(f"{path}: array {i} has shape {a.shape} {a.dtype}, this run's state "
                            f"expects {tuple(r.shape)} {r.dtype}: a different configuration")
  return jax.tree_util.tree_unflatten(treedef, leaves), info


def latest(directory) -> Optional[Path]:
  found = list_checkpoints(directory)
  return found[-1] if found else None
