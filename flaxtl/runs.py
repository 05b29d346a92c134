"""The sub-runs of the verbs that train many (the sweep's levels, cross-validation's folds).

Each sub-run is a normal run directory trained by `train.train_and_evaluate` (the test split left
alone) and summarised in one row. A marker file beside it holds the row with the config that made
it: an identical finished run is reused, one cut short is resumed, so a killed sweep or cv
continues where it stopped.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable


def finished(run_dir: Path, marker: str, ident: dict) -> dict | None:
  """The row of an identical finished run in `run_dir`, else None."""
  path = Path(run_dir) / marker
  if not path.exists():
    return None
  doc = json.loads(path.read_text())
  return doc["row"] if {k: doc.get(k) for k in ident} == ident else None


def identity(cfg, **extra) -> dict:
  """What makes two sub-runs the same (JSON-normalised, as the marker stores it)."""
  return json.loads(json.dumps({"config": cfg.to_dict(), **extra}, default=str))


def run(cfg, run_dir: Path, setup=None, *, marker: str, ident: dict | None = None,
        steps_for: Callable | None = None, log_fn: Callable = print, title: str = "") -> dict:
  """Trains `cfg` in `run_dir` (or reuses/resumes it) and returns its row.

  `setup`: a prepared Setup, a function cfg -> Setup (called only when training is needed), or
  None (`prepare.prepare`). `steps_for(setup, steps_per_epoch)` -> train steps (default: epochs).
  """
  from flaxtl import freezing, prepare, train, workdir
  from flaxtl.models.vgg import HEAD
  run_dir = Path(run_dir)
  ident = ident or identity(cfg)
  row = finished(run_dir, marker, ident)
  if row is not None:
    log_fn(f"{title or run_dir}: already done in {run_dir}: reusing its results")
    return row
  # Stopped partway (its checkpoints, or config.json, are there): continue it.
  resume = (run_dir / "config.json").exists() or workdir.has_checkpoints(run_dir)
  if callable(setup):
    setup = setup(cfg)
  setup = setup or prepare.prepare(cfg, run_dir, log_fn=log_fn)
  full = setup.feeders["train"].steps(cfg.batch_size)
  steps = steps_for(setup, full) if steps_for else max(1, math.ceil(cfg.epochs * full))
  with cfg.unlocked():
    cfg.train_steps = steps
  log_fn(f"\n=== {title}: {steps} steps ({steps / full:.2g} epochs) -> {run_dir}")
  counts = freezing.count(setup.params, setup.freeze)
  res = train.train_and_evaluate(cfg, run_dir, setup=setup, evaluate_test=False, log_fn=log_fn,
                                 resume=resume)
  head_only = setup.head_fit is not None and setup.freeze.trainable == (HEAD,)
  history = workdir.read_metrics(run_dir)
  probe = setup.probe or {}
  row = {"level": cfg.trainable, "seed": cfg.seed, "epochs": 0.0 if head_only else steps / full,
         "steps": 0 if head_only else steps, "workdir": str(run_dir),
         "trainable_params": counts[freezing.TRAINABLE], "frozen_params": counts[freezing.FROZEN],
         "boundary": setup.freeze.boundary, "cached": setup.cached,
         "val_accuracy": res["val_accuracy"], "val_macro_f1": res.get("val_macro_f1"),
         "select_by": cfg.select_best_by, "best_epoch": res["best_epoch"],
         "val_loss": res["val_loss"], "val_count": int(setup.feeders["valid"].n),
         "train_seconds": res["train_seconds"] or setup.timings.get("head_fit_s", 0.0),
         "images_per_s": statistics.median([r["images_per_s"] for r in history
                                            if "images_per_s" in r] or [0.0]),
         "prepare_seconds": setup.timings.get("prepare_s", 0.0),
         "wall_seconds": res["wall_seconds"],
         "probe_val_accuracy": probe.get("val_accuracy"),
         "probe_val_macro_f1": probe.get("val_macro_f1"), "probe_l2": probe.get("l2"),
         "probe_few_shot": probe.get("few_shot")}
  workdir.write_json(run_dir / marker, {**ident, "row": row})
  return row
