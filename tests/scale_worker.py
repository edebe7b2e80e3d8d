"""One meta-step of a small sinusoid job, run in its own process so that the device count
(XLA_FLAGS) and jax.distributed can be set up before jax starts. Writes the outer loss,
the meta-gradient and the meta-step's metrics to an .npz (process 0 only).

    python tests/scale_worker.py OUT.npz DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID] [--set KEY=VALUE ...]
"""

import sys

import jax
import numpy as np

from mplp import config as config_lib, distributed
from mplp.tasks import jit_with_task


def main():
  args = sys.argv[1:]
  overrides = args[args.index("--set") + 1:] if "--set" in args else []
  args = args[:len(args) - len(overrides) - bool(overrides)]
  out, devices = args[0], int(args[1])
  if len(args) > 2:
    distributed.initialize(args[2], int(args[3]), int(args[4]))
  cfg = config_lib.load("maml_sinusoid_2x10", ["meta.outer_batch=4", f"run.devices={devices}",
                                               "meta.learning_rate=1e-3", *overrides])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  assert (trainer.mesh.size if trainer.mesh is not None else 1) == max(devices, 1), trainer.mesh
  state = distributed.replicate(distributed.to_host(jit_with_task(trainer.init, task)(jax.random.PRNGKey(0))),
                                trainer.mesh)

  def loss_and_grad(state, task):
    key = jax.random.fold_in(state.rng, state.step)
    loss, _, grads, _ = trainer.estimator.estimate(trainer, state.trainable, state.stats, state.pool,
                                                   key, task, state.unrolls)
    return loss, grads

  loss, grads = jit_with_task(loss_and_grad, task)(state)
  new, metrics = jit_with_task(trainer.step, task)(state)
  grads, metrics = distributed.to_host((grads, metrics))
  if distributed.is_writer():
    np.savez(out, loss=distributed.to_host(loss), heldout=metrics["heldout"], step=np.asarray(new.step),
             **{f"grad_{i}": a for i, a in enumerate(jax.tree_util.tree_leaves(grads))})


if __name__ == "__main__":
  main()
