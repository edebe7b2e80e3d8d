"""How mplp compiles: `jit`, which is `jax.jit` with mplp's XLA options.

Every program mplp compiles (the meta-step, its initialization, evaluation curves, the
CLI's fits, the benchmarks) goes through `jit`, so the options below apply to them and
to nothing else in the process (they are per-compilation options, not `XLA_FLAGS`).
Jit your own functions with `mplp.compiling.jit` to get the same programs.

`COMPILER_OPTIONS`:
* `xla_cpu_experimental_ynn_fusion_type = ""`: XLA's CPU backend hands matrix products to
  YNNPACK by default; without it they run in XLA's own (Eigen) kernels. Measured on this
  project's 2-core Xeon (bench.py medians, the agents' cell of `mplp.agents`): MNIST
  meta-step 1.00 -> 0.89 s, sinusoid meta-step 136 -> 124 ms, MNIST inner step 13.4 ->
  12.1 ms, sinusoid inner step 2.5 -> 2.1 ms. YNNPACK's products also slow each other
  down when XLA runs two at once (two independent [57,600, 80] x [80, 40] products took
  6.5-7 ms each side by side, 1.5 ms alone). It is an XLA CPU option; mplp has not been
  measured on other platforms with it.

`RUN_ONCE_OPTIONS`, added by `jit(..., once=True)`, for a program that runs once (the
trainer's initialization, which measures the statistics over an unroll of inner steps):
`xla_backend_optimization_level = 0` compiles it in a third to two thirds of the time,
for a run that stays short. Measured on this kind's 2-core EPYC: the sinusoid_5x10
trainer's init compiled in 10.3 -> 6.4 s and ran in 0.04 -> 0.06 s; mnist_20x8's in
11.7 -> 3.8 s and 0.26 -> 0.29 s (its statistics differ in the last bits: float32 sums
in another order). The meta-step keeps the full optimization: at level 1 the MNIST inner
step took 13.4 ms instead of 11.3 ms.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax

COMPILER_OPTIONS: Dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
RUN_ONCE_OPTIONS: Dict[str, Any] = {"xla_backend_optimization_level": 0}


def jit(fn: Callable, *, once: bool = False, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)` compiled with `COMPILER_OPTIONS`, and `RUN_ONCE_OPTIONS` if
  `once` (a program called once: compile time over run time); a `compiler_options`
  argument is merged over them."""
  options = {**COMPILER_OPTIONS, **(RUN_ONCE_OPTIONS if once else {}),
             **kwargs.pop("compiler_options", {})}
  return jax.jit(fn, compiler_options=options, **kwargs)
