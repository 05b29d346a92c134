"""What a freeze-level sweep's runs say (flaxtl/sweep.py runs them): one row per level from its
seeds' runs, the probe's bar, the rule that recommends a level on validation only, and the table.
Pure functions of the runs' figures, so the rule is tested without training anything."""
from __future__ import annotations

import statistics
from typing import Sequence

# ---------------------------------------------------------------------------------------------
# The rule.

def recommend(rows: Sequence[dict], tolerance: float) -> dict:
  """The cheapest level (fewest trainable params; ties: train time, then order) whose val score
  is within `tolerance` of the best; rows are per level (means over seeds). The score is the
  runs' own rule (config.select_best_by: val accuracy, or val macro-F1)."""
  if not rows:
    raise ValueError("no levels to choose from")
  key = score_key(rows[0])
  best = max(rows, key=lambda r: r[key])
  eps = 1e-9  # 0.975 - 0.005 must count as within 0.005 despite float rounding
  within = [i for i, r in enumerate(rows) if best[key] - r[key] <= tolerance + eps]
  pick = min(within, key=lambda i: (rows[i]["trainable_params"], rows[i]["train_seconds"], i))
  return {"level": rows[pick]["level"], "best_level": best["level"], "by": key,
          "best_score": best[key], "best_val_accuracy": best["val_accuracy"],
          "tolerance": tolerance, "within_tolerance": [rows[i]["level"] for i in within],
          "rule": f"fewest trainable params among the levels whose best {LABEL[key]} is within "
                  "tolerance of the best level's (ties: less train time, then the order given); "
                  "the test split is not used"}


LABEL = {"val_accuracy": "val accuracy", "val_macro_f1": "val macro-F1"}


def score_key(row: dict) -> str:
  from flaxtl.workdir import SELECT_BY
  return SELECT_BY[row.get("select_by") or "accuracy"]


def _spread(runs: Sequence[dict], key: str, name: str | None = None) -> dict:
  """Mean, std, min and max of `key` over runs (None when a run lacks it), as `name`_*."""
  name = name or key
  v = [r.get(key) for r in runs]
  if any(x is None for x in v):
    return {name: None}
  return {name: statistics.fmean(v), f"{name}_std": statistics.stdev(v) if len(v) > 1 else 0.0,
          f"{name}_min": min(v), f"{name}_max": max(v)}


def aggregate(runs: Sequence[dict]) -> dict:
  """One row per level from its seeds' runs: means, and the spread of val accuracy and
  macro-F1."""
  mean = lambda k: statistics.fmean(r[k] for r in runs)  # noqa: E731
  return {"level": runs[0]["level"], "trainable_params": runs[0]["trainable_params"],
          "frozen_params": runs[0]["frozen_params"], "boundary": runs[0]["boundary"],
          "cached": runs[0]["cached"], "epochs": runs[0]["epochs"], "seeds": len(runs),
          "select_by": runs[0].get("select_by", "accuracy"),
          **_spread(runs, "val_accuracy"), **_spread(runs, "val_macro_f1"),
          "best_epoch": mean("best_epoch"), "val_loss": mean("val_loss"),
          "train_seconds": mean("train_seconds"), "images_per_s": mean("images_per_s")}


def probe_row(runs: Sequence[dict]) -> dict | None:
  """The closed-form probe's val accuracy (the bar), from the runs that fitted it: it depends only
  on the GAP features and the split, so every level has the same (per fold with --cv)."""
  first = next((r["level"] for r in runs if r.get("probe_val_accuracy") is not None), None)
  if first is None:
    return None
  mine = [r for r in runs if r["level"] == first and r.get("probe_val_accuracy") is not None]
  return {"level": "probe", **_spread(mine, "probe_val_accuracy", "val_accuracy"),
          **_spread(mine, "probe_val_macro_f1", "val_macro_f1"), "runs": len(mine),
          "l2": mine[0].get("probe_l2"), "few_shot": mine[0].get("probe_few_shot"),
          "method": "L-BFGS logistic regression on the cached GAP features, L2 chosen on valid"}


# ---------------------------------------------------------------------------------------------
# Reporting.

def format_params(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_table(doc: dict) -> str:
  multi = len(doc["seeds"]) > 1 or bool(doc.get("cv"))
  rec = doc["recommendation"]
  probe = doc.get("probe")
  key = rec.get("by", "val_accuracy")  # the rule's score: the column shown
  acc_w = 17 if multi else 8
  col = "val acc" if key == "val_accuracy" else "val F1"
  head = (f"{'level':<7} {'trainable':>9} {'epochs':>6} {'input':>6} {col:>{acc_w}} "
          f"{'best ep':>7} {'val loss':>8} {'train s':>8} {'img/s':>7}")
  lines = [head, "-" * len(head)]
  fmt = lambda r: ("-" if r.get(key) is None else  # noqa: E731
                   f"{r[key]:.4f} ± {r[f'{key}_std']:.4f}" if multi else f"{r[key]:.4f}")
  if probe:
    lines.append(f"{'probe':<7} {'-':>9} {'fit':>6} {'cache':>6} {fmt(probe):>{acc_w}}  "
                 "<- the bar: closed-form probe on the GAP features")
  for r in doc["rows"]:
    acc = fmt(r)
    mark = "  <- recommended" if r["level"] == rec["level"] else ""
    if (probe and r["level"] != "head" and probe.get(key) is not None
        and r[key] <= probe[key]):
      mark += "  (not above the probe)"
    ep = "fit" if r["level"] == "head" else f"{r['epochs']:.3g}"
    lines.append(f"{r['level']:<7} {format_params(r['trainable_params']):>9} {ep:>6} "
                 f"{'cache' if r['cached'] else 'images':>6} "
                 f"{acc:>{acc_w}} {r['best_epoch']:>7g} {r['val_loss']:>8.4f} "
                 f"{r['train_seconds']:>8.1f} {r['images_per_s']:>7.1f}{mark}")
  t = rec["test"]
  lines += ["", f"best {LABEL[key]}: {rec.get('best_score', rec['best_val_accuracy']):.4f} "
            f"({rec['best_level']}); within "
            f"{rec['tolerance']:g}: {', '.join(rec['within_tolerance'])}",
            f"recommended: trainable={rec['level']!r} (rule: {rec['rule']})",
            f"test accuracy of {rec['level']} (evaluated once, after the choice): "
            f"{t['test_accuracy']:.4f} ({t['test_correct']}/{t['test_count']}), best checkpoint "
            f"step {t['step']} in {t['workdir']}",
            f"sweep wall time {doc['wall_seconds'] / 60:.1f} min (feature pass "
            f"{doc['feature_pass_seconds']:.0f}s); wrote sweep.json, sweep.png"]
  if doc.get("budget") == "time" and doc.get("budget_seconds"):
    lines.insert(0, f"budget: {doc['budget_seconds']:.0f}s of training per level (the train time of "
                    f"{doc['reference_level']}); epochs = what each level's steps fit in it")
  if probe and probe.get("few_shot"):
    from flaxtl.probe import format_few_shot
    lines.insert(-4, f"few-shot on the probe's features (ridge, closed form): "
                     f"{format_few_shot(probe['few_shot'])}")
  if multi:
    per = (f"{len(doc['seeds'])} seed(s) x {doc['cv']} folds" if doc.get("cv")
           else f"{len(doc['seeds'])} seeds")
    lines.insert(0, f"{per} per level: {col} is mean ± std; other columns are means")
  return "\n".join(lines)
