"""Meta-gradient estimators against backprop through the unroll (the oracle).

The small meta-problem: plain MAML (learned initialization + the backprop agents' SGD)
of a 1-8-1 relu network on sinusoids, 4 inner steps: 25 meta-parameters, so a few
hundred antithetic pairs pin the gradient down.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mplp.host import config as config_lib
from mplp.backprop import BackpropRule
from mplp.episode import Episode
from mplp.estimators import ES, Backprop
from mplp.layers import Activation, Dense
from mplp.losses import L2
from mplp.meta_train import MetaTrainer, OuterLoss
from mplp.network import Network
from mplp.tasks import Sinusoid

TASK = Sinusoid()
FLAT = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])
COS = lambda a, b: float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _maml(estimator, objective=OuterLoss()):
  net = Network(1, (Dense(8), Activation("relu"), Dense(1), L2()), BackpropRule(0.1))
  episode = Episode(net, inner_steps=4, batch_size=10, eval_size=50, learn_init=True, pool_size=0)
  return MetaTrainer(episode, optax.sgd(0.0), estimator, objective, outer_batch=4)


_JITTED = {}


def _estimate(trainer, state, key, carry=None):
  """trainer.meta_gradient at state's parameters (one compilation per trainer)."""
  if trainer not in _JITTED:
    _JITTED[trainer] = jax.jit(lambda s, k, c: trainer.meta_gradient(s.trainable, s.stats, s.pool, k, TASK, c))
  return _JITTED[trainer](state, key, state.unrolls if carry is None else carry)


def test_es_estimate_aligns_with_the_backprop_meta_gradient():
  """256 antithetic pairs, sigma 1e-3, seed 0: cosine > 0.9 (and the loss agrees)."""
  backprop = _maml(Backprop())
  es = _maml(ES(sigma=1e-3, pairs=256))
  state = backprop.init(jax.random.PRNGKey(0), TASK)
  key = jax.random.PRNGKey(1)
  loss_bp, _, g_bp, _ = _estimate(backprop, state, key)
  loss_es, metrics, g_es, _ = _estimate(es, state, key)
  np.testing.assert_allclose(loss_es, loss_bp, rtol=1e-4)
  cos = COS(FLAT(g_es), FLAT(g_bp))
  assert cos > 0.9, cos
  assert float(jnp.linalg.norm(FLAT(g_es)) / jnp.linalg.norm(FLAT(g_bp))) == pytest.approx(1.0, abs=0.5)
  # and the estimate is not the gradient by construction: 8 pairs give a poor direction
  _, _, g_few, _ = _estimate(_maml(ES(sigma=1e-3, pairs=8)), state, key)
  assert COS(FLAT(g_few), FLAT(g_bp)) < 0.8


