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
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax

COMPILER_OPTIONS: Dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)` compiled with `COMPILER_OPTIONS` (a `compiler_options`
  argument is merged over them)."""
  options = {**COMPILER_OPTIONS, **kwargs.pop("compiler_options", {})}
  return jax.jit(fn, compiler_options=options, **kwargs)
