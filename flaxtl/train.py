"""Fine-tuning, in the shape of Flax's examples/imagenet: `create_train_state`, `train_step`,
`train_and_evaluate(config, workdir)`. `python -m flaxtl.train` is the CLI (flaxtl/cli.py).

Data parallelism is `jax.jit` over the 1-D ('data',) mesh of every device of every process: the
global batch is sharded, params are replicated, XLA inserts the gradient all-reduce. When the
frozen trunk's output is cached, the step starts at the boundary.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flaxtl import checkpointing, evaluate, optim, parallel
from flaxtl.prepare import Setup, prepare, summary
from flaxtl.progress import Progress
from flaxtl.workdir import Recorder, RunError, check as check_workdir

__all__ = ["Preempted", "RunError", "TrainState", "create_train_state", "train_and_evaluate",
           "train_step"]


class TrainState(train_state.TrainState):
  """step, params, opt_state (+ apply_fn, tx as static fields)."""


class Preempted(Exception):
  """Training stopped on request (SIGTERM/SIGINT) after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step}; checkpoint saved")
    self.step = step


def create_train_state(setup: Setup, lr) -> TrainState:
  tx = optim.create(setup.config, setup.params, setup.freeze, lr)
  return TrainState.create(apply_fn=setup.network, params=setup.params, tx=tx)


def loss_terms(logits, labels, mask):
  """Sums (not means) of the loss and correct predictions over unmasked rows, in float32."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)


def zero_metrics(sums: dict | None = None) -> dict:
  m = {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
       "count": jnp.zeros((), jnp.float32), "nonfinite_step": jnp.full((), -1, jnp.int32)}
  return {**m, **{k: jnp.float32(v) for k, v in (sums or {}).items()}}


def train_step(state: TrainState, metrics: dict, batch: dict, rng) -> tuple[TrainState, dict]:
  """One optimizer step on the global batch; metrics are accumulated on device (no host sync)."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
    loss_sum, correct, count = loss_terms(logits, batch["label"], batch["mask"])
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, correct, count)

  grads, (loss_sum, correct, count) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  finite = jnp.isfinite(loss_sum)
  metrics = {"loss": metrics["loss"] + loss_sum, "correct": metrics["correct"] + correct,
             "count": metrics["count"] + count,
             "nonfinite_step": jnp.where((metrics["nonfinite_step"] < 0) & ~finite,
                                         state.step.astype(jnp.int32), metrics["nonfinite_step"])}
  return new_state, metrics


@functools.lru_cache(maxsize=8)
def jit_train_step(mesh) -> Callable:
  rep, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  return jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(rep, rep, shard, rep),
                 out_shardings=(rep, rep))


