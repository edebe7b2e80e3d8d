"""Where a trained rule comes from: a run directory, a rule shipped with mplp (or a rule
file, or a W&B model artifact), or the authors' published flat weights. Each gives
`(config, episode, rule, task)` ready for `mplp.evaluation.compare` (an
`mplp.episode.Episode` whose tasks start from fresh networks or the learned
initialization, and a `TrainedRule`), with config overrides applied (for transfer:
another activation, other widths, another data set). Only a run directory's checkpoint
(a whole `TrainState`) needs the trainer's shapes; nothing else builds an outer optimizer.

A shipped rule is `mplp/host/pretrained/NAME.npz` in the checkpoint format (see
`mplp.host.checkpoint`) holding `{"trainable", "stats"}` and the config it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from mplp import reference
from mplp.host import checkpoint, config as config_lib
from mplp.episode import TrainedRule

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PUBLISHED = ("sinusoid_5x10", "maml_sinusoid_2x10", "mnist_20x8")


def shipped() -> list:
  return sorted(p.stem for p in PRETRAINED_DIR.glob("*.npz"))


def _with_overrides(raw: dict, overrides: Sequence[str]) -> config_lib.Config:
  return config_lib.from_dict(config_lib.apply_overrides(raw, overrides))


def _build(cfg):
  """Task, and the episode that starts every task from a fresh inner network (or the
  learned initialization): the paper's evaluation protocol."""
  task = config_lib.build_task(cfg)
  return task, config_lib.build_episode(cfg, config_lib.build_network(cfg, task))


def _state_template(cfg):
  """The shapes of the `TrainState` a run with `cfg` saves (nothing is computed)."""
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, devices=1)),
                                     config_lib.build_network(cfg, task))
  return jax.eval_shape(lambda: trainer.init(jax.random.PRNGKey(0), task))


def _rule_template(cfg, network):
  """The shapes of a shipped rule file's `{"trainable", "stats"}` for `cfg` (from the
  network alone: no trainer, nothing computed)."""
  key = jax.random.PRNGKey(0)
  meta = jax.eval_shape(network.init_meta, key)
  init = jax.eval_shape(lambda: network.weights(network.init(key, 1))) if cfg.meta.learn_init else ()
  return {"trainable": {"rule": meta.params, "init": init}, "stats": meta.stats}


def _checkpoint_of(run_dir: Path, step: int | None) -> Path:
  """The run's checkpoint of meta-step `step`, or its newest for `None`."""
  found = checkpoint.list_checkpoints(run_dir / "checkpoints")
  if not found:
    raise checkpoint.CheckpointError(f"{run_dir}/checkpoints holds no checkpoint yet")
  if step is None:
    return found[-1]
  path = checkpoint.path_for(run_dir / "checkpoints", step)
  if path not in found:
    kept = [checkpoint.step_of(p) for p in found]
    raise config_lib.ConfigError(f"--step: {run_dir} holds no checkpoint of step {step}; kept steps: {kept}")
  return path


def _steps(step) -> tuple:
  """`None` (the newest), one step, or several: a sorted tuple of distinct steps."""
  if step is None:
    return (None,)
  steps = tuple(sorted(set([step] if isinstance(step, int) else step)))
  if not steps:
    raise config_lib.ConfigError("--step: give at least one meta-step")
  return steps


def _restore_run(run_dir, step=None):
  """(the run's config as saved, its `TrainState` at `step` or the newest, checkpoint
  metadata). Several steps: the uniform average of their rules and statistics (tail
  averaging of the meta-parameters; the optimizer state and pool are the newest's), with
  `info["averaged_steps"]`."""
  run_dir = Path(run_dir)
  if not (run_dir / "config.json").exists():
    raise config_lib.ConfigError(f"{run_dir} is not an mplp run directory (no config.json)")
  raw = config_lib.read_json(run_dir / "config.json")
  template = _state_template(config_lib.from_dict(raw))
  restored = [checkpoint.restore(_checkpoint_of(run_dir, s), template) for s in _steps(step)]
  state, info = restored[-1]
  if len(restored) > 1:
    mean = lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(np.asarray(leaves[0]).dtype)
    average = lambda trees: jax.tree_util.tree_map(mean, *trees)
    state = state._replace(trainable=average([s.trainable for s, _ in restored]),
                           stats=average([s.stats for s, _ in restored]))
    info = {**info, "averaged_steps": [m["step"] for _, m in restored]}
  return raw, state, info


