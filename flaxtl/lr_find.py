"""python -m flaxtl.lr_find --config sign_digits.py --workdir runs/sign_digits [--num_steps 100]

A learning-rate range test (Smith 2015; fastai's lr_find): a short run whose learning rate rises
exponentially from `start_lr` to `end_lr`, cycling through the training batches, with the real
optimizer and train step. It stops when the running (EMA) loss exceeds `diverge` x its minimum.

Suggestion ('steep', as fastai's `steep`): the LR where the smoothed loss falls fastest per decade
of LR, looked for before the smoothed minimum, skipping the first 10% of steps (noise at tiny
LRs). Unlike fastai, the curve it reads is smoothed forward and backward (no lag): a one-sided
EMA over ~50 steps trails the raw loss by ~3 decades of LR at 100 steps and pushed the suggestion
past the good range on problems whose good range is known (tests/test_sweep_lr_find.py).
Writes only `<workdir>/lr_find/` (lr_find.json, lr_find.png): a run's checkpoints are never touched.
"""
from __future__ import annotations

import functools
import itertools
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

SUBDIR = "lr_find"


def ema(values, beta: float) -> np.ndarray:
  """Bias-corrected exponential moving average (fastai's AvgSmoothLoss)."""
  avg, out = 0.0, []
  for i, v in enumerate(values):
    avg = beta * avg + (1 - beta) * v
    out.append(avg / (1 - beta ** (i + 1)))
  return np.asarray(out)


def smooth(losses, beta: float) -> np.ndarray:
  """Forward-backward EMA: smoothed without shifting the curve towards higher LRs."""
  return ema(ema(losses, beta)[::-1], beta)[::-1]


def suggest(lrs, smoothed, skip_start: float = 0.1) -> tuple[float, int]:
  """(lr, index) of the steepest descent of `smoothed` vs log10(lr), before its minimum."""
  lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
  lo, hi = int(len(lrs) * skip_start), int(np.argmin(smoothed)) + 1
  if hi - lo < 3:  # no descent to measure: a tenth of the LR at the minimum (fastai's 'minimum')
    i = int(np.argmin(smoothed))
    return float(lrs[i] / 10), i
  slope = np.gradient(smoothed[lo:hi], np.log10(lrs[lo:hi]))
  i = lo + int(np.argmin(slope))
  return float(lrs[i]), i


def lr_find(setup, workdir: str | Path, *, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_steps: int = 100, diverge: float = 4.0, beta: float = 0.8,
            log_fn: Callable = functools.partial(print, flush=True)) -> dict:
  """Runs the range test on `setup`'s train split; writes <workdir>/lr_find/{json,png}."""
  import jax
  import optax
  from flaxtl import parallel, workdir as run_files
  from flaxtl.step import create_train_state, jit_train_step, zero_metrics
  cfg = setup.config
  out_dir = Path(workdir) / SUBDIR
  out_dir.mkdir(parents=True, exist_ok=True)
  feeder = setup.feeders["train"]
  schedule = optax.exponential_decay(start_lr, max(1, num_steps - 1), end_lr / start_lr)
  mesh = parallel.global_mesh()
  parallel.check_batch_size(cfg.batch_size, mesh=mesh)
  state = jax.device_put(create_train_state(setup, schedule), parallel.replicated(mesh))
  step_fn, rng = jit_train_step(mesh), jax.random.key(cfg.seed + 1)
  batches = itertools.chain.from_iterable(
      feeder.epoch(cfg.batch_size, seed=cfg.seed, epoch=e, shuffle=True,
                   process_index=jax.process_index(), process_count=jax.process_count())
      for e in itertools.count())
  lrs, losses, running, stop = [], [], [], "reached end_lr"
  avg = 0.0  # running: the online, bias-corrected EMA of the loss that decides when to stop
  for i, batch in zip(range(num_steps), batches):
    metrics = jax.device_put(zero_metrics(), parallel.replicated(mesh))
    state, m = step_fn(state, metrics, parallel.put_batch(batch, mesh), rng)
    m = jax.device_get(m)
    loss = float(m["loss"] / max(m["count"], 1.0))
    if not math.isfinite(loss):
      stop = f"non-finite loss at step {i}"
      break
    lrs.append(float(schedule(i)))
    losses.append(loss)
    avg = beta * avg + (1 - beta) * loss
    running.append(avg / (1 - beta ** (i + 1)))
    if running[-1] > diverge * min(running):
      stop = f"running loss above {diverge:g}x its minimum at step {i}"
      break
  if len(losses) < 2:
    raise run_files.RunError(f"lr_find: only {len(losses)} step(s) before stopping ({stop}); "
                           "lower start_lr")
  smoothed = smooth(losses, beta)
  lr, index = suggest(lrs, smoothed)
  doc = {"suggestion": lr, "suggestion_step": index, "method": "steep",
         "min_smoothed_loss_lr": lrs[int(np.argmin(smoothed))], "stopped": stop,
         "steps": len(losses), "start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps,
         "diverge": diverge, "beta": beta, "optimizer": cfg.optimizer.to_dict(),
         "trainable": cfg.trainable, "batch_size": cfg.batch_size,
         "lrs": lrs, "losses": losses, "smoothed": smoothed.tolist()}
  if jax.process_index() == 0:
    run_files.write_json(out_dir / "lr_find.json", doc)
    doc["plot"] = str(plot(doc, out_dir / "lr_find.png"))
  log_fn(f"lr_find: {len(losses)} steps, {stop}; suggested learning rate {lr:.2e} (steepest "
         f"descent of the smoothed loss); minimum at {doc['min_smoothed_loss_lr']:.2e}. "
         f"Train with --config.optimizer.learning_rate={lr:.2g}")
  return doc


