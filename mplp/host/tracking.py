"""Where metrics go: `DIR/metrics.jsonl` (always) and Weights & Biases (when asked).

`MetricsLog` appends one JSON line per logged step and flushes it, so a killed run keeps
every line it logged; `truncate_after(step)` drops lines past a checkpoint when a run is
resumed (the file is rewritten atomically). `start_wandb` opens the real wandb client:
'offline' writes a syncable run under DIR/wandb with no network; 'online' checks for an
API key and a reachable server first (seconds) and falls back to offline with a warning
instead of hanging; 'disabled' does nothing.

W&B conventions the jobs follow: a trained rule is a **model artifact** `rule-RUNID`
(type "model", one file `rule.npz` that `mplp eval --pretrained` reads, the config as
metadata; aliases `latest`, `best`, `step-N`), read back with `download_rule`
("wandb:ENTITY/PROJECT/rule-RUNID:ALIAS"); per-step curves are `wandb.Table`s
(`curves_table`); plots are `wandb.Image`s.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Dict, Optional
from urllib.parse import urlparse

from mplp.host.files import write_atomic

WANDB_MODES = ("disabled", "offline", "online")


def _jsonable(v):
  v = float(v) if not isinstance(v, (int, float, str, bool)) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
  """Append-only `metrics.jsonl`: one `{"step": t, name: value, ...}` per line."""

  def __init__(self, path):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a")
    self._failed = False

  def write(self, step: int, metrics: Dict[str, Any]):
    try:
      self._file.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}) + "\n")
      self._file.flush()
    except OSError:  # a full disk: what reached the file is at most a cut last line
      self._failed = True
      raise

  def close(self):
    """Close the file; after a failed write the unwritten rest of the buffer is dropped
    (closing would retry it and raise again)."""
    try:
      self._file.close()
    except OSError:
      if not self._failed:
        raise

  @staticmethod
  def _steps(path):
    """[(step, line)] of the file; a last line cut by a kill is left out. Raises
    ValueError naming the line for a damaged line anywhere else (never drops valid lines)."""
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    out = []
    for i, line in enumerate(lines, 1):
      try:
        step = json.loads(line)["step"]
        if not isinstance(step, int):
          raise TypeError(step)
        out.append((step, line))
      except (json.JSONDecodeError, KeyError, TypeError):
        if i < len(lines):
          raise ValueError(f"{path}: line {i} of {len(lines)} is not a metrics record ({line[:60]!r}); "
                           "repair or remove that line to resume (nothing was changed)") from None
    return out

  @staticmethod
  def check(path):
    """Raise ValueError if `path` has a damaged line other than a cut last one."""
    MetricsLog._steps(path)

  @staticmethod
  def truncate_after(path, step: int):
    """Keep only lines with `step <= step` (a resumed run rewrites the rest); a last line
    cut by a kill goes, a damaged line elsewhere is refused (ValueError, file untouched)."""
    path = Path(path)
    if not path.exists():
      return
    kept = [line for s, line in MetricsLog._steps(path) if s <= step] if step > 0 else []
    write_atomic(path, "".join(l + "\n" for l in kept))  # a full disk: the original stays as it was


def _has_api_key() -> bool:
  if os.environ.get("WANDB_API_KEY"):
    return True
  host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
  try:
    return netrc.netrc().authenticators(host) is not None
  except (FileNotFoundError, netrc.NetrcParseError):
    return False


def _reachable(timeout: float = 3.0) -> bool:
  url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
  try:
    with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
      return True
  except OSError:
    return False


def start_wandb(mode: str, out_dir, config: Dict[str, Any], project: str = "mplp",
                run_id: Optional[str] = None):
  """A wandb run (or None for 'disabled'). `run_id` resumes the same W&B run."""
  if mode not in WANDB_MODES:
    raise ValueError(f"--wandb: {mode!r} is not allowed; allowed: {list(WANDB_MODES)}")
  if mode == "disabled":
    return None
  if mode == "online":
    why = None if _has_api_key() else "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if why is None and not _reachable():
      why = "the W&B server is not reachable"
    if why:
      warnings.warn(f"--wandb online: {why}; logging offline instead (sync later with "
                    f"`wandb sync {Path(out_dir) / 'wandb'}`)", stacklevel=2)
      mode = "offline"
  import wandb
  settings = wandb.Settings(init_timeout=30, silent=True, console="off")
  kwargs = dict(project=project, dir=str(out_dir), config=config, mode=mode, settings=settings)
  if run_id:
    kwargs.update(id=run_id, resume="allow")
  try:
    return wandb.init(**kwargs)
  except Exception as e:  # network trouble after the checks: never lose the run over it
    if mode != "online":
      raise
    warnings.warn(f"--wandb online failed ({type(e).__name__}: {e}); logging offline instead",
                  stacklevel=2)
    # The failed attempt keeps the run id registered in this process ("run ID ... is in
    # use" on the retry, e.g. against a server that is not W&B): start the client afresh.
    wandb.teardown()
    kwargs["mode"] = "offline"
    return wandb.init(**kwargs)


RULE_FILE = "rule.npz"  # the one file of a rule artifact


def log_rule(run, path, config: Dict[str, Any], step: int, aliases, heldout: Optional[float] = None):
  """Log the rule file `path` as version of this run's model artifact `rule-RUNID`."""
  import wandb
  art = wandb.Artifact(f"rule-{run.id}", type="model",
                       description="An mplp learned rule: `mplp eval --pretrained rule.npz`, or "
                                   f"`mplp eval wandb:ENTITY/PROJECT/rule-{run.id}:latest`.",
                       metadata={"config": config, "trained_steps": int(step),
                                 "heldout": _jsonable(heldout) if heldout is not None else None})
  art.add_file(str(path), name=RULE_FILE)
  run.log_artifact(art, aliases=list(aliases))
  return art


