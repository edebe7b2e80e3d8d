"""The stateful agent cell as one fused CPU kernel (`cell_kernel.cc`, an XLA FFI call).

XLA's CPU backend runs the cell of `mplp.agents` as dozens of kernels per call, each
streaming the agents' [N, 80] and [N, 40] intermediates through memory; this kernel runs
the whole cell on tiles of 64 agents whose intermediates stay in cache, forward and backward
(the backward recomputes the tile's forward), on every core. Same equations, float32;
its tanh is the rational approximation XLA's CPU backend uses, so results differ from
the XLA path in the last bits only (summation order).

The kernel is compiled on first use with the machine's C++ compiler (`g++ -O3
-march=native`, a few seconds) into a cache directory (`MPLP_KERNEL_CACHE`, default
`~/.cache/mplp/kernels`) keyed by the source, jaxlib's version and the CPU, then loaded
and registered with `jax.ffi`. Where it cannot be built (no compiler) or does not apply
(not float32, not the CPU backend), or with `MPLP_CELL_KERNEL=0`, `mplp.agents` runs the
cell with XLA as before; `available()` says which (and why not, once, as a warning).

Shapes: x [G, n, X] (the agents' concatenated input parts), c [G, n, C] (the carry),
params [Gp, P] (Gp = 1, shared by the G groups, or G): `mplp.cell_params.CellParams.flat`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cell_kernel.cc")
_TARGETS = {"forward": "mplp_cell_forward", "backward": "mplp_cell_backward"}
_STATE = {"lib": None, "error": None, "warned": False}


def _cpu_id() -> str:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  keys = ("model name", "flags")
  return "\n".join(sorted({l for l in text.splitlines() if l.split(":")[0].strip() in keys}))


def _build() -> Path:
  """Compiles the kernel (once per source, jaxlib and CPU) and returns the library's path."""
  include = jax.ffi.include_dir()
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
  import jaxlib
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, include, compiler,
                                  " ".join(flags), _cpu_id()]).encode()).hexdigest()[:16]
  cache = Path(os.environ.get("MPLP_KERNEL_CACHE", Path.home() / ".cache" / "mplp" / "kernels"))
  lib = cache / f"cell_kernel-{key}.so"
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, moved in whole
    out = Path(tmp) / lib.name
    run = subprocess.run([compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(out)],
                         capture_output=True, text=True)
    if run.returncode != 0:
      raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{run.stderr[-2000:]}")
    os.replace(out, lib)
  return lib


def available() -> bool:
  """Whether the fused kernel is built and registered (builds it on the first call)."""
  switch = os.environ.get("MPLP_CELL_KERNEL", "1")
  if switch not in ("0", "1"):
    raise ValueError(f"MPLP_CELL_KERNEL must be '0' (the cell runs in XLA) or '1' (the fused "
                     f"kernel, the default), got {switch!r}")
  if switch == "0":
    return False
  if _STATE["lib"] is None and _STATE["error"] is None:
    try:
      lib = ctypes.cdll.LoadLibrary(str(_build()))
      for name, target in (("MplpCellForward", _TARGETS["forward"]),
                           ("MplpCellBackward", _TARGETS["backward"])):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
      _STATE["lib"] = lib
    except Exception as e:  # no compiler, a failed build: the XLA path runs instead
      _STATE["error"] = e
  if _STATE["error"] is not None and not _STATE["warned"]:
    _STATE["warned"] = True
    warnings.warn(f"mplp: the fused agent-cell kernel is unavailable, the cell runs in XLA "
                  f"(slower): {_STATE['error']}", RuntimeWarning, stacklevel=2)
  return _STATE["lib"] is not None


_OFF = contextvars.ContextVar("mplp_cell_kernel_off", default=False)


