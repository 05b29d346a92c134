"""python -m flaxtl.evaluate --workdir runs/X [--split test] [--step N] [--tta flip]

Re-reads one split of a finished run (the saved config; for class_folders the workdir's split.json),
runs the restored model (best step unless --step) and reports what fastai users expect one call
away: accuracy, top-5, per-class precision/recall/F1, the confusion matrix, the most confused pairs
and the images with the highest loss. Writes eval_<split>.json, confusion_<split>.png,
top_losses_<split>.png and learning_curves.png into the workdir (process 0 only).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def scores(labels: np.ndarray, logits: np.ndarray) -> dict:
  """Mean cross-entropy, accuracy and macro-F1 from float32 logits: the figures every evaluation
  reports (macro-F1 from the confusion matrix: cheap, and what select_best_by='macro_f1' ranks)."""
  labels = np.asarray(labels, np.int64)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  pred = logp.argmax(1)
  correct = int((pred == labels).sum()) if len(labels) else 0
  return {"loss": float(-logp[np.arange(len(labels)), labels].mean()) if len(labels) else None,
          "accuracy": correct / max(len(labels), 1), "correct": correct, "count": int(len(labels)),
          "macro_f1": macro_f1(labels, pred, logits.shape[1])}


def confusion(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(pred, np.int64)), 1)
  return cm


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(precision, recall, F1, support) per class from a confusion matrix (rows: true)."""
  n = len(cm)
  tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n),
                 where=precision + recall > 0)
  return precision, recall, f1, support


def macro_f1(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
  """The mean F1 over the classes present in `labels` (the report's macro avg)."""
  _, _, f1, support = per_class(confusion(labels, pred, num_classes))
  return float(f1[support > 0].mean()) if (support > 0).any() else 0.0


def evaluate_split(logits_fn: Callable, params, feeder, batch_size: int) -> dict:
  """The one evaluation: `logits_fn(params, inputs)` over a split's stored inputs (cached features
  or images) on this process's devices, then `scores`; used by training, the sweep and lr_find."""
  from flaxtl import parallel
  logits = parallel.map_batches(logits_fn, params, feeder.inputs, batch_size)
  return {**scores(feeder.labels, logits), "logits": logits}


def classification_metrics(labels: np.ndarray, logits: np.ndarray,
                           class_names: Sequence[str]) -> dict:
  """Accuracy, top-5, loss, per-class P/R/F1/support and the confusion matrix, in numpy."""
  n = len(class_names)
  labels = np.asarray(labels, np.int64)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  pred = logp.argmax(1)
  cm = confusion(labels, pred, n)
  precision, recall, f1, support = per_class(cm)
  s = scores(labels, logits)
  doc = {"num_images": s["count"], "correct": s["correct"], "accuracy": s["accuracy"],
         "loss": s["loss"]}
  if n > 5:
    top5 = np.argsort(-logp, axis=1)[:, :5]
    doc["top5_accuracy"] = float((top5 == labels[:, None]).any(1).mean()) if len(labels) else None
  doc["per_class"] = {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)}
  present = support > 0
  doc["macro_avg"] = {k: float(v[present].mean()) if present.any() else 0.0
                      for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
  doc["confusion_matrix"] = {"rows": "true class", "columns": "predicted class",
                             "class_names": list(class_names), "matrix": cm.tolist()}
  off = [(int(cm[i, j]), i, j) for i in range(n) for j in range(n) if i != j and cm[i, j]]
  doc["most_confused"] = [{"true": class_names[i], "predicted": class_names[j], "count": c}
                          for c, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:10]]
  return doc


def top_losses(paths: Sequence[str], labels: np.ndarray, logits: np.ndarray,
               class_names: Sequence[str], k: int) -> list[dict]:
  """The k examples with the highest cross-entropy, worst first (index into the inputs)."""
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  loss = -logp[np.arange(len(labels)), labels]
  rows = []
  for i in np.argsort(-loss, kind="stable")[:k]:
    p = int(logp[i].argmax())
    rows.append({"index": int(i), "path": paths[i], "true": class_names[labels[i]],
                 "predicted": class_names[p], "probability": float(np.exp(logp[i, p])),
                 "true_probability": float(np.exp(logp[i, labels[i]])), "loss": float(loss[i])})
  return rows


