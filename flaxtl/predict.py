"""python -m flaxtl.predict --workdir runs/X PATH... [--top-k 3] [--json | --csv] [--batch-size 64]
    [--tta flip]

Classifies image files and folders (recursively; image extensions in any case) with a run's best
model. Files are decoded in parallel by tf.data in chunks and predicted in batches; a file that
cannot be read is reported (stderr, and under "errors" with --json) and the rest go on. Exit code 0
when at least one image was predicted.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence


def find_images(paths: Iterable[str]) -> tuple[list[str], dict[str, str]]:
  """Files as given, folders searched recursively for image extensions; {missing path: why}."""
  from flaxtl import data
  files, errors = [], {}
  for p in map(Path, paths):
    if p.is_dir():
      # As training lists a class folder (hidden files and folders skipped), by extension here.
      found = [f for f in data.image_files(p) if Path(f).suffix.lower() in data.IMAGE_EXTENSIONS]
      if not found:
        errors[str(p)] = "folder holds no image files"
      files += found
    elif p.is_file():
      files.append(str(p))
    else:
      errors[str(p)] = "no such file or directory"
  return list(dict.fromkeys(files)), errors


def predict_files(predictor, files: Sequence[str], top_k: int = 3, *, max_pixels: int = 50_000_000,
                  chunk: int = 1024) -> tuple[list[dict], dict[str, str]]:
  """[{path, top_k: [{class, probability}]}] in input order, and {unreadable file: why}."""
  import numpy as np
  from flaxtl import input_pipeline
  rows, errors = [], {}
  k = max(1, min(top_k, len(predictor.class_names)))
  for i in range(0, len(files), chunk):
    part = list(files[i:i + chunk])
    images, bad = input_pipeline.decode_images(part, predictor.image_size,
                                               max_pixels=max_pixels)
    errors.update(bad)
    good = [p for p in part if p not in bad]
    probs = predictor.predict_proba(images)
    for path, p in zip(good, probs):
      top = np.argsort(-p, kind="stable")[:k]
      rows.append({"path": path, "top_k": [{"class": predictor.class_names[j],
                                            "probability": float(p[j])} for j in top]})
  return rows, errors


def write_table(rows: list[dict], out) -> None:
  w = max([len(r["path"]) for r in rows] + [4])
  for r in rows:
    out.write(f"{r['path']:<{w}}  " +
              "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"]) + "\n")


def write_csv(rows: list[dict], out) -> None:
  k = max((len(r["top_k"]) for r in rows), default=0)
  writer = csv.writer(out)
  writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1)
                              for c in ("class", "probability")])
  for r in rows:
    writer.writerow([r["path"]] + [v for t in r["top_k"]
                                   for v in (t["class"], f"{t['probability']:.6f}")])


def define_flags() -> None:
  from absl import flags
  from flaxtl import inference
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by val accuracy).")
  flags.DEFINE_integer("top-k", 3, "Classes to show per image.", lower_bound=1)
  flags.DEFINE_integer("batch-size", 64, "Images per forward pass.", lower_bound=1)
  flags.DEFINE_bool("json", False, "Print JSON: predictions and errors.")
  flags.DEFINE_bool("csv", False, "Print CSV: path, class_1, probability_1, ...")
  flags.DEFINE_string("tta", "none", inference.TTA_HELP)
  flags.mark_bool_flags_as_mutual_exclusive(["json", "csv"])


def main(argv):
  from absl import flags
  from flaxtl import inference, runtime
  from flaxtl.errors import FlaxtlError
  FLAGS = flags.FLAGS
  if len(argv) < 2:
    raise FlaxtlError("give image files or folders to classify")
  runtime.setup_logging()
  predictor = inference.load(FLAGS.workdir, FLAGS.step, batch_size=FLAGS["batch-size"].value,
                             tta=FLAGS.tta)
  files, errors = find_images(argv[1:])
  max_pixels = predictor.info["config"].data.get("max_pixels", 50_000_000)
  rows, bad = predict_files(predictor, files, FLAGS["top-k"].value, max_pixels=max_pixels,
                            chunk=max(FLAGS["batch-size"].value, 1024))
  errors.update(bad)
  for path, why in errors.items():
    print(f"warning: {path}: {why}", file=sys.stderr)
  if FLAGS.json:
    json.dump({"workdir": predictor.info["workdir"], "step": predictor.step,
               "tta": predictor.tta, "predictions": rows,
               "errors": [{"path": p, "error": e} for p, e in errors.items()]},
              sys.stdout, indent=2)
    sys.stdout.write("\n")
  elif FLAGS.csv:
    write_csv(rows, sys.stdout)
  else:
    write_table(rows, sys.stdout)
  print(f"{len(rows)} image(s) predicted, {len(errors)} error(s)", file=sys.stderr)
  sys.exit(0 if rows else 1)


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("predict")