def curves_table(curves: Dict[str, Dict[str, Dict[str, list]]], first: str = "method"):
  """A `wandb.Table` of `{name: {metric: {stat: [T + 1]}}}` (eval's methods with mean and
  ci95, analysis' layers with mean and sd): one row per (name, metric, inner step)."""
  import wandb
  stats = list(next(iter(next(iter(curves.values())).values())))
  rows = [[name, metric, t, *(_jsonable(v[s][t]) if v[s][t] is not None else None for s in stats)]
          for name, per in curves.items() for metric, v in per.items() for t in range(len(v["mean"]))]
  return wandb.Table(columns=[first, "metric", "step", *stats], data=rows)


def log_images(run, paths, step: Optional[int] = None):
  """The PNGs that exist among `paths` as `wandb.Image`s, keyed by file stem."""
  import wandb
  images = {Path(p).stem: wandb.Image(str(p)) for p in paths if Path(p).exists()}
  if images:
    run.log(images, step=step)


def download_rule(ref: str) -> Path:
  """The rule file of a W&B model artifact "wandb:ENTITY/PROJECT/NAME[:ALIAS]" (alias
  default `latest`), downloaded into W&B's artifact cache. Refused at once, with what to
  do instead, where it cannot be read: offline mode, no API key, no reachable server."""
  from mplp.host.config import ConfigError
  name = ref[len("wandb:"):]
  if name.count("/") != 2 or not all(name.split("/")):
    raise ConfigError(f"{ref!r}: a W&B rule is wandb:ENTITY/PROJECT/NAME[:ALIAS], e.g. "
                      "wandb:me/mplp/rule-1a2b3c4d:latest")
  name = name if ":" in name.split("/")[-1] else name + ":latest"
  instead = (f"; download it where W&B is reachable (`wandb artifact get {name}`) and pass its "
             f"{RULE_FILE} as PATH.npz")
  if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
    raise ConfigError(f"{ref}: WANDB_MODE is {os.environ['WANDB_MODE']!r}, so W&B artifacts cannot be read{instead}")
  if not _has_api_key():
    raise ConfigError(f"{ref}: no W&B API key (set WANDB_API_KEY or run `wandb login`){instead}")
  if not _reachable():
    raise ConfigError(f"{ref}: the W&B server is not reachable{instead}")
  import wandb
  try:
    art = wandb.Api(timeout=30).artifact(name, type="model")
    path = Path(art.download()) / RULE_FILE
  except Exception as e:  # not found, no access, network trouble
    raise ConfigError(f"{ref}: W&B could not give this artifact ({type(e).__name__}: {e}){instead}") from None
  if not path.is_file():
    raise ConfigError(f"{ref}: the artifact holds no {RULE_FILE}: not an mplp rule")
  return path
