"""The meta-gradient estimates of a small sinusoid job, run in its own process so that the
device count (XLA_FLAGS), float64 (JAX_ENABLE_X64) and jax.distributed can be set up before
jax starts. Writes, for backprop and for antithetic ES, the outer loss, the meta-step's
metrics and the meta-gradient to an .npz (process 0 only; keys `{estimator}_{name}`).

    python tests/scale_worker.py OUT.npz DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID] [--reference]

`--reference` adds the 1-device references, computed on this process' first device alone
(`one_*`, the same estimates without a mesh), and `wrong_*`: the backprop estimate over
DEVICES of a trainer that sums the outer loss over the tasks instead of averaging it (what
a missing mean over devices looks like), so the test can show that its comparison catches
a wrong reduction.
"""

import dataclasses
import sys

import jax
import numpy as np

from mplp import cell_params, distributed
from mplp.host import config as config_lib
from mplp.estimators import ES, Backprop
from mplp.meta_train import MetaTrainer
from mplp.tasks import jit_with_task

ES_PAIRS = 3


@dataclasses.dataclass(frozen=True)
class SumOverTasks(MetaTrainer):
  """A deliberately wrong outer loss: the sum over the outer batch, not the mean."""

  def outer_loss(self, *args, **kwargs):
    loss, aux = super().outer_loss(*args, **kwargs)
    return loss * self.outer_batch, aux


def main():
  args = sys.argv[1:]
  reference = "--reference" in args
  args = [a for a in args if a != "--reference"]
  out, devices = args[0], int(args[1])
  if len(args) > 2:
    distributed.initialize(args[2], int(args[3]), int(args[4]))
  cfg = config_lib.load("maml_sinusoid_2x10", ["meta.outer_batch=4", f"run.devices={devices}",
                                               "network.hidden=[8]"])
  task = config_lib.build_task(cfg)
  trainer = config_lib.build_trainer(cfg, config_lib.build_network(cfg, task))
  assert (trainer.mesh.size if trainer.mesh is not None else 1) == max(devices, 1), trainer.mesh
  state = distributed.replicate(distributed.to_host(jit_with_task(trainer.init, task, once=True)(jax.random.PRNGKey(0))),
                                trainer.mesh)
  trainers = {"backprop": dataclasses.replace(trainer, estimator=Backprop()),
              "es": dataclasses.replace(trainer, estimator=ES(sigma=0.01, pairs=ES_PAIRS))}
  if reference:
    fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(MetaTrainer)}
    trainers["wrong"] = SumOverTasks(**fields)
    for name in ("backprop", "es"):
      trainers[f"one_{name}"] = dataclasses.replace(trainers[name], mesh=None)

  def estimates(state, task):  # every estimator in one program: one compile
    key = jax.random.fold_in(state.rng, state.step)
    out = {}
    for name, t in trainers.items():
      loss, metrics, grads, _ = t.meta_gradient(state.trainable, state.stats, state.pool, key, task,
                                                state.unrolls)
      out[name] = {"loss": loss, **metrics,
                   **{f"grad_{i}": g for i, g in  # each of a stateful cell's 17 tensors apart
                      enumerate(jax.tree_util.tree_leaves(cell_params.unpack_all(grads)))}}
    return out

  result = distributed.to_host(jit_with_task(estimates, task)(state))
  if distributed.is_writer():
    np.savez(out, dtype=str(result["backprop"]["loss"].dtype),
             **{f"{name}_{k}": v for name, r in result.items() for k, v in r.items()})


if __name__ == "__main__":
  main()