@contextlib.contextmanager
def disabled():
  """Within it, programs being traced run the cell in XLA. For programs that XLA
  partitions over several devices (a `MetaTrainer` mesh): XLA's partitioner cannot split
  the kernel's call, so it would gather the operands and run every device's share on
  every device (the sinusoid meta-step over 2 and 4 forced CPU devices took 195 and 326
  ms with the kernel, 97 ms on one)."""
  token = _OFF.set(True)
  try:
    yield
  finally:
    _OFF.reset(token)


def applies(dtype) -> bool:
  """Whether `cell` is used for a computation in `dtype` on the default backend."""
  return (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"
          and not _OFF.get() and available())


def _fold(args, batched, axis_size):
  """Moves a vmapped axis into the groups: [B, G, ...] -> [B * G, ...] (unbatched arrays
  broadcast first)."""
  out = []
  for a, b in zip(args, batched):
    a = a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
    out.append(a.reshape((-1,) + a.shape[2:]))
  return out


def _fold_params(p, batched, axis_size, groups):
  """Params [Gp, P] under vmap: shared ones stay [1, P]; others become [B * G, P]."""
  if not batched and p.shape[0] == 1:
    return p
  p = p if batched else jnp.broadcast_to(p, (axis_size,) + p.shape)
  return jnp.broadcast_to(p, (axis_size, groups) + p.shape[2:]).reshape(axis_size * groups, -1)


@functools.lru_cache(maxsize=None)
def _calls(h1: int, h2: int):
  """The forward and backward FFI calls for hidden sizes (h1, h2), with vmap rules."""
  if not available():
    raise RuntimeError(f"mplp's cell kernel is unavailable: {_STATE['error'] or 'MPLP_CELL_KERNEL=0'}")
  attrs = dict(h1=np.int64(h1), h2=np.int64(h2))

  @jax.custom_batching.custom_vmap
  def forward(x, c, p):
    return jax.ffi.ffi_call(_TARGETS["forward"], jax.ShapeDtypeStruct(c.shape, c.dtype))(x, c, p, **attrs)

  @forward.def_vmap
  def _(axis_size, in_batched, x, c, p):
    groups = x.shape[1] if in_batched[0] else x.shape[0]
    p = _fold_params(p, in_batched[2], axis_size, groups)
    x, c = _fold((x, c), in_batched[:2], axis_size)
    return forward(x, c, p).reshape((axis_size, -1) + c.shape[1:]), True

  @jax.custom_batching.custom_vmap
  def backward(x, c, p, d_new):
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(c.shape, c.dtype),
              jax.ShapeDtypeStruct((x.shape[0], p.shape[1]), p.dtype))
    return jax.ffi.ffi_call(_TARGETS["backward"], shapes)(x, c, p, d_new, **attrs)

  @backward.def_vmap
  def _(axis_size, in_batched, x, c, p, d_new):
    groups = x.shape[1] if in_batched[0] else x.shape[0]
    p = _fold_params(p, in_batched[2], axis_size, groups)
    x, c, d_new = _fold((x, c, d_new), (in_batched[0], in_batched[1], in_batched[3]), axis_size)
    d_x, d_c, d_p = backward(x, c, p, d_new)
    unfold = lambda a: a.reshape((axis_size, -1) + a.shape[1:])
    return (unfold(d_x), unfold(d_c), unfold(d_p)), (True, True, True)

  return forward, backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def cell(p, x, c, h1: int, h2: int):
  """The new carry [G, n, C] of the cell on x [G, n, X], c [G, n, C] with params p [Gp, P]."""
  return _calls(h1, h2)[0](x, c, p)


def _cell_fwd(p, x, c, h1, h2):
  return cell(p, x, c, h1, h2), (p, x, c)


def _cell_bwd(h1, h2, res, d_new):
  p, x, c = res
  d_x, d_c, d_p = _calls(h1, h2)[1](x, c, p, d_new)
  if p.shape[0] == 1:
    d_p = jnp.sum(d_p, 0, keepdims=True)
  return d_p, d_x, d_c


cell.defvjp(_cell_fwd, _cell_bwd)
