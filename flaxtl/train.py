"""python -m flaxtl.train --config NAME|FILE --workdir DIR [--config.FIELD=VALUE ...] [--resume]

The training loop, in the shape of Flax's examples/imagenet `train_and_evaluate(config, workdir)`:
phase 1 (the fitted head) as step 0, then the step (flaxtl/step.py) over epochs with validation,
best/latest checkpoints, early stopping, the plateau LR, preemption and the test read once at the
end; the CLI is flaxtl/cli.py. When the frozen trunk's output is cached, the step starts at the
boundary.
"""
from __future__ import annotations

import functools
import itertools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from flaxtl import checkpointing, evaluate, optim, parallel, precise_bn, wise_ft
from flaxtl.config_check import check_config
from flaxtl.prepare import Setup, prepare, summary
from flaxtl.step import create_train_state, jit_train_step, lr_scale, plateau_update, zero_metrics
from flaxtl.progress import Progress
from flaxtl.models import HEAD
from flaxtl.workdir import (RANKED, Recorder, RunError, best_record, check as check_workdir,
                            write_json)

__all__ = ["Preempted", "RunError", "train_and_evaluate"]


class Preempted(Exception):
  """Training stopped on request (SIGTERM/SIGINT) after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step}; checkpoint saved")
    self.step = step


def batches(feeder, config, start: int, total: int):
  """(step, this process's batch) from `start` to `total`, across epochs: a pure function of
  (seed, epoch, step), so a resumed run sees exactly the batches it would have."""
  spe = feeder.steps(config.batch_size)
  for epoch in range(start // spe, -(-total // spe)):
    first = start - epoch * spe if epoch == start // spe else 0
    rows = feeder.epoch(config.batch_size, seed=config.seed, epoch=epoch, shuffle=True,
                        start_step=first, process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        balanced=config.data.sampler == "balanced")
    for i, batch in enumerate(rows, start=epoch * spe + first):
      if i >= total:
        return
      yield i, batch


def train_and_evaluate(config, workdir: str | Path, *, resume: bool = False,
                       log_fn: Callable = functools.partial(print, flush=True),
                       stop_requested: Callable[[], bool] | None = None,
                       evaluate_test: bool = True, setup: Setup | None = None) -> dict:
  """Trains, keeps the best and latest checkpoints, evaluates the best params on test."""
  t_start, workdir = time.perf_counter(), Path(workdir)
  if setup is None:
    check_config(config)  # before anything is written, the workdir included
  check_workdir(workdir, resume)
  if resume and (workdir / "config.json").exists():  # a resume continues the same run, or refuses
    checkpointing.check_resumable(json.loads((workdir / "config.json").read_text()), config)
  if jax.process_index() == 0:
    write_json(workdir / "config.json", config.to_dict())  # the run exists from here on
  setup = setup or prepare(config, workdir, log_fn=log_fn)
  log_fn(summary(setup))
  feeder, mesh = setup.feeders["train"], parallel.global_mesh()
  parallel.check_batch_size(config.batch_size, mesh=mesh)
  spe = feeder.steps(config.batch_size)
  head_only = setup.head_fit is not None and setup.freeze.trainable == (HEAD,)
  total = 0 if head_only else optim.total_steps(config, spe)  # phase 1 was all of it
  state = create_train_state(setup, optim.learning_rate(config.optimizer, spe, total))
  mngr = checkpointing.manager(workdir)
  start, sums = 0, {}
  if resume:
    state, start, sums = checkpointing.resume(mngr, state)
    log_fn(f"resumed from step {start} (epoch {start // spe + 1}, step {start % spe} of {spe})")
  ended = wise_ft.resumed_finished(mngr, start, total, workdir)  # its kept mix: nothing to train
  total = start if ended else total
  recorder = Recorder(workdir, start // spe, active=jax.process_index() == 0)
  recorder.write_json("run.json", run_info(setup))
  state = jax.device_put(state, parallel.replicated(mesh))
  if start == 0 and setup.head_fit is not None:
    phase1(setup, state, mngr, recorder, log_fn)
  step_fn = jit_train_step(mesh, config.label_smoothing, config.ema_decay, config.mixup_alpha,
                           config.get("cutmix_alpha", 0.0), class_weight_for(config, setup))
  rng = jax.random.key(config.seed + 1)
  rep = parallel.replicated(mesh)
  precise = precise_bn.batches_for(config, setup.weights_meta)  # the epoch's first batches
  metrics, t_epoch, train_time = jax.device_put(zero_metrics(sums), rep), time.perf_counter(), 0.0
  bar = Progress(min(spe, total) - start % spe, f"epoch {start // spe + 1}", log_fn, unit="step")
  if stop_requested is not None:
    stop_requested()  # From here on a stop request is honoured with a checkpoint.
  for step, batch in batches(feeder, config, start, total):
    batch = parallel.put_batch(batch, mesh)  # fetched while the previous step runs
    # At most one step in flight: a stop request then waits for one step, not for the
    # log_every_steps that async dispatch would otherwise queue (a preemption notice is ~30 s).
    jax.block_until_ready(metrics)
    state, metrics = step_fn(state, metrics, batch, rng)
    done, stop = step + 1, parallel.agree(stop_requested is not None and stop_requested())
    epoch_end = done % spe == 0 or done == total
    bar.update()
    if done % config.log_every_steps == 0 or epoch_end:
      m = jax.device_get(metrics)
      _check_finite(m, mngr)
      bar.set_postfix(loss=f"{m['loss'] / max(m['count'], 1):.4f}",
                      acc=f"{m['correct'] / max(m['count'], 1):.3f}")
    if epoch_end:
      bar.close()
      seconds = time.perf_counter() - t_epoch
      train_time += seconds
      m = jax.device_get(metrics)
      _check_finite(m, mngr, state)  # never checkpoint params a non-finite loss has touched
      if precise and state.batch_stats:
        state = state.replace(batch_stats=jax.device_put(precise_bn.recalibrate(
            state.apply_fn, state.eval_params, state.batch_stats,
            (b for _, b in itertools.islice(batches(feeder, config, step // spe * spe, done),
                                            precise)), mesh, config.seed), rep))
      val = evaluate.evaluate_split(setup.network.logits, state.eval_variables,
                                    setup.feeders["valid"], config.eval_batch_size)
      record = {"epoch": step // spe, "step": done,
                "train_loss": float(m["loss"] / max(m["count"], 1)),
                "train_accuracy": float(m["correct"] / max(m["count"], 1)),
                **val_fields(val, config), "images_per_s": (float(m["count"]) - sums.get("count", 0.0)) / seconds,
                "seconds": seconds}
      if state.plateau:
        record["lr_scale"] = float(lr_scale(state))
        state = plateau_update(state, config.optimizer, val["loss"], rep)
      recorder.epoch(record)
      checkpointing.save(mngr, done, state, {k: record[k] for k in RANKED})
      log_fn(format_epoch(record, -(-total // spe)))
      metrics, sums, t_epoch = jax.device_put(zero_metrics(), rep), {}, time.perf_counter()
      bar = Progress(min(spe, total - done), f"epoch {done // spe + 1}", log_fn, unit="step")
      if early_stop(recorder.history, config.early_stopping_patience):
        log_fn(f"early stopping: no better val in {config.early_stopping_patience} epochs")
        break
    elif stop or (config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0):
      m = jax.device_get(metrics)
      _check_finite(m, mngr, state)
      so_far = {k: float(m[k]) for k in ("loss", "correct", "count")}
      checkpointing.save(mngr, done, state, custom={"train_sums": so_far})
    if stop and done < total:
      mngr.wait_until_finished()
      bar.close()
      raise Preempted(done)
  bar.close()
  mngr.wait_until_finished()
  wise = None if ended else wise_ft.after_training(setup, state, mngr, recorder, val_fields, log_fn)
  results = finish(setup, mngr, recorder, evaluate_test, log_fn)
  if wise is not None:
    results["wise_ft"] = wise
  results.update(train_seconds=train_time, wall_seconds=time.perf_counter() - t_start)
  recorder.write_json("results.json", {**results, "config": config.to_dict()})
  mngr.close()
  results["state"] = state
  return results


def phase1(setup: Setup, state, mngr, recorder: Recorder, log_fn: Callable) -> None:
  """The fitted head (step 0) evaluated, recorded and checkpointed like an epoch: the best
  checkpoint is never worse on valid than the head alone."""
  val = evaluate.evaluate_split(setup.network.logits, setup.variables, setup.feeders["valid"],
                                setup.config.eval_batch_size)
  fit = setup.head_fit  # its train figures: the network's at step 0 (the trunk is unchanged)
  record = {"epoch": -1, "step": 0, "phase": 1, "train_loss": fit["train_loss"],
            "train_accuracy": fit["train_accuracy"], **val_fields(val, setup.config),
            "seconds": setup.head_fit["seconds"]}
  recorder.epoch(record)
  checkpointing.save(mngr, 0, state, {k: record[k] for k in RANKED})
  log_fn(f"phase 1 (head)  train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
         f"  val loss {val['loss']:.4f} acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}")


def val_fields(val: dict, config) -> dict:
  """An epoch's validation figures (unweighted, whatever class_weight) and the rule that ranks
  them (config.select_best_by), as metrics.jsonl and the checkpoint keep them."""
  return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
          "val_macro_f1": val["macro_f1"], "select_by": config.select_best_by}


def class_weight_for(config, setup: Setup) -> tuple | None:
  """config.class_weight='balanced': the train split's weights, as the step's constant."""
  if config.class_weight != "balanced":
    return None
  from flaxtl.data import class_weights
  return tuple(map(float, class_weights(setup.feeders["train"].labels, len(setup.class_names))))


def early_stop(history: list[dict], patience: int) -> bool:
  """True when the last `patience` epochs brought no better val (the best rule): a function of
  metrics.jsonl alone, so a resumed run stops where an uninterrupted one would."""
  if not patience or not history:
    return False
  best = best_record(history)
  return history[-1]["epoch"] - best["epoch"] >= patience


def finish(setup: Setup, mngr, recorder: Recorder, evaluate_test: bool, log_fn: Callable) -> dict:
  """The best epoch's validation figures and, once, its test accuracy."""
  best = checkpointing.best_step(mngr)
  record = next((r for r in recorder.history if r["step"] == best), None)
  record = record or (wise_ft.record(mngr, best) if best is not None else None)
  results = {"best_step": best, "best_epoch": record["epoch"] + 1 if record else None,
             "val_accuracy": record["val_accuracy"] if record else None,
             "val_loss": record["val_loss"] if record else None,
             "val_macro_f1": record.get("val_macro_f1") if record else None,
             "select_by": setup.config.select_best_by, **setup.timings,
             "head_fit": setup.head_fit, "probe": setup.probe, "skipped_files": setup.skipped,
             "num_skipped": len(setup.skipped),
             "devices": jax.device_count(), "processes": jax.process_count()}
  if best is None:
    raise RunError(f"no epoch finished in {recorder.workdir}: nothing to report")
  if setup.probe and record and record["epoch"] >= 0:
    gap = results["val_accuracy"] - setup.probe["val_accuracy"]
    log_fn(f"best epoch {results['best_epoch']}: val acc {results['val_accuracy']:.4f}, "
           f"{'beats' if gap > 0 else 'does not beat'} the closed-form probe's "
           f"{setup.probe['val_accuracy']:.4f} ({gap:+.4f})")
  if evaluate_test and "test" in setup.feeders:
    variables, _ = checkpointing.restore_params(
        recorder.workdir, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                       setup.variables),
        parallel.replicated(parallel.local_mesh()), best, item=model_item(setup.config))
    test = evaluate.evaluate_split(setup.network.logits, variables, setup.feeders["test"],
                                   setup.config.eval_batch_size)
    results.update(test_accuracy=test["accuracy"], test_loss=test["loss"],
                   test_macro_f1=test["macro_f1"], test_correct=test["correct"],
                   test_count=test["count"])
    where = "phase 1 (the fitted head)" if record["epoch"] < 0 else f"epoch {results['best_epoch']}"
    if wise_ft.KEY in record:
      where = f"WiSE-FT mix (alpha {record[wise_ft.KEY]['alpha']:g}) of phase 1 and {where}"
    f1 = results["val_macro_f1"]  # None in a run resumed from before it was recorded
    log_fn(f"best {where} (by val {setup.config.select_best_by}): val acc "
           f"{results['val_accuracy']:.4f} macro-F1 {'-' if f1 is None else f'{f1:.4f}'}, test acc "
           f"{test['accuracy']:.4f} ({test['correct']}/{test['count']}) macro-F1 "
           f"{test['macro_f1']:.4f}")
  return results


