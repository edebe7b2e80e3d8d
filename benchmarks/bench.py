"""Speed and memory of mplp's inner step, meta-gradient and full meta-step.

    python benchmarks/bench.py [--only NAME ...] [--repeats N] --out results.json

Each benchmark runs in its own subprocess (so `peak_rss_mb` is its own peak), compiles
once, then times `--repeats` calls and reports the median. Next to it, the same process
times a 2048^3 float32 matmul, so achieved GFLOP/s can be read against this machine's
dense-matmul rate measured at the same time. Output: `{NAME: {"median_s": ..., ...}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The authors' TensorFlow implementation on this kind of machine's EPYC CPUs (shared/reference);
# `--authors FILE` replaces them with a side-by-side run of ../shared/anchor-tf/bench_tf.py.
AUTHORS_S = {"sinusoid_inner_step": 5.9e-3, "mnist_inner_step": 28e-3,
             "sinusoid_meta_step": 0.30, "mnist_meta_step": 0.85}
AUTHORS_PEAK_MB = {"sinusoid_meta_step": 1.95e3, "mnist_meta_step": 2.74e3}
SHAPES = {
    # name: (preset, batch, unroll T)
    "sinusoid": ("sinusoid_5x10", 10, 5),
    "mnist": ("mnist_20x8", 8, 20),
}


def _agents_per_step(net, batch):
  from mplp.layers import Dense
  n = 0
  for layer, width in zip(net.layers, net.widths):
    n += batch * (width * layer.units + layer.units) if isinstance(layer, Dense) else batch * width
  return n


def _time(fn, args, repeats):
  import jax
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def _matmul_gflops(repeats=5):
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  median, _ = _time(f, (a,), repeats)
  return 2 * n ** 3 / median / 1e9


def _flops(net, meta, what, args):
  """XLA's flop count of the same computation with no loops (XLA counts a loop body
  once): agents in one call, the unroll as a Python loop."""
  import jax
  from mplp import agents, compiling
  # The cell's own backward passes (fused kernel, or XLA's) recompute its forward, and
  # XLA cannot count a kernel's flops: count the autodiff XLA cell instead, which keeps
  # the forward's intermediates (the work, without recomputation).
  saved, agents.CHUNK_AGENTS = agents.CHUNK_AGENTS, 1 << 62
  saved_cell, agents._gru = agents._gru, agents._gru_xla.fun
  try:
    if what == "inner_step":
      fn = lambda *a: net.inner_step(*a)  # a fresh function: no reuse of the chunked trace
    else:
      def fn(params, state, xs, ys):
        m = meta._replace(params=params)
        def loss(p):
          s = state
          for t in range(xs.shape[0]):
            s, _ = net.inner_step(m._replace(params=p), s, xs[t], ys[t])
          return net.loss(s, xs[-1], ys[-1])
        return jax.grad(loss)(params)
    cost = compiling.jit(fn).lower(*args).compile().cost_analysis()
  finally:
    agents.CHUNK_AGENTS, agents._gru = saved, saved_cell
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _time_meta_steps(step, state, repeats):
  """Compile time (first call) and per-call times of a jitted meta-step, the state
  threaded through (each call is a real next step)."""
  import jax
  t = time.perf_counter()
  state, _ = jax.block_until_ready(step(state))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, _ = jax.block_until_ready(step(state))
    times.append(time.perf_counter() - t)
  return compile_s, times


def run_meta_step(name: str, repeats: int) -> dict:
  """A full meta-step (`MetaTrainer.step`, jitted) as `mplp train` runs it: sinusoid_5x10
  with its config (4 tasks x 5 steps), or the mnist_20x8 shape (144-50-10, 1 task x 20
  steps of 8) on synthetic 144-feature data (no download)."""
  import jax
  from mplp.host import config as config_lib
  from mplp.tasks import jit_with_task
  if name == "sinusoid_meta_step":
    cfg = config_lib.load("sinusoid_5x10")
    task = config_lib.build_task(cfg)
  else:
    cfg = config_lib.load("mnist_20x8")
    task = _synthetic_images(144)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  t = time.perf_counter()
  state = jax.block_until_ready(jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0)))
  init_s = time.perf_counter() - t  # compile and run, as `mplp train` pays it before step 1
  compile_s, times = _time_meta_steps(jit_with_task(trainer.step, task), state, repeats)
  median = statistics.median(times)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  # XLA's count of one task's T-step meta-gradient (loops unrolled), times the outer batch
  # (the optimizer's and the held-out loss' flops are negligible next to it)
  net = trainer.episode.network
  meta = net.init_meta(jax.random.PRNGKey(0))
  sample = task.sample(jax.random.PRNGKey(1), cfg.task.inner_steps, cfg.task.batch_size, 1)
  flops = cfg.meta.outer_batch * _flops(net, meta, "unroll_grad",
                                        (meta.params, net.init(jax.random.PRNGKey(2), cfg.task.batch_size),
                                         sample.xs, sample.ys))
  matmul = _matmul_gflops()
  return {"median_s": median, "min_s": min(times), "repeats": repeats, "compile_s": compile_s,
          "init_s": init_s, "peak_rss_mb": peak_mb, "authors_s": AUTHORS_S[name], "authors_peak_mb": AUTHORS_PEAK_MB[name],
          "speedup_vs_authors": AUTHORS_S[name] / median, "matmul_2048_gflops": matmul,
          "xla_flops": flops, "achieved_gflops": flops / median / 1e9,
          "fraction_of_matmul": flops / median / 1e9 / matmul,
          "shape": {"outer_batch": cfg.meta.outer_batch, "inner_steps": cfg.task.inner_steps,
                    "batch": cfg.task.batch_size, "remat": cfg.meta.remat},
          "device": str(jax.devices()[0])}


def _synthetic_images(features: int):
  import jax
  from mplp.tasks import Classification
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return Classification(jax.random.normal(k1, (2000, features)), jax.random.randint(k2, (2000,), 0, 10),
                        jax.random.normal(k2, (500, features)), jax.random.randint(k1, (500,), 0, 10))


def run_meta_grad(name: str, repeats: int) -> dict:
  """One task's meta-gradient through T inner steps (B = 8) of 144-50-10
  (`mnist_meta_grad_T{T}`) or 784-100-10 (`mnist784_meta_grad_T{T}`), with per-step
  rematerialization unless the name ends in `_noremat`. Memory is the process's peak RSS."""
  import jax
  from mplp.host import config as config_lib
  from mplp.tasks import jit_with_task
  shape, rest = name.split("_meta_grad_T")
  steps = int(rest.split("_")[0])
  remat = not name.endswith("_noremat")
  features, hidden = (144, 50) if shape == "mnist" else (784, 100)
  cfg = config_lib.load("mnist_20x8", [f"task.inner_steps={steps}", "meta.outer_batch=1",
                                       f"meta.remat={'true' if remat else 'false'}", f"network.hidden=[{hidden}]"])
  task = _synthetic_images(features)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  state = jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0))

  def grad(state, task):
    key = jax.random.fold_in(state.rng, state.step)
    return jax.grad(lambda p: trainer.outer_loss(p, state.stats, state.pool, key, task)[0])(state.trainable)

  fn = jit_with_task(grad, task)
  t = time.perf_counter()
  jax.block_until_ready(fn(state))
  compile_s = time.perf_counter() - t
  median, times = _time(fn, (state,), repeats)
  return {"median_s": median, "min_s": min(times), "repeats": repeats, "compile_s": compile_s,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "shape": {"net": f"{features}-{hidden}-10", "batch": 8, "steps": steps, "remat": remat,
                    "weight_agents_per_step": 8 * (features * hidden + hidden * 10)},
          "device": str(jax.devices()[0])}


