"""Test-session set-up: one persistent XLA compilation cache for the whole session.

Many tests (and the `mplp` processes some of them start) compile the same programs: the
same meta-step of a small config, the same evaluation curves. A cache in a fresh
directory of this session (inherited by subprocesses through the environment) compiles
each once; a cached executable is the same compiled code, so no number changes. Set
JAX_COMPILATION_CACHE_DIR yourself to keep one across sessions.
"""

import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="mplp-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
  _CACHE = None


def pytest_unconfigure(config):
  if _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)
