"""The `mplp train` job: it learns, it resumes exactly after a kill, it refuses bad input
cleanly, it skips non-finite steps, and it logs to wandb offline."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplp import evaluation
from mplp.host import checkpoint, config as config_lib
from mplp.host.cli import main
from mplp.tasks import Sinusoid, jit_with_task
from mplp.host.train import RunError, train

# A small, fast job: the MAML-style sinusoid experiment with 2 tasks per meta-step.
TINY = ["meta.outer_batch=2", "run.eval_tasks=0", "run.log_every=1", "meta.learning_rate=3e-3",
        "meta.per_tensor_norm=false"]


def _metrics(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines()]


def test_meta_training_improves_held_out_loss():
  """300 meta-steps (outer batch 4, seed 0) cut the held-out loss after the inner steps
  on 64 fixed tasks by a clear factor (measured 1.46x; asserted 1.25x)."""
  cfg = config_lib.load("maml_sinusoid_2x10", ["run.steps=300", "run.eval_tasks=0",
                                               "meta.learning_rate=3e-3", "meta.per_tensor_norm=false"])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  keys = jax.random.split(jax.random.PRNGKey(99), 64)
  curves = jax.jit(lambda s: evaluation.rule_curves(
      trainer.episode, s.trainable, s.stats, s.pool, Sinusoid(eval_grid=True), keys)["loss"].mean(0))
  before = curves(jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0)))
  state = jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0))
  step = jit_with_task(trainer.step, task)
  for _ in range(300):
    state, _ = step(state)
  after = curves(state)
  assert after[-1] < 0.8 * before[-1], (before, after)
  assert after[-1] < after[0]  # the learned rule's inner steps help, not only the learned init


def _cli(out, *args):
  cmd = [sys.executable, "-m", "mplp.host.cli", "train", "maml_sinusoid_2x10", "--out", str(out),
         "--no-progress", *sum((["--set", s] for s in TINY), []), *args]
  return cmd


def _run_until_checkpoint(out, step, *args):
  """A `mplp train` subprocess on `out` (going on for ever) once it has checkpointed `step`."""
  proc = subprocess.Popen(_cli(out, "--steps", "100000", "--set", "run.checkpoint_every=4", *args),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while time.time() < deadline:
    found = checkpoint.list_checkpoints(out / "checkpoints")
    if found and checkpoint.step_of(found[-1]) >= step:
      return proc
    if proc.poll() is not None:
      pytest.fail(proc.stderr.read().decode())
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"no checkpoint {step} in {out} within 240 s")


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, capsys):
  """SIGTERM (exit 143, the last checkpoint named), then a resumed run killed with
  SIGKILL (its lock does not outlive it), then a resume to the end: the metrics equal an
  uninterrupted run's. A second writer is refused while one runs."""
  killed = tmp_path / "killed"
  proc = _run_until_checkpoint(killed, 8)
  try:
    # a second writer on the same directory is refused at once, naming the first
    code = main(["train", "maml_sinusoid_2x10", "--out", str(killed), "--resume", "--no-progress",
                 *sum((["--set", s] for s in TINY), [])])
    assert code == 2
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
  finally:
    proc.kill()
  assert proc.returncode == 143, (proc.returncode, err)
  last = checkpoint.latest(killed / "checkpoints")
  assert err.strip().splitlines()[-1] == f"mplp: terminated (SIGTERM); {last} is intact: continue with --resume"
  assert checkpoint.read(last) and not list(killed.rglob("*.tmp"))
  first = proc.pid
  proc = _run_until_checkpoint(killed, checkpoint.step_of(last) + 4, "--resume")
  proc.send_signal(signal.SIGKILL)  # the lock it held does not outlive it (the resume below)
  proc.wait()
  last = checkpoint.latest(killed / "checkpoints")
  k = int(last.stem.split("_")[1])
  total = k + 6
  assert max(m["step"] for m in _metrics(killed / "metrics.jsonl")) >= k
  err = capsys.readouterr().err
  assert f"{killed} is being written by another mplp train (pid {first})" in err, err
  res = subprocess.run(_cli(killed, "--steps", str(total), "--resume", "--set", "run.checkpoint_every=4"),
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  whole = tmp_path / "whole"
  res = subprocess.run(_cli(whole, "--steps", str(total), "--set", "run.checkpoint_every=4"),
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  a, b = _metrics(whole / "metrics.jsonl"), _metrics(killed / "metrics.jsonl")
  assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, total + 1))
  for ma, mb in zip(a, b):
    for key in ma:
      if key != "wall_s":
        np.testing.assert_allclose(mb[key], ma[key], rtol=1e-6, atol=1e-7, err_msg=f"{key} at {ma['step']}")
  assert len({m["meta_loss"] for m in a}) > 1  # the metrics do change from step to step


