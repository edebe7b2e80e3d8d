"""The `mplp` command.

    mplp train EXPERIMENT [--steps N] [--seed S] [--out DIR] [--wandb MODE] [--resume] [--set key=value ...]
                          [--devices N] [--coordinator HOST:PORT --num-processes N --process-id I]

    mplp eval (RUN_DIR | --pretrained NAME | --reference PATH.npy --experiment NAME) [--tasks N] ...
    mplp analyze (RUN_DIR | --pretrained NAME | --reference PATH.npy --experiment NAME) [--tasks N] ...
    mplp transfer EVAL_DIR [EVAL_DIR ...] [--out TABLE.md]

EXPERIMENT names a config in `mplp/host/configs/` (sinusoid_5x10, maml_sinusoid_2x10,
digits_20x8, mnist_20x8, ...) or is a path to a `.toml`. Bad input ends with one line
`mplp: error: ...` (exit status 2) and leaves existing outputs as they were.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from mplp.host.checkpoint import CheckpointError
from mplp.host.config import SEED_MAX, ConfigError
from mplp.host.datasets import DataError, DataUnavailableError
from mplp.host.tracking import WANDB_MODES

USER_ERRORS = (ConfigError, DataError, DataUnavailableError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mplp", description="Meta-learn message passing learning protocols.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="meta-train a learning rule",
                     description="Meta-train a learning rule as an experiment config says.")
  t.add_argument("experiment", help="a shipped config name (mplp/host/configs/) or a path to a .toml")
  t.add_argument("--steps", type=int, help="meta-steps (run.steps)")
  t.add_argument("--seed", type=int, help="run.seed")
  t.add_argument("--out", help="output directory (default runs/EXPERIMENT-seedS)")
  t.add_argument("--wandb", default="disabled", choices=WANDB_MODES, help="Weights & Biases mode")
  t.add_argument("--resume", action="store_true", help="continue the run in --out")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set meta.learning_rate=1e-3 (repeatable)")
  t.add_argument("--devices", type=int, help="devices to split the outer batch over (run.devices; 0: all)")
  t.add_argument("--coordinator", help="multi-process run: HOST:PORT of process 0")
  t.add_argument("--num-processes", type=int, help="multi-process run: number of processes")
  t.add_argument("--process-id", type=int, help="multi-process run: this process's index")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  t.add_argument("--force", action="store_true",
                 help="start even where the memory estimate exceeds what this machine has available")

  e = sub.add_parser("eval", help="evaluate a rule against tuned SGD and Adam",
                     description="The paper's protocol: N fresh tasks and inner networks, the same "
                                 "for every method; held-out metric after each inner step.")
  _source_args(e, tasks=100)
  e.add_argument("--tune-tasks", type=int, default=20, help="tasks for tuning the baselines' learning rates")
  e.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], help="optax baselines by name")
  e.add_argument("--against", nargs="+", default=[], metavar="RUN_DIR|NAME",
                 help="other trained rules for the same task, on the same tasks (e.g. plain MAML)")

  n = sub.add_parser("analyze", help="compare a rule's updates and messages with the true gradients",
                     description="Along the rule's inner runs: per layer and step, the cosine of its "
                                 "updates with the negative gradient and how much of dL/d(output) its "
                                 "messages carry (mplp.analysis).")
  _source_args(n, tasks=20)

  r = sub.add_parser("transfer", help="one table over several `mplp eval` outputs",
                     description="Collect `mplp eval` outputs (e.g. one rule on other activations, "
                                 "widths or data sets via --set) into one markdown table.")
  r.add_argument("eval_dirs", nargs="+", help="`mplp eval` output directories")
  r.add_argument("--out", help="also write the table to this file")
  return p


def _source_args(p, tasks: int):
  """Where the rule comes from, and the options `eval` and `analyze` share."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("run_dir", nargs="?", help="a `mplp train` output directory (its newest checkpoint, or "
                   "--step), a rule file PATH.npz, or a W&B model artifact wandb:ENTITY/PROJECT/NAME:ALIAS")
  p.add_argument("--step", type=int, nargs="+", help="with RUN_DIR: its checkpoint of this meta-step instead of "
                 "the newest; several steps: the average of their rules and statistics")
  src.add_argument("--pretrained", metavar="NAME", help="a rule shipped with mplp (or PATH.npz, or wandb:...)")
  src.add_argument("--reference", metavar="PATH.npy", help="the authors' published flat weights")
  p.add_argument("--experiment", help="with --reference: sinusoid_5x10, maml_sinusoid_2x10 or mnist_20x8")
  p.add_argument("--reference-prior", metavar="PATH.npy", help="with --reference: the MAML experiment's learned init")
  p.add_argument("--tasks", type=int, default=tasks, help=f"tasks (default {tasks})")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help=f"output directory (default runs/{p.prog.split()[-1]}-SOURCE-seedS)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="transfer: change the network or task, e.g. --set network.activation=step")
  p.add_argument("--wandb", default="disabled", choices=WANDB_MODES)
  p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when stderr is not a terminal)")


