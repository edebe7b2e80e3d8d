"""Reports of `mplp eval` and `mplp analyze`: JSON, a markdown table, PNG plots
(matplotlib, Agg).

    DIR/eval.json     {"metric", "methods": {method: {"mean", "sd", "ci95"} per step},
                       "all_metrics", "learning_rates", "grids", "tasks", "config"}
    DIR/eval.md       the table (mean +- 95% CI per inner step)
    DIR/curves.png    the metric vs inner step, a band of +-95% CI per method
    DIR/fits.png      sinusoid only: targets, observed points, the rule's fit after each step

    transfer table: one row per `mplp eval` directory (network, task, the rule and the best
                    tuned baseline at the last step), from their eval.json files

    DIR/analysis.json  {"layers": {layer: {metric: {"mean", "sd"} per inner step}}, "tasks", "config"}
    DIR/analysis.md    mean over steps and tasks per layer and metric
    DIR/alignment.png  update_cos (Dense layers) and message_r (all layers) vs inner step
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mplp.host.files import write_atomic


def primary_metric(problem: str) -> str:
  return "accuracy" if problem == "classification" else "loss"


def table(result: dict, metric: str) -> str:
  methods = result["all_metrics"]
  steps = len(next(iter(methods.values()))[metric]["mean"])
  head = "| step | " + " | ".join(methods) + " |"
  lines = [f"Held-out {metric} on {result['tasks']} fresh tasks, mean +- 95% CI (step 0: before learning).", "",
           head, "|" + "---|" * (len(methods) + 1)]
  for t in range(steps):
    cells = [f"{methods[m][metric]['mean'][t]:.4f} +- {methods[m][metric]['ci95'][t]:.4f}" for m in methods]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  grids = "; ".join(f"{k}: {v} (chosen {result['learning_rates'][k]})" for k, v in result["grids"].items())
  lines += ["", f"Learning rates tuned on {result['tune_tasks']} separate tasks over {grids}."]
  return "\n".join(lines) + "\n"


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_curves(result: dict, metric: str, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in result["all_metrics"].items():
    mean, ci = np.array(r[metric]["mean"]), np.array(r[metric]["ci95"])
    steps = np.arange(len(mean))
    ax.plot(steps, mean, marker="o", label=name)
    ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2)
  ax.set_xlabel("inner step")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_ylabel(f"held-out {metric}")
  if metric == "loss":
    ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_fits(fits, path):
  """fits: list of (TaskSample, predictions [T + 1, E, 1]) for sinusoid tasks."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(fits), figsize=(4 * len(fits), 3.2), squeeze=False)
  for ax, (sample, preds) in zip(axes[0], fits):
    x = np.asarray(sample.x_eval[:, 0])
    order = np.argsort(x)
    ax.plot(x[order], np.asarray(sample.y_eval[order, 0]), "k-", lw=2, label="target")
    steps = len(preds)
    for t in range(steps):
      ax.plot(x[order], np.asarray(preds[t][order, 0]), color=_plt().cm.viridis(t / max(steps - 1, 1)),
              lw=1, label=f"after {t}" if t in (0, steps - 1) else None)
    ax.scatter(np.asarray(sample.xs).ravel(), np.asarray(sample.ys).ravel(), s=10, c="red", label="observed")
    ax.set_xlabel("x")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(result: dict, out_dir, problem: str, config: dict, fits=None) -> Path:
  """Write eval.json, eval.md and the plots; returns the directory."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  metric = primary_metric(problem)
  doc = {"metric": metric,
         "methods": {m: r[metric] for m, r in result["methods"].items()},
         "all_metrics": result["methods"], "learning_rates": result["learning_rates"],
         "grids": result["grids"], "tasks": result["tasks"], "tune_tasks": result["tune_tasks"],
         "config": config}
  _write_json(out / "eval.json", doc)
  (out / "eval.md").write_text(table(doc, metric))
  plot_curves(doc, metric, out / "curves.png")
  if fits:
    plot_fits(fits, out / "fits.png")
  return out


def finite_json(doc) -> str:
  """`doc` as strict JSON: non-finite floats (a diverged method's NaN) become null, which
  every JSON reader accepts (bare NaN is not JSON)."""
  def clean(v):
    if isinstance(v, float):
      return v if math.isfinite(v) else None
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [clean(x) for x in v]
    return v
  return json.dumps(clean(doc), indent=1, allow_nan=False) + "\n"


def _write_json(path: Path, doc: dict):
  write_atomic(path, finite_json(doc))


def analysis_table(doc: dict) -> str:
  from mplp.analysis import METRICS
  lines = [f"Alignment with the true gradient, mean over {doc['tasks']} tasks and the inner steps "
           "(NaN-free steps).", "", "| layer | " + " | ".join(METRICS) + " |",
           "|" + "---|" * (len(METRICS) + 1)]
  for layer, per in doc["layers"].items():
    cells = [f"{np.nanmean(np.array(per[m]['mean'], float)):.3f}" if m in per else "" for m in METRICS]
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_alignment(doc: dict, path):
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric, title in ((axes[0], "update_cos", "cos(update, -gradient)"),
                            (axes[1], "message_r", "message: fraction of dL/dh recovered")):
    for layer, per in doc["layers"].items():
      if metric in per:
        mean, sd = np.array(per[metric]["mean"], float), np.array(per[metric]["sd"], float)
        steps = np.arange(len(mean))
        ax.plot(steps, mean, marker="o", label=layer)
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("inner step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_analysis(summary: dict, out_dir, tasks: int, config: dict) -> Path:
  """Write analysis.json, analysis.md and alignment.png; returns the directory."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  doc = {"layers": summary, "tasks": tasks, "config": config}
  _write_json(out / "analysis.json", doc)
  (out / "analysis.md").write_text(analysis_table(doc))
  plot_alignment(doc, out / "alignment.png")
  return out


def transfer_table(eval_dirs) -> str:
  """One markdown table over `mplp eval` outputs (e.g. one rule evaluated with several
  `--set` overrides): the network and task of each, the rule's and the best tuned
  baseline's metric after the last inner step, and which is ahead."""
  lines = ["| eval | network | task | mplp | best baseline | mplp - baseline |", "|---|---|---|---|---|---|"]
  for d in eval_dirs:
    path = Path(d) / "eval.json"
    if not path.is_file():
      raise FileNotFoundError(f"{d}: no eval.json (not an `mplp eval` output directory)")
    try:
      doc = json.loads(path.read_text())
      net, task = doc["config"]["network"], doc["config"]["task"]
      size = f"-{task['image_size']}px" if task["name"] in ("mnist", "fashion_mnist") else ""
      final = {m: r["mean"][-1] for m, r in doc["methods"].items()}
      rule = final.pop("mplp")
      hidden, activation, steps = net["hidden"], net["activation"], task["inner_steps"]
    except (ValueError, KeyError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
      raise ValueError(f"{path}: not an `mplp eval` result ({type(e).__name__}: {e}); "
                       "rerun mplp eval for that directory") from None
    better = max if doc["metric"] == "accuracy" else min
    name, base = better(final.items(), key=lambda kv: kv[1])
    lines.append(f"| {Path(d).name} | {'-'.join(map(str, hidden))} {activation} | "
                 f"{task['name']}{size}, {steps} steps | {rule:.4f} | {base:.4f} ({name}) | "
                 f"{rule - base:+.4f} |")
  return "\n".join(lines) + "\n"
