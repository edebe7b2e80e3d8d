"""What did the rule learn? Its updates and messages against the true gradients.

Along the rule's own inner run on a task, at every inner step t (state theta_t, batch
(x_t, y_t), inner loss L = sum over outputs, mean over the batch):

* every Dense layer k (its W and b together):
    update_cos[k]   = cos(theta'_k - theta_k, -dL/dtheta_k)
    update_ratio[k] = |theta'_k - theta_k| / |dL/dtheta_k|   (an effective learning rate);
* every layer i but the loss, the message it received ([B, U, M], about its output h_i)
  against the true backprop signal s = d(per-example loss)/dh_i ([B, U]):
    message_r[i]   = |P s| / |s|, P the projection onto the span of the M message
                     channels (how much of the signal a linear readout of the message
                     recovers; 1 = the message carries the gradient, ~sqrt(M / (B U)) by
                     chance), and
    message_r_chance[i] = sqrt(min(M, B U) / (B U)), what message_r is for a message
                     unrelated to the signal (a readout of M channels fits M of B U values);
    message_cos[i] = the signed cosine of the single channel with the largest |cosine|.

The hand-written backprop agents (`mplp.backprop`) give 1.0 for update_cos, message_r
and message_cos at every step; a randomly initialized rule gives update_cos about 0.
Where the true gradient is 0 (below a step activation) the cosines are NaN.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from mplp.episode import scan_steps
from mplp.layers import Dense
from mplp.learned import MetaParams

METRICS = ("update_cos", "update_ratio", "message_r", "message_r_chance", "message_cos")


def layer_names(network) -> List[str]:
  """`"0 Dense(20)"`, `"1 relu"`, ... for every layer but the loss."""
  names = []
  for i, layer in enumerate(network.layers[:-1]):
    if isinstance(layer, Dense):
      names.append(f"{i} Dense({layer.units})")
    else:
      fn = getattr(layer, "fn", None)
      names.append(f"{i} {fn if isinstance(fn, str) else type(layer).__name__.lower()}")
  return names


def _cos(a, b):
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  return jnp.where((na > 0) & (nb > 0), jnp.vdot(a, b) / jnp.maximum(na * nb, 1e-30), jnp.nan)


def true_signals(network, state, x, y):
  """d(per-example inner loss)/d(output of every layer but the loss): tuple of [B, U]."""
  def loss_with(shifts):
    h = x
    for layer, s, d in zip(network.layers[:-1], state[:-1], shifts):
      h = layer.forward(s, h)[0] + d
    return network.layers[-1].value(h, y)
  zeros = tuple(jnp.zeros((x.shape[0], w), jnp.float32) for w in network.widths[1:])
  return tuple(g * x.shape[0] for g in jax.grad(loss_with)(zeros))


def _message_scores(msg, signal):
  """msg [B, U, M], signal [B, U] -> (message_r, message_cos)."""
  m = msg.reshape(-1, msg.shape[-1])
  s = signal.reshape(-1)
  coef = jnp.linalg.lstsq(m, s)[0]
  norm = jnp.linalg.norm(s)
  r = jnp.where(norm > 0, jnp.linalg.norm(m @ coef) / jnp.maximum(norm, 1e-30), jnp.nan)
  cos = jax.vmap(lambda c: _cos(c, s), in_axes=1)(m)
  best = jnp.nanargmax(jnp.where(jnp.isnan(cos), -1.0, jnp.abs(cos)))
  return r, cos[best]


def step_alignment(network, meta, state, x, y):
  """One inner step and its alignment: (new state, {metric: [layers]}) (NaN where a
  metric does not apply, e.g. update_cos of an activation layer)."""
  new, _, _, received = network.step_traced(meta, state, x, y)
  weights = network.weights(state)
  grads = jax.grad(lambda w: network.loss(network.with_weights(state, w), x, y))(weights)
  signals = true_signals(network, state, x, y)
  n = len(network.layers) - 1
  out = {k: [jnp.float32(jnp.nan)] * n for k in METRICS}
  for k, i in enumerate(network.dense_layers):
    delta = jnp.concatenate([jnp.ravel(a - b) for a, b in zip(network.weights(new)[k], weights[k])])
    g = jnp.concatenate([jnp.ravel(a) for a in grads[k]])
    out["update_cos"][i] = _cos(delta, -g)
    out["update_ratio"][i] = jnp.linalg.norm(delta) / jnp.linalg.norm(g)
  for i in range(n):
    out["message_r"][i], out["message_cos"][i] = _message_scores(received[i], signals[i])
    samples = signals[i].size
    out["message_r_chance"][i] = jnp.float32(np.sqrt(min(received[i].shape[-1], samples) / samples))
  return new, {k: jnp.stack(v) for k, v in out.items()}


def alignment(episode, trainable, stats, task, keys) -> Dict[str, jax.Array]:
  """The rule's alignment along its inner runs (an `mplp.episode.Episode`) on the tasks of
  `keys` [N, 2] (each task starts as in `mplp.evaluation`): {metric: [N, T, layers]}."""
  net = episode.network
  meta = MetaParams(trainable["rule"], stats)

  def one(key):
    sample, state = episode.start(trainable, (), key, task)
    step = lambda s, x, y: step_alignment(net, meta, s, x, y)
    return scan_steps(step, state, sample.xs, sample.ys)[1]

  return jax.lax.map(one, keys)


def _nan_to_none(a) -> list:
  return [None if np.isnan(v) else float(v) for v in a]


def layer_summary(curves, names) -> Dict[str, Dict[str, Dict[str, list]]]:
  """{layer: {metric: {"mean": [T], "sd": [T]}}} over tasks (NaN-aware; None where every
  task is NaN; metrics that do not apply to a layer are left out)."""
  out = {}
  for j, name in enumerate(names):
    per = {}
    for metric, values in curves.items():
      v = np.asarray(values)[:, :, j]
      if np.all(np.isnan(v)):
        continue
      with warnings.catch_warnings():  # a step where every task is NaN stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, sd = np.nanmean(v, 0), np.nanstd(v, 0)
      per[metric] = {"mean": _nan_to_none(mean), "sd": _nan_to_none(sd)}
    out[name] = per
  return out
