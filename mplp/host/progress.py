"""Progress on the terminal: tqdm bars on stderr, shown only when stderr is a terminal.

Output redirected to a file or a CI log gets no bar (no carriage returns); `--no-progress`
turns it off on a terminal too. `Phases` names the phase of a long command (which
optimizer is tuned over how many tasks, which method runs) as the bar's description.
"""

from __future__ import annotations

import sys


def shown(requested: bool = True) -> bool:
  """Whether a bar is drawn: requested and stderr is a terminal."""
  return bool(requested) and sys.stderr.isatty()


def bar(total: int, desc: str, requested: bool = True, **kwargs):
  """A tqdm bar on stderr (disabled, and silent, where `shown` is False)."""
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, file=sys.stderr, disable=not shown(requested),
              dynamic_ncols=True, **kwargs)


class Phases:
  """A bar over `total` phases: `start(what)` ends the current phase and names the next."""

  def __init__(self, total: int, desc: str, requested: bool = True):
    self._bar = bar(total, desc, requested, unit="phase",
                    bar_format="{desc} [{n_fmt}/{total_fmt} phases, {elapsed}]")
    self._desc, self._started = desc, False

  def start(self, what: str):
    if self._started:
      self._bar.update(1)
    self._started = True
    self._bar.set_description_str(f"{self._desc}: {what}")

  def close(self):
    if self._started:
      self._bar.update(1)
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._bar.close()