def layer_map(trained, network) -> tuple:
  """For each layer of `network`, the layer of the `trained` network whose per-layer
  rule entries (agent networks not shared across layers, output scales, statistics) it
  uses: layers are (Dense, activation) blocks and a tail (the last Dense and what follows
  it); block j takes the trained block min(j, trained blocks - 1), the tail the trained
  tail. The identity for the same depth; a deeper network's extra hidden blocks reuse the
  last trained hidden block (so 144-50-50-10 runs the 144-50-10 rule). Raises
  ConfigError where the kinds of the mapped layers differ."""
  from mplp.layers import Dense
  def split(net):
    last = max(net.dense_layers)
    return [net.layers[i:i + 2] for i in range(0, last, 2)], last, len(net.layers)
  old_blocks, old_tail, _ = split(trained)
  new_blocks, new_tail, n = split(network)
  out = []
  for i in range(n):
    if i >= new_tail:
      j = old_tail + (i - new_tail)
    else:
      j = 2 * min(i // 2, len(old_blocks) - 1) + i % 2 if old_blocks else -1
    if not 0 <= j < len(trained.layers) or trained.layers[j].kinds != network.layers[i].kinds or (
        isinstance(network.layers[i], Dense) != isinstance(trained.layers[j], Dense)):
      raise config_lib.ConfigError(
          f"network: layer {i} ({type(network.layers[i]).__name__}) has no counterpart in the rule's "
          f"trained network {[type(l).__name__ for l in trained.layers]}; allowed: the same layers, wider, "
          "or more (Dense, activation) blocks")
    out.append(j)
  return tuple(out)


def _for_network(rule: TrainedRule, trained, network) -> TrainedRule:
  """`rule` (trained on `trained`) with its per-layer entries arranged for `network`."""
  if len(trained.layers) == len(network.layers):
    return rule
  if rule.trainable["init"]:
    raise config_lib.ConfigError("network.hidden: a rule with a learned initialization (meta.learn_init) "
                                 "runs only on the network it was trained with")
  mapping = layer_map(trained, network)
  params = rule.trainable["rule"]
  params = {**params, "layers": tuple(params["layers"][j] for j in mapping)}
  stats = tuple(rule.stats[j] for j in mapping)
  return rule._replace(trainable={**rule.trainable, "rule": params}, stats=stats)


def _trained_network(raw: dict):
  saved = config_lib.from_dict(raw)
  return config_lib.build_network(saved, config_lib.build_task(saved))


def from_run(run_dir, overrides: Sequence[str] = (), step=None):
  """Checkpoint `step` (default: the newest) of a `mplp train` run; several steps: the
  average of their rules and statistics."""
  raw, state, _ = _restore_run(run_dir, step)
  cfg = _with_overrides(raw, overrides)
  task, episode = _build(cfg)
  rule = TrainedRule(state.trainable, state.stats)
  if cfg.network.hidden != config_lib.from_dict(raw).network.hidden:
    rule = _for_network(rule, _trained_network(raw), episode.network)
  return cfg, episode, rule, task


def load(source: str, overrides: Sequence[str] = ()):
  """A run directory or, if `source` is not a directory, a rule (`rule_file`)."""
  return from_run(source, overrides) if Path(source).is_dir() else from_pretrained(source, overrides)


def save_pretrained(run_dir, name: str, directory=PRETRAINED_DIR, step=None):
  """Ship checkpoint `step` (default: the newest; several steps: the average of their
  rules and statistics) of a run as `NAME.npz` (rule and statistics only)."""
  raw, state, info = _restore_run(run_dir, step)
  extra = {"averaged_steps": info["averaged_steps"]} if "averaged_steps" in info else {}
  return checkpoint.write(Path(directory) / f"{name}.npz",
                          {"trainable": state.trainable, "stats": state.stats},
                          {"config": config_lib.from_dict(raw).to_dict(), "trained_steps": info["step"],
                           "source": str(run_dir), **extra})


def rule_file(name: str) -> Path:
  """Where the rule `name` is: a shipped name, a rule file (`PATH.npz`, as `mplp train`
  writes to DIR/rule.npz and to its W&B model artifact), or `wandb:ENTITY/PROJECT/NAME:ALIAS`
  (downloaded from W&B; refused at once where no server can be reached)."""
  if name.startswith("wandb:"):
    from mplp.host import tracking
    return tracking.download_rule(name)
  if Path(name).is_file():
    return Path(name)
  if name.endswith(".npz"):
    raise config_lib.ConfigError(f"--pretrained: no such rule file {name!r}")
  path = PRETRAINED_DIR / f"{name}.npz"
  if not path.exists():
    raise config_lib.ConfigError(f"--pretrained: unknown rule {name!r}; shipped: {shipped()}, or a "
                                 "PATH.npz, or wandb:ENTITY/PROJECT/NAME:ALIAS")
  return path


def from_pretrained(name: str, overrides: Sequence[str] = ()):
  path = rule_file(name)
  _, info = checkpoint.read(path)
  raw = info["config"]
  trained = _trained_network(raw)
  tree, _ = checkpoint.restore(path, _rule_template(config_lib.from_dict(raw), trained))
  cfg = _with_overrides(json.loads(json.dumps(raw)), overrides)
  task, episode = _build(cfg)
  return cfg, episode, _for_network(TrainedRule(tree["trainable"], tree["stats"]), trained, episode.network), task


def from_reference(path: str, experiment: str, prior: str | None = None, overrides: Sequence[str] = ()):
  """The authors' flat weights (`*.npy`) for one of their experiments; for the MAML-style
  experiment also `prior`, the learned initial weights."""
  if experiment not in PUBLISHED:
    raise config_lib.ConfigError(f"--experiment: unknown experiment {experiment!r}; known: {list(PUBLISHED)}")
  cfg = config_lib.load(experiment, list(overrides))
  if experiment == "maml_sinusoid_2x10" and prior is None:
    raise config_lib.ConfigError("--reference-prior: the MAML-style experiment needs its learned initial "
                                 "weights (maml_sin_prior_weights_*.npy)")
  if experiment != "maml_sinusoid_2x10" and prior is not None:
    raise config_lib.ConfigError(f"--reference-prior: only maml_sinusoid_2x10 has a learned prior, not {experiment}")
  task, episode = _build(cfg)
  if not Path(path).is_file():
    raise config_lib.ConfigError(f"--reference: no such file {path!r}")
  if prior is not None and not Path(prior).is_file():
    raise config_lib.ConfigError(f"--reference-prior: no such file {prior!r}")
  try:
    meta = reference.import_flat(np.load(path, allow_pickle=False), episode.network)
    init = reference.load_prior(prior, episode.network) if prior else ()
  except ValueError as e:
    raise config_lib.ConfigError(f"--reference: {e} (experiment {experiment})") from None
  return cfg, episode, TrainedRule({"rule": meta.params, "init": init}, meta.stats), task


def warm_start(source: str, trainable, stats):
  """`(trainable, stats)` with the rule and statistics taken from `source` (a run
  directory or a shipped rule name); the learned initialization is kept. The source must
  have the same rule architecture (meta.init_rule)."""
  if not Path(source).is_dir() and source not in shipped():
    raise config_lib.ConfigError(f"meta.init_rule: {source!r} is neither a run directory nor a shipped "
                                 f"rule; shipped: {shipped()}")
  try:
    _, _, rule, _ = load(source)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"meta.init_rule: {e}") from None
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), t)
  if (jax.tree_util.tree_structure(rule.trainable["rule"]) != jax.tree_util.tree_structure(trainable["rule"])
      or shapes(rule.trainable["rule"]) != shapes(trainable["rule"]) or shapes(rule.stats) != shapes(stats)):
    raise config_lib.ConfigError(f"meta.init_rule: the rule in {source!r} has another architecture than "
                                 "this config's network.preset; allowed: a run or shipped rule of the same preset")
  return {**trainable, "rule": rule.trainable["rule"]}, rule.stats