def _run_error(capsys, argv):
  code = main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.startswith("mplp: error: ") and "Traceback" not in err, err
  return err


def _snapshot(directory):
  return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(directory).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "out"
  cfg = config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=4", "run.checkpoint_every=2"])
  train(cfg, out, progress=False)
  return out, cfg


def test_cli_errors_leave_outputs_untouched(tmp_path, capsys, finished_run):
  out, _ = finished_run
  before = _snapshot(out)
  base = ["train", "maml_sinusoid_2x10", "--out", str(out), "--no-progress"]
  assert "meta.lr" in _run_error(capsys, base + ["--resume", "--set", "meta.lr=1"])
  assert "meta.outer_batch: expected an integer" in _run_error(capsys, base + ["--resume", "--set", "meta.outer_batch=x"])
  assert "already holds a run; pass --resume" in _run_error(capsys, base)
  assert "meta.outer_batch: 2 (saved) vs 3" in _run_error(capsys, base + ["--resume", "--set", "meta.outer_batch=3"])
  msg = _run_error(capsys, ["train", "digits_20x8", "--out", str(tmp_path / "m"), "--set", "task.name=mnist",
                            "--set", f"task.data_dir={tmp_path / 'tfds'}"])
  assert "mnist is not prepared in" in msg and "tfds build mnist" in msg
  bad = tmp_path / "bad.npz"
  np.savez(bad, x=np.ones((5, 2)), y=np.zeros(4, int))
  msg = _run_error(capsys, ["train", "digits_20x8", "--out", str(tmp_path / "n"), "--set", "task.name=npz",
                            "--set", f"task.path='{bad}'"])
  assert "y must have shape [N] = [5]" in msg
  assert _snapshot(out) == before
  assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_warm_start_from_a_run(tmp_path, capsys, finished_run):
  """meta.init_rule: the new run starts from the source run's newest rule and statistics
  (its learned initialization is its own); another architecture is refused before
  anything is written."""
  out, cfg = finished_run
  warm = config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=0", f"meta.init_rule='{out}'", "run.seed=5"])
  state = train(warm, tmp_path / "warm", progress=False, log=lambda *a: None)["state"]
  chex.assert_trees_all_equal(state.trainable["rule"], _restored(out, cfg).trainable["rule"])
  chex.assert_trees_all_equal(state.stats, _restored(out, cfg).stats)
  fresh = train(config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=0", "run.seed=5"]),
                tmp_path / "fresh", progress=False)["state"]
  chex.assert_trees_all_equal(state.trainable["init"], fresh.trainable["init"])
  msg = _run_error(capsys, ["train", "sinusoid_5x10", "--out", str(tmp_path / "other"),
                            "--set", f"meta.init_rule='{out}'"])
  assert "meta.init_rule: the rule in" in msg and "another architecture" in msg
  assert not (tmp_path / "other").exists()
  msg = _run_error(capsys, ["train", "sinusoid_5x10", "--out", str(tmp_path / "other"),
                            "--set", f"meta.init_rule='{tmp_path / 'no_such_run'}'"])
  assert "is neither a run directory nor a shipped rule; shipped: ['digits_20x8'" in msg
  assert not (tmp_path / "other").exists()


def _restored(out, cfg):
  from mplp.host import sources
  return checkpoint.restore(checkpoint.latest(out / "checkpoints"), sources._state_template(cfg))[0]


