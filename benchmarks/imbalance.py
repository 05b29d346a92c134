"""Issue 16's imbalance measurement: Caltech-97 with half its classes cut to 5 train images.

  FLAXTL_DATA_DIR=/work/shared/data FLAXTL_CACHE_DIR=/work/cache python -m benchmarks.imbalance \
    --weights /work/shared/weights/vgg16_tv_in1k_features.safetensors [--seeds 0,1,2] \
    [--out benchmarks/imbalance.json]

How: one `prepare` of the caltech101 config (trainable='head', its seeded 70/15/15 split) reads
the cached GAP features; per seed s, a seeded draw (numpy default_rng([16, s])) picks 48 of the 97
classes and 5 of each one's train images; valid and test are untouched. The cut split is rows of
the same features (`prepare.resplit`: nothing decoded, the trunk not run), and every variant is a
normal `train.train_and_evaluate` run on it (training seed = s): the probe head (phase 1 alone,
the default recipe for trainable='head') with and without class weights, its L2 chosen by val
accuracy or val macro-F1; and a head trained from random by minibatch AdamW (the caltech101
config's 40 epochs, phase 2's loss and sampler) with the plain loss, class weights, or the
balanced sampler. Choices (L2, best epoch) are made on valid; test is evaluated once per run, at
its end. Per-class figures come from the same best checkpoint's test logits.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> config overrides
    "probe": {},
    "probe, class_weight=balanced": {"class_weight": "balanced"},
    "probe, select_best_by=macro_f1": {"select_best_by": "macro_f1"},
    "probe, class_weight=balanced, select_best_by=macro_f1": {"class_weight": "balanced",
                                                             "select_best_by": "macro_f1"},
    "adamw head": {"head_init": "random"},
    "adamw head, class_weight=balanced": {"head_init": "random", "class_weight": "balanced"},
    "adamw head, sampler=balanced": {"head_init": "random", "data.sampler": "balanced"},
}
CUT_CLASSES, KEEP = 48, 5


def cut(train, seed: int, num_classes: int):
  """(indices of train kept, the cut classes): 48 classes drawn by the seed keep 5 images."""
  rng = np.random.default_rng([16, seed])
  classes = np.sort(rng.choice(num_classes, CUT_CLASSES, replace=False))
  keep = []
  for c in range(num_classes):
    ids = np.flatnonzero(train.labels == c)
    keep.extend(np.sort(rng.choice(ids, KEEP, replace=False)) if c in classes else ids)
  return np.sort(np.asarray(keep)), classes


def per_class_test(setup, cfg, run_dir: Path, cut_classes) -> dict:
  """The best checkpoint's test figures per class (as `finish` restores it), split into the
  cut classes and the rest."""
  import jax
  from flaxtl import checkpointing, evaluate, parallel, train
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.variables)
  variables, step = checkpointing.restore_params(
      run_dir, abstract, parallel.replicated(parallel.local_mesh()), item=train.model_item(cfg))
  feeder = setup.feeders["test"]
  logits = parallel.map_batches(setup.network.logits, variables, feeder.inputs, cfg.eval_batch_size)
  doc = evaluate.classification_metrics(feeder.labels, logits, setup.class_names)
  pc = list(doc["per_class"].values())
  mask = np.isin(np.arange(len(pc)), cut_classes)
  mean = lambda key, m: float(np.mean([pc[i][key] for i in np.flatnonzero(m)]))  # noqa: E731
  return {"step": step, "accuracy": doc["accuracy"], "macro_f1": doc["macro_avg"]["f1"],
          "cut_recall": mean("recall", mask), "cut_f1": mean("f1", mask),
          "rest_recall": mean("recall", ~mask), "rest_f1": mean("f1", ~mask)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--weights", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated names")
  ap.add_argument("--out", default="benchmarks/imbalance.json")
  ap.add_argument("--workdir", default="", help="runs go here (default: a temp folder)")
  args = ap.parse_args()
  import flaxtl
  flaxtl.configure_cpu()
  from flaxtl import prepare, train
  from flaxtl.configs import caltech101
  quiet = lambda *a: None  # noqa: E731
  config = caltech101.get_config()
  config.model.weights = args.weights
  config.trainable = "head"
  config.probe_shots = ()
  t0 = time.perf_counter()
  base = prepare.prepare(config, None, fit=False, log_fn=print)
  print(f"prepared in {time.perf_counter() - t0:.0f}s: train {base.feeders['train'].n}, "
        f"valid {base.feeders['valid'].n}, test {base.feeders['test'].n}", flush=True)
  k = len(base.class_names)
  root = Path(args.workdir or tempfile.mkdtemp(prefix="imbalance_"))
  names = [v.strip() for v in args.variants.split(";") if v.strip()]
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    keep, cut_classes = cut(base.splits["train"], seed, k)
    splits = {"train": base.splits["train"].subset(keep), "valid": base.splits["valid"],
              "test": base.splits["test"]}
    counts = np.bincount(splits["train"].labels, minlength=k)
    print(f"\nseed {seed}: train {len(keep)} images, {CUT_CLASSES} classes cut to {KEEP} "
          f"(the others {counts[counts > KEEP].min()}-{counts.max()})", flush=True)
    for name in names:
      cfg = config.copy_and_resolve_references()
      cfg.seed = seed
      cfg.update_from_flattened_dict(VARIANTS[name])
      t = time.perf_counter()
      setup = prepare.resplit(base, cfg, splits, log_fn=quiet)
      run_dir = root / f"seed{seed}" / name.replace(", ", "_").replace(" ", "_")
      res = train.train_and_evaluate(cfg, run_dir, setup=setup, log_fn=quiet)
      test = per_class_test(setup, cfg, run_dir, cut_classes)
      assert abs(test["accuracy"] - res["test_accuracy"]) < 1e-9, (test, res)
      row = {"seed": seed, "variant": name, "val_accuracy": res["val_accuracy"],
             "val_macro_f1": res["val_macro_f1"], "test_accuracy": res["test_accuracy"],
             "test_macro_f1": res["test_macro_f1"], "best_epoch": res["best_epoch"],
             "head_l2": (res["head_fit"] or {}).get("l2"),  # the probe head's (None: AdamW)
             **{f"test_{k2}": v for k2, v in test.items()
                if k2 not in ("accuracy", "macro_f1", "step")},
             "seconds": time.perf_counter() - t}
      rows.append(row)
      print(f"  {name:<55} val acc {row['val_accuracy']:.4f} F1 {row['val_macro_f1']:.4f}"
            f" | test acc {row['test_accuracy']:.4f} F1 {row['test_macro_f1']:.4f}"
            f" | cut recall {row['test_cut_recall']:.3f} rest {row['test_rest_recall']:.3f}"
            f" | {row['seconds']:.0f}s", flush=True)
  summary = summarize(rows, names)
  from benchmarks import common
  doc = {"rows": rows, "summary": summary, "cpu": cpu_model(),
         "load_end": common.load(),
         "cut_classes": CUT_CLASSES, "keep": KEEP, "seeds": args.seeds,
         "wall_seconds": time.perf_counter() - t0}
  Path(args.out).write_text(json.dumps(doc, indent=2))
  print("\n" + table(summary))


def cpu_model() -> str:
  """lscpu's model name (platform.processor() is empty on Linux), with the core count."""
  import os
  try:
    names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
  except OSError:
    names = []
  return f"{names[0] if names else platform.machine()}, {os.cpu_count()} CPUs"


METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "test_cut_recall",
           "test_rest_recall")


def summarize(rows, names):
  out = []
  for name in names:
    mine = [r for r in rows if r["variant"] == name]
    s = {"variant": name, "runs": len(mine)}
    for m in METRICS:
      v = [r[m] for r in mine]
      s[m] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
    out.append(s)
  return out


def table(summary) -> str:
  head = ("| variant | val acc | val macro-F1 | test acc | test macro-F1 | test recall, cut "
          "classes | test recall, the rest |")
  lines = [head, "| --- |" + " ---: |" * len(METRICS)]
  for s in summary:
    lines.append(f"| {s['variant']} | " + " | ".join(f"{s[m][0]:.4f} ± {s[m][1]:.4f}"
                                                      for m in METRICS) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