def model_item(config) -> str:
  """The checkpoint entry holding the model to use: the EMA when one is kept."""
  return "ema_params" if config.get("ema_decay", 0.0) > 0 else "params"


def run_info(setup: Setup) -> dict:
  """run.json: what inference needs to rebuild the model and feed it."""
  c = setup.config
  return {"params_item": model_item(c), "class_names": setup.class_names, "preprocessing": setup.preprocessing,
          "image_size": c.data.image_size, "weights": setup.weights_meta,
          "boundary": setup.freeze.boundary, "trainable": list(setup.freeze.trainable),
          "model": c.model.to_dict(), "num_classes": len(setup.class_names),
          "trained_on": {"cached_features": setup.cached,  # how phase 2 saw the train images
                         "augmented_views": len(setup.feeders["train"].views)},
          "feature_engine": setup.feature_engine,
          "train_engine": list(setup.network.trained_in_tf)}  # layers trained in oneDNN bf16


def format_epoch(r: dict, epochs: int) -> str:
  return (f"epoch {r['epoch'] + 1:3d}/{epochs}  train loss {r['train_loss']:.4f} "
          f"acc {r['train_accuracy']:.4f}  val loss {r['val_loss']:.4f} "
          f"acc {r['val_accuracy']:.4f} macro-F1 {r['val_macro_f1']:.4f}  "
          f"{r['images_per_s']:.1f} img/s  {r['seconds']:.1f}s")


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_finite(m: dict, mngr, state=None) -> None:
  """Raises on a non-finite loss; with `state` (before a save), also on non-finite params: an
  overflowing update can follow a finite loss, and a checkpoint must never hold inf/nan."""
  what, step = "loss", int(m["nonfinite_step"])
  if step < 0 and state is not None and not bool(_all_finite(state.params)):
    what, step = "params", int(state.step) - 1
  if step >= 0:
    mngr.wait_until_finished()
    raise RunError(f"non-finite {what} at step {step}: stopping; the last "
                   f"good checkpoint (step {mngr.latest_step()}) is kept. Lower the learning "
                   "rate or check the inputs.")


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("train")