def _load_source(a):
  """(config, episode, rule, task, name) from a run directory, a shipped rule, a rule file,
  a W&B model artifact (`wandb:ENTITY/PROJECT/NAME:ALIAS`, given as --pretrained or in
  place of RUN_DIR) or the authors' weights."""
  import re
  from pathlib import Path
  from mplp.host import sources
  if a.reference:
    if not a.experiment:
      raise ConfigError(f"--experiment is required with --reference; known: {list(sources.PUBLISHED)}")
    return (*sources.from_reference(a.reference, a.experiment, a.reference_prior, a.overrides),
            f"reference-{a.experiment}")
  if a.step is not None and not a.run_dir:
    raise ConfigError("--step picks a checkpoint of RUN_DIR; it does not apply to --pretrained or --reference")
  if a.run_dir and (a.run_dir.startswith("wandb:") or Path(a.run_dir).is_file() or a.run_dir.endswith(".npz")):
    if a.step is not None:
      raise ConfigError("--step picks a checkpoint of RUN_DIR; a rule file or W&B artifact holds one rule")
    a.pretrained, a.run_dir = a.run_dir, None
  if a.pretrained:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(a.pretrained).stem).strip("-")
    return (*sources.from_pretrained(a.pretrained, a.overrides), f"pretrained-{label}")
  name = Path(a.run_dir).name + ("" if a.step is None else "-step" + "+".join(map(str, sorted(set(a.step)))))
  return (*sources.from_run(a.run_dir, a.overrides, a.step), name)


def _train(a) -> int:
  from pathlib import Path
  from mplp.host import config as config_lib
  from mplp.host.train import train
  overrides = list(a.overrides)
  if a.steps is not None:
    overrides.append(f"run.steps={a.steps}")
  if a.seed is not None:
    overrides.append(f"run.seed={a.seed}")
  if a.devices is not None:
    overrides.append(f"run.devices={a.devices}")
  multi = (a.coordinator, a.num_processes, a.process_id)
  if any(v is not None for v in multi):
    if any(v is None for v in multi):
      raise ConfigError("--coordinator, --num-processes and --process-id must be given together")
    from mplp import distributed
    distributed.initialize(a.coordinator, a.num_processes, a.process_id)
  cfg = config_lib.load(a.experiment, overrides)
  out = a.out or f"runs/{Path(a.experiment).stem}-seed{cfg.run.seed}"
  a.run_dir = out  # for the message after an interrupt
  train(cfg, out, resume=a.resume, wandb_mode=a.wandb, progress=not a.no_progress, force=a.force)
  print(f"outputs in {out}")
  return 0


def _check_seed(seed: int):
  if not 0 <= seed <= SEED_MAX:
    raise ConfigError(f"--seed: {seed} is out of range; allowed: 0 to {SEED_MAX}")


def _writable_dir(path: str) -> str:
  """`path` if results can be written there (created if missing), checked before any work
  so that finished results are never computed and then lost; ConfigError naming it."""
  import tempfile
  from pathlib import Path
  d = Path(path)
  if d.exists() and not d.is_dir():
    raise ConfigError(f"--out: {d} is a file, not a directory; allowed: a directory to write results to")
  try:
    d.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=d).close()
  except OSError as e:
    raise ConfigError(f"--out: cannot write to {d} ({e.strerror or e}); choose a writable directory") from None
  return str(d)


