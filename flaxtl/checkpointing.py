"""Orbax checkpoints: keep the best state (by validation accuracy) and the latest one.

Saves are atomic (orbax writes to a temporary directory and renames it on commit), so a kill at
any moment leaves the last complete checkpoint usable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


def _rank(metrics: dict) -> tuple[float, float]:
  # Higher accuracy wins; on a tie, lower loss.
  return (metrics["val_accuracy"], -metrics["val_loss"])


def manager(workdir: Path, read_only: bool = False) -> ocp.CheckpointManager:
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=1),
      cm.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn only makes orbax write the metrics next to each step; the policy decides what is kept.
  # A kill mid-save leaves `<step>.orbax-checkpoint-tmp`: never read as a step, removed here.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_rank,
                                         read_only=read_only, create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the best validation metrics (None if no step has metrics)."""
  ranked = [(_rank(m), -step, step) for step in mngr.all_steps()
            if (m := mngr.metrics(step))]
  return max(ranked)[2] if ranked else None


def save(mngr: ocp.CheckpointManager, step: int, state: Any, metrics: dict | None = None,
         custom: dict | None = None) -> None:
  """`custom` (JSON) is committed atomically with the step: e.g. a mid-epoch run's metric sums."""
  mngr.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True,
            custom_metadata=custom)


def custom(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The `custom` dict saved with `step` ({} when none)."""
  return dict(mngr.metadata(step).custom_metadata or {})


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores `step` into the structure (and shardings) of `target`."""
  return mngr.restore(step, args=ocp.args.StandardRestore(target))
