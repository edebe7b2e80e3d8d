"""Experiment configs: a TOML file of four sections, validated before any work starts.

    [network]  preset, activation, hidden
    [task]     name, inner_steps, batch_size, eval_size, ... (which data, how sampled)
    [meta]     the outer loop: outer batch, optimizer, loss weights, learned init, pool
    [run]      steps, seed, logging and checkpoint cadence, final evaluation

`load(name_or_path, overrides)` returns a frozen `Config`; an unknown key, a wrong type
or a value out of range raises `ConfigError` naming the key and what is allowed.
`build(config)` makes the task, the network and the `MetaTrainer` it describes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from mplp import estimators, presets
from mplp.host import datasets
from mplp.estimators import ESTIMATORS
from mplp.layers import ACTIVATIONS
from mplp.optim import OPTIMIZERS


class ConfigError(ValueError):
  """A config key, type or value that is not allowed."""


SEED_MAX = 2 ** 31 - 1


def _f(default, *, choices=None, lo=None, hi=None, lo_open=False, doc=""):
  return dataclasses.field(default=default, metadata=dict(choices=choices, lo=lo, hi=hi,
                                                          lo_open=lo_open, doc=doc))


TASKS = ("sinusoid", "digits", "mnist5k", "npz") + datasets.TFDS_IMAGE_SETS


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  preset: str = _f("sinusoid_5x10", choices=tuple(presets.PRESETS), doc="architecture and rule")
  activation: str = _f("relu", choices=tuple(ACTIVATIONS))
  hidden: Tuple[int, ...] = _f((20, 20), lo=1, doc="hidden layer widths")
  rule: str = _f("learned", choices=("learned", "backprop"),
                 doc="backprop: exact gradients + SGD as agents (with meta.learn_init: plain MAML)")
  inner_lr: float = _f(0.1, lo=0.0, lo_open=True, doc="rule = backprop: the inner SGD learning rate")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str = _f("sinusoid", choices=TASKS)
  inner_steps: int = _f(5, lo=1)
  batch_size: int = _f(10, lo=1)
  eval_size: int = _f(100, lo=1, doc="held-out examples per task")
  image_size: int = _f(12, lo=4, hi=28, doc="mnist5k/mnist/fashion_mnist: resize to this (28 = original)")
  permute_classes: bool = _f(False)
  path: str = _f("", doc="npz: the file")
  data_dir: str = _f("", doc="mnist/fashion_mnist: prepared tfds directory")
  split_seed: int = _f(0, lo=0, hi=2 ** 32 - 1, doc="digits/mnist5k/npz: train/test split (numpy's seed range)")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  outer_batch: int = _f(4, lo=1)
  optimizer: str = _f("adam", choices=tuple(sorted(OPTIMIZERS)))
  learning_rate: float = _f(1e-4, lo=0.0, lo_open=True)
  lr_drop_step: int = _f(0, lo=0, doc="0: constant learning rate")
  lr_after_drop: float = _f(1e-4, lo=0.0, lo_open=True)
  per_tensor_norm: bool = _f(True, doc="g / (||g|| + 1e-8) per tensor (the paper's)")
  clip_global_norm: float = _f(0.0, lo=0.0, doc="0: off")
  hint_weight: float = _f(0.7, lo=0.0)
  heldout_weight: float = _f(0.3, lo=0.0)
  remember_weight: float = _f(0.0, lo=0.0)
  update_l2_weight: float = _f(0.0, lo=0.0)
  learn_init: bool = _f(False, doc="meta-train the initial inner weights (MAML-style)")
  pool_size: int = _f(128, lo=0, doc="pre-sampled initial networks (0: fresh per task)")
  remat: bool = _f(False, doc="recompute each inner step in the backward pass (agent slices always are)")
  truncation: int = _f(0, lo=0, doc="inner steps per meta-gradient window (0: whole unroll)")
  estimator: str = _f("backprop", choices=ESTIMATORS,
                      doc="meta-gradient: backprop / es over whole unrolls; truncated / pes over "
                          "windows of meta.truncation steps (mplp.estimators)")
  es_sigma: float = _f(0.01, lo=0.0, lo_open=True, doc="es/pes: perturbation std")
  es_pairs: int = _f(8, lo=1, doc="es/pes: antithetic pairs per meta-step")
  max_bad_steps: int = _f(20, lo=1, doc="stop after this many consecutive non-finite steps")
  init_rule: str = _f("", doc="start the rule and its statistics from a run directory or a shipped "
                               "rule name (same network.preset); empty: a fresh rule")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  steps: int = _f(1000, lo=0)
  seed: int = _f(0, lo=0, hi=SEED_MAX, doc="jax.random.PRNGKey's range, with room for the final eval's seed + 10,000")
  log_every: int = _f(10, lo=1)
  checkpoint_every: int = _f(100, lo=1)
  keep_checkpoints: int = _f(3, lo=1)
  eval_tasks: int = _f(100, lo=0, doc="final comparison with SGD and Adam (0: skip)")
  tune_tasks: int = _f(20, lo=1, doc="tasks for tuning the SGD/Adam learning rates")
  wandb_project: str = _f("mplp")
  wandb_checkpoints: bool = _f(False, doc="--wandb: log the rule as a model-artifact version at every "
                                          "checkpoint (else once, at the end)")
  devices: int = _f(0, lo=0, doc="devices to split the outer batch over (0: all that divide it)")


@dataclasses.dataclass(frozen=True)
class Config:
  network: NetworkConfig = NetworkConfig()
  task: TaskConfig = TaskConfig()
  meta: MetaConfig = MetaConfig()
  run: RunConfig = RunConfig()

  def to_dict(self) -> Dict[str, Dict[str, Any]]:
    return {s.name: {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
            for s in dataclasses.fields(self)}

  def flat(self) -> Dict[str, Any]:
    return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLS = {"network": NetworkConfig, "task": TaskConfig, "meta": MetaConfig, "run": RunConfig}


def _check_value(key: str, field: dataclasses.Field, value):
  """Type- and range-check one value; returns it converted (int -> float, list -> tuple)."""
  default, meta = field.default, field.metadata
  expected = type(default)
  if expected is tuple:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise ConfigError(f"{key}: expected a list of ints, got {value!r}")
    value = tuple(value)
    items = value
  elif expected is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}: expected true or false, got {value!r}")
    items = ()
  elif expected is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected an integer, got {value!r}")
    items = (value,)
  elif expected is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    value = float(value)
    items = (value,)
  else:
    if not isinstance(value, str):
      raise ConfigError(f"{key}: expected a string, got {value!r}")
    items = ()
  if meta["choices"] is not None and value not in meta["choices"]:
    raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {list(meta['choices'])}")
  for v in items:
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (v < lo or (meta["lo_open"] and v == lo)):
      raise ConfigError(f"{key}: {v!r} is out of range; must be {'>' if meta['lo_open'] else '>='} {lo}"
                        + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and v > hi:
      raise ConfigError(f"{key}: {v!r} is out of range; must be <= {hi}")
  return value


def from_dict(raw: Dict[str, Any]) -> Config:
  """A validated `Config` from nested dicts (missing keys take their defaults)."""
  if not isinstance(raw, dict):
    raise ConfigError(f"config must be a table of sections {list(SECTIONS)}")
  unknown = [s for s in raw if s not in SECTIONS]
  if unknown:
    raise ConfigError(f"unknown config section(s) {unknown}; allowed: {list(SECTIONS)}")
  sections = {}
  for name, cls in _SECTION_CLS.items():
    values = raw.get(name, {})
    if not isinstance(values, dict):
      raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = [k for k in values if k not in fields]
    if bad:
      raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}; allowed in [{name}]: {list(fields)}")
    sections[name] = cls(**{k: _check_value(f"{name}.{k}", fields[k], v) for k, v in values.items()})
  config = Config(**sections)
  _check_consistency(config)
  return config


def _check_consistency(c: Config):
  if c.task.name == "npz" and not c.task.path:
    raise ConfigError("task.path: task.name = 'npz' needs the path of a .npz file (arrays x, y)")
  if c.task.name == "sinusoid" and c.network.preset == "mnist_20x8":
    raise ConfigError("network.preset: 'mnist_20x8' is a classifier; task.name = 'sinusoid' needs "
                      "'sinusoid_5x10' or 'maml_sinusoid_2x10'")
  if c.task.name != "sinusoid" and c.network.preset != "mnist_20x8":
    raise ConfigError(f"network.preset: task.name = {c.task.name!r} is classification and needs "
                      f"'mnist_20x8' (softmax + cross-entropy), got {c.network.preset!r}")
  if c.network.rule == "backprop" and not c.meta.learn_init:
    raise ConfigError("network.rule: 'backprop' has nothing to meta-train unless meta.learn_init = true "
                      "(plain MAML); allowed: 'learned', or set meta.learn_init = true and meta.pool_size = 0")
  try:  # the estimator and its window are checked where they are defined
    estimators.make(c.meta.estimator, c.meta.truncation, c.task.inner_steps, c.meta.es_sigma, c.meta.es_pairs)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if c.meta.learn_init and c.meta.pool_size:
    raise ConfigError("meta.pool_size: must be 0 when meta.learn_init = true (tasks start from "
                      "the learned initialization, not from a pool)")


def _parse_override(item: str):
  if "=" not in item:
    raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. meta.learning_rate=1e-3")
  key, text = item.split("=", 1)
  key = key.strip()
  if key.count(".") != 1:
    raise ConfigError(f"--set {item!r}: the key must be section.key with a section in {list(SECTIONS)}")
  try:
    value = tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    value = text  # a bare string such as task.name=digits
  return key, value


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs, inside the package


def experiment_path(name_or_path: str) -> Path:
  """`NAME`: `./experiments/NAME.toml` (a user's own, next to the working directory) or
  the shipped `mplp/host/configs/NAME.toml` (inside the package, so found after any install);
  or an existing file path."""
  p = Path(name_or_path)
  if p.suffix == ".toml" or os.sep in name_or_path:
    if not p.is_file():
      raise ConfigError(f"experiment config {name_or_path!r} does not exist")
    return p
  roots = [Path.cwd() / "experiments", CONFIG_DIR]
  for root in roots:
    if (root / f"{name_or_path}.toml").is_file():
      return root / f"{name_or_path}.toml"
  known = sorted({q.stem for r in roots if r.is_dir() for q in r.glob("*.toml")})
  raise ConfigError(f"unknown experiment {name_or_path!r}; known: {known} (or give a path to a .toml)")


def load(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
  """Read an experiment config and apply `section.key=value` overrides."""
  path = experiment_path(name_or_path)
  try:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path}: not valid TOML ({e})") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); a config is "
                      "TOML text in UTF-8") from None
  return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
  """Set `section.key=value` items in a nested config dict (in place; returned)."""
  for item in overrides:
    key, value = _parse_override(item)
    section, name = key.split(".")
    if section not in SECTIONS:
      raise ConfigError(f"--set {item!r}: unknown section {section!r}; allowed: {list(SECTIONS)}")
    raw.setdefault(section, {})[name] = value
  return raw


def read_json(path) -> Dict[str, Any]:
  """A run's saved `config.json` as a dict; a damaged file is a ConfigError naming it."""
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ConfigError(f"{path} is damaged ({type(e).__name__}: {e}); it must be the JSON config "
                      "mplp train wrote (nothing was changed)") from None


def load_json(path) -> Config:
  return from_dict(read_json(path))


def build_task(c: Config):
  """The task the config describes (loads data; may raise DataUnavailableError)."""
  import jax.numpy as jnp
  from mplp.tasks import Classification, Sinusoid
  t = c.task
  if t.name == "sinusoid":
    return Sinusoid()
  if t.name == "digits":
    data = datasets.digits(seed=t.split_seed)
  elif t.name == "mnist5k":
    data = datasets.mnist5k(seed=t.split_seed, image_size=t.image_size)
  elif t.name == "npz":
    data = datasets.npz(t.path, seed=t.split_seed)
  else:
    data = datasets.tfds_images(t.name, t.data_dir or None, t.image_size)
  return Classification(jnp.asarray(data.x_train), jnp.asarray(data.y_train),
                        jnp.asarray(data.x_test), jnp.asarray(data.y_test),
                        classes=data.classes, permute_classes=t.permute_classes)


def build_network(c: Config, task):
  from mplp.backprop import BackpropRule
  net = presets.network(c.network.preset, activation=c.network.activation,
                        hidden=c.network.hidden, input_size=task.input_size,
                        outputs=task.output_size)
  if c.network.rule == "backprop":
    net = dataclasses.replace(net, rule=BackpropRule(c.network.inner_lr))
  return net


def build_episode(c: Config, network, pool_size: int = 0):
  """The inner run the config describes (`mplp.episode.Episode`), tasks starting from
  `pool_size` pre-sampled networks (0, the evaluation protocol: fresh ones) or the learned
  initialization; nothing of the outer loop (optimizer, estimator, mesh) is built."""
  from mplp.episode import Episode
  return Episode(network, c.task.inner_steps, c.task.batch_size, c.task.eval_size, c.meta.learn_init,
                 pool_size)


def build_trainer(c: Config, network):
  """The `MetaTrainer` (with a device mesh when more than one device is used)."""
  from mplp import distributed
  from mplp.meta_train import MetaTrainer, OuterLoss
  from mplp.optim import outer_optimizer
  m = c.meta
  try:
    mesh = distributed.mesh(c.run.devices, m.outer_batch)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  optimizer = outer_optimizer(m.optimizer, m.learning_rate, m.per_tensor_norm,
                              m.clip_global_norm, m.lr_drop_step, m.lr_after_drop)
  objective = OuterLoss(m.hint_weight, m.heldout_weight, m.remember_weight, m.update_l2_weight)
  estimator = estimators.make(m.estimator, m.truncation, c.task.inner_steps, m.es_sigma, m.es_pairs)
  return MetaTrainer(build_episode(c, network, m.pool_size), optimizer, estimator, objective,
                     outer_batch=m.outer_batch, remat=m.remat, mesh=mesh)