def test_corrupted_checkpoint_refused_on_resume(tmp_path, capsys, finished_run):
  import shutil
  out = tmp_path / "copy"
  shutil.copytree(finished_run[0], out)
  last = checkpoint.latest(out / "checkpoints")
  data = bytearray(last.read_bytes())
  last.write_bytes(bytes(data[: len(data) - 100]))  # truncated, as by a full disk
  before = _snapshot(out)
  msg = _run_error(capsys, ["train", "maml_sinusoid_2x10", "--out", str(out), "--resume", "--steps", "8",
                            "--no-progress", *sum((["--set", s] for s in TINY), [])])
  assert f"checkpoint {last} is corrupted or truncated" in msg
  assert _snapshot(out) == before


class NaNSinusoid(Sinusoid):
  """A user's task whose targets are NaN: every meta-step is non-finite."""
  def sample(self, key, steps, batch, eval_size):
    s = super().sample(key, steps, batch, eval_size)
    return s._replace(ys=s.ys * jnp.nan)


def test_non_finite_steps_are_skipped_and_stop_the_run(tmp_path, finished_run):
  import shutil
  out = tmp_path / "copy"
  shutil.copytree(finished_run[0], out)
  cfg = dataclasses.replace(finished_run[1], run=dataclasses.replace(finished_run[1].run, steps=50),
                            meta=dataclasses.replace(finished_run[1].meta, max_bad_steps=3))
  good = checkpoint.latest(out / "checkpoints")
  good_bytes = good.read_bytes()
  with pytest.raises(RunError, match=rf"stopped at meta-step 7: 3 consecutive meta-steps had a non-finite.*Last good checkpoint: {good}"):
    train(cfg, out, resume=True, task=NaNSinusoid(), progress=False)
  assert good.read_bytes() == good_bytes and checkpoint.latest(out / "checkpoints") == good
  logged = _metrics(out / "metrics.jsonl")
  assert [m["skipped"] for m in logged[-3:]] == [1, 2, 3] and [m["finite"] for m in logged[-3:]] == [0, 0, 0]
  assert all(m["meta_loss"] is None for m in logged[-3:])


def _wandb_records(path, kind: str):
  """The records of one type ("history", "artifact", "metric", "summary") of a wandb run
  file (a leveldb-style log of protobuf records; wandb 0.31 has no Python reader)."""
  import struct
  from wandb.proto import wandb_internal_pb2 as pb
  data, pos, buf, out = Path(path).read_bytes(), 7, b"", []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # block trailer
      pos += 32768 - pos % 32768
      continue
    _, n, chunk = struct.unpack("<IHB", data[pos:pos + 7])
    buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
    if chunk in (1, 4):  # full or last chunk of a record
      record = pb.Record()
      record.ParseFromString(buf)
      buf = b""
      if record.WhichOneof("record_type") == kind:
        out.append(getattr(record, kind))
  return out


def _wandb_history(path):
  """The history rows of a wandb run file."""
  return [{(i.key or i.nested_key[0]): json.loads(i.value_json) for i in h.item}
          for h in _wandb_records(path, "history")]


def _wandb_run(out):
  """The one offline run under DIR/wandb: (its directory, its .wandb file)."""
  runs = list((Path(out) / "wandb").glob("offline-run-*"))
  assert len(runs) == 1, runs
  return runs[0], next(runs[0].glob("run-*.wandb"))