@dataclasses.dataclass
class Report:
  """One split's evaluation: `doc` (what eval_<split>.json holds) and the top-loss images. Its
  figures are matplotlib Figures, which a notebook shows inline; `print(report)` is the CLI's text."""
  doc: dict
  top_images: np.ndarray  # (k, S, S, 3) uint8, in doc["top_losses"]'s order
  class_names: list[str]
  history: list[dict]     # metrics.jsonl, for the learning curves
  name: str               # "<run> (<split>, step N)", the figures' titles
  cams: np.ndarray | None = None  # (k, S, S) Grad-CAM of each top loss's predicted class

  @property
  def accuracy(self) -> float:
    return self.doc["accuracy"]

  def confusion_matrix(self):
    from flaxtl import plots
    return plots.confusion_matrix_figure(np.asarray(self.doc["confusion_matrix"]["matrix"]),
                                         self.class_names, f"Confusion matrix: {self.name}")

  def top_losses(self):
    from flaxtl import plots
    return plots.top_losses_figure(self.top_images, self.doc["top_losses"],
                                   f"Top losses: {self.name}", self.cams)

  def learning_curves(self):
    from flaxtl import plots
    return plots.learning_curves_figure(self.history, f"Learning curves: {self.name}")

  def save(self, workdir: Path) -> list[str]:
    """eval_<split>.json and the PNGs, into `workdir` (what the verb writes)."""
    from flaxtl import plots, workdir as run_dir
    workdir, split = Path(workdir), self.doc["split"]
    files = [run_dir.write_json(workdir / f"eval_{split}.json", self.doc)]
    for fig, name in ((self.confusion_matrix(), f"confusion_{split}.png"),
                      (self.top_losses(), f"top_losses_{split}.png"),
                      *([(self.learning_curves(), "learning_curves.png")] if self.history else [])):
      files.append(plots.save(fig, workdir / name))
    self.doc["files"] = [str(f) for f in files]
    return self.doc["files"]

  def __str__(self) -> str:
    return format_report(self.doc)

  def __repr__(self) -> str:
    d = self.doc
    return (f"<Report {self.name}: accuracy {d['accuracy']:.4f} ({d['correct']}/"
            f"{d['num_images']}), loss {d['loss']:.4f}>")


def split_images(pred, workdir: Path, split: str, log_fn: Callable = print):
  """One split of a run, as it trained on it (the saved config; for class_folders split.json),
  decoded at the model's size -> (Split without unreadable files, uint8 images, {bad: why})."""
  from flaxtl import data, input_pipeline, inference, splitting
  config = pred.info["config"]
  if data.split_by_flaxtl(config.data) and not (workdir / "split.json").exists():
    raise inference.InferenceError(f"{workdir / 'split.json'}: missing; without the run's split "
                                   "manifest the evaluation could include training images")
  splits = splitting.load_splits(config.data, config.seed, workdir)
  if split not in splits:
    raise data.DataError(f"no {split!r} split in this run (splits: {', '.join(splits)})")
  sp = splits[split]
  if list(sp.class_names) != pred.class_names:
    raise data.DataError(f"the data's classes ({', '.join(sp.class_names)}) differ from the "
                         f"model's ({', '.join(pred.class_names)}) in {workdir / 'run.json'}")
  if sp.images is not None:  # decoded by the source (tfds), as in training
    images, bad = sp.images, {}
  else:
    images, bad = input_pipeline.decode_images(sp.paths, pred.image_size,
                                               max_pixels=config.data.max_pixels)
  if bad:
    log_fn(f"skipping {len(bad)} unreadable file(s): " +
           "; ".join(f"{p}: {why}" for p, why in sorted(bad.items())))
    sp = sp.subset([i for i, p in enumerate(sp.paths) if p not in bad])
  if not len(sp):
    raise data.DataError(f"split {split!r} has no readable images")
  return sp, images, bad


