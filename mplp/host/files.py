"""Atomic text writes: a file is either its old content or its new one, never a part.

The text goes to `NAME.tmp` beside the file, then `os.replace` puts it in place (atomic
on POSIX within a file system). A failed write (a full disk, a kill's exception) removes
the temporary file and leaves the original untouched.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path, text: str) -> None:
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
