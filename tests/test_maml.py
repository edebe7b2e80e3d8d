"""Plain MAML (learned initialization + the backprop agents' SGD) against a hand-written
second-order MAML loss with jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np

from mplp.host import config as config_lib
from mplp.tasks import jit_with_task


def test_maml_outer_loss_and_meta_gradient_equal_hand_written_maml():
  cfg = config_lib.load("maml_baseline_2x10", ["meta.outer_batch=3"])
  task = config_lib.build_task(cfg)
  net = config_lib.build_network(cfg, task)
  trainer = config_lib.build_trainer(cfg, net)
  state = jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0))
  key = jax.random.fold_in(state.rng, state.step)
  lr, w = cfg.network.inner_lr, trainer.objective

  def ours(init):
    trainable = {**state.trainable, "init": init}
    return trainer.outer_loss(trainable, state.stats, state.pool, key, task)[0]

  def maml(init):
    def one(k):
      sample, state0 = trainer.episode.start({"init": init}, (), k, task)
      loss = lambda p, x, y: net.loss(net.with_weights(state0, p), x, y)
      params, hints = init, []
      for x, y in zip(sample.xs, sample.ys):
        grads = jax.grad(loss)(params, x, y)
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        hints.append(loss(params, x, y))
      return w.hint * jnp.mean(jnp.stack(hints)) + w.heldout * loss(params, sample.x_eval, sample.y_eval)
    return jnp.mean(jnp.stack([one(k) for k in jax.random.split(key, 3)]))

  init = state.trainable["init"]
  loss_a, grad_a = jax.jit(jax.value_and_grad(ours))(init)
  loss_b, grad_b = jax.jit(jax.value_and_grad(maml))(init)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad_a, grad_b)
  assert float(jnp.abs(grad_a[0][0]).max()) > 1e-4
  assert state.trainable["rule"] == {}  # nothing but the initialization is meta-trained


def test_backprop_rule_without_learned_init_is_refused():
  import pytest
  with pytest.raises(config_lib.ConfigError, match="network.rule: 'backprop' has nothing to meta-train"):
    config_lib.load("maml_baseline_2x10", ["meta.learn_init=false"])
