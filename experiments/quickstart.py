"""Quickstart: build the sinusoid 5x10 network, measure its statistics, unroll it.

    python experiments/quickstart.py [--seed S] [--published PATH.npy]

Runs on the embedded default (a sampled sinusoid task, no downloads): an untrained
learned rule (statistics from minibatch init) and the backprop-as-agents rule (plain
SGD) each learn one task for 5 inner steps; prints the held-out loss after each step.
With `--published`, the authors' sinusoid weights are used instead of the untrained rule.
"""

import argparse

import jax
import jax.numpy as jnp

import mplp


def sinusoid_task(key, steps, batch):
  """y = A sin(x + p): T batches of (x, y) and 100 evaluation points on linspace(-5, 5)."""
  ka, kp, kx = jax.random.split(key, 3)
  amp = jax.random.uniform(ka, (), minval=0.1, maxval=0.5)
  phase = jax.random.uniform(kp, (), maxval=jnp.pi)
  xs = jax.random.uniform(kx, (steps, batch, 1), minval=-5.0, maxval=5.0)
  x_eval = jnp.linspace(-5.0, 5.0, 100)[:, None]
  f = lambda x: amp * jnp.sin(x + phase)
  return xs, f(xs), x_eval, f(x_eval)


def held_out_curve(net, meta, state, xs, ys, x_eval, y_eval):
  """Loss on the evaluation points before and after each inner step: [T + 1]."""
  def body(s, batch):
    s, _ = net.inner_step(meta, s, *batch)
    return s, net.loss(s, x_eval, y_eval)
  _, losses = jax.lax.scan(body, state, (xs, ys))
  return jnp.concatenate([net.loss(state, x_eval, y_eval)[None], losses])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--published", help="the authors' sinusoid_weights_*.npy")
  a = p.parse_args()
  k_task, k_net, k_meta, k_stats = jax.random.split(jax.random.PRNGKey(a.seed), 4)
  steps, batch = 5, 10
  xs, ys, x_eval, y_eval = sinusoid_task(k_task, steps, batch)

  if a.published:
    net, meta = mplp.reference.load_published(a.published, "sinusoid_5x10")
    label = "published MPLP rule"
  else:
    net = mplp.presets.sinusoid_5x10()
    meta = net.init_meta(k_meta)
    s_xs, s_ys, _, _ = sinusoid_task(k_stats, steps, batch)
    meta = mplp.minibatch_init.measure(net, meta, net.init(k_net, batch), s_xs, s_ys)
    label = "untrained MPLP rule"
  state = net.init(k_net, batch)
  mplp_curve = mplp.compiling.jit(held_out_curve, static_argnums=0)(net, meta, state, xs, ys, x_eval, y_eval)

  sgd = mplp.Network(1, net.layers, mplp.BackpropRule(0.3))
  sgd_state = sgd.init(k_net, batch, weights=net.weights(state))  # same initial weights
  sgd_curve = mplp.compiling.jit(held_out_curve, static_argnums=0)(
      sgd, sgd.init_meta(k_meta), sgd_state, xs, ys, x_eval, y_eval)

  print("held-out L2 loss on 100 points after each inner step (step 0 = before learning)")
  print(f"{'step':>4}  {label:>22}  {'SGD(0.3) as agents':>20}")
  for t in range(steps + 1):
    print(f"{t:4d}  {float(mplp_curve[t]):22.5f}  {float(sgd_curve[t]):20.5f}")


if __name__ == "__main__":
  main()
