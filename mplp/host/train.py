"""The meta-training job behind `mplp train`: one jitted meta-step in a host loop that
logs, checkpoints, resumes, and ends with a comparison against tuned SGD and Adam.

    DIR/config.json       the resolved config (a resumed run must match it)
    DIR/metrics.jsonl     one line per logged meta-step
    DIR/checkpoints/      ckpt_XXXXXXXX.npz (see mplp.host.checkpoint)
    DIR/final_eval.json   held-out curves of the rule, SGD and Adam (if run.eval_tasks > 0)
    DIR/wandb/            the W&B run (offline or online mode)

A resumed run restores the exact `TrainState` (meta-parameters, optimizer state,
statistics, pool, step and RNG key) and rewrites metrics past the checkpoint, so its
metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path

import jax

from mplp import distributed, evaluation
from mplp.host import checkpoint, config as config_lib, memory, progress as progress_lib, report, tracking
from mplp.tasks import Sinusoid, jit_with_task
from mplp.host.files import write_atomic
from mplp.host.tracking import MetricsLog, start_wandb


class RunError(RuntimeError):
  """The run cannot start or go on (existing outputs, a mismatched resume, divergence)."""


def _megabytes(n: float) -> str:
  return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


@contextlib.contextmanager
def _writing(what: str, path: Path, needed: int, ckpt_dir: Path):
  """A failed write (a full disk, a quota, a vanished mount) becomes one RunError line:
  what could not be written where, the space it needed and had, and the checkpoint that
  is intact (the writers leave no partial file: checkpoint.write and _write_atomic
  delete their .tmp; a cut metrics line is dropped on --resume)."""
  try:
    yield
  except OSError as e:
    where = Path(path)
    while not where.exists() and where != where.parent:
      where = where.parent
    try:
      free = f"{_megabytes(shutil.disk_usage(where).free)} free there"
    except OSError:
      free = "free space unknown"
    good = checkpoint.latest(ckpt_dir)
    then = (f"the last good checkpoint, {good}, is intact: free space, then rerun with --resume to "
            "continue exactly" if good else "no checkpoint was written yet (--resume starts the run over)")
    raise RunError(f"could not write {what} {path} ({e.strerror or e}; it needs about "
                   f"{_megabytes(needed)}, {free}); {then}") from None


def _lock_holder(path: Path) -> str:
  """Who holds the flock on `path`, from /proc/locks (Linux): 'pid N', or a plain phrase."""
  try:
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
      fields = line.split()
      if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
        return f"pid {fields[4]}"
  except OSError:
    pass
  return "another process"


def _lock(out: Path):
  """Hold `DIR/.lock` (an exclusive `flock`) while this process writes DIR: a second
  writer on the same directory is refused at once, naming the process that holds it. The
  kernel drops the lock when its holder dies (kill -9 included), so a stale lock never
  blocks --resume. Returns the open file (the lock lasts while it is open); the file is
  never written, so taking the lock changes no byte of the run."""
  import fcntl
  path = out / ".lock"
  try:
    out.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
  except OSError as e:
    raise RunError(f"--out: cannot write to {out} ({e.strerror or e}); choose a writable directory "
                   "(nothing was written)") from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise RunError(f"{out} is being written by another mplp train ({_lock_holder(path)}); wait for it "
                   "to end or choose another --out (nothing was changed)") from None
  return f


def _check_resume(saved: config_lib.Config, new: config_lib.Config):
  a, b = saved.flat(), new.flat()
  free = {"run.steps", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints",
          "run.eval_tasks", "run.tune_tasks", "run.wandb_project", "run.wandb_checkpoints",
          "meta.max_bad_steps"}
  diff = [f"{k}: {a[k]!r} (saved) vs {b[k]!r}" for k in a if k not in free and a[k] != b[k]]
  if diff:
    raise RunError("--resume: the config differs from the saved run's config.json in "
                   + "; ".join(diff) + " (only run.steps, the run.* cadence and meta.max_bad_steps may change)")


def train(cfg: config_lib.Config, out_dir, *, resume: bool = False, wandb_mode: str = "disabled",
          task=None, progress: bool = True, log=print, force: bool = False) -> dict:
  """Meta-train as `cfg` says, writing to `out_dir`.

  Args:
    task: use this task object instead of the one the config names (Python API: a
      user's own `Task`).
    log: where human-readable lines go.
    force: skip the memory check (`mplp.host.memory`) made before anything compiles.
  Returns:
    {"state": final TrainState, "final_eval": dict or None, "metrics": last logged}.
  """
  out = Path(out_dir)
  ckpt_dir = out / "checkpoints"
  cfg_path = out / "config.json"
  created = not out.exists()
  lock = _lock(out) if distributed.is_writer() else None
  try:
    return _train(cfg, out, ckpt_dir, cfg_path, resume, wandb_mode, task, progress, log, force)
  except BaseException:
    if created and lock is not None and [p.name for p in out.iterdir()] == [".lock"]:
      (out / ".lock").unlink()  # refused before writing anything: leave no directory behind
      out.rmdir()
    raise
  finally:
    if lock is not None:
      lock.close()


def _train(cfg, out, ckpt_dir, cfg_path, resume, wandb_mode, task, progress, log, force) -> dict:
  latest = _resumable(cfg, out, ckpt_dir, cfg_path, resume)
  task = task if task is not None else config_lib.build_task(cfg)
  network = config_lib.build_network(cfg, task)
  memory.check(cfg, network, force)  # before anything compiles or is written
  trainer = config_lib.build_trainer(cfg, network)

  t0 = time.perf_counter()
  task = distributed.replicate(task, trainer.mesh)
  if progress and latest is None:
    log("sampling the initial networks and measuring the agents' statistics (compiling)...")
  state = _initial_state(cfg, trainer, task, latest, log)
  writer = distributed.is_writer()
  if writer:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_partial(ckpt_dir)  # a write cut by a kill
    if not resume:
      text = json.dumps(cfg.to_dict(), indent=2) + "\n"
      with _writing("the config", cfg_path, len(text), ckpt_dir):
        write_atomic(cfg_path, text)
  state = _restore(state, out, ckpt_dir, latest, resume, writer, log)
  state = distributed.replicate(state, trainer.mesh)
  wb = _open_wandb(cfg, out, ckpt_dir, wandb_mode) if writer else None
  versions = RuleVersions(out, cfg, wb)
  state, last = _loop(cfg, trainer, task, state, out, ckpt_dir, writer, wb, versions, progress, log, t0)
  final = _final_eval(cfg, trainer, task, state, out, ckpt_dir, wb, log) if writer else None
  if wb is not None:
    if not cfg.run.wandb_checkpoints or not versions.logged:
      versions.log(int(distributed.to_host(state.step)))
    if final is not None:
      wb.log({"final_eval": tracking.curves_table(final["methods"])}, step=int(distributed.to_host(state.step)))
      wb.summary.update({f"final/learning_rate/{k}": v for k, v in final["learning_rates"].items()})
    wb.finish()
  return {"state": state, "final_eval": final, "metrics": last}


def _resumable(cfg, out, ckpt_dir, cfg_path, resume):
  """Refuse a run directory that cannot be started or resumed as asked, before anything
  is built or written; the checkpoint to resume from, or None."""
  if resume:
    if not cfg_path.exists():
      raise RunError(f"--resume: {out} has no config.json; there is no run to resume there")
    _check_resume(config_lib.load_json(cfg_path), cfg)
  elif cfg_path.exists() or checkpoint.latest(ckpt_dir) or (out / "metrics.jsonl").exists():
    raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose "
                   f"another --out (nothing was changed)")
  latest = checkpoint.latest(ckpt_dir) if resume else None
  if latest is not None:
    checkpoint.read(latest)  # refuse a corrupted file before touching anything
    if checkpoint.step_of(latest) >= cfg.run.steps:
      raise RunError(f"--resume: {out} is already at meta-step {checkpoint.step_of(latest)} "
                     f"({latest.name}); --steps {cfg.run.steps} asks for no more. Give --steps above "
                     f"{checkpoint.step_of(latest)} to go on (nothing was changed)")
    try:
      MetricsLog.check(out / "metrics.jsonl")  # a damaged line is refused, not dropped
    except ValueError as e:
      raise RunError(f"--resume: {e}") from None
  return latest


def _initial_state(cfg, trainer, task, latest, log):
  """A fresh TrainState (on the host), with the warm-start rule of `meta.init_rule` for a
  run that does not resume (read, and refused, before anything is written). A run that
  resumes from a checkpoint gets only the state's shapes: the checkpoint replaces every
  array, so the initialization (about 9 s of compilation for the shipped configs) is
  not run."""
  key = jax.random.PRNGKey(cfg.run.seed)
  if latest is not None:
    return jax.eval_shape(lambda k: trainer.init(k, task), key)
  state = distributed.to_host(jit_with_task(trainer.init, task, once=True)(key))
  if cfg.meta.init_rule:
    from mplp.host import sources
    trainable, stats = sources.warm_start(cfg.meta.init_rule, state.trainable, state.stats)
    state = state._replace(trainable=trainable, stats=stats, opt_state=trainer.optimizer.init(trainable))
    log(f"rule and statistics from {cfg.meta.init_rule}")
  return state


def _restore(state, out, ckpt_dir, latest, resume, writer, log):
  """The state of the checkpoint resumed from (the metrics log cut back to its step), or
  `state`; a resumed run killed before its first checkpoint starts over at step 0."""
  metrics_path = out / "metrics.jsonl"
  metrics_size = metrics_path.stat().st_size if metrics_path.exists() else 0
  if latest is not None:
    state, info = checkpoint.restore(latest, state)
    if writer:
      with _writing("the metrics", metrics_path, metrics_size, ckpt_dir):
        MetricsLog.truncate_after(metrics_path, info["step"])
    log(f"resumed from {latest} (step {info['step']})")
  elif resume and writer:
    with _writing("the metrics", metrics_path, metrics_size, ckpt_dir):
      MetricsLog.truncate_after(metrics_path, 0)
    log(f"no checkpoint in {ckpt_dir} yet; starting {out} from step 0")
  return state


def _open_wandb(cfg, out, ckpt_dir, wandb_mode):
  """The W&B run (resumed under the id the run directory keeps), or None."""
  id_path = out / "wandb_run_id"
  run_id = id_path.read_text().strip() if id_path.exists() else None
  if run_id is None and wandb_mode != "disabled":
    run_id = uuid.uuid4().hex[:8]
    with _writing("the W&B run id", id_path, 9, ckpt_dir):
      write_atomic(id_path, run_id + "\n")
  wb = start_wandb(wandb_mode, out, cfg.to_dict(), cfg.run.wandb_project, run_id)
  if wb is not None:  # the run page's summary: the best and the last of each
    for name, best in (("heldout", "min"), ("heldout_accuracy", "max"), ("meta_loss", "min")):
      wb.define_metric(name, summary=f"{best},last")
  return wb


def _loop(cfg, trainer, task, state, out, ckpt_dir, writer, wb, versions, progress, log, t0):
  """Meta-steps from the state's step to `run.steps`: metrics, W&B, the progress bar and
  checkpoints on their schedules; (final state, the last logged metrics)."""
  start = int(distributed.to_host(state.step))
  metrics_path = out / "metrics.jsonl"
  step_fn = jit_with_task(trainer.step, task)
  metrics_log = MetricsLog(metrics_path) if writer else None
  state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state))
  last = {}
  bar = None
  if progress and writer:
    bar = progress_lib.bar(cfg.run.steps, "meta-train (compiling)", initial=start, unit="step")
    if start < cfg.run.steps:
      log("compiling the meta-step...")
  try:
    for t in range(start, cfg.run.steps):
      state, metrics = step_fn(state)
      if bar is not None and t == start:
        bar.set_description_str("meta-train")
      done = t + 1
      bad = int(distributed.to_host(state.bad_steps))
      if done % cfg.run.log_every == 0 or done == cfg.run.steps or done == 1 or bad:
        last = {k: float(v) for k, v in distributed.to_host(metrics).items()}
        last["wall_s"] = time.perf_counter() - t0
        versions.observe(last)
        if metrics_log is not None:
          with _writing("the metrics", metrics_path, 1000, ckpt_dir):
            metrics_log.write(done, last)
        if wb is not None:
          wb.log(last, step=done)
        if bar is not None:
          bar.set_postfix(meta_loss=f"{last['meta_loss']:.4g}", heldout=f"{last['heldout']:.4g}")
      if bar is not None:
        bar.update(1)
      if bad >= cfg.meta.max_bad_steps:
        good = checkpoint.latest(ckpt_dir)
        raise RunError(
            f"stopped at meta-step {done}: {bad} consecutive meta-steps had a non-finite loss or "
            f"meta-gradient (skipped, parameters untouched; meta.max_bad_steps = "
            f"{cfg.meta.max_bad_steps}). Last good checkpoint: {good or 'none yet'}. Try a lower "
            f"meta.learning_rate or meta.clip_global_norm.")
      if (done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps) and not bad and writer:
        with _writing("the checkpoint", checkpoint.path_for(ckpt_dir, done), state_bytes, ckpt_dir):
          checkpoint.save(ckpt_dir, done, distributed.to_host(state),
                          {"config": cfg.to_dict(), "seed": cfg.run.seed,
                           "rng": distributed.to_host(state.rng).tolist()}, keep=cfg.run.keep_checkpoints)
        if cfg.run.wandb_checkpoints:
          versions.log(done)
  except KeyboardInterrupt:
    if wb is not None:
      wb.finish(exit_code=130)  # the W&B run keeps what was logged
    raise
  finally:
    if metrics_log is not None:
      metrics_log.close()
    if bar is not None:
      bar.close()
  return state, last


def _final_eval(cfg, trainer, task, state, out, ckpt_dir, wb, log):
  """The paper's protocol on `run.eval_tasks` tasks, as `mplp eval` runs it (fresh inner
  networks, not pool draws), written to final_eval.json; None when eval_tasks is 0."""
  if cfg.run.eval_tasks <= 0:
    return None
  eval_task = dataclasses.replace(task, eval_grid=True) if isinstance(task, Sinusoid) else task
  final = evaluation.compare(dataclasses.replace(trainer.episode, pool_size=0), distributed.to_host(state),
                             distributed.to_host(eval_task),
                             jax.random.PRNGKey(10_000 + cfg.run.seed), cfg.run.eval_tasks, cfg.run.tune_tasks)
  text = report.finite_json(final)
  with _writing("the final evaluation", out / "final_eval.json", len(text), ckpt_dir):
    write_atomic(out / "final_eval.json", text)
  log(format_comparison(final, task.problem))
  if wb is not None:
    wb.summary.update({f"final/{m}/{k}": v["mean"][-1] for m, r in final["methods"].items()
                       for k, v in r.items()})
  return final


class RuleVersions:
  """The run's rule as W&B model-artifact versions: `observe` each logged metrics line,
  `log(step)` exports checkpoint `step` to DIR/rule.npz (the file `mplp eval --pretrained`
  reads) and logs it with aliases `latest`, `step-N`, and `best` when the mean held-out
  loss of the lines since the previous version is the lowest so far."""

  def __init__(self, out: Path, cfg, wb):
    self.out, self.cfg, self.wb = out, cfg, wb
    self.window, self.best, self.logged = [], float("inf"), 0

  def observe(self, metrics: dict):
    if "heldout" in metrics:
      self.window.append(metrics["heldout"])

  def log(self, step: int):
    if self.wb is None or checkpoint.latest(self.out / "checkpoints") is None:
      return
    from mplp.host import sources
    path = sources.save_pretrained(self.out, "rule", directory=self.out, step=step)
    score = sum(self.window) / len(self.window) if self.window else float("inf")
    aliases = ["latest", f"step-{step}"]
    if score <= self.best or not self.logged:
      self.best = min(score, self.best)
      aliases.append("best")
    tracking.log_rule(self.wb, path, self.cfg.to_dict(), step, aliases, score if self.window else None)
    self.window, self.logged = [], self.logged + 1


def format_comparison(final: dict, problem: str) -> str:
  """A plain-text table: held-out metric (mean +- 95% CI) per inner step and method."""
  metric = report.primary_metric(problem)
  methods = final["methods"]
  steps = len(next(iter(methods.values()))[metric]["mean"])
  head = f"held-out {metric} on {final['tasks']} fresh tasks (mean +- 95% CI); step 0 = before learning"
  cols = list(methods)
  lines = [head, "step  " + "  ".join(f"{c:>22}" for c in cols)]
  for t in range(steps):
    cells = [f"{methods[c][metric]['mean'][t]:.5f} +- {methods[c][metric]['ci95'][t]:.5f}" for c in cols]
    lines.append(f"{t:4d}  " + "  ".join(f"{c:>22}" for c in cells))
  lines.append(f"learning rates tuned on {final['tune_tasks']} other tasks over "
               + ", ".join(f"{k} {v}" for k, v in final["grids"].items()))
  return "\n".join(lines)