def test_wandb_offline_run_and_online_fallback(tmp_path, monkeypatch, capsys):
  """The offline run holds the metrics, the summary definitions, the final eval as a
  table, and the rule as a model artifact at each checkpoint (`rule.npz` in its manifest,
  whose staged file holds the checkpoint's rule and evaluates with `mplp eval`); a
  `wandb:` reference is refused at once offline; --wandb disabled writes nothing of W&B."""
  from mplp.host import sources, tracking
  monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging
  cfg = config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=3", "run.eval_tasks=2", "run.tune_tasks=2",
                                                      "run.checkpoint_every=2", "run.wandb_checkpoints=true"])
  result = train(cfg, tmp_path / "off", wandb_mode="offline", progress=False)
  run_dir, run_file = _wandb_run(tmp_path / "off")
  history = _wandb_history(run_file)
  logged = _metrics(tmp_path / "off" / "metrics.jsonl")
  assert [h["_step"] for h in history] == [m["step"] for m in logged] == [1, 2, 3]
  for h, m in zip(history, logged):
    np.testing.assert_allclose(h["meta_loss"], m["meta_loss"], rtol=1e-6)
    np.testing.assert_allclose(h["heldout"], m["heldout"], rtol=1e-6)
  assert "final_eval" in history[-1]  # the table, logged at the last step
  table = json.loads(next((run_dir / "files" / "media" / "table").glob("final_eval_*.table.json")).read_text())
  assert table["columns"] == ["method", "metric", "step", "mean", "sd", "ci95"]
  mean = {(r[0], r[1], r[2]): r[3] for r in table["data"]}
  np.testing.assert_allclose(mean["mplp", "loss", 2], result["final_eval"]["methods"]["mplp"]["loss"]["mean"][2])
  summaries = {m.name: m.summary for m in _wandb_records(run_file, "metric") if m.name}
  assert summaries["heldout"].min and summaries["heldout"].last and summaries["heldout_accuracy"].max
  run_id = (tmp_path / "off" / "wandb_run_id").read_text().strip()
  arts = [a for a in _wandb_records(run_file, "artifact") if a.type == "model"]  # tables are artifacts too
  assert [(a.name, a.type) for a in arts] == [(f"rule-{run_id}", "model")] * 2
  assert set(arts[0].aliases) == {"latest", "step-2", "best"}  # the first version is the best so far
  assert {"latest", "step-3"} <= set(arts[1].aliases) and json.loads(arts[1].metadata)["trained_steps"] == 3
  assert json.loads(arts[1].metadata)["config"] == cfg.to_dict()
  (entry,) = arts[1].manifest.contents
  assert entry.path == "rule.npz"
  staged = sources.from_pretrained(entry.local_path)[2]
  last = sources.from_run(tmp_path / "off")[2]  # the run's last checkpoint
  assert checkpoint.step_of(checkpoint.latest(tmp_path / "off" / "checkpoints")) == 3
  chex.assert_trees_all_equal((staged.trainable, staged.stats), (last.trainable, last.stats))
  assert main(["eval", entry.local_path, "--tasks", "2", "--tune-tasks", "1", "--optimizers", "sgd",
               "--no-progress", "--out", str(tmp_path / "from-artifact")]) == 0
  assert json.loads((tmp_path / "from-artifact" / "eval.json").read_text())["config"] == cfg.to_dict()
  monkeypatch.setenv("WANDB_MODE", "offline")
  t = time.perf_counter()
  assert main(["eval", f"wandb:me/mplp/rule-{run_id}:best"]) == 2
  err = capsys.readouterr().err
  assert "WANDB_MODE is 'offline', so W&B artifacts cannot be read; download it where W&B is reachable " in err
  assert f"(`wandb artifact get me/mplp/rule-{run_id}:best`)" in err and time.perf_counter() - t < 10
  monkeypatch.delenv("WANDB_MODE")
  with pytest.raises(config_lib.ConfigError, match="a W&B rule is wandb:ENTITY/PROJECT/NAME"):
    tracking.download_rule("wandb:rule-x")
  train(cfg, tmp_path / "plain", progress=False)  # --wandb disabled
  assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
      ".lock", "checkpoints", "config.json", "final_eval.json", "metrics.jsonl"]
  # online without an API key: offline within seconds, with a warning
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("NETRC", str(tmp_path / "none"))
  t = time.perf_counter()
  with pytest.warns(UserWarning, match="no W&B API key.*logging offline instead"):
    train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval_tasks=0)), tmp_path / "on",
          wandb_mode="online", progress=False)
  assert list((tmp_path / "on" / "wandb").glob("offline-run-*"))
  assert time.perf_counter() - t < 90


def _resume_argv(out, steps, *extra):
  return ["train", "maml_sinusoid_2x10", "--out", str(out), "--resume", "--steps", str(steps), "--no-progress",
          *sum((["--set", s] for s in TINY + ["run.checkpoint_every=2", *extra]), [])]