def batches(feeder, config, start: int, total: int):
  """(step, this process's batch) from `start` to `total`, across epochs: a pure function of
  (seed, epoch, step), so a resumed run sees exactly the batches it would have."""
  spe = feeder.steps(config.batch_size)
  for epoch in range(start // spe, -(-total // spe)):
    first = start - epoch * spe if epoch == start // spe else 0
    rows = feeder.epoch(config.batch_size, seed=config.seed, epoch=epoch, shuffle=True,
                        start_step=first, process_index=jax.process_index(),
                        process_count=jax.process_count())
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
  check_workdir(workdir, resume)
  setup = setup or prepare(config, workdir, log_fn=log_fn)
  log_fn(summary(setup))
  feeder, mesh = setup.feeders["train"], parallel.global_mesh()
  parallel.check_batch_size(config.batch_size, mesh=mesh)
  spe = feeder.steps(config.batch_size)
  total = optim.total_steps(config, spe)
  state = create_train_state(setup, optim.learning_rate(config.optimizer, spe, total))
  mngr = checkpointing.manager(workdir)
  start, sums = 0, {}
  if resume:
    state, start, sums = checkpointing.resume(mngr, state, config, workdir)
    log_fn(f"resumed from step {start} (epoch {start // spe + 1}, step {start % spe} of {spe})")
  recorder = Recorder(workdir, start // spe, active=jax.process_index() == 0)
  recorder.write_json("run.json", run_info(setup))
  recorder.write_json("config.json", config.to_dict())
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn, rng = jit_train_step(mesh), jax.random.key(config.seed + 1)
  rep = parallel.replicated(mesh)
  metrics, t_epoch, train_time = jax.device_put(zero_metrics(sums), rep), time.perf_counter(), 0.0
  bar = Progress(min(spe, total) - start % spe, f"epoch {start // spe + 1}", log_fn, unit="step")
  if stop_requested is not None:
    stop_requested()  # From here on a stop request is honoured with a checkpoint.
  for step, batch in batches(feeder, config, start, total):
    state, metrics = step_fn(state, metrics, parallel.put_batch(batch, mesh), rng)
    done, stop = step + 1, stop_requested is not None and stop_requested()
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
      val = evaluate.evaluate_split(setup.network.logits, state.params, setup.feeders["valid"],
                                    config.eval_batch_size)
      record = {"epoch": step // spe, "step": done,
                "train_loss": float(m["loss"] / max(m["count"], 1)),
                "train_accuracy": float(m["correct"] / max(m["count"], 1)),
                "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "images_per_s": (float(m["count"]) - sums.get("count", 0.0)) / seconds,
                "seconds": seconds}
      recorder.epoch(record)
      checkpointing.save(mngr, done, state, {k: record[k] for k in ("val_accuracy", "val_loss")})
      log_fn(format_epoch(record, -(-total // spe)))
      metrics, sums, t_epoch = jax.device_put(zero_metrics(), rep), {}, time.perf_counter()
      bar = Progress(min(spe, total - done), f"epoch {done // spe + 1}", log_fn, unit="step")
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
  results = finish(setup, mngr, recorder, evaluate_test, log_fn)
  results.update(train_seconds=train_time, wall_seconds=time.perf_counter() - t_start)
  recorder.write_json("results.json", {**results, "config": config.to_dict()})
  mngr.close()
  results["state"] = state
  return results


def finish(setup: Setup, mngr, recorder: Recorder, evaluate_test: bool, log_fn: Callable) -> dict:
  """The best epoch's validation figures and, once, its test accuracy."""
  best = checkpointing.best_step(mngr)
  record = next((r for r in recorder.history if r["step"] == best), None)
  results = {"best_step": best, "best_epoch": record["epoch"] + 1 if record else None,
             "val_accuracy": record["val_accuracy"] if record else None,
             "val_loss": record["val_loss"] if record else None, **setup.timings,
             "skipped_files": setup.skipped, "num_skipped": len(setup.skipped),
             "devices": jax.device_count(), "processes": jax.process_count()}
  if best is None:
    raise RunError(f"no epoch finished in {recorder.workdir}: nothing to report")
  if evaluate_test and "test" in setup.feeders:
    params, _ = checkpointing.restore_params(
        recorder.workdir, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                       setup.params),
        parallel.replicated(parallel.local_mesh()), best)
    test = evaluate.evaluate_split(setup.network.logits, params, setup.feeders["test"],
                                   setup.config.eval_batch_size)
    results.update(test_accuracy=test["accuracy"], test_loss=test["loss"],
                   test_correct=test["correct"], test_count=test["count"])
    log_fn(f"best epoch {results['best_epoch']}: val acc {results['val_accuracy']:.4f}, "
           f"test acc {test['accuracy']:.4f} ({test['correct']}/{test['count']})")
  return results


def run_info(setup: Setup) -> dict:
  """run.json: what inference needs to rebuild the model and feed it."""
  c = setup.config
  return {"class_names": setup.class_names, "preprocessing": setup.preprocessing,
          "image_size": c.data.image_size, "weights": setup.weights_meta,
          "boundary": setup.freeze.boundary, "trainable": list(setup.freeze.trainable),
          "model": c.model.to_dict(), "num_classes": len(setup.class_names)}


def format_epoch(r: dict, epochs: int) -> str:
  return (f"epoch {r['epoch'] + 1:3d}/{epochs}  train loss {r['train_loss']:.4f} "
          f"acc {r['train_accuracy']:.4f}  val loss {r['val_loss']:.4f} "
          f"acc {r['val_accuracy']:.4f}  {r['images_per_s']:.1f} img/s  {r['seconds']:.1f}s")


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
