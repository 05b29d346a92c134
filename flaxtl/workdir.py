"""The run directory: its files, written atomically, and the one rule for which epoch is best.

<workdir>/ config.json run.json results.json metrics.jsonl tensorboard/ checkpoints/ split.json
Only process 0 writes; every write goes through a temp file + rename, so a kill never leaves half a
file for a resume or an evaluation to choke on.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from flaxtl.errors import FlaxtlError

METRICS = "metrics.jsonl"


class RunError(FlaxtlError, RuntimeError):
  """A run that cannot start or go on (bad workdir, non-finite loss, ...), with the reason."""


SELECT_BY = {"accuracy": "val_accuracy", "macro_f1": "val_macro_f1"}  # config.select_best_by
RANKED = ("val_accuracy", "val_loss", "val_macro_f1", "select_by")  # what a checkpoint keeps


def rank(metrics: dict) -> tuple[float, float]:
  """The best rule, for checkpoints, plots, early stopping, sweeps and cv alike: higher val
  accuracy (val macro-F1 when the record says select_by='macro_f1'), then lower val loss. Each
  record carries its run's rule, so every reader agrees without the config (older records: by
  accuracy)."""
  return (metrics[score_key(metrics)], -metrics["val_loss"])


def score_key(metrics: dict) -> str:
  """The record's key the rule ranks first: 'val_accuracy' or 'val_macro_f1'."""
  return SELECT_BY[metrics.get("select_by", "accuracy")]


def atomic_write(path: Path, text: str) -> Path:
  """Writes `text` via a temp file in the same folder + rename: readers never see half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_json(path: Path, doc) -> Path:
  return atomic_write(path, json.dumps(doc, indent=2, default=str))


def read_metrics(workdir: Path) -> list[dict]:
  """metrics.jsonl: one record per finished epoch ([] when there is none yet)."""
  path = Path(workdir) / METRICS
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_record(history: Sequence[dict]) -> dict | None:
  return max(history, key=rank) if history else None


def has_checkpoints(workdir: Path) -> bool:
  """True if `workdir`/checkpoints holds a finished step (orbax names them by the step number; a
  save cut short leaves only a `<step>.orbax-checkpoint-tmp...` folder)."""
  ckpt = Path(workdir) / "checkpoints"
  return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def check(workdir: Path, resume: bool) -> None:
  """Fail at start, not after an hour: the workdir must be writable and not hold another run."""
  if resume and not workdir.is_dir():
    raise RunError(f"--resume: {workdir} does not exist; drop --resume to start a new run there")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_bytes(b"\0" * (1 << 20))
    probe.unlink()
  except OSError as e:
    raise RunError(f"workdir {workdir} is not writable ({e.strerror or e})") from e
  has_run = has_checkpoints(workdir)
  if not resume and has_run:
    raise RunError(f"{workdir} already holds checkpoints of a run: pass --resume to continue it, "
                   "or choose another --workdir")
  # A run stopped before its first checkpoint (config.json is written when training starts) is
  # resumed from step 0; a folder that never held a run is refused.
  if resume and not has_run and not (workdir / "config.json").exists():
    raise RunError(f"--resume: {workdir} holds no run to resume (no checkpoint, no config.json); "
                   "drop --resume to start a new run there")
  free = shutil.disk_usage(workdir).free
  if free < 200 << 20:
    raise RunError(f"workdir {workdir}: only {free >> 20} MiB free on its disk")


class Recorder:
  """metrics.jsonl, TensorBoard events and the run's JSON files; only process 0 writes."""

  def __init__(self, workdir: Path, resume_epoch: int | None, active: bool = True):
    self.workdir, self.active = Path(workdir), active
    self.path = self.workdir / METRICS
    self.history = [r for r in read_metrics(self.workdir)
                    if resume_epoch is not None and r["epoch"] < resume_epoch]
    self._writer = None
    if self.active:
      self._rewrite()
      import tensorflow as tf
      self._writer = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))

  def _rewrite(self):
    atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.history))

  def epoch(self, record: dict) -> None:
    self.history.append(record)
    if not self.active:
      return
    self._rewrite()
    import tensorflow as tf
    with self._writer.as_default(step=record["epoch"] + 1):
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "epoch":
          tf.summary.scalar(k, v)
    self._writer.flush()

  def write_json(self, name: str, doc: dict) -> None:
    if self.active:
      write_json(self.workdir / name, doc)