def _eval(a) -> int:
  import dataclasses
  import jax
  from mplp import compiling, evaluation
  from mplp.host import progress, report
  from mplp.tasks import Sinusoid
  if a.tasks < 2 or a.tune_tasks < 1:
    raise ConfigError(f"--tasks must be >= 2 and --tune-tasks >= 1, got {a.tasks} and {a.tune_tasks}")
  _check_seed(a.seed)
  cfg, episode, rule, task, name = _load_source(a)
  for opt in a.optimizers:  # refuse unknown names before any work
    try:
      evaluation.optax_optimizer(opt)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  others = [_against(source, cfg, a.overrides) for source in a.against]
  names = ["mplp"] + [name for name, _, _ in others]
  if len(set(names)) < len(names):
    raise ConfigError(f"--against: method names must differ (the rule is 'mplp'), got {names}")
  out_dir = _writable_dir(a.out or f"runs/eval-{name}-seed{a.seed}")  # before the work
  if isinstance(task, Sinusoid):
    task = dataclasses.replace(task, eval_grid=True)
  key = jax.random.PRNGKey(a.seed)
  with progress.Phases(evaluation.phase_count(a.optimizers, others), "mplp eval",
                       not a.no_progress) as phases:
    result = evaluation.compare(episode, rule, task, key, a.tasks, a.tune_tasks, a.optimizers, others,
                                on_phase=phases.start)
    phases.close()
  fits = None
  if isinstance(task, Sinusoid):
    keys = jax.random.split(jax.random.split(key)[0], a.tasks)[:3]  # the first evaluation tasks
    fits = compiling.jit(jax.vmap(lambda k: evaluation.rule_predictions(
        episode, rule.trainable, rule.stats, (), task, k)))(keys)  # one compile for the three
    fits = [jax.tree_util.tree_map(lambda a, i=i: a[i], fits) for i in range(len(keys))]
  out = report.write(result, out_dir, task.problem, cfg.to_dict(), fits)
  print((out / "eval.md").read_text())
  if a.wandb != "disabled":
    from mplp.host import tracking
    run = tracking.start_wandb(a.wandb, out, {**cfg.to_dict(), "eval": vars(a)}, cfg.run.wandb_project)
    metric = report.primary_metric(task.problem)
    for t in range(episode.inner_steps + 1):
      run.log({f"{m}/{metric}": r[metric]["mean"][t] for m, r in result["methods"].items()}, step=t)
    run.log({"curves_table": tracking.curves_table(result["methods"])}, step=episode.inner_steps)
    tracking.log_images(run, [out / "curves.png", out / "fits.png"], step=episode.inner_steps)
    run.summary.update({f"learning_rate/{k}": v for k, v in result["learning_rates"].items()})
    run.summary.update({f"final/{m}/{metric}": r[metric]["mean"][-1] for m, r in result["methods"].items()})
    run.finish()
  print(f"outputs in {out}")
  return 0


def _against(source, cfg, overrides):
  """(name, episode, rule) of another trained rule whose task config equals `cfg`'s."""
  from pathlib import Path
  from mplp.host import sources
  try:
    other_cfg, episode, rule, _ = sources.load(source, overrides)
  except ConfigError as e:
    raise ConfigError(f"--against {source}: {e}") from None
  mine, theirs = cfg.to_dict()["task"], other_cfg.to_dict()["task"]
  differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
  if differ:
    raise ConfigError(f"--against {source}: its task differs in {', '.join(f'task.{k}' for k in differ)} "
                      f"({', '.join(f'{mine.get(k)!r} vs {theirs.get(k)!r}' for k in differ)}); allowed: "
                      "a rule trained for the same task (or --set the same overrides)")
  name = Path(source).name if Path(source).is_dir() else f"pretrained:{source}"
  return name, episode, rule


def _analyze(a) -> int:
  import jax
  from mplp import analysis
  from mplp.host import progress, report
  from mplp.tasks import jit_with_task
  if a.tasks < 1:
    raise ConfigError(f"--tasks must be >= 1, got {a.tasks}")
  _check_seed(a.seed)
  cfg, episode, rule, task, name = _load_source(a)
  out_dir = _writable_dir(a.out or f"runs/analyze-{name}-seed{a.seed}")
  keys = jax.random.split(jax.random.PRNGKey(a.seed), a.tasks)
  fn = lambda tr, st, k, task: analysis.alignment(episode, tr, st, task, k)
  with progress.Phases(1, "mplp analyze", not a.no_progress) as phases:
    phases.start(f"{a.tasks} tasks with their true gradients (one compile)")
    curves = jit_with_task(fn, task)(rule.trainable, rule.stats, keys)
    phases.close()
  summary = analysis.layer_summary(curves, analysis.layer_names(episode.network))
  out = report.write_analysis(summary, out_dir, a.tasks, cfg.to_dict())
  print((out / "analysis.md").read_text())
  if a.wandb != "disabled":
    from mplp.host import tracking
    run = tracking.start_wandb(a.wandb, out, {**cfg.to_dict(), "analyze": vars(a)}, cfg.run.wandb_project)
    for t in range(episode.inner_steps):
      run.log({f"{layer}/{m}": v["mean"][t] for layer, per in summary.items() for m, v in per.items()
               if v["mean"][t] is not None}, step=t)
    run.log({"alignment_table": tracking.curves_table(summary, first="layer")}, step=episode.inner_steps - 1)
    tracking.log_images(run, [out / "alignment.png"], step=episode.inner_steps - 1)
    run.finish()
  print(f"outputs in {out}")
  return 0