def run_devices(name: str, repeats: int) -> dict:
  """`sinusoid_meta_step` (4 tasks) with the outer batch split over N forced CPU devices
  (`devices_N`; the parent sets XLA_FLAGS for the child)."""
  import jax
  from mplp import distributed
  from mplp.host import config as config_lib
  from mplp.tasks import jit_with_task
  n = int(name.split("_")[1])
  cfg = config_lib.load("sinusoid_5x10", [f"run.devices={n}"])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  state = distributed.replicate(jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0)), trainer.mesh)
  compile_s, times = _time_meta_steps(jit_with_task(trainer.step, task), state, repeats)
  median = statistics.median(times)
  return {"median_s": median, "meta_steps_per_s": 1 / median, "devices": n,
          "device_count": jax.device_count(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "compile_s": compile_s}


def run_train(name: str, repeats: int) -> dict:
  """`mplp train sinusoid_5x10` end to end, as a user runs it (its own process, no W&B, no
  final eval): `meta_steps_per_s` is the progress bar's rate (steps 2..N from the
  metrics' wall clock, after the compile), `first_step_s` the wait before step 1 with an
  empty compilation cache, `first_step_cached_s` the same wait for the next run of the
  same config (the CLI's cache, $XDG_CACHE_HOME/mplp/xla, holds its programs)."""
  import json as _json
  import tempfile
  from pathlib import Path
  steps = max(repeats, 20)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE") and k != "MPLP_NO_CACHE"}
  with tempfile.TemporaryDirectory() as d:
    env["XDG_CACHE_HOME"] = d + "/cache"  # empty: the first run compiles everything
    walls = []
    for run, n in (("run", steps), ("again", 2)):
      cmd = [sys.executable, "-m", "mplp.host.cli", "train", "sinusoid_5x10", "--steps", str(n), "--out", f"{d}/{run}",
             "--wandb", "disabled", "--no-progress", "--set", "run.eval_tasks=0", "--set", "run.log_every=1"]
      t = time.perf_counter()
      subprocess.run(cmd, check=True, capture_output=True, env=env)
      walls.append(time.perf_counter() - t)
      lines = Path(d, run, "metrics.jsonl").read_text().splitlines()
      if run == "run":
        wall = {m["step"]: m["wall_s"] for m in map(_json.loads, lines)}
      else:
        cached = _json.loads(lines[0])["wall_s"]
  return {"median_s": (wall[steps] - wall[1]) / (steps - 1), "meta_steps_per_s": (steps - 1) / (wall[steps] - wall[1]),
          "first_step_s": wall[1], "first_step_cached_s": cached, "command_s": walls[0], "steps": steps,
          "compile_s": wall[1], "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_one(name: str, repeats: int) -> dict:
  if name == "train_sinusoid_5x10":
    return run_train(name, repeats)
  if name.endswith("_meta_step"):
    return run_meta_step(name, repeats)
  if "_meta_grad_T" in name:
    return run_meta_grad(name, repeats)
  if name.startswith("devices_"):
    return run_devices(name, repeats)
  import jax
  from mplp import compiling, presets

  shape, what = name.rsplit("_", 2)[0], name.split("_", 1)[1]
  preset, batch, steps = SHAPES[shape]
  net = presets.network(preset)
  meta = net.init_meta(jax.random.PRNGKey(0))
  state = net.init(jax.random.PRNGKey(1), batch)
  key = jax.random.PRNGKey(2)
  xs = jax.random.normal(key, (steps, batch, net.input_size))
  ys = jax.nn.softmax(jax.random.normal(key, (steps, batch, net.output_size)))
  agents = _agents_per_step(net, batch)
  if what == "inner_step":
    fn, args, updates = net.inner_step, (meta, state, xs[0], ys[0]), agents
  elif what == "unroll_grad":
    def meta_loss(params, state, xs, ys):
      final, _ = net.unroll(meta._replace(params=params), state, xs, ys)
      return net.loss(final, xs[-1], ys[-1])
    fn, args, updates = jax.grad(meta_loss), (meta.params, state, xs, ys), agents * steps
  else:
    raise SystemExit(f"unknown benchmark {name!r}")
  t = time.perf_counter()
  compiled = compiling.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  compile_s = time.perf_counter() - t
  median, times = _time(compiled, args, repeats)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the flop count
  flops = _flops(net, meta, what, args)
  matmul = _matmul_gflops()
  out = {
      "median_s": median,
      "min_s": min(times),
      "repeats": repeats,
      "compile_s": compile_s,
      "peak_rss_mb": peak_mb,
      "agent_updates_per_s": updates / median,
      "xla_flops": flops,
      "achieved_gflops": flops / median / 1e9,
      "matmul_2048_gflops": matmul,
      "fraction_of_matmul": flops / median / 1e9 / matmul,
      "shape": {"preset": preset, "batch": batch, "steps": steps, "agents_per_step": agents},
      "device": str(jax.devices()[0]),
  }
  if name in AUTHORS_S:
    out["authors_s"] = AUTHORS_S[name]
    out["speedup_vs_authors"] = AUTHORS_S[name] / median
  return out


NAMES = ("sinusoid_inner_step", "mnist_inner_step", "sinusoid_unroll_grad", "mnist_unroll_grad",
         "sinusoid_meta_step", "mnist_meta_step",
         *(f"mnist_meta_grad_T{t}{s}" for t in (5, 20, 80) for s in ("", "_noremat")),
         "mnist784_meta_grad_T20", "mnist784_meta_grad_T20_noremat",
         "devices_1", "devices_2", "devices_4", "train_sinusoid_5x10")
MEMORY_LIMIT_GB = 18  # a child that needs more fails (reported), instead of swapping the machine


def _read_authors(path: str) -> dict:
  """{name: {"median_s", "peak_rss_mb", ...}} from bench_tf.py's output; a clear error otherwise."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise SystemExit(f"--authors: cannot read {path!r} as bench_tf.py's JSON ({e})")
  bad = [k for k, v in data.items() if not isinstance(v, dict) or "median_s" not in v]
  if not isinstance(data, dict) or bad:
    raise SystemExit(f"--authors: {path!r} is not bench_tf.py's output (entries without median_s: {bad})")
  return data


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="+", choices=NAMES, help="run only these benchmarks")
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--out", default="results.json", help="JSON file to write")
  p.add_argument("--authors", help="bench_tf.py's JSON from this machine (../shared/anchor-tf): compare "
                                   "with its medians instead of the stored EPYC figures")
  p.add_argument("--child", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  authors = _read_authors(a.authors) if a.authors else None
  if a.child:
    limit = MEMORY_LIMIT_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(run_one(a.child, a.repeats)))
    return
  results = {}
  for name in a.only or NAMES:
    env = dict(os.environ)
    if name.startswith("devices_"):
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--repeats", str(a.repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
      tail = proc.stderr.strip().splitlines()[-3:]
      results[name] = {"failed": True, "returncode": proc.returncode, "error": " | ".join(tail)[-500:]}
      print(f"{name:24s} FAILED (exit {proc.returncode}): {results[name]['error'][-200:]}", flush=True)
      continue
    results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    r = results[name]
    if authors is not None and name in authors:
      theirs = authors[name]
      r.update(authors_s=theirs["median_s"], authors_peak_mb=theirs.get("peak_rss_mb"),
               speedup_vs_authors=theirs["median_s"] / r["median_s"], authors_source=a.authors)
    rate = f"{r['agent_updates_per_s']:.3g} agent-updates/s  " if "agent_updates_per_s" in r else ""
    rate += f"{r['achieved_gflops']:6.1f} GFLOP/s " if "achieved_gflops" in r else ""
    rate += f"(matmul {r['matmul_2048_gflops']:.0f})" if "matmul_2048_gflops" in r else ""
    rate += f" {100 * r['fraction_of_matmul']:.0f}% of matmul" if "fraction_of_matmul" in r else ""
    rate += f" {r['meta_steps_per_s']:.2f} meta-steps/s" if "meta_steps_per_s" in r else ""
    print(f"{name:24s} median {r['median_s'] * 1e3:8.2f} ms  compile {r['compile_s']:5.2f} s  "
          f"peak {r['peak_rss_mb']:7.0f} MB  {rate}"
          + (f"  x{r['speedup_vs_authors']:.2f} vs authors" if "speedup_vs_authors" in r else ""),
          flush=True)
  with open(a.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
