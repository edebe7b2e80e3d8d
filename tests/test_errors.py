"""Bad input is refused with errors that name the layer, the field and the shapes."""

import jax
import jax.numpy as jnp
import pytest

from mplp import Activation, Dense, L2, LearnedRule, Network, Softmax, presets


def _fresh(net, batch):
  return net.init_meta(jax.random.PRNGKey(0)), net.init(jax.random.PRNGKey(1), batch)


def test_input_width_mismatch():
  net = presets.sinusoid_5x10()
  meta, state = _fresh(net, 10)
  with pytest.raises(ValueError, match=r"input x has shape \(10, 3\) but layer 0 \(Dense\) takes \[batch, 1\]"):
    net.inner_step(meta, state, jnp.zeros((10, 3)), jnp.zeros((10, 1)))


def test_batch_mismatch():
  net = presets.sinusoid_5x10()
  meta, state = _fresh(net, 10)
  with pytest.raises(ValueError, match=r"batch 4 but the inner state was made for batch 10"):
    net.inner_step(meta, state, jnp.zeros((4, 1)), jnp.zeros((4, 1)))


def test_target_mismatch():
  net = presets.mnist_20x8()
  meta, state = _fresh(net, 8)
  with pytest.raises(ValueError, match=r"targets y have shape \(8, 3\) but the loss \(layer 4, CrossEntropy\) expects \[8, 10\]"):
    net.inner_step(meta, state, jnp.zeros((8, 144)), jnp.zeros((8, 3)))


def test_loss_not_last():
  with pytest.raises(ValueError, match=r"layer 1 \(L2\) is a loss but is not last"):
    Network(1, (Dense(1), L2(), Activation("relu")), LearnedRule())
  with pytest.raises(ValueError, match=r"the last layer must be a loss .* got Softmax at layer 1"):
    Network(1, (Dense(3), Softmax()), LearnedRule())


def test_unknown_activation():
  with pytest.raises(ValueError, match=r"unknown activation 'gelu'; allowed: \['identity', 'relu', 'sigmoid', 'step', 'tanh'\]"):
    Activation("gelu")


@pytest.mark.parametrize("m", [0, -2])
def test_message_size_below_one(m):
  with pytest.raises(ValueError, match=r"msg_size \(message size\) must be an int >= 1, got"):
    LearnedRule(msg_size=m)


def test_other_bad_fields():
  with pytest.raises(ValueError, match=r"family must be 'stateful' or 'stateless', got 'lstm'"):
    LearnedRule("lstm")
  with pytest.raises(ValueError, match=r"unknown agent kinds \['loss'\]; allowed"):
    LearnedRule(shared=("loss",))
  with pytest.raises(ValueError, match=r"Dense.units must be a positive int"):
    Dense(0)
  net = presets.sinusoid_5x10()
  with pytest.raises(ValueError, match=r"layer 0 \(Dense\) expects W \(1, 20\)"):
    net.init(jax.random.PRNGKey(0), 10, weights=[(jnp.zeros((2, 20)), jnp.zeros(20))] * 3)