def test_resume_refuses_a_damaged_metrics_line_and_a_step_count_already_reached(tmp_path, capsys, finished_run):
  """A damaged metrics line before the last is refused with its number (valid lines after
  it were silently deleted before); --steps at or below the checkpoint's step says so;
  neither changes a byte of the run."""
  import shutil
  out = tmp_path / "copy"
  shutil.copytree(finished_run[0], out)
  lines = (out / "metrics.jsonl").read_text().splitlines()
  lines[1] = lines[1][:20] + "#garbled"
  (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  before = _snapshot(out)
  msg = _run_error(capsys, _resume_argv(out, 8))
  assert f"metrics.jsonl: line 2 of {len(lines)} is not a metrics record" in msg
  assert _snapshot(out) == before
  for steps in (4, 2):
    msg = _run_error(capsys, _resume_argv(out, steps))  # checked before the metrics
    assert f"is already at meta-step 4 (ckpt_00000004.npz); --steps {steps} asks for no more" in msg


def test_resume_removes_partial_checkpoints_and_logs_as_an_uninterrupted_run(tmp_path):
  """A `.tmp` left by a write cut by a kill is removed; the resumed run logs the steps an
  uninterrupted run logs (no extra line for its first step), after the first run's own."""
  cfg = lambda steps: config_lib.load("maml_sinusoid_2x10", TINY + [f"run.steps={steps}", "run.log_every=3",
                                                                     "run.checkpoint_every=2"])
  train(cfg(4), tmp_path / "cut", progress=False)
  stale = tmp_path / "cut" / "checkpoints" / "ckpt_00000006.npz.tmp"
  stale.write_bytes(b"half a checkpoint")
  train(cfg(8), tmp_path / "cut", resume=True, progress=False, log=lambda *a: None)
  assert not stale.exists() and checkpoint.latest(tmp_path / "cut" / "checkpoints").name == "ckpt_00000008.npz"
  train(cfg(8), tmp_path / "whole", progress=False)
  whole = [m["step"] for m in _metrics(tmp_path / "whole" / "metrics.jsonl")]
  assert whole == [1, 3, 6, 8]
  assert [m["step"] for m in _metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 3, 4, 6, 8]  # 4: the first run's end


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
  def full_disk(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(np, "savez", full_disk)
  with pytest.raises(OSError, match="No space left"):
    checkpoint.save(tmp_path, 3, {"a": np.ones(3)}, {})
  assert list(tmp_path.iterdir()) == []


def _small_filesystem(path) -> bool:
  """Mount a 4 MB tmpfs at `path` (an empty directory); False where this machine does not
  allow it (not root, no mount, a container without the capability)."""
  import shutil
  path.mkdir()
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def _fill(disk, leave: int):
  """Fill the filesystem of `disk` up to `leave` bytes free (4 KB pages)."""
  import shutil
  with open(disk / "filler", "wb") as f:
    f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))


