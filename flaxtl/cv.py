"""python -m flaxtl.cv --config NAME --workdir DIR --folds K [--seeds N] [--include-test]

Stratified K-fold cross-validation of a recipe: a test split of 50 images cannot tell 49/50 from
50/50, K folds over train+valid can. Every fold is a normal run (`train_and_evaluate`: phase 1,
the probe, best-checkpoint rule) in DIR/fold<k> (DIR/seed<s>/fold<k> with several seeds), trained
on the other folds and validated on its own; its config carries data.cv_folds/cv_fold, so
`flaxtl.evaluate --workdir DIR/fold0 --split valid` reads the fold's split back.

The frozen trunk runs once for all folds: one `prepare` decodes every split and computes (or
loads) the trunk's features per split, and each fold's inputs are rows of those
(`prepare.resplit`). The test split is not touched (`--include-test`: it joins the folds).

Reports, per fold and overall, the best val accuracy with its spread and a 95% interval: per fold
a Wilson interval over its validation images (and the std over seeds), overall the mean ± std over
folds with a t interval, and the pooled accuracy (every image validated once) with a Wilson
interval; beside each, the closed-form probe's val accuracy on the same fold, the bar. Printed,
and written to DIR/cv.json (atomically, at the end) and DIR/cv.png. A killed cv run leaves no
cv.json; run it again: finished folds are reused, a cut one resumes.
"""
from __future__ import annotations

import functools
import gc
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from flaxtl.errors import ConfigError

# Student's t, 97.5% quantile, by degrees of freedom (1-30); beyond, the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
         2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
  return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def mean_interval(values: Sequence[float]) -> dict:
  """Mean, std (n-1) and the 95% t interval of the mean (a single value: no interval)."""
  m = statistics.fmean(values)
  if len(values) < 2:
    return {"mean": m, "std": 0.0, "low": None, "high": None}
  sd = statistics.stdev(values)
  half = t975(len(values) - 1) * sd / math.sqrt(len(values))
  return {"mean": m, "std": sd, "low": m - half, "high": m + half}


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a proportion measured on n items (sound at 0 and 1)."""
  if n <= 0:
    return (0.0, 1.0)
  centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
  return (max(0.0, centre - half), min(1.0, centre + half))


def fold_config(config, folds: int, fold: int, include_test: bool = False):
  """The recipe on fold `fold`: only data.cv_* change, and the split seed is pinned so that every
  training seed sees the same folds."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.cv_folds, c.data.cv_fold, c.data.cv_include_test = folds, fold, include_test
    if c.data.split_seed < 0:
      c.data.split_seed = config.seed
  return c


class Folds:
  """The fold Setups of one recipe from ONE prepare (one decode, one trunk pass): `setup(cfg)`
  for any fold and seed of it. The prepare runs at the first fold that needs training."""

  def __init__(self, config, workdir: Path, folds: int, include_test: bool = False,
               log_fn: Callable = print, base=None):
    self.config = fold_config(config, 0, 0)  # no folds: the base split, its seed pinned
    self.workdir, self.folds, self.include_test, self.log_fn = Path(workdir), folds, include_test, log_fn
    self.base = base

  def check(self) -> None:
    """The fold split's mistakes (a class with fewer images than folds), before any compute."""
    from flaxtl import splitting
    splitting.load_splits(fold_config(self.config, self.folds, 0, self.include_test).data,
                          self.config.seed, self.workdir)

  def setup(self, cfg, run_dir: Path | None = None):
    """The Setup of the fold (and seed) `cfg` describes; `run_dir` gets the base split.json, so
    the fold's run reads the same split back (evaluate, predict)."""
    from flaxtl import prepare, splitting
    if self.base is None:
      self.base = prepare.prepare(self.config, self.workdir, log_fn=self.log_fn, fit=False)
    manifest = self.workdir / "split.json"
    if run_dir is not None and manifest.exists():
      Path(run_dir).mkdir(parents=True, exist_ok=True)
      shutil.copyfile(manifest, Path(run_dir) / "split.json")
    splits = splitting.load_splits(cfg.data, cfg.seed, self.workdir)
    self.log_fn(f"fold {cfg.data.cv_fold + 1}/{cfg.data.cv_folds}: train {len(splits['train'])}, "
                f"valid {len(splits['valid'])} images (rows of the one feature pass)")
    return prepare.resplit(self.base, cfg, splits, log_fn=self.log_fn)

  def setup_for(self, run_dir: Path) -> Callable:
    return lambda cfg: self.setup(cfg, run_dir)


