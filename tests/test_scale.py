"""Scale: rematerialization and truncation do not change the meta-gradient, sharding over
devices and processes does not change the meta-step."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mplp import cell_params, evaluation
from mplp.host import config as config_lib
from mplp.tasks import jit_with_task

WORKER = str(Path(__file__).with_name("scale_worker.py"))


def _trainer(overrides=(), optimizer=None):
  cfg = config_lib.load("sinusoid_5x10", ["meta.outer_batch=2", "meta.pool_size=8", "task.inner_steps=4",
                                          "network.hidden=[8]", *overrides])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  if optimizer is not None:
    trainer = dataclasses.replace(trainer, optimizer=optimizer)
  return trainer, task


@pytest.fixture(autouse=True)
def float64():
  """Every comparison here is between two computation orders: in float64 their rounding
  (~1e-16) cannot reach the tolerances below on any CPU, while float32's can (lesson 6 of
  ../shared/style.md)."""
  with jax.enable_x64(True):
    yield


def _close(a, b, rtol=1e-9):
  """Every leaf of b equals a's to `rtol` of that leaf's largest element (each of a
  stateful cell's 17 tensors a leaf)."""
  a, b = cell_params.unpack_all(a), cell_params.unpack_all(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == np.float64, x.dtype
    np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * np.abs(x).max())


def _grads(trainer, task, state):
  def fn(state, task):
    key = jax.random.fold_in(state.rng, state.step)
    return jax.value_and_grad(trainer.outer_loss, has_aux=True)(
        state.trainable, state.stats, state.pool, key, task, state.unrolls)
  (loss, _), grads = jit_with_task(fn, task)(state)
  return loss, grads


def test_remat_gives_the_same_meta_gradient():
  plain, task = _trainer(["meta.remat=false"])
  remat, _ = _trainer(["meta.remat=true"])
  state = jit_with_task(plain.init, task)(jax.random.PRNGKey(0))
  loss_a, grads_a = _grads(plain, task, state)
  loss_b, grads_b = _grads(remat, task, state)
  _close((loss_a, grads_a), (loss_b, grads_b))
  assert float(optax.tree_utils.tree_norm(grads_a)) > 1e-4


def test_truncation_with_window_T_equals_full_backprop():
  full, task = _trainer(["meta.truncation=0"])
  trunc, _ = _trainer(["meta.truncation=4", "meta.estimator=truncated"])
  s_full = jit_with_task(full.init, task)(jax.random.PRNGKey(0))
  s_trunc = jit_with_task(trunc.init, task)(jax.random.PRNGKey(0))
  step_full, step_trunc = jit_with_task(full.step, task), jit_with_task(trunc.step, task)
  for _ in range(3):  # three meta-steps: every one restarts each run on a fresh task
    s_full, m_full = step_full(s_full)
    s_trunc, m_trunc = step_trunc(s_trunc)
    _close(m_full["meta_loss"], m_trunc["meta_loss"])
  # Adam's g / (sqrt(v) + 1e-8) amplifies the rounding of gradient elements near 0
  _close(s_full.trainable, s_trunc.trainable, rtol=1e-7)
  np.testing.assert_array_equal(s_trunc.unrolls.t, [0, 0])


def test_truncated_windows_carry_the_inner_state():
  """With the meta-parameters frozen (SGD, lr 0), four windows of one step walk the same
  inner trajectory as one full unroll of four steps on the same task."""
  trunc, task = _trainer(["meta.truncation=1", "meta.estimator=truncated"], optimizer=optax.sgd(0.0))
  state = jit_with_task(trunc.init, task)(jax.random.PRNGKey(0))
  step = jit_with_task(trunc.step, task)
  heldouts, keys = [], []
  for i in range(4):
    state, m = step(state)
    heldouts.append(m["heldout"])
    keys.append(np.asarray(state.unrolls.key))
    np.testing.assert_array_equal(state.unrolls.t, [(i + 1) % 4] * 2)
  assert all((k == keys[0]).all() for k in keys)  # the same two tasks throughout
  curves = evaluation.rule_curves(trunc.episode, state.trainable, state.stats, state.pool, task,
                                  jnp.asarray(keys[0]))
  _close(jnp.mean(curves["loss"][:, 1:], axis=0), jnp.stack(heldouts))
  state, _ = step(state)  # t wrapped to 0: new tasks
  assert not (np.asarray(state.unrolls.key) == keys[0]).all()


def _run(args, env_extra, log):
  """Start the worker with its output in the file `log` (a pipe nobody reads while we wait
  on another process could fill up and stall a collective). Returns (process, log)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1", **env_extra}
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=f, stderr=subprocess.STDOUT), log


def _wait(runs):
  for proc, log in runs:
    proc.wait(timeout=600)
    assert proc.returncode == 0, Path(log).read_text()


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  """The same float64 meta-step estimates on 1 device and on 4 devices of one process, and
  on 2 processes of 2 devices each (jax.distributed over 127.0.0.1): three processes at once."""
  tmp = tmp_path_factory.mktemp("scale")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  runs = [_run([str(tmp / "d4.npz"), "4", "--reference"],
               {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, tmp / "d4.log"),
          *(_run([str(tmp / "multi.npz"), "4", f"127.0.0.1:{port}", "2", str(i)], two, tmp / f"rank{i}.log")
            for i in range(2))]
  _wait(runs)
  d4, multi = _load(tmp / "d4.npz"), _load(tmp / "multi.npz")
  pick = lambda prefix: {k[len(prefix):]: v for k, v in d4.items() if k.startswith(prefix)}
  return {"d1": {**pick("one_"), "dtype": d4["dtype"]}, "d4": d4, "multi": multi,
          "wrong": {**{k.replace("wrong_", "backprop_"): v for k, v in d4.items() if k.startswith("wrong_")},
                    "dtype": d4["dtype"]}}


# Float64 rounding (~1e-16) amplified through the unroll and, for ES, by 1 / sigma = 100
# stays far below this; float32 rounding (1.5e-4 of a gradient's scale was measured on an
# AVX2 EPYC) and any wrong reduction (O(1)) are far above it.
F64_RTOL = 1e-9


def _assert_same(a, b, estimator, rtol=F64_RTOL):
  """Outer loss, metrics and every meta-gradient tensor of `estimator` equal to `rtol`
  of that tensor's largest element (elementwise relative error is meaningless for
  elements near 0). The parameter update is a function of these."""
  assert str(a["dtype"]) == str(b["dtype"]) == "float64"
  keys = sorted(k for k in a if k.startswith(estimator + "_"))
  assert keys == sorted(k for k in b if k.startswith(estimator + "_"))
  assert sum("_grad_" in k for k in keys) > 10
  for k in keys:
    np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=rtol * np.abs(a[k]).max(), err_msg=k)


@pytest.mark.parametrize("estimator", ["backprop", "es"])
def test_sharded_over_four_devices_equals_one_device(workers, estimator):
  """The outer batch (inside every ES pair) split over 4 devices: the same meta-step."""
  _assert_same(workers["d1"], workers["d4"], estimator)


@pytest.mark.parametrize("estimator", ["backprop", "es"])
def test_two_processes_equal_one_process(workers, estimator):
  _assert_same(workers["d1"], workers["multi"], estimator)


def test_the_device_comparison_catches_a_wrong_reduction(workers):
  """A 4-device run whose outer loss sums over the tasks instead of averaging fails the
  comparison; the right one passes it by orders of magnitude."""
  d1, d4 = workers["d1"], workers["d4"]
  with pytest.raises(AssertionError):
    _assert_same(d1, workers["wrong"], "backprop")
  worst = max(np.abs(d4[k] - d1[k]).max() / np.abs(d1[k]).max()
              for k in d1 if k.startswith("backprop_grad_") and np.abs(d1[k]).max() > 0)
  assert worst < F64_RTOL / 100, worst


def test_device_count_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"run.devices: 8 requested but only 1 cpu device"):
    config_lib.build_trainer(config_lib.load("sinusoid_5x10", ["run.devices=8"]), None)
