"""WiSE-FT (Wortsman et al., CVPR 2022): after phase 2, the model on the straight line between phase
1 (pretrained trunk + fitted head) and phase 2's end, (1 - a) * start + a * end, `a` chosen on valid.

Why: on a small dataset fine-tuning fits train in an epoch and gives up some of the pretrained
features' generality; the mix keeps part of both at the cost of a few validation passes. Both ends
share phase 1's head, so the line stays in one basin (the LP-FT setting, Kumar et al. 2022). The
mix is kept only when it beats every epoch on valid, so a run is never worse on valid for it.
"""
from __future__ import annotations

from typing import Callable

import jax

from flaxtl import checkpointing, evaluate
from flaxtl.workdir import RANKED, RunError, best_record, rank

KEY = "wise_ft"  # the mix's checkpoint carries {KEY: {"alpha", "end_step", "epoch"}} as custom metadata


def check(config) -> str | None:
  """The problem with config.wise_alphas, or None."""
  alphas = tuple(config.get("wise_alphas", ()))
  if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < 1 for a in alphas):
    return (f"config.wise_alphas={alphas!r}: mixing weights strictly between 0 and 1 (the ends, "
            "phase 1 and phase 2, are already evaluated), e.g. (0.25, 0.5, 0.75); () for none")
  return None


def mix(start, end, alpha: float):
  """start + alpha * (end - start), leaf by leaf: a leaf both ends share (a frozen layer) stays
  bit-identical."""
  return jax.tree.map(lambda s, e: (s + alpha * (e - s)).astype(e.dtype), start, end)


def resumed_finished(mngr, start: int, total: int, workdir) -> bool:
  """True when the resumed step is the run's kept mix (the run is over: nothing to train); a
  resume asking for more steps than that run had is refused."""
  if not start or record(mngr, start) is None:
    return False
  if total > start:
    raise RunError(f"{workdir} ended with its WiSE-FT mix (step {start}); training on from a mix "
                   "is a new run: start a new --workdir to train longer")
  return True


def after_training(setup, state, mngr, recorder, val_fields: Callable,
                   log_fn: Callable) -> dict | None:
  """`search` when config.wise_alphas asks for it and there is a phase 1 and a phase 2 to mix."""
  if not setup.config.wise_alphas:
    return None
  if setup.head_fit is None:
    log_fn("config.wise_alphas: skipped, head_init='random' leaves no phase 1 model to mix with")
    return None
  step = int(state.step)
  return search(setup, state, mngr, recorder, step, val_fields, log_fn) if step > 0 else None


def search(setup, state, mngr, recorder, end_step: int, val_fields: Callable,
           log_fn: Callable) -> dict:
  """Evaluates each config.wise_alphas mix of phase 1 (`setup.variables`) and `state` (phase 2's
  end) on valid; saves the best as checkpoint `end_step + 1` when it ranks above every epoch.
  Returns {"path": [per alpha: alpha and val figures], "alpha": the kept alpha or None}."""
  config = setup.config
  start, end = setup.variables, state.eval_variables
  path = []
  for a in config.wise_alphas:
    val = evaluate.evaluate_split(setup.network.logits, mix(start, end, a), setup.feeders["valid"],
                                  config.eval_batch_size)
    path.append({"alpha": float(a), **val_fields(val, config)})
  top = max(path, key=rank)
  best = best_record(recorder.history)
  shown = ", ".join(f"{r['alpha']:g}: {r['val_accuracy']:.4f}" for r in path)
  epoch = recorder.history[-1]["epoch"]
  if rank(top) <= rank(best):
    log_fn(f"WiSE-FT (val acc by alpha: {shown}): no mix beats the best epoch; it stays")
    return {"path": path, "alpha": None}
  mixed = mix(start, end, top["alpha"])
  kept = state.replace(params=mixed["params"],
                       ema_params=mixed["params"] if state.ema_params else state.ema_params,
                       batch_stats=mixed.get("batch_stats", state.batch_stats))
  checkpointing.save(mngr, end_step + 1, kept, {k: top[k] for k in RANKED},
                     custom={KEY: {"alpha": top["alpha"], "end_step": end_step, "epoch": epoch}})
  mngr.wait_until_finished()
  log_fn(f"WiSE-FT (val acc by alpha: {shown}): alpha {top['alpha']:g} kept, val acc "
         f"{top['val_accuracy']:.4f} against the best epoch's {best['val_accuracy']:.4f}")
  return {"path": path, "alpha": top["alpha"]}


def record(mngr, step: int) -> dict | None:
  """The kept mix's record (its val figures, alpha, and the epoch it ends at) if `step` is one."""
  info = checkpointing.custom(mngr, step).get(KEY)
  if not info:
    return None
  return {**mngr.metrics(step), "step": step, "epoch": info["epoch"], KEY: info}