def _transfer(a) -> int:
  from pathlib import Path
  from mplp.host import report
  try:
    text = report.transfer_table(a.eval_dirs)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  print(text)
  if a.out:
    Path(a.out).write_text(text)
  return 0


class Terminated(KeyboardInterrupt):
  """SIGTERM (`kill PID`, a scheduler's stop, a container's shutdown), handled as Ctrl-C
  is: the checkpoint being written is abandoned (its .tmp deleted), the last one stays."""


GRACE_S = 10.0  # after Ctrl-C / SIGTERM, leave within this long even if the interrupt was lost


def _signal_handler(a):
  """Ctrl-C and SIGTERM raise KeyboardInterrupt (Terminated) so that the run unwinds (a
  checkpoint being written deletes its .tmp, W&B is finished); a watchdog thread leaves
  after GRACE_S in case the exception was swallowed (Python ignores one raised inside a
  finalizer or a callback; seen once in the suite: the run trained on)."""
  import threading

  def handler(signum, frame):
    import signal
    terminated = signum == signal.SIGTERM
    watchdog = threading.Timer(GRACE_S, _interrupted, (a, terminated))
    watchdog.daemon = True
    watchdog.start()
    raise Terminated() if terminated else KeyboardInterrupt()
  return handler


def _compilation_cache():
  """Keep XLA's compiled programs across runs in `$XDG_CACHE_HOME/mplp/xla` (default
  `~/.cache/mplp/xla`): the second `mplp train` or `mplp eval` of a configuration loads its
  programs instead of compiling them again (the same compiled code, so the same numbers).
  JAX_COMPILATION_CACHE_DIR, if set, is used as it is; MPLP_NO_CACHE=1 turns it off; an
  unwritable cache folder is skipped."""
  import os
  from pathlib import Path
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("MPLP_NO_CACHE"):
    return None
  root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mplp" / "xla"
  try:
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
      return None
  except OSError:
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", str(root))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return root


def main(argv=None) -> int:
  import signal
  import threading
  a = _parser().parse_args(argv)
  _compilation_cache()
  warnings.formatwarning = lambda msg, cat, *args, **kw: f"mplp: warning: {msg}\n"
  on_main_thread = threading.current_thread() is threading.main_thread()
  handler = _signal_handler(a)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if on_main_thread else {}
  try:
    return _main(a)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _main(a) -> int:
  from mplp.host.train import RunError
  try:
    if a.command == "train":
      return _train(a)
    if a.command == "eval":
      return _eval(a)
    if a.command == "analyze":
      return _analyze(a)
    if a.command == "transfer":
      return _transfer(a)
  except USER_ERRORS + (RunError,) as e:
    print(f"mplp: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    _interrupted(a, terminated=isinstance(e, Terminated))
  return 1


def _interrupted(a, terminated: bool = False):
  """Ctrl-C / SIGINT (exit 130) or SIGTERM (exit 143): say what is left, then leave at
  once. The interpreter's own shutdown is skipped: with XLA still compiling in its
  threads it crashed (exit 139)."""
  import os
  from pathlib import Path
  from mplp.host import checkpoint
  msg = "mplp: terminated (SIGTERM)" if terminated else "mplp: interrupted"
  run_dir = getattr(a, "run_dir", None)
  if a.command == "train" and run_dir is not None:
    last = checkpoint.latest(Path(run_dir) / "checkpoints")
    msg += (f"; {last} is intact: continue with --resume" if last is not None else
            f"; {run_dir} has no checkpoint yet (--resume starts it over)")
  print(msg, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(143 if terminated else 130)


if __name__ == "__main__":
  sys.exit(main())