def plot(doc: dict, path: Path) -> Path:
  from flaxtl.plots import _figure, save
  fig = _figure(8, 5)
  ax = fig.add_subplot()
  lrs, smoothed = doc["lrs"], doc["smoothed"]
  ax.plot(lrs, doc["losses"], color="tab:blue", alpha=0.3, linewidth=1, label="loss per step")
  ax.plot(lrs, smoothed, color="tab:blue", linewidth=2,
          label=f"smoothed (forward-backward EMA, beta={doc['beta']:g})")
  i = doc["suggestion_step"]
  ax.axvline(doc["suggestion"], color="tab:red", linestyle="--",
             label=f"suggested lr {doc['suggestion']:.1e} (steepest descent)")
  ax.plot([lrs[i]], [smoothed[i]], "o", color="tab:red", markersize=8)
  ax.set_xscale("log")
  low = min(min(doc["losses"]), min(smoothed))  # raw spikes past the divergence are cut off
  high = max(max(smoothed[:int(np.argmin(smoothed)) + 1]), low + 1e-3)
  ax.set_ylim(low - 0.05 * (high - low), high + 0.3 * (high - low))
  ax.set_xlabel("learning rate (log scale)")
  ax.set_ylabel("training loss")
  ax.set_title(f"Learning-rate finder: {doc['optimizer']['name']}, trainable={doc['trainable']!r}, "
               f"batch {doc['batch_size']}, {doc['steps']} steps")
  ax.grid(alpha=0.3)
  ax.legend()
  return save(fig, path)


def run(config, workdir: str | Path, log_fn: Callable = functools.partial(print, flush=True),
        **kwargs) -> dict:
  """prepare + lr_find, with the workdir's class_folders split (if any) reused, read-only."""
  from flaxtl import prepare
  workdir = Path(workdir)
  out_dir = workdir / SUBDIR
  out_dir.mkdir(parents=True, exist_ok=True)
  if (workdir / "split.json").exists() and not (out_dir / "split.json").exists():
    shutil.copyfile(workdir / "split.json", out_dir / "split.json")  # the run's own split
  setup = prepare.prepare(config, out_dir, log_fn=log_fn)
  return lr_find(setup, workdir, log_fn=log_fn, **kwargs)


def define_flags() -> None:
  from absl import flags
  from flaxtl import cli
  cli.define_config_flags("Run directory; only its lr_find/ subfolder is written.")
  flags.DEFINE_float("start_lr", 1e-7, "First learning rate.")
  flags.DEFINE_float("end_lr", 10.0, "Last learning rate (if the loss has not diverged before).")
  flags.DEFINE_integer("num_steps", 100, "Steps from start_lr to end_lr (batches cycle).")
  flags.DEFINE_float("diverge", 4.0, "Stop when the running loss exceeds this x its minimum.")
  flags.DEFINE_float("beta", 0.8, "Smoothing of the loss (exponential moving average).")


def main(argv):
  from absl import flags
  from flaxtl import cli
  FLAGS = flags.FLAGS
  name = cli.start(argv)
  run(FLAGS.config, FLAGS.workdir or f"runs/{name}", start_lr=FLAGS.start_lr, end_lr=FLAGS.end_lr,
      num_steps=FLAGS.num_steps, diverge=FLAGS.diverge, beta=FLAGS.beta)


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("lr_find")