def cross_validate(config, workdir: str | Path, folds: int, seeds: int = 1,
                   include_test: bool = False,
                   log_fn: Callable = functools.partial(print, flush=True)) -> dict:
  """Trains the recipe on every fold (and seed), reports per fold and overall (module doc)."""
  from flaxtl import config_check, runs, workdir as run_files
  t0, workdir = time.perf_counter(), Path(workdir)
  if folds < 2:
    raise ConfigError(f"--folds={folds}: k-fold cross-validation needs at least 2 folds")
  if seeds < 1:
    raise ConfigError(f"--seeds={seeds}: at least 1")
  config_check.check_config(config)
  run_files.check(workdir, resume=False)  # writable, not a training run's directory
  maker = Folds(config, workdir, folds, include_test, log_fn)
  maker.check()
  seed_list = [config.seed + i for i in range(seeds)]
  rows = []
  for s in seed_list:
    for f in range(folds):
      cfg = fold_config(config, folds, f, include_test)
      with cfg.unlocked():
        cfg.seed = s
      run_dir = workdir / f"fold{f}" if seeds == 1 else workdir / f"seed{s}" / f"fold{f}"
      row = runs.run(cfg, run_dir, maker.setup_for(run_dir), marker="cv_run.json",
                     log_fn=log_fn, title=f"cv: fold {f + 1}/{folds}, seed {s}")
      rows.append({**row, "fold": f})
      gc.collect()  # the fold's inputs go before the next fold gathers its own
  doc = summarize(rows, folds, seed_list)
  base = maker.base.timings if maker.base is not None else {}
  doc.update(include_test=include_test, workdir=str(workdir), wall_seconds=time.perf_counter() - t0,
             feature_pass_seconds=base.get("features_s"), decode_seconds=base.get("decode_s"),
             config=config.to_dict())
  run_files.write_json(workdir / "cv.json", doc)
  what = config.data.name or Path(config.data.root or workdir).name
  doc["plot"] = str(plot(doc, workdir / "cv.png", title=f"{folds}-fold cross-validation of "
                         f"trainable={config.trainable!r} on {what}"))
  log_fn("\n" + format_table(doc))
  return doc


def summarize(rows: Sequence[dict], folds: int, seeds: Sequence[int]) -> dict:
  """Per fold (over seeds) and overall figures from the fold runs' rows."""
  per_fold = []
  for f in range(folds):
    mine = [r for r in rows if r["fold"] == f]
    acc = mean_interval([r["val_accuracy"] for r in mine])
    n = mine[0]["val_count"]
    lo, hi = wilson(acc["mean"], n)
    probes = [r["probe_val_accuracy"] for r in mine if r.get("probe_val_accuracy") is not None]
    f1 = [r.get("val_macro_f1") for r in mine]
    per_fold.append({"fold": f, "val_count": n, "val_accuracy": acc["mean"],
                     "val_accuracy_std": acc["std"], "low": lo, "high": hi,
                     "val_macro_f1": None if None in f1 else statistics.fmean(f1),
                     "probe_val_accuracy": statistics.fmean(probes) if probes else None,
                     "best_epoch": statistics.fmean(r["best_epoch"] for r in mine),
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in mine)})
  overall = mean_interval([p["val_accuracy"] for p in per_fold])
  n_all = sum(p["val_count"] for p in per_fold)
  pooled = sum(p["val_accuracy"] * p["val_count"] for p in per_fold) / n_all
  doc = {"folds": folds, "seeds": list(seeds), "per_fold": per_fold, "runs": list(rows),
         "val_accuracy": overall, "val_images": n_all,
         "select_by": rows[0].get("select_by", "accuracy") if rows else "accuracy",
         "pooled": {"accuracy": pooled, "correct": round(pooled * n_all), "count": n_all,
                    "low": wilson(pooled, n_all)[0], "high": wilson(pooled, n_all)[1]}}
  if all(p["val_macro_f1"] is not None for p in per_fold):
    doc["val_macro_f1"] = mean_interval([p["val_macro_f1"] for p in per_fold])
  if all(p["probe_val_accuracy"] is not None for p in per_fold):
    doc["probe"] = mean_interval([p["probe_val_accuracy"] for p in per_fold])
    doc["over_probe"] = mean_interval([p["val_accuracy"] - p["probe_val_accuracy"]
                                       for p in per_fold])
  return doc


def _interval(d: dict) -> str:
  return f"{d['low']:.4f}-{d['high']:.4f}" if d.get("low") is not None else "-"