def test_a_full_disk_ends_in_one_line_and_resume_continues_exactly(tmp_path, capsys, monkeypatch, finished_run):
  """Out of space while rewriting the metrics on --resume and while writing a checkpoint
  (a real 4 MB tmpfs where the machine lets the test mount one, else an injected ENOSPC
  in the checkpoint writer): one line naming the file, the space and the intact
  checkpoint; no temporary file left; the checkpoint byte-identical; and after freeing
  space, --resume ends with the metrics of an uninterrupted run (`finished_run`)."""
  disk = tmp_path / "disk"
  how = "tmpfs" if _small_filesystem(disk) else "injected"
  out = disk / "run"
  try:
    train(config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=2", "run.checkpoint_every=2"]), out,
          progress=False)
    good = out / "checkpoints" / "ckpt_00000002.npz"
    kept = good.read_bytes()
    if how == "tmpfs":
      _fill(disk, 0)
      msg = _run_error(capsys, _resume_argv(out, 4))
      assert f"could not write the metrics {out / 'metrics.jsonl'} (No space left on device" in msg, msg
      _fill(disk, 64 * 1024)  # room for metrics lines, not for a checkpoint
    else:
      def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
      monkeypatch.setattr(checkpoint.np, "savez", full_disk)
    msg = _run_error(capsys, _resume_argv(out, 4))
    assert (f"could not write the checkpoint {out / 'checkpoints' / 'ckpt_00000004.npz'} (No space left "
            "on device; it needs about ") in msg, msg
    assert f"the last good checkpoint, {good}, is intact: free space, then rerun with --resume" in msg
    assert good.read_bytes() == kept and checkpoint.read(good)
    assert not list(out.rglob("*.tmp")) and checkpoint.latest(out / "checkpoints") == good
    monkeypatch.undo()
    (disk / "filler").unlink(missing_ok=True)
    assert main(_resume_argv(out, 4)) == 0
    a, b = _metrics(finished_run[0] / "metrics.jsonl"), _metrics(out / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
      for key in ma:
        if key != "wall_s":
          np.testing.assert_allclose(mb[key], ma[key], rtol=1e-6, atol=1e-7, err_msg=f"{key} at {ma['step']}")
  finally:
    if how == "tmpfs":
      subprocess.run(["umount", str(disk)], capture_output=True)


def test_damaged_files_and_unwritable_outputs_get_one_line_errors(tmp_path, capsys, finished_run):
  """A truncated config.json (resume, eval), a malformed eval.json (transfer) and an --out
  that cannot be written are refused before any work, with one line naming the file."""
  import shutil
  out = tmp_path / "copy"
  shutil.copytree(finished_run[0], out)
  text = (out / "config.json").read_text()
  (out / "config.json").write_text(text[: len(text) // 2])
  before = _snapshot(out)
  assert "config.json is damaged (JSONDecodeError" in _run_error(capsys, _resume_argv(out, 8))
  assert "config.json is damaged (JSONDecodeError" in _run_error(capsys, ["eval", str(out)])
  assert _snapshot(out) == before
  (tmp_path / "ev").mkdir()
  (tmp_path / "ev" / "eval.json").write_text('{"metric": "loss", "methods": ')
  assert "eval.json: not an `mplp eval` result (JSONDecodeError" in _run_error(capsys, ["transfer", str(tmp_path / "ev")])
  (tmp_path / "ev" / "eval.json").write_text('{"metric": "loss", "methods": {}}')
  assert "eval.json: not an `mplp eval` result (KeyError" in _run_error(capsys, ["transfer", str(tmp_path / "ev")])
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  msg = _run_error(capsys, ["train", "maml_sinusoid_2x10", "--out", str(a_file / "run"), "--steps", "2"])
  assert f"--out: cannot write to {a_file / 'run'}" in msg
  latin = tmp_path / "latin.toml"
  latin.write_bytes(b"# caf\xe9\n[network]\npreset = 'sinusoid_5x10'\n")
  assert "latin.toml: not a UTF-8 text file (byte 5" in _run_error(capsys, ["train", str(latin)])
  assert "run.seed: 99999999999999999999 is out of range; must be <= 2147483647" in _run_error(
      capsys, ["train", "maml_sinusoid_2x10", "--seed", "99999999999999999999", "--out", str(tmp_path / "s")])
  assert "--seed: 99999999999999999999 is out of range; allowed: 0 to 2147483647" in _run_error(
      capsys, ["eval", str(finished_run[0]), "--seed", "99999999999999999999"])
  assert not (tmp_path / "s").exists()
  for target, why in ((a_file, "is a file, not a directory"), (a_file / "sub", "cannot write to")):
    msg = _run_error(capsys, ["eval", str(finished_run[0]), "--tasks", "2", "--tune-tasks", "1", "--out", str(target)])
    assert f"--out: {target} {why}" in msg if why.startswith("is") else f"--out: cannot write to {target}" in msg
  assert a_file.read_text() == "keep me"


def test_memory_estimate_is_a_lower_bound_of_xla_and_refuses_what_cannot_fit(tmp_path, capsys):
  """`mplp.host.memory`'s estimate for the digits meta-step is below what XLA's compiled
  program holds (arguments, temporaries, outputs) but of its size (unroll-dominated:
  within 2x); sizes a million times too large are refused before anything compiles or is
  written, naming the key; --force gets past the check."""
  from mplp.host import memory
  cfg = config_lib.load("digits_20x8", ["meta.pool_size=2"])
  task = config_lib.build_task(cfg)
  net = config_lib.build_network(cfg, task)
  trainer = config_lib.build_trainer(cfg, net)
  total, parts = memory.check(cfg, net)
  state = jax.eval_shape(lambda k: trainer.init(k, task), jax.random.PRNGKey(0))
  xla = jax.jit(trainer.step).lower(state, task).compile().memory_analysis()
  held = xla.argument_size_in_bytes + xla.temp_size_in_bytes + xla.output_size_in_bytes
  assert held / 2 < total < held, (total, held, parts)
  state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(net.init(jax.random.PRNGKey(0), 8)))
  assert memory.inner_state_bytes(net, 8)[0] == state_bytes
  for key, value in (("task.eval_size", 10 ** 9), ("network.hidden", "[1000000]"), ("task.batch_size", 10 ** 6)):
    t = time.perf_counter()
    out = tmp_path / key
    msg = _run_error(capsys, ["train", "digits_20x8", "--out", str(out), "--set", f"{key}={value}"])
    assert "this configuration needs at least " in msg and "more than the " in msg, msg
    assert f"{key} {value if key != 'network.hidden' else [10 ** 6]}" in msg and "pass --force" in msg, msg
    assert time.perf_counter() - t < 15 and not out.exists()
  big = config_lib.load("digits_20x8", ["task.eval_size=1000000000"])
  with pytest.raises(memory.TooLarge, match="task.eval_size 1000000000 held-out examples"):
    memory.check(big, net)
  assert memory.check(big, net, force=True)[0] > 10 ** 12
  assert memory.check(cfg, net, available=total - 1, force=True)[0] == total
  with pytest.raises(memory.TooLarge, match=r"the largest part is .* for meta.outer_batch 1 x 20 saved inner steps"):
    memory.check(cfg, net, available=total - 1)


def test_wandb_online_against_a_server_that_is_not_wandb_falls_back_offline(tmp_path, monkeypatch):
  """A reachable TCP listener that is not W&B (it answers 404): mplp train used to stop
  with "run ID ... is in use" when retrying offline; it now logs offline with the same id."""
  import socket
  import threading
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.settimeout(60)

  def answer():
    try:
      while True:
        conn, _ = server.accept()
        with conn:
          conn.recv(65536)
          conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except OSError:  # closed at the end of the test, or idle for a minute
      pass

  threading.Thread(target=answer, daemon=True).start()
  monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
  monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
  import wandb
  wandb.teardown()  # a W&B service left by an earlier test would keep its own server address
  cfg = config_lib.load("maml_sinusoid_2x10", TINY + ["run.steps=2"])
  try:
    with pytest.warns(UserWarning, match="(?s)--wandb online failed.*logging offline instead"):
      train(cfg, tmp_path / "run", wandb_mode="online", progress=False)
  finally:
    server.close()
  run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
  assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
  assert [m["step"] for m in _metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child execs at once (preexec_fn)
def test_sigint_during_compilation_exits_130_with_what_is_left(tmp_path):
  """Ctrl-C while XLA compiles the meta-step (it crashed with exit 139 in the interpreter's
  shutdown): exit 130 and a message that says there is no checkpoint to resume from yet."""
  out = tmp_path / "run"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cold-cache")}  # really compile
  proc = subprocess.Popen(_cli(out, "--steps", "100000"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.time() + 240
    while not (out / "config.json").exists():  # written after init, before the meta-step compiles
      assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
      time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=240)[1].decode()
  finally:
    proc.kill()
  assert proc.returncode == 130, (proc.returncode, err)
  assert err.strip().splitlines()[-1] == f"mplp: interrupted; {out} has no checkpoint yet (--resume starts it over)"
  assert not checkpoint.list_checkpoints(out / "checkpoints")
