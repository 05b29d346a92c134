"""python -m flaxtl.sweep --config sign_digits.py --workdir runs/sweep [--levels head,block5,...]

How much to freeze, in one command: the same recipe trained at each freeze level
(`config.trainable = level`), one sub-workdir per level (and seed). The frozen trunk runs once for
every level: a first `prepare` caches each level's boundary features in one forward pass, and each
level's own `prepare` then hits the cache. 'all' has no boundary, and a level whose features would
not fit `cache_budget_mb` (block1_pool is 21x the bytes of the images) trains from images.

The choice never looks at the test split. Recommendation rule: among the levels whose best
validation accuracy (mean over seeds) is within `tolerance` of the best level's, take the one with
the FEWEST TRAINABLE PARAMETERS (ties: less train time, then the order given). Only then is the
recommended level's best checkpoint evaluated on test, once.

Fair budgets. Every level runs the recipe: phase 1 fits the head to convergence (the `head` level
is that alone), phase 2 trains the level from that head. Deep levels cost 10-50x more per step
than block5 on a CPU, so equal epochs would be unaffordable and fewer epochs picked by hand would
decide the answer. `budget='time'` (the default) gives every level the SAME TRAINING TIME: the
first level after `head` (block5) trains `config.epochs`; its train time is the budget, and each
deeper level gets the steps that fit it, from its own step time measured at its start (the
table says what each got, so "worse" reads "worse for the same compute"). `budget='epochs'` gives
every level `config.epochs` (or `epochs_per_level`, e.g. 'all:0.25'; a fraction f < 1 is one
epoch cut to ceil(f * steps) shuffled steps).
"""
from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from flaxtl.errors import ConfigError
from flaxtl.sweep_report import aggregate, format_table, probe_row, recommend

BUDGETS = ("time", "epochs")


def parse_epochs(spec: str | dict | None, levels: Sequence[str]) -> dict[str, float]:
  """'all:0.25,block2:1' -> {'all': 0.25, 'block2': 1.0}; fractions < 1 or whole epochs only."""
  if isinstance(spec, dict):
    pairs = list(spec.items())
  else:
    pairs = [p.split(":", 1) for p in (spec or "").split(",") if p.strip()]
  out = {}
  for pair in pairs:
    if len(pair) != 2:
      raise ConfigError(f"epochs_per_level: {':'.join(pair)!r} is not LEVEL:EPOCHS")
    try:
      level, value = pair[0].strip(), float(pair[1])
    except ValueError:
      raise ConfigError(f"epochs_per_level: {':'.join(pair)!r} is not LEVEL:EPOCHS") from None
    if not (0 < value < 1 or (value >= 1 and value == int(value))):
      raise ConfigError(f"epochs_per_level {level}:{value}: a fraction below 1 or whole epochs")
    out[level] = value
  return {k: v for k, v in out.items() if k in levels}  # levels left out of this sweep: ignored


def default_levels(config) -> tuple[str, ...]:
  """The model's own freeze levels, deepest first (VGG16: head, block5, ..., block2, all;
  ResNet50: head, conv5, ..., conv2, all; `models.description`)."""
  from flaxtl import models
  desc = models.description(config.model.name)
  if desc is None:
    raise ConfigError(f"model.name={config.model.name!r} has no freeze levels: pass --levels")
  return desc.stages


def level_config(config, level: str, seed: int, epochs: float, cache: bool = True):
  """The recipe at one level: only trainable, seed, epochs (and feature_cache) change; the split
  stays fixed."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.trainable = level
    c.head_init = "probe"  # every level starts from the converged head: a fair comparison
    if smoothing_note(config):
      c.label_smoothing = 0.0
    c.feature_cache = bool(config.feature_cache and cache)
    if c.data.split_seed < 0:
      c.data.split_seed = config.seed  # class_folders: every seed sees the same split
    c.seed = seed
    c.epochs = max(1, int(epochs))
  return c


def smoothing_note(config) -> str:
  """Why a config's label smoothing is dropped: it was chosen behind a random head, and from a
  fitted head it cost block 5 2 points on sign_digits' CV and 1 on Caltech (RESULTS.md)."""
  if config.head_init == "probe" or not config.label_smoothing:
    return ""
  return (f"label_smoothing={config.label_smoothing} goes with head_init={config.head_init!r}; "
          "every level here starts from the fitted head, where smoothing lost on valid "
          "(benchmarks/RESULTS.md), so the levels train without it")


def feature_mb(config, boundary: str, n_images: int) -> float:
  """MiB of the float32 features at `boundary` for `n_images` (what a cached level holds)."""
  import jax
  import jax.numpy as jnp
  from flaxtl import models
  model, s = models.create(config, num_classes=2), config.data.image_size
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, stop_at=boundary)[0],
                       jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return n_images * math.prod(out.shape[1:]) * 4 / 2**20


# ---------------------------------------------------------------------------------------------
# Running the levels.

