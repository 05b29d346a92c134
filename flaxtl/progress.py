"""Progress for long loops: a tqdm bar on a terminal or in a notebook, else a log line every ~30 s
(a minutes-long feature pass under nohup or CI must not look hung). A terminal that reports 0
columns (some CI pseudo-terminals, COLUMNS=0) gets the log lines: a bar there is an endless line of
carriage returns."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable


def terminal_columns() -> int | None:
  """stderr's terminal width (0 if it reports none, or COLUMNS=0), or None when not a terminal."""
  if os.environ.get("COLUMNS", "").strip() == "0":
    return 0
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns
  except (AttributeError, ValueError, OSError):
    return None


def use_bar() -> bool:
  if "ipykernel" in sys.modules:
    return True
  return bool(sys.stderr.isatty()) and terminal_columns() != 0


class Progress:
  def __init__(self, total: int, desc: str, log_fn: Callable = print, every_s: float = 30.0,
               unit: str = "img"):
    self.total, self.desc, self.log_fn, self.every_s, self.unit = total, desc, log_fn, every_s, unit
    self.done, self.t0 = 0, time.perf_counter()
    self.last = self.t0
    self.bar = None
    if use_bar():
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.perf_counter()
    if now - self.last >= self.every_s and self.done < self.total:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      self.log_fn(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
                  f"~{(self.total - self.done) / max(rate, 1e-9):.0f}s left)")

  def set_postfix(self, **kwargs) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**kwargs)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
