"""Evaluation reports: `eval.json`, a markdown table and PNG plots (matplotlib, Agg).

    DIR/eval.json     {"metric", "methods": {method: {"mean", "sd", "ci95"} per step},
                       "all_metrics", "learning_rates", "grids", "tasks", "config"}
    DIR/eval.md       the table (mean +- 95% CI per inner step)
    DIR/curves.png    the metric vs inner step, a band of +-95% CI per method
    DIR/fits.png      sinusoid only: targets, observed points, the rule's fit after each step
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def primary_metric(kind: str) -> str:
  return "accuracy" if kind == "classification" else "loss"


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


def write(result: dict, out_dir, kind: str, config: dict, fits=None) -> Path:
  """Write eval.json, eval.md and the plots; returns the directory."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  metric = primary_metric(kind)
  doc = {"metric": metric,
         "methods": {m: r[metric] for m, r in result["methods"].items()},
         "all_metrics": result["methods"], "learning_rates": result["learning_rates"],
         "grids": result["grids"], "tasks": result["tasks"], "tune_tasks": result["tune_tasks"],
         "config": config}
  tmp = out / "eval.json.tmp"
  tmp.write_text(json.dumps(doc, indent=1) + "\n")
  os.replace(tmp, out / "eval.json")
  (out / "eval.md").write_text(table(doc, metric))
  plot_curves(doc, metric, out / "curves.png")
  if fits:
    plot_fits(fits, out / "fits.png")
  return out