def test_es_is_unbiased_along_the_gradient_of_a_learned_rule():
  """The stateless MAML-experiment rule (on a 1-8-1 network) has ~10^4 meta-parameters (ES cannot pin its gradient down
  with a test-sized population), but along the true gradient g the estimate's projection
  has mean |g| and sd |g| sqrt(2 / pairs): 256 pairs put it within 4 sd (35%) of |g|."""
  cfg = config_lib.load("maml_sinusoid_2x10", ["meta.outer_batch=2", "meta.pool_size=4", "task.inner_steps=2",
                                               "network.hidden=[8]", "meta.learn_init=false"])
  net = config_lib.build_network(cfg, TASK)
  base = config_lib.build_trainer(cfg, net)
  state = jax.jit(lambda k: base.init(k, TASK))(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(3)
  _, _, g_bp, _ = _estimate(base, state, key)
  pairs = 256
  es = dataclasses.replace(base, estimator=ES(sigma=1e-3, pairs=pairs))
  _, _, g_es, _ = _estimate(es, state, key)
  g, e = FLAT(g_bp), FLAT(g_es)
  norm = float(jnp.linalg.norm(g))
  along = float(jnp.dot(e, g)) / norm
  assert abs(along - norm) < 4 * norm * np.sqrt(2 / pairs), (along, norm)


def _pes_run(trainer, state, key):
  """Sum of PES estimates over the windows of one run (frozen meta-parameters)."""
  carry, total = state.unrolls, None
  for w in range(trainer.episode.inner_steps // trainer.estimator.truncation):
    _, _, g, carry = _estimate(trainer, state, jax.random.fold_in(key, w) if w else key, carry)
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
  return FLAT(total)


def test_pes_over_truncations_agrees_with_full_unroll_es_in_expectation():
  """Hint loss only, so the windows' losses sum to (T / K) x the whole unroll's. Over 24
  seeds (each: the same tasks for both), the mean PES estimate (sum over 4 windows of 1
  step, / 4) equals the mean full-unroll ES estimate within 4.5 standard errors of their
  difference on every meta-parameter; truncated backprop, which cuts the windows apart,
  is biased and fails the same check."""
  loss = OuterLoss(hint=1.0, heldout=0.0)
  es = _maml(ES(sigma=1e-3, pairs=16), loss)
  pes = _maml(ES(sigma=1e-3, pairs=16, truncation=1), loss)
  tbptt = _maml(Backprop(truncation=1), loss)
  full = _maml(Backprop(), loss)
  state = es.init(jax.random.PRNGKey(0), TASK)
  pes_state = pes.init(jax.random.PRNGKey(0), TASK)
  tb_state = tbptt.init(jax.random.PRNGKey(0), TASK)
  n = pes.episode.inner_steps // pes.estimator.truncation
  diffs, tb_diffs, es_all = [], [], []
  for s in range(24):
    key = jax.random.PRNGKey(100 + s)
    g_es = FLAT(_estimate(es, state, key)[2])
    diffs.append(_pes_run(pes, pes_state, key) / n - g_es)
    tb_diffs.append(_pes_run(tbptt, tb_state, key) / n - g_es)
    es_all.append(g_es)
  diffs, tb_diffs = np.stack(diffs), np.stack(tb_diffs)
  z = lambda d: np.abs(d.mean(0)) / (d.std(0, ddof=1) / np.sqrt(len(d)))
  assert z(diffs).max() < 4.5, z(diffs)
  assert z(tb_diffs).max() > 4.5, z(tb_diffs)
  # both unbiased estimates of the same gradient: their mean is close to the true one
  g_true = np.mean([FLAT(_estimate(full, state, jax.random.PRNGKey(100 + s))[2]) for s in range(24)], 0)
  assert COS(jnp.asarray(np.mean(es_all, 0)), jnp.asarray(g_true)) > 0.9


def test_es_meta_step_trains_and_resumes_through_the_trainer():
  """`meta.estimator = pes` through the real config and step: the PES carry lives in the
  TrainState; a non-finite step restarts its runs."""
  cfg = config_lib.load("maml_baseline_2x10", ["meta.estimator=pes", "meta.truncation=1",
                                              "meta.es_pairs=4", "meta.outer_batch=2"])
  net = config_lib.build_network(cfg, TASK)
  trainer = config_lib.build_trainer(cfg, net)
  assert isinstance(trainer.estimator, ES)
  state = trainer.init(jax.random.PRNGKey(0), TASK)
  step = jax.jit(lambda s: trainer.step(s, TASK))
  before = FLAT(state.trainable)
  for i in range(3):
    state, m = step(state)
    np.testing.assert_array_equal(state.unrolls.pos.t, (i + 1) % 2)
  assert bool(m["finite"]) and float(jnp.abs(FLAT(state.trainable) - before).max()) > 0
  runs = state.unrolls  # mid-run (t = 1): poison the + runs' inner state
  poisoned = runs.pos._replace(state=jax.tree_util.tree_map(lambda a: a * jnp.nan, runs.pos.state))
  bad = state._replace(unrolls=runs._replace(pos=poisoned))
  bad, m = step(bad)
  assert not bool(m["finite"])
  np.testing.assert_array_equal(bad.unrolls.pos.t, 0)
  np.testing.assert_array_equal(bad.unrolls.neg.t, 0)


@pytest.mark.parametrize("overrides, message", [
    (["meta.estimator=pes"], "meta.truncation: meta.estimator = 'pes' needs a window"),
    (["meta.estimator=es", "meta.truncation=1"], "meta.estimator: 'es' uses whole unrolls"),
    (["meta.estimator=adjoint"], "allowed: ['backprop', 'truncated', 'es', 'pes']"),
    (["meta.es_sigma=0"], "meta.es_sigma: 0.0 is out of range; must be > 0.0"),
])
def test_bad_estimator_settings_are_refused(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
    config_lib.load("maml_baseline_2x10", overrides)