def report(workdir: str | Path, split: str = "test", step: int | None = None, *,
           num_top_losses: int = 12, tta: str = "none", log_fn: Callable = print) -> Report:
  """Evaluates the restored model (best step unless `step`) on `split` of the run's own data,
  with test-time augmentation `tta` (`inference.TTA`); the top losses carry their Grad-CAM maps
  for the plain model's predicted class."""
  from flaxtl import explain, inference, workdir as run_dir
  workdir = Path(workdir)
  pred = inference.load(workdir, step, tta=tta)
  sp, images, bad = split_images(pred, workdir, split, log_fn)
  logits = pred.predict_logits(images)
  doc = {"workdir": str(workdir.resolve()), "split": split, "step": pred.step, "tta": tta,
         **classification_metrics(sp.labels, logits, pred.class_names),
         "top_losses": top_losses(sp.paths, sp.labels, logits, pred.class_names, num_top_losses),
         "skipped_files": bad}
  worst = images[[r["index"] for r in doc["top_losses"]]]
  cams = explain.gradcam(pred, worst)["cam"] if len(worst) else None
  tta_note = "" if tta == "none" else f", TTA {tta}"
  return Report(doc, worst, pred.class_names, run_dir.read_metrics(workdir),
                f"{workdir.name} ({split}, step {pred.step}{tta_note})", cams)


def evaluate(workdir: str | Path, split: str = "test", step: int | None = None, *,
             num_top_losses: int = 12, tta: str = "none", write: bool = True,
             log_fn: Callable = print) -> dict:
  """The verb: `report`, then eval_<split>.json and the PNGs in the workdir (process 0, if
  `write`) -> the report's doc."""
  import jax
  r = report(workdir, split, step, num_top_losses=num_top_losses, tta=tta, log_fn=log_fn)
  if write and jax.process_index() == 0:
    r.save(Path(workdir))
  return r.doc


def format_report(doc: dict) -> str:
  names = doc["confusion_matrix"]["class_names"]
  tta = doc.get("tta", "none")
  lines = [f"{doc['split']} split, step {doc['step']}"
           f"{'' if tta == 'none' else f', test-time augmentation {tta}'}: "
           f"accuracy {doc['accuracy']:.4f} "
           f"({doc['correct']}/{doc['num_images']})" +
           (f", top-5 {doc['top5_accuracy']:.4f}" if "top5_accuracy" in doc else "") +
           f", loss {doc['loss']:.4f}", ""]
  w = max(12, *(len(f'{i} {n}') for i, n in enumerate(names)))
  lines.append(f"{'class':<{w}}  precision  recall     f1  support")
  for name, m in doc["per_class"].items():
    lines.append(f"{name:<{w}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
                 f"{m['support']:7d}")
  m = doc["macro_avg"]
  lines += [f"{'macro avg':<{w}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
            f"{doc['num_images']:7d}", "", "confusion matrix (rows: true, columns: predicted)"]
  matrix = doc["confusion_matrix"]["matrix"]
  cw = max(3, *(len(str(v)) for row in matrix for v in row))
  # Columns are numbered (full names are too wide for many classes); the key maps them back.
  lines.append(" " * w + "  " + " ".join(f"{i:>{cw}}" for i in range(len(names))))
  for i, (name, row) in enumerate(zip(names, matrix)):
    lines.append(f"{f'{i} {name}':<{w}}  " + " ".join(f"{v:>{cw}}" for v in row))
  if doc["most_confused"]:
    lines += ["", "most confused (true -> predicted: count)"]
    lines += [f"  {r['true']} -> {r['predicted']}: {r['count']}" for r in doc["most_confused"]]
  lines += ["", "highest losses"]
  lines += [f"  {r['loss']:7.3f}  true {r['true']} ({r['true_probability']:.3f})  "
            f"pred {r['predicted']} ({r['probability']:.3f})  {r['path']}"
            for r in doc["top_losses"]]
  if doc.get("files"):
    lines += ["", "wrote: " + ", ".join(doc["files"])]
  return "\n".join(lines)


def define_flags() -> None:
  from absl import flags
  from flaxtl import inference
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_string("split", "test", "Split to evaluate: train, valid or test.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by the run's rule, "
                       "config.select_best_by).")
  flags.DEFINE_integer("top_losses", 12, "How many highest-loss images to report and plot.")
  flags.DEFINE_string("tta", "none", inference.TTA_HELP)


def main(argv):
  from absl import flags
  from flaxtl import cli
  FLAGS = flags.FLAGS
  cli.start(argv, config=False)
  doc = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.step, num_top_losses=FLAGS.top_losses,
                 tta=FLAGS.tta)
  import jax
  if jax.process_index() == 0:
    print(format_report(doc))


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("evaluate")
