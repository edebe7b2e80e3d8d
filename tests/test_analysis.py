"""`mplp analyze`: the backprop agents are exactly gradient-aligned (the oracle), a random
rule is not, and the command writes its report and logs to W&B."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from mplp import analysis
from mplp.host import config as config_lib, datasets, sources
from mplp.backprop import BackpropRule
from mplp.host.cli import main
from mplp.layers import Activation, Dense, Softmax
from mplp.losses import CrossEntropy, L2
from mplp.episode import Episode
from mplp.network import Network
from mplp.tasks import Classification, Sinusoid
from test_train import _wandb_history

NO_RULE = {"rule": {}, "init": ()}


_JITTED = {}


def _curves(net, task, tasks=3, trainable=NO_RULE, stats=()):
  """analysis.alignment on `tasks` tasks of 5 steps (one compilation per network)."""
  if net not in _JITTED:
    episode = Episode(net, inner_steps=5, batch_size=10, eval_size=20)
    _JITTED[net] = jax.jit(lambda tr, st, k, task: analysis.alignment(episode, tr, st, task, k))
  keys = jax.random.split(jax.random.PRNGKey(0), tasks)
  return {k: np.asarray(v) for k, v in _JITTED[net](trainable, stats, keys, task).items()}


def _digits():
  d = datasets.digits(seed=0)
  return Classification(jnp.asarray(d.x_train), jnp.asarray(d.y_train), jnp.asarray(d.x_test),
                        jnp.asarray(d.y_test), classes=10)


def test_backprop_agents_are_the_gradient_at_every_step():
  """Oracle: cos(update, -grad) = 1, |update| / |grad| = the learning rate, and every
  message is dL/d(output) (message_r = message_cos = 1), on 1-20-20-1 relu + L2 and on
  64-32-10 sigmoid + softmax + cross-entropy (digits)."""
  cases = [(Network(1, (Dense(20), Activation("relu"), Dense(20), Activation("relu"), Dense(1), L2()),
                    BackpropRule(0.1)), Sinusoid(), 0.1),
           (Network(64, (Dense(32), Activation("sigmoid"), Dense(10), Softmax(), CrossEntropy()),
                    BackpropRule(0.5)), _digits(), 0.5)]
  for net, task, lr in cases:
    c = _curves(net, task)
    dense = list(net.dense_layers)
    assert c["update_cos"].shape == (3, 5, len(net.layers) - 1)
    np.testing.assert_allclose(c["update_cos"][:, :, dense], 1.0, atol=1e-4)
    np.testing.assert_allclose(c["update_ratio"][:, :, dense], lr, rtol=1e-4)
    np.testing.assert_allclose(c["message_r"], 1.0, atol=1e-4)
    np.testing.assert_allclose(c["message_cos"], 1.0, atol=1e-4)
    others = [i for i in range(len(net.layers) - 1) if i not in dense]
    assert np.isnan(c["update_cos"][:, :, others]).all()


def test_a_random_rule_is_not_gradient_aligned():
  """Fresh (untrained) sinusoid 5x10 rules, 4 seeds x 8 tasks x 5 steps: the hidden
  layers' update cosine averages about 0 (|mean| < 0.1), and a message whose readout
  fits no better than chance is what an untrained first layer gets."""
  cfg = config_lib.load("sinusoid_5x10")
  net = config_lib.build_network(cfg, Sinusoid())
  means = []
  for seed in range(4):
    meta = net.init_meta(jax.random.PRNGKey(seed))
    c = _curves(net, Sinusoid(), tasks=8, trainable={"rule": meta.params, "init": ()}, stats=meta.stats)
    means.append(np.nanmean(c["update_cos"][:, :, [0, 2]]))
  assert abs(np.mean(means)) < 0.1, means
  # the backprop oracle on the same network is at 1: the metric separates the two
  oracle = _curves(Network(1, net.layers, BackpropRule(0.1)), Sinusoid(), tasks=2)
  assert np.nanmean(oracle["update_cos"][:, :, [0, 2]]) > 0.999


def test_analyze_command_writes_the_report_and_logs_to_wandb(tmp_path):
  out = tmp_path / "analyze"
  assert main(["analyze", "--pretrained", "sinusoid_5x10", "--tasks", "3", "--out", str(out),
               "--wandb", "offline"]) == 0
  doc = json.loads((out / "analysis.json").read_text())
  assert list(doc["layers"]) == ["0 Dense(20)", "1 relu", "2 Dense(20)", "3 relu", "4 Dense(1)"]
  first = doc["layers"]["0 Dense(20)"]
  assert set(first) == set(analysis.METRICS)
  assert len(first["update_cos"]["mean"]) == 5 and "update_cos" not in doc["layers"]["1 relu"]
  assert all(-1 <= v <= 1 for v in first["update_cos"]["mean"])
  assert (out / "alignment.png").stat().st_size > 1000
  assert (out / "analysis.md").read_text().count("\n| ") == 6  # the header and 5 layers
  run = next((out / "wandb").glob("offline-run-*"))
  history = _wandb_history(next(run.glob("run-*.wandb")))
  assert [h["_step"] for h in history] == [0, 1, 2, 3, 4]
  np.testing.assert_allclose([h["0 Dense(20)/update_cos"] for h in history],
                             first["update_cos"]["mean"], rtol=1e-6)


def test_analyze_refuses_bad_input(tmp_path, capsys):
  assert main(["analyze", "--pretrained", "nope", "--out", str(tmp_path / "a")]) == 2
  assert f"unknown rule 'nope'; shipped: {sources.shipped()}" in capsys.readouterr().err
  assert main(["analyze", "--pretrained", "sinusoid_5x10", "--tasks", "0"]) == 2
  assert "--tasks must be >= 1" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()