def format_table(doc: dict) -> str:
  multi = len(doc["seeds"]) > 1
  head = (f"{'fold':>4} {'val images':>10} {'val acc':>{17 if multi else 8}} {'95% interval':>13} "
          f"{'probe':>7} {'best ep':>7} {'train s':>8}")
  n = len(doc["seeds"])
  lines = [f"{doc['folds']}-fold cross-validation, {n} seed{'s' if n > 1 else ''}; the test split "
           + ("joined the folds" if doc.get("include_test") else "untouched"), head, "-" * len(head)]
  for p in doc["per_fold"]:
    acc = (f"{p['val_accuracy']:.4f} ± {p['val_accuracy_std']:.4f}" if multi
           else f"{p['val_accuracy']:.4f}")
    probe = f"{p['probe_val_accuracy']:.4f}" if p["probe_val_accuracy"] is not None else "-"
    lines.append(f"{p['fold'] + 1:>4} {p['val_count']:>10} {acc:>{17 if multi else 8}} "
                 f"{p['low']:.4f}-{p['high']:.4f} {probe:>7} {p['best_epoch']:>7.3g} "
                 f"{p['train_seconds']:>8.1f}")
  o, q = doc["val_accuracy"], doc["pooled"]
  lines += ["", f"val accuracy over folds: {o['mean']:.4f} ± {o['std']:.4f} (mean ± std), "
                f"95% interval {_interval(o)} (t, {doc['folds'] - 1} dof)",
            f"pooled (every image validated once per seed): {q['accuracy']:.4f} of "
            f"{q['count']} images, 95% interval {q['low']:.4f}-{q['high']:.4f} (Wilson)"]
  if doc.get("val_macro_f1"):  # each fold's best checkpoint is chosen by its runs' rule
    f = doc["val_macro_f1"]
    lines.append(f"val macro-F1 over folds: {f['mean']:.4f} ± {f['std']:.4f}; best checkpoints "
                 f"chosen by val {doc.get('select_by', 'accuracy')}")
  if "probe" in doc:
    lines.append(f"the closed-form probe on the same folds: {doc['probe']['mean']:.4f} ± "
                 f"{doc['probe']['std']:.4f}; the recipe minus the probe: "
                 f"{doc['over_probe']['mean']:+.4f} (95% interval {_interval(doc['over_probe'])})")
  if doc.get("wall_seconds") is not None:
    fp = doc.get("feature_pass_seconds")
    lines.append(f"wall time {doc['wall_seconds'] / 60:.1f} min"
                 + (f"; one feature pass for every fold: {fp:.0f}s (+ decode "
                    f"{doc.get('decode_seconds') or 0:.0f}s)" if fp is not None else ""))
  return "\n".join(lines)


def plot(doc: dict, path: Path, title: str = "k-fold cross-validation") -> Path:
  """Best val accuracy per fold (Wilson 95% bars), the probe per fold, and the mean over folds
  with its 95% t interval."""
  from flaxtl.plots import _figure, save as _save
  folds = doc["per_fold"]
  fig = _figure(max(7.5, 0.9 * len(folds) + 3), 5.2)
  ax = fig.add_subplot()
  x = [p["fold"] + 1 for p in folds]
  acc = [p["val_accuracy"] for p in folds]
  yerr = [[max(0.0, a - p["low"]) for a, p in zip(acc, folds)],  # Wilson at 0 or 1: rounding
          [max(0.0, p["high"] - a) for a, p in zip(acc, folds)]]
  o = doc["val_accuracy"]
  if o.get("low") is not None:
    ax.axhspan(o["low"], o["high"], color="tab:blue", alpha=0.12,
               label=f"95% interval of the mean ({o['low']:.3f}-{o['high']:.3f})")
  ax.axhline(o["mean"], color="tab:blue", linestyle="--", linewidth=1,
             label=f"mean over folds {o['mean']:.4f} ± {o['std']:.4f}")
  ax.errorbar(x, acc, yerr=yerr, fmt="o", capsize=5, color="tab:blue",
              label="fine-tuned: best val accuracy (95% Wilson interval)")
  probes = [p["probe_val_accuracy"] for p in folds]
  if all(v is not None for v in probes):
    ax.plot(x, probes, "x", markersize=9, color="tab:red", linestyle="none",
            label=f"closed-form probe (the bar), mean {statistics.fmean(probes):.4f}")
  for xi, a, p in zip(x, acc, folds):
    ax.annotate(f"{a:.3f}\n({p['val_count']} imgs)", (xi, a), textcoords="offset points",
                xytext=(14, -4), fontsize=8, va="center")
  lows = [p["low"] for p in folds] + [v for v in probes if v is not None]
  ax.set_ylim(max(0.0, min(lows) - 0.015), min(1.0, max(p["high"] for p in folds)) + 0.01)
  ax.set_xlim(0.5, len(folds) + 0.9)
  ax.set_xticks(x, [f"fold {i}" for i in x])
  ax.set_ylabel("validation accuracy")
  seeds = len(doc["seeds"])
  ax.set_title(f"{title}\n{doc['val_images']} images in {len(folds)} folds, "
               f"{seeds} seed{'s' if seeds > 1 else ''}", fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, fontsize=8, frameon=False)
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI.

def define_flags() -> None:
  from absl import flags
  from flaxtl import cli
  cli.define_config_flags("CV directory: a run per fold, cv.json and cv.png (default: "
                          "runs/<config>_cv).")
  flags.DEFINE_integer("folds", 5, "Number of folds (stratified, over train+valid).", lower_bound=2)
  flags.DEFINE_integer("seeds", 1, "Training seeds per fold (config.seed, +1, ...).", lower_bound=1)
  flags.DEFINE_bool("include-test", False, "Put the test split into the folds too.")


def main(argv):
  from absl import flags
  from flaxtl import cli
  FLAGS = flags.FLAGS
  name = cli.start(argv)
  cross_validate(FLAGS.config, FLAGS.workdir or f"runs/{name}_cv", FLAGS.folds, FLAGS.seeds,
                 FLAGS["include-test"].value)


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("cv")
