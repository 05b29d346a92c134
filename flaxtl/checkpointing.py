"""Orbax checkpoints: keep the best state (by validation accuracy) and the latest one.

Saves are atomic (orbax writes to a temporary directory and renames it on commit), so a kill at
any moment leaves the last complete checkpoint usable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import contextlib
import logging

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from flaxtl.errors import FlaxtlError
from flaxtl.workdir import rank as _rank


class CheckpointError(FlaxtlError, ValueError):
  """A checkpoint that cannot be read back for this model; the message names the file."""


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
  """The whole train state of `step` (resume), into the structure and shardings of `target`."""
  return mngr.restore(step, args=ocp.args.StandardRestore(target))


# Changes a resume accepts: how long to train on, and bookkeeping. Anything else would continue a
# different run under the old one's name (and its metrics), so it is refused.
RESUMABLE = ("epochs", "train_steps", "log_every_steps", "checkpoint_every_steps",
             "eval_batch_size", "cache_dir", "report_probe", "probe_shots")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_resumable(saved: dict, config) -> None:
  """Refuses a resume whose config changes anything but RESUMABLE, naming each field. A field the
  saved config lacks (added to flaxtl since the run started) counts as its default."""
  import json
  from flaxtl.configs import default
  plain = lambda c: _flat(json.loads(json.dumps(c.to_dict(), default=str)))  # noqa: E731
  old, new = {**plain(default.get_config()), **_flat(saved)}, plain(config)
  changed = sorted(k for k in old.keys() | new.keys()
                   if k not in RESUMABLE and old.get(k) != new.get(k))
  if changed:
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    raise CheckpointError(f"--resume with a changed config: {shown}. A resume may change only "
                          f"{', '.join(RESUMABLE)}; start a new --workdir for other changes")


def resume(mngr: ocp.CheckpointManager, state: Any) -> tuple[Any, int, dict]:
  """(state at the latest step, that step, the epoch's metric sums so far when mid-epoch);
  a run stopped before its first checkpoint starts again from `state` at step 0."""
  if mngr.latest_step() is None:
    return state, 0, {}
  step = int(mngr.latest_step())
  # Into arrays replicated over the training mesh, as the loop holds them: restored into this
  # process's own device, a multi-process run could not place them on the global mesh.
  from flaxtl import parallel
  rep = parallel.replicated(parallel.global_mesh())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      jax.numpy.shape(a), jax.dtypes.canonicalize_dtype(jax.numpy.result_type(a)), sharding=rep),
      state)
  state = restore(mngr, step, target)
  return state, step, custom(mngr, step).get("train_sums", {})


def choose_step(mngr, step: int | None = None, which: str = "best") -> int:
  steps = sorted(mngr.all_steps())
  where = mngr.directory
  if not steps:
    raise CheckpointError(f"{where}: no checkpoints")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"{where}: no step {step} (kept steps: {', '.join(map(str, steps))})")
    return step
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: 'best' or 'latest'")
  best = best_step(mngr) if which == "best" else None
  return steps[-1] if best is None else best


def restore_params(workdir: Path, abstract: dict, sharding, step: int | None = None,
                   which: str = "best", item: str = "params") -> tuple[dict, int]:
  """Only the model of the chosen step, as the variables `model.apply` takes: its weights
  (`params`, or `ema_params` for a run that kept an EMA; no optimizer state) and, for a model with
  batch norm, `batch_stats`. The one way every verb gets a trained model back. Names and shapes
  are checked against `abstract` (variables from jax.eval_shape) in the metadata first."""
  wanted = {item: abstract["params"]}
  if abstract.get("batch_stats"):
    wanted["batch_stats"] = abstract["batch_stats"]
  ckpt_dir = Path(workdir).resolve() / "checkpoints"  # orbax reads relative paths as missing
  if not ckpt_dir.is_dir():
    raise CheckpointError(f"{ckpt_dir}: missing (not a training workdir?)")
  try:
    with _quiet("absl"):  # orbax warns that a read-only manager is read-only
      mngr = manager(workdir, read_only=True)
  except Exception as e:  # orbax reads step metadata eagerly; junk there surfaces here.
    raise CheckpointError(f"{ckpt_dir}: unreadable ({type(e).__name__}: {e})") from None
  with mngr:
    step = choose_step(mngr, step, which)
    item_dir = ckpt_dir / str(step) / "default"
    try:
      with _quiet("absl"), ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item_dir).item_metadata
      stored = {k: meta.tree.get(k) for k in wanted} if meta is not None else {}
    except Exception as e:
      raise CheckpointError(f"{item_dir}: unreadable checkpoint metadata ({root_cause(e)})") from None
    if stored.get(item) is None:
      raise CheckpointError(f"{item_dir}: no readable checkpoint metadata (corrupt or incomplete)")
    for k, tree in wanted.items():
      if not stored.get(k):
        raise CheckpointError(f"{item_dir}: no {k} (a checkpoint of another model?)")
      check_params(stored[k], tree, f"{ckpt_dir / str(step)} (for the model in "
                                    f"{Path(workdir) / 'run.json'})")
    target = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                              tree) for k, tree in wanted.items()}
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      restored = mngr.restore(step, args=args)
    except Exception as e:  # tensorstore/orbax raise many types for truncated or corrupt files.
      raise CheckpointError(f"{ckpt_dir / str(step)}: params could not be restored "
                            f"({root_cause(e)})") from None
  return {"params": restored[item],
          **({"batch_stats": restored["batch_stats"]} if "batch_stats" in wanted else {})}, step


def check_params(params, abstract, source: str) -> None:
  """`params` (arrays, or orbax's metadata of them) must have the names and shapes of `abstract`."""
  import numpy as np
  flat = jax.tree_util.tree_flatten_with_path
  got = {jax.tree_util.keystr(p): tuple(v.shape if hasattr(v, "shape") else np.shape(v))
         for p, v in flat(params)[0]}
  for path, leaf in flat(abstract)[0]:
    name = jax.tree_util.keystr(path)
    if name not in got:
      raise CheckpointError(f"{source}: no parameter {name}")
    if got[name] != leaf.shape:
      raise CheckpointError(f"{source}: parameter {name} has shape {got[name]}, the model needs "
                            f"{leaf.shape}")


def root_cause(e: BaseException) -> str:
  """The innermost exception's first line: orbax wraps the useful tensorstore message deep."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


@contextlib.contextmanager
def _quiet(logger: str):
  """Drops the logger's records below ERROR for a while (a filter: TensorFlow resets levels)."""
  log, keep = logging.getLogger(logger), lambda record: record.levelno >= logging.ERROR
  log.addFilter(keep)
  try:
    yield
  finally:
    log.removeFilter(keep)
