"""Evaluation curves against an oracle: the backprop-as-agents rule with learning rate
lr must trace exactly the curve of optax.sgd(lr) on the same tasks, weights and batches."""

import chex
import jax
import numpy as np
import optax
import pytest

from mplp import BackpropRule, evaluation, presets
from mplp.host import config as config_lib
from mplp.episode import Episode, TrainedRule
from mplp.network import Network
from mplp.tasks import Sinusoid


@pytest.mark.parametrize("problem", ["sinusoid", "digits"])
def test_rule_curve_equals_optax_sgd_curve(problem):
  lr = 0.5
  if problem == "sinusoid":
    task, base = Sinusoid(eval_grid=True), presets.sinusoid_5x10()
  else:
    task = config_lib.build_task(config_lib.load("digits_20x8"))
    base = presets.mnist_20x8(hidden=(16,), input_size=64)
  net = Network(base.input_size, base.layers, BackpropRule(lr))
  episode = Episode(net, inner_steps=6, batch_size=8, eval_size=50)  # no outer optimizer, no trainer
  meta = net.init_meta(jax.random.PRNGKey(0))
  trainable = {"rule": meta.params, "init": ()}
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  rule = jax.jit(lambda k: evaluation.rule_curves(episode, trainable, meta.stats, (), task, k))(keys)
  sgd = jax.jit(lambda k: evaluation.optax_curves(episode, trainable, (), task, k, optax.sgd, (lr,)))(keys)
  assert rule["loss"].shape == (5, 7)
  np.testing.assert_allclose(rule["loss"], sgd["loss"][0], rtol=2e-5, atol=1e-7)
  assert float(np.abs(rule["loss"][:, -1] - rule["loss"][:, 0]).max()) > 1e-3  # weights moved
  if problem == "digits":
    np.testing.assert_array_equal(rule["accuracy"], sgd["accuracy"][0])


def test_summary_statistics():
  curve = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
  s = evaluation.curve_summary(curve)
  np.testing.assert_allclose(s["mean"], [3.0, 6.0])
  np.testing.assert_allclose(s["sd"], [2.0, 4.0])
  np.testing.assert_allclose(s["ci95"], [1.96 * 2 / np.sqrt(3), 1.96 * 4 / np.sqrt(3)])


def test_a_shipped_rule_evaluates_with_only_an_episode_and_the_rule(monkeypatch, tmp_path):
  """Evaluating a shipped rule builds no outer optimizer, trainer or device mesh: with
  those three made to fail, the rule loads (an `Episode` and a `TrainedRule`), compares
  against tuned SGD, and its curve equals the one the CLI writes for the same seed."""
  import json
  from mplp import distributed, optim
  from mplp.host import sources
  from mplp.host.cli import main
  cli = tmp_path / "cli"
  assert main(["eval", "--pretrained", "digits_20x8", "--tasks", "8", "--tune-tasks", "2", "--optimizers", "adam",
               "--no-progress", "--out", str(cli)]) == 0

  def refuse(*a, **k):
    raise AssertionError("evaluation built a part of the outer loop")
  for module, name in ((config_lib, "build_trainer"), (distributed, "mesh"), (optim, "outer_optimizer")):
    monkeypatch.setattr(module, name, refuse)
  cfg, episode, rule, task = sources.from_pretrained("digits_20x8")
  assert type(episode) is Episode and type(rule) is TrainedRule and episode.pool_size == 0
  result = evaluation.compare(episode, rule, task, jax.random.PRNGKey(0), 8, 2, ["adam"])
  doc = json.loads((cli / "eval.json").read_text())
  np.testing.assert_array_equal(result["methods"]["mplp"]["accuracy"]["mean"], doc["methods"]["mplp"]["mean"])
  assert result["learning_rates"] == doc["learning_rates"]


def test_a_rule_runs_on_deeper_networks_with_its_layers_mapped():
  """144-50-10's rule on 144-50-50-50-10: each extra (Dense, sigmoid) block takes the
  trained hidden block's per-layer entries, the tail (last Dense, softmax, loss) the
  trained tail's; the same depth maps to itself. It used to stop with an IndexError."""
  from mplp.host import sources
  one, three = presets.mnist_20x8(hidden=(50,)), presets.mnist_20x8(hidden=(50, 50, 50))
  assert sources.layer_map(one, three) == (0, 1, 0, 1, 0, 1, 2, 3, 4)
  assert sources.layer_map(one, one) == (0, 1, 2, 3, 4)
  assert sources.layer_map(three, one) == (0, 1, 6, 7, 8)
  _, _, trained, _ = sources.from_pretrained("digits_20x8")
  cfg, episode, rule, task = sources.from_pretrained("digits_20x8", ["network.hidden=[50, 50]"])
  assert episode.network.widths == (64, 50, 50, 50, 50, 10, 10)
  for new, old in enumerate((0, 1, 0, 1, 2, 3, 4)):
    chex.assert_trees_all_equal(rule.stats[new], trained.stats[old])
    chex.assert_trees_all_equal(rule.trainable["rule"]["layers"][new], trained.trainable["rule"]["layers"][old])
  curves = evaluation.rule_curves(episode, rule.trainable, rule.stats, (), task, jax.random.split(jax.random.PRNGKey(0), 2))
  assert np.all(np.isfinite(curves["loss"])) and curves["accuracy"].shape == (2, 21)


def test_rule_curves_in_batches_of_tasks_equal_all_tasks_at_once(monkeypatch):
  """A network too large for all tasks at once runs them in batches (lax.map): the same
  curves, compared in float64 (1e-12); 5 tasks in batches of 2. (The backprop agents:
  the batching is the same for any rule, and they compile in a fraction of the time.)"""
  with jax.enable_x64(True):
    base = presets.mnist_20x8(hidden=(6,), input_size=64)
    net = Network(base.input_size, base.layers, BackpropRule(0.5))
    episode = Episode(net, inner_steps=3, batch_size=4, eval_size=10)
    task = config_lib.build_task(config_lib.load("digits_20x8"))
    meta = net.init_meta(jax.random.PRNGKey(0))
    trainable = {"rule": meta.params, "init": ()}
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    whole = evaluation.rule_curves(episode, trainable, meta.stats, (), task, keys)
    per_task = 4 * 8 * sum(a.size for a in jax.tree_util.tree_leaves(net.init(keys[0], 4)))
    monkeypatch.setattr(evaluation, "TASKS_BYTES", 2.5 * per_task)
    assert evaluation.tasks_at_once(episode, 5) == 2
    batched = evaluation.rule_curves(episode, trainable, meta.stats, (), task, keys)
    for k in whole:
      np.testing.assert_allclose(batched[k], whole[k], rtol=1e-12, atol=1e-12)
    assert whole["loss"].dtype == np.float64 and float(np.ptp(whole["loss"])) > 0
