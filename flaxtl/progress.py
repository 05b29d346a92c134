"""Progress for long loops: a tqdm bar on a terminal or in a notebook, else a log line every ~30 s
(a minutes-long feature pass under nohup or CI must not look hung)."""
from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
  def __init__(self, total: int, desc: str, log_fn: Callable = print, every_s: float = 30.0,
               unit: str = "img"):
    self.total, self.desc, self.log_fn, self.every_s, self.unit = total, desc, log_fn, every_s, unit
    self.done, self.t0 = 0, time.perf_counter()
    self.last = self.t0
    self.bar = None
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
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
