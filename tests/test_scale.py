"""Scale: rematerialization and truncation do not change the meta-gradient, sharding over
devices and processes does not change the meta-step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mplp import config as config_lib, evaluation
from mplp.meta_train import MetaTrainer
from mplp.tasks import Sinusoid, jit_with_task

WORKER = str(Path(__file__).with_name("scale_worker.py"))


def _trainer(overrides=(), optimizer=None):
  cfg = config_lib.load("sinusoid_5x10", ["meta.outer_batch=2", "meta.pool_size=8", "task.inner_steps=4",
                                          *overrides])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  if optimizer is not None:
    import dataclasses
    trainer = dataclasses.replace(trainer, optimizer=optimizer)
  return trainer, task


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
  assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
  chex.assert_trees_all_close(grads_a, grads_b, rtol=1e-5, atol=1e-9)
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
    np.testing.assert_allclose(m_trunc["meta_loss"], m_full["meta_loss"], rtol=1e-6)
  chex.assert_trees_all_close(s_trunc.trainable, s_full.trainable, rtol=1e-6, atol=1e-8)
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
    heldouts.append(float(m["heldout"]))
    keys.append(np.asarray(state.unrolls.key))
    np.testing.assert_array_equal(state.unrolls.t, [(i + 1) % 4] * 2)
  assert all((k == keys[0]).all() for k in keys)  # the same two tasks throughout
  curves = evaluation.rule_curves(trunc, state.trainable, state.stats, state.pool, task,
                                  jnp.asarray(keys[0]))
  np.testing.assert_allclose(heldouts, np.mean(curves["loss"][:, 1:], axis=0), rtol=1e-5)
  state, _ = step(state)  # t wrapped to 0: new tasks
  assert not (np.asarray(state.unrolls.key) == keys[0]).all()


def _run(args, env_extra, log):
  """Start the worker with its output in the file `log` (a pipe nobody reads while we wait
  on another process could fill up and stall a collective). Returns (process, log)."""
  env = {**os.environ, **env_extra}
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=f, stderr=subprocess.STDOUT), log


def _wait(runs):
  for proc, log in runs:
    proc.wait(timeout=600)
    assert proc.returncode == 0, Path(log).read_text()


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_same(a, b, grad_rtol=1e-5):
  """Outer loss, metrics and meta-gradient to 1e-5 relative (each gradient tensor
  relative to its own scale, to `grad_rtol`). The parameter update is a function of
  these; with Adam's first step, g / (|g| + 1e-8), elements whose gradient is nearly 0
  amplify float rounding, so it is not compared element by element."""
  assert a.keys() == b.keys()
  for k in a:
    tol = grad_rtol if k.startswith("grad") else 1e-5
    np.testing.assert_allclose(b[k], a[k], rtol=tol, atol=tol * np.abs(a[k]).max(), err_msg=k)
  assert sum(k.startswith("grad") for k in a) > 10


@pytest.mark.parametrize("estimator", [[], ["--set", "meta.estimator=es", "meta.es_pairs=3"]],
                         ids=["backprop", "es"])
def test_sharded_over_four_devices_equals_one_device(tmp_path, estimator):
  """The outer batch (inside every ES pair) split over 4 devices: the same meta-step.
  An ES gradient is (L+ - L-) / (2 sigma^2) eps: float32 rounding of the losses (another
  reduction order over devices, ~1e-7 relative) is amplified ~1/sigma = 100x, so ES
  gradients are compared to 1e-3 of their scale (a wrong reduction would be off by O(1))."""
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  _wait([_run([str(tmp_path / f"d{n}.npz"), str(n), *estimator], flags, tmp_path / f"d{n}.log")
         for n in (1, 4)])  # both at once
  _assert_same(_load(tmp_path / "d1.npz"), _load(tmp_path / "d4.npz"), grad_rtol=1e-3 if estimator else 1e-5)


def test_two_processes_equal_one_process(tmp_path):
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  runs = [_run([str(tmp_path / "multi.npz"), "4", f"127.0.0.1:{port}", "2", str(i)], flags, tmp_path / f"rank{i}.log")
          for i in range(2)]
  runs.append(_run([str(tmp_path / "single.npz"), "1"], {"JAX_PLATFORMS": "cpu"}, tmp_path / "single.log"))
  _wait(runs)  # all three at once
  _assert_same(_load(tmp_path / "single.npz"), _load(tmp_path / "multi.npz"))


def test_device_count_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"run.devices: 8 requested but only 1 cpu device"):
    config_lib.build_trainer(config_lib.load("sinusoid_5x10", ["run.devices=8"]), None)
