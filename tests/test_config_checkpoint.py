"""Configs are validated before any work; checkpoints round-trip exactly and refuse damage."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mplp.host import checkpoint, config as config_lib
from mplp.optim import normalize_per_tensor


@pytest.mark.parametrize("name", ["sinusoid_5x10", "maml_sinusoid_2x10", "digits_20x8", "mnist_20x8",
                                  "mnist5k_20x8"])
def test_shipped_experiments_load_and_round_trip(name):
  cfg = config_lib.load(name)
  assert config_lib.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("override, message", [
    ("meta.lr=1e-3", r"unknown key\(s\) \['meta.lr'\]; allowed in \[meta\]: \['outer_batch'"),
    ("meta.outer_batch=abc", r"meta.outer_batch: expected an integer, got 'abc'"),
    ("meta.outer_batch=0", r"meta.outer_batch: 0 is out of range; must be >= 1"),
    ("meta.learning_rate=0", r"meta.learning_rate: 0.0 is out of range; must be > 0"),
    ("task.name=cifar", r"task.name: 'cifar' is not allowed; allowed: \['sinusoid', 'digits'"),
    ("network.hidden=[20, true]", r"network.hidden: expected a list of ints"),
    ("meta.remat=1", r"meta.remat: expected true or false, got 1"),
    ("learning_rate=1", r"the key must be section.key"),
    ("optim.lr=1", r"unknown section 'optim'"),
    ("meta.pool_size=8", None),
])
def test_bad_overrides_name_the_key(override, message):
  if message is None:  # a valid one, for contrast
    assert config_lib.load("sinusoid_5x10", [override]).meta.pool_size == 8
    return
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load("sinusoid_5x10", [override])


def test_inconsistent_config_and_unknown_experiment():
  with pytest.raises(config_lib.ConfigError, match="network.preset: task.name = 'digits' is classification"):
    config_lib.load("sinusoid_5x10", ["task.name=digits"])
  with pytest.raises(config_lib.ConfigError, match=r"meta.pool_size: must be 0 when meta.learn_init"):
    config_lib.load("maml_sinusoid_2x10", ["meta.pool_size=4"])
  with pytest.raises(config_lib.ConfigError, match=r"unknown experiment 'nope'; known: \[.*'sinusoid_5x10'"):
    config_lib.load("nope")


def _tree(key):
  k1, k2 = jax.random.split(key)
  return {"a": jax.random.normal(k1, (3, 4)), "b": (jnp.arange(5, dtype=jnp.int32), jax.random.key_data(jax.random.PRNGKey(7))),
          "c": jax.random.uniform(k2, ())}


def test_checkpoint_round_trip_and_pruning(tmp_path):
  for step in (1, 2, 3, 4):
    checkpoint.save(tmp_path, step, _tree(jax.random.PRNGKey(step)), {"note": step}, keep=2)
  (tmp_path / "ckpt_00000009.npz.tmp").write_bytes(b"half a write")  # a killed write
  files = checkpoint.list_checkpoints(tmp_path)
  assert [p.name for p in files] == ["ckpt_00000003.npz", "ckpt_00000004.npz"]
  tree, meta = checkpoint.restore(files[-1], _tree(jax.random.PRNGKey(0)))
  assert meta["step"] == 4 and meta["note"] == 4
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), tree, _tree(jax.random.PRNGKey(4)))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
  path = checkpoint.save(tmp_path, 5, _tree(jax.random.PRNGKey(5)), {})
  data = bytearray(path.read_bytes())
  if damage == "truncate":
    data = data[: len(data) // 2]
  elif damage == "flip":
    data[len(data) // 3] ^= 0xFF  # inside the array payload
  else:
    data = bytearray(b"not a zip at all")
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match=r"ckpt_00000005.npz.* (corrupted|truncated)"):
    checkpoint.restore(path, _tree(jax.random.PRNGKey(0)))


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
  path = checkpoint.save(tmp_path, 1, _tree(jax.random.PRNGKey(1)), {})
  with pytest.raises(checkpoint.CheckpointError, match="array 0 has shape"):
    checkpoint.restore(path, {"a": jnp.zeros((2, 2)), "b": (jnp.zeros(5, jnp.int32), jnp.zeros(2, jnp.uint32)), "c": jnp.zeros(())})


def test_per_tensor_normalization_then_adam_matches_hand_computation():
  grads = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([0.5])}
  norm = normalize_per_tensor()
  out, _ = norm.update(grads, norm.init(grads))
  np.testing.assert_allclose(out["w"], [[0.6, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [1.0], rtol=1e-6)
  opt = config_lib.build_trainer(config_lib.load("sinusoid_5x10", ["meta.learning_rate=0.1"]),
                                 None).optimizer
  upd, _ = opt.update(grads, opt.init(grads), grads)
  ref, _ = optax.adam(0.1).update(out, optax.adam(0.1).init(out))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), upd, ref)


def test_every_experiment_config_is_valid(tmp_path, monkeypatch):
  """Every shipped config loads, by name, from outside the repository too (they live in
  the package, so a non-editable install finds them)."""
  monkeypatch.chdir(tmp_path)
  names = sorted(p.stem for p in config_lib.CONFIG_DIR.glob("*.toml"))
  assert config_lib.CONFIG_DIR.parent == Path(config_lib.__file__).resolve().parent
  assert {"sinusoid_5x10", "digits_20x8", "digits_step_pes"} <= set(names)
  for name in names:
    cfg = config_lib.load(name)
    assert cfg.run.steps > 0, name
  assert config_lib.load("digits_step_pes").meta.estimator == "pes"


def test_a_non_editable_install_trains_a_shipped_config_from_any_directory(tmp_path):
  """The wheel `pip` builds from this checkout, installed (not editable) into a fresh
  virtual environment, runs `mplp train sinusoid_5x10` from a temporary directory: the
  config is package data, not a file of the repository. The fresh environment gets its
  dependencies (jax, optax, ...) by a path file naming this environment's site-packages,
  whose own path files (the editable mplp's import hook) are not processed there, so the
  only mplp it can import is the installed wheel's."""
  import os
  import subprocess
  import sys
  import sysconfig
  import venv
  repo = Path(__file__).resolve().parents[1]
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(repo), "-w",
                          str(tmp_path / "wheel")], capture_output=True, text=True)
  if built.returncode != 0:
    pytest.skip(f"pip cannot build a wheel here (no build backend reachable): {built.stderr[-300:]}")
  (wheel,) = (tmp_path / "wheel").glob("mplp-*.whl")
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = env_dir / "bin" / "python"
  site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip())
  (site / "parent_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                 check=True, capture_output=True, env=clean)
  work = tmp_path / "elsewhere"
  work.mkdir()
  code = ("import mplp, sys; from mplp.host.cli import main; print(mplp.__file__); "
          "sys.exit(main(['train', 'sinusoid_5x10', '--steps', '0', '--no-progress', '--out', 'run', "
          "'--set', 'run.eval_tasks=0', '--set', 'meta.outer_batch=1', '--set', 'meta.pool_size=2']))")
  res = subprocess.run([str(python), "-c", code], cwd=work, env=clean, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.splitlines()[0] == str(site / "mplp" / "__init__.py")
  saved = json.loads((work / "run" / "config.json").read_text())
  assert saved["network"]["preset"] == "sinusoid_5x10" and (work / "run" / "metrics.jsonl").exists()


def test_the_library_imports_nothing_of_the_job_side():
  """Every module of `mplp/` imported (a fresh interpreter): no `mplp.host` module loads."""
  import subprocess
  import sys
  library = sorted(p.stem for p in Path(config_lib.__file__).resolve().parents[1].glob("*.py") if p.stem != "__init__")
  assert {"episode", "evaluation", "meta_train", "network"} <= set(library) and "config" not in library
  code = (f"import importlib, sys; [importlib.import_module('mplp.' + m) for m in {library!r}]; "
          "print(sorted(m for m in sys.modules if m.startswith('mplp.host')))")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "[]"