def step_seconds(setup, steps: int = 3) -> float:
  """Median seconds of the level's own train step (after its compile), on its real batches."""
  import jax
  from flaxtl import parallel
  from flaxtl.step import create_train_state, jit_train_step, zero_metrics
  cfg, mesh = setup.config, parallel.global_mesh()
  rep = parallel.replicated(mesh)
  state = jax.device_put(create_train_state(setup, cfg.optimizer.learning_rate), rep)
  metrics, fn = jax.device_put(zero_metrics(), rep), jit_train_step(mesh)
  batches = setup.feeders["train"].epoch(cfg.batch_size, seed=cfg.seed, epoch=0, shuffle=True,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
  times = []
  for i, batch in zip(range(steps + 1), batches):
    t = time.perf_counter()
    state, metrics = fn(state, metrics, parallel.put_batch(batch, mesh), jax.random.key(0))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return statistics.median(times[1:] or times)


def run_level(config, level: str, seed: int, epochs: float, run_dir: Path, setup=None,
              log_fn: Callable = print, cache: bool = True, budget_s: float = 0.0,
              title: str = "") -> dict:
  """Trains one level (test split untouched) and returns its row; reuses an identical finished
  run (`runs.run`). With `budget_s`, the level trains the steps its measured step time fits in
  it. `setup`: a Setup, or a function cfg -> Setup (a cross-validation fold's)."""
  from flaxtl import runs
  cfg = level_config(config, level, seed, epochs, cache)

  def steps_for(setup, full):
    if not (budget_s and level != "head"):
      return max(1, math.ceil(epochs * full))
    per_step = step_seconds(setup)
    steps = max(1, min(int(config.epochs) * full, int(budget_s / per_step)))
    log_fn(f"sweep: {level} steps take {per_step:.3f}s: {steps} steps fit the {budget_s:.0f}s budget")
    return steps

  return runs.run(cfg, run_dir, setup, marker="sweep_run.json", steps_for=steps_for,
                  ident=runs.identity(cfg, epochs=epochs, time_budget=bool(budget_s)),
                  log_fn=log_fn, title=f"sweep: trainable={level} seed={seed}{title}")


def evaluate_test(run_dir: Path) -> dict:
  """The best checkpoint of one finished run, on its test split (the only test evaluation)."""
  from flaxtl import evaluate
  doc = evaluate.evaluate(run_dir, "test", write=False, num_top_losses=0)
  return {"workdir": str(run_dir), "step": doc["step"], "test_accuracy": doc["accuracy"],
          "test_loss": doc["loss"], "test_correct": doc["correct"],
          "test_count": doc["num_images"]}


def sweep(config, workdir: str | Path, levels: Sequence[str] | None = None, seeds: int = 1,
          tolerance: float = 0.005, epochs_per_level: str | dict | None = None,
          cache_budget_mb: float = 1024, budget: str = "time", cv: int = 0,
          log_fn: Callable = functools.partial(print, flush=True)) -> dict:
  """Trains every level (and seed), recommends one by the rule, evaluates only it on test.
  `budget`: 'time' (every level the reference level's train time) or 'epochs' (module doc).
  `cv` > 1: each level (and seed) trains on `cv` stratified folds of train+valid (`flaxtl.cv`),
  its val accuracy is the mean over folds, and the folds' inputs come from one prepare per level.

  A level trains from cached features when its train split's features fit `cache_budget_mb`;
  the shallow boundaries (block1_pool: 21x the bytes of the uint8 images) train from images.
  """
  from flaxtl import cv as kfold, freezing, input_pipeline, models, prepare, splitting
  from flaxtl import workdir as run_files
  t0 = time.perf_counter()
  workdir = Path(workdir)
  levels = list(dict.fromkeys(levels or default_levels(config)))
  if budget not in BUDGETS:
    raise ConfigError(f"sweep budget={budget!r}: one of {', '.join(BUDGETS)}")
  if cv == 1 or cv < 0:
    raise ConfigError(f"sweep --cv={cv}: 0 (one validation split) or at least 2 folds")
  epochs = {lv: config.epochs for lv in levels} | parse_epochs(epochs_per_level, levels)
  reference = next((lv for lv in levels if lv != "head"), None)  # its train time: the budget
  model = models.create(config, num_classes=2)  # layer names do not depend on classes
  plans = {lv: freezing.plan(lv, model, config.model.train_bn)  # a bad level fails here
           for lv in levels}
  seed_list = [config.seed + i for i in range(seeds)]
  run_dir = lambda lv, s: workdir / lv if seeds == 1 else workdir / lv / f"seed{s}"  # noqa: E731
  dirs = lambda lv, s: ([run_dir(lv, s) / f"fold{f}" for f in range(cv)] if cv  # noqa: E731
                        else [run_dir(lv, s)])
  if cv:
    kfold.Folds(config, workdir, cv).check()  # too few images of a class: before any compute
  if smoothing_note(config):
    log_fn(smoothing_note(config))

  # One forward pass caches every cached level's boundary (when the recipe can use the cache).
  n_train = len(splitting.load_splits(config.data, config.seed)["train"])
  sizes = {lv: feature_mb(config, plans[lv].boundary, n_train) for lv in levels
           if plans[lv].boundary}
  cache = {lv: lv in sizes and sizes[lv] <= cache_budget_mb for lv in levels}
  cacheable = bool(config.feature_cache and (config.data.augment_views or
                                             not input_pipeline.augment_enabled(config.data.augment)))
  bounded = [lv for lv in levels if cache[lv]]
  todo = [(lv, s) for lv in bounded for s in seed_list
          if not all((d / "sweep_run.json").exists() for d in dirs(lv, s))]
  ready, t_features = {}, 0.0  # the first level's Setup, handed on (not prepared twice)
  if cacheable and todo:
    t1 = time.perf_counter()
    lv, s = todo[0]
    key = lv if cv else (lv, s)  # with folds: that level's base Setup, re-cut for every fold
    ready[key] = prepare.prepare(level_config(config, lv, config.seed if cv else s, epochs[lv],
                                              cache[lv]),
                                 workdir / lv if cv else run_dir(lv, s), log_fn=log_fn,
                                 also_cache=tuple(plans[b].boundary for b in bounded),
                                 fit=not cv)
    t_features = time.perf_counter() - t1

  runs, budget_s = [], 0.0
  for lv in levels:
    folds = (kfold.Folds(level_config(config, lv, config.seed, epochs[lv], cache[lv]),
                         workdir / lv, cv, log_fn=log_fn, base=ready.pop(lv, None))
             if cv else None)
    for s in seed_list:
      timed = budget == "time" and lv not in ("head", reference)
      for f, d in enumerate(dirs(lv, s)):
        if folds is None:
          row = run_level(config, lv, s, epochs[lv], d, ready.pop((lv, s), None), log_fn,
                          cache[lv], budget_s=budget_s if timed else 0.0)
        else:
          row = {**run_level(kfold.fold_config(config, cv, f), lv, s, epochs[lv], d,
                             folds.setup_for(d), log_fn, cache[lv],
                             budget_s=budget_s if timed else 0.0, title=f" fold {f + 1}/{cv}"),
                 "fold": f}
        runs.append(row)
        gc.collect()  # the level's features go before the next level loads its own
    del folds
    if lv == reference and budget == "time":
      budget_s = statistics.fmean(r["train_seconds"] for r in runs if r["level"] == lv)
  rows = [aggregate([r for r in runs if r["level"] == lv]) for lv in levels]
  probe = probe_row(runs)

  choice = recommend(rows, tolerance)  # validation only: the test split is still untouched
  rec_runs = [r for r in runs if r["level"] == choice["level"]]
  best_run = max(rec_runs, key=lambda r: r[choice["by"]])
  test = evaluate_test(Path(best_run["workdir"]))
  doc = {"levels": levels, "seeds": seed_list, "tolerance": tolerance, "epochs": epochs,
         "budget": budget, "budget_seconds": budget_s, "reference_level": reference,
         "cache_budget_mb": cache_budget_mb, "feature_mb": sizes,
         "cv": cv, "probe": probe, "rows": rows, "runs": runs,
         "recommendation": {**choice, "test": test},
         "feature_pass_seconds": t_features, "wall_seconds": time.perf_counter() - t0,
         "config": config.to_dict()}
  run_files.write_json(workdir / "sweep.json", doc)
  from flaxtl import plots
  doc["plot"] = str(plots.sweep(rows, choice, workdir / "sweep.png", tolerance, probe))
  log_fn("\n" + format_table(doc))
  return doc


# ---------------------------------------------------------------------------------------------
# CLI.

def define_flags() -> None:
  from absl import flags
  from flaxtl import cli
  cli.define_config_flags("Sweep directory: a sub-workdir per level, sweep.json/png.")
  flags.DEFINE_list("levels", [], "Freeze levels (config.trainable values) to compare; default: "
                    "the model's own (VGG16: head,block5,block4,block3,block2,all).")
  flags.DEFINE_integer("seeds", 1, "Seeds per level (config.seed, +1, ...): mean and spread.")
  flags.DEFINE_float("tolerance", 0.005, "Val accuracy a cheaper level may lose vs the best.")
  flags.DEFINE_enum("budget", "time", BUDGETS, "'time': every level trains as long as the "
                    "first level after head does in config.epochs; 'epochs': config.epochs (or "
                    "--epochs_per_level) for every level.")
  flags.DEFINE_string("epochs_per_level", "", "With --budget=epochs: LEVEL:EPOCHS,... overriding "
                      "config.epochs for those levels; a fraction < 1 is one epoch cut short.")
  flags.DEFINE_integer("cv", 0, "K > 1: choose the level from K stratified folds of "
                       "train+valid (mean val accuracy) instead of one validation split.")
  flags.DEFINE_float("cache_budget_mb", 1024, "Largest train-split feature array (MiB) a level "
                     "trains from; levels with bigger boundaries train from images.")


def main(argv):
  from absl import flags
  from flaxtl import cli
  FLAGS = flags.FLAGS
  name = cli.start(argv)
  sweep(FLAGS.config, FLAGS.workdir or f"runs/{name}_sweep", FLAGS.levels, FLAGS.seeds,
        FLAGS.tolerance, FLAGS.epochs_per_level, FLAGS.cache_budget_mb, FLAGS.budget, FLAGS.cv)


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("sweep")
