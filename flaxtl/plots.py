"""The pictures a user looks at after training: confusion matrix, top losses (with Grad-CAM),
learning curves, Grad-CAM over one image, an embedding map, nearest-neighbour grids, and the
freeze-level sweep's score and cost per level.

Figures are drawn with matplotlib's object API (no pyplot, no display, no global backend switch):
each `*_figure` returns a `Figure`, which a notebook shows inline; the verbs write them as PNGs,
atomically, so a half-drawn PNG never replaces a good one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _figure(w: float, h: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(w, h), dpi=100, layout="constrained")


def save(fig, path: Path) -> Path:
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path,
                     title: str = "Confusion matrix") -> Path:
  return save(confusion_matrix_figure(matrix, class_names, title), path)


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str],
                            title: str = "Confusion matrix"):
  """Rows: true class, columns: predicted; colour = share of the true class, text = count."""
  matrix = np.asarray(matrix)
  n = len(class_names)
  side = min(40.0, max(5.0, 0.4 * n + 2.5))
  cell = side * 72 * 0.8 / n  # points per cell, roughly: text is sized to fit it
  fontsize = float(np.clip(0.45 * cell, 5, 10))
  fig = _figure(side + 1.2, side)
  ax = fig.add_subplot()
  share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
  labels = [str(c) for c in class_names]
  ax.set_xticks(range(n), labels, rotation=90 if max(map(len, labels)) > 3 else 0,
                fontsize=fontsize)
  ax.set_yticks(range(n), labels, fontsize=fontsize)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(f"{title}  (accuracy {np.trace(matrix) / max(matrix.sum(), 1):.1%}, "
               f"{int(matrix.sum())} images)")
  if cell >= 12:  # counts where they stay legible
    for i, j in zip(*np.nonzero(matrix)):
      ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=min(9, 0.4 * cell),
              color="white" if share[i, j] > 0.5 else "black")
  return fig


def _overlay(ax, image: np.ndarray, cam: np.ndarray | None) -> None:
  """The image, and over it a Grad-CAM map (0-1) in the jet colours, half transparent."""
  ax.imshow(image, interpolation="nearest")
  if cam is not None:
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
  ax.set_xticks([])
  ax.set_yticks([])


def top_losses(images: np.ndarray, rows: Sequence[dict], path: Path,
               title: str = "Top losses", cams: np.ndarray | None = None) -> Path:
  return save(top_losses_figure(images, rows, title, cams), path)


def top_losses_figure(images: np.ndarray, rows: Sequence[dict], title: str = "Top losses",
                      cams: np.ndarray | None = None):
  """A grid of the worst-predicted images: true / predicted class, probabilities, loss; with
  `cams`, each image's Grad-CAM for its predicted class over it."""
  k = len(rows)
  cols = min(4, max(1, k))
  lines = max(1, -(-k // cols))
  fig = _figure(3.2 * cols, 3.4 * lines + 0.4)
  fig.suptitle(f"{title}: true / predicted class, probability of each, loss"
               + ("\nheatmap: Grad-CAM of the predicted class (where its evidence lies)"
                  if cams is not None else ""))
  for i, (img, r) in enumerate(zip(images, rows)):
    ax = fig.add_subplot(lines, cols, i + 1)
    _overlay(ax, img, None if cams is None else cams[i])
    ax.set_xticks([])
    ax.set_yticks([])
    ok = r["true"] == r["predicted"]
    ax.set_title(f"true {r['true']} (p={_p(r['true_probability'])})\n"
                 f"pred {r['predicted']} (p={_p(r['probability'])})\nloss {r['loss']:.2f}  "
                 f"{Path(r['path']).name[-18:]}", fontsize=9,
                 color="darkgreen" if ok else "darkred")
  return fig


def _p(p: float) -> str:
  return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def learning_curves(history: Sequence[dict], path: Path, title: str = "Learning curves") -> Path:
  return save(learning_curves_figure(history, title), path)


def learning_curves_figure(history: Sequence[dict], title: str = "Learning curves"):
  """Train and validation loss and accuracy per epoch (metrics.jsonl)."""
  fig = _figure(11, 4.2)
  fig.suptitle(title)
  epochs = [r["epoch"] + 1 for r in history]
  from flaxtl.workdir import best_record, score_key
  top = best_record(history)
  best = top["epoch"] + 1  # the epoch whose checkpoint is kept as best (the run's rule)
  by = " by val macro-F1" if score_key(top) == "val_macro_f1" else ""
  for i, (metric, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
    ax = fig.add_subplot(1, 2, i + 1)
    for split, style in (("train", "o-"), ("val", "s--")):
      ax.plot(epochs, [r[f"{split}_{metric}"] for r in history], style, label=split)
    if metric == "accuracy" and all("val_macro_f1" in r for r in history):
      ax.plot(epochs, [r["val_macro_f1"] for r in history], "^:", label="val macro-F1")
    ax.axvline(best, color="gray", linestyle=":", label=f"best (epoch {best}{by})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(label.capitalize())
    if metric == "accuracy":
      ax.set_ylim(0, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
  return fig


def gradcam(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> Path:
  """The image as the model saw it, and the Grad-CAM map over it."""
  fig = _figure(8.4, 4.8)
  fig.suptitle(title, fontsize=10)
  left, right = fig.subplots(1, 2)
  _overlay(left, image, None)
  left.set_title("input (resized as the model sees it)", fontsize=9)
  _overlay(right, image, cam)
  right.set_title("Grad-CAM: red = strongest evidence", fontsize=9)
  from matplotlib.cm import ScalarMappable
  fig.colorbar(ScalarMappable(cmap="jet"), ax=right, shrink=0.8,
               label="evidence for the class (relative)")
  return save(fig, path)


def embedding_map(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path,
                  title: str, axis_labels: tuple[str, str] = ("PC 1", "PC 2"),
                  wrong: np.ndarray | None = None) -> Path:
  """2-D points coloured by class, a legend of class names; `wrong` marks misclassified ones."""
  n = len(class_names)
  fig = _figure(9.0 if n <= 20 else 8.0, 7.0)
  ax = fig.add_subplot()
  from matplotlib import colormaps
  cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
  colours = [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]
  for c in range(n):
    sel = labels == c
    if sel.any():
      ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=colours[c], alpha=0.75,
                 label=f"{class_names[c]} ({int(sel.sum())})")
  if wrong is not None and wrong.any():
    ax.scatter(xy[wrong, 0], xy[wrong, 1], s=60, facecolors="none", edgecolors="black",
               linewidths=1.0, label=f"misclassified ({int(wrong.sum())})")
  ax.set_xlabel(axis_labels[0])
  ax.set_ylabel(axis_labels[1])
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if n <= 30:
    ax.legend(fontsize=8, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title="class (images)")
  return save(fig, path)


def neighbours(query: np.ndarray, query_title: str, images: Sequence[np.ndarray | None],
               titles: Sequence[str], path: Path, title: str) -> Path:
  """The query image, then its nearest images in order, each with its caption."""
  k = len(images) + 1
  cols = min(5, k)
  lines = -(-k // cols)
  fig = _figure(2.9 * cols, 3.1 * lines + 0.3)
  fig.suptitle(title)
  for i, (img, text) in enumerate(zip([query, *images], [query_title, *titles])):
    ax = fig.add_subplot(lines, cols, i + 1)
    if img is None:
      ax.text(0.5, 0.5, "file not readable", ha="center", va="center", transform=ax.transAxes)
      ax.set_xticks([])
      ax.set_yticks([])
    else:
      _overlay(ax, img, None)
    ax.set_title(text, fontsize=8, color="darkblue" if i == 0 else "black")
  return save(fig, path)


def sweep(rows: Sequence[dict], choice: dict, path: Path, tolerance: float,
          probe: dict | None = None) -> Path:
  """The rule's validation score (accuracy or macro-F1, top) and train time (bottom, log scale)
  against the freeze level."""
  from flaxtl.sweep_report import LABEL, format_params
  fig = _figure(max(8.0, 1.5 * len(rows) + 1), 6.5)
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
  x = list(range(len(rows)))
  key = choice.get("by", "val_accuracy")
  acc = [r[key] for r in rows]
  err = [r.get(f"{key}_std", 0.0) for r in rows]
  rec = next(i for i, r in enumerate(rows) if r["level"] == choice["level"])
  top.errorbar(x, acc, yerr=err if any(err) else None, fmt="o-", capsize=4,
               label=f"best {LABEL[key]}")
  best = choice.get("best_score", choice["best_val_accuracy"])
  probe = probe if probe and probe.get(key) is not None else None
  top.axhspan(best - tolerance, best, color="tab:green", alpha=0.15,
              label=f"within {tolerance:g} of the best")
  top.plot([rec], [acc[rec]], marker="*", markersize=18, color="tab:red", linestyle="none",
           label=f"recommended: {choice['level']}")
  if probe:
    top.axhline(probe[key], color="tab:purple", linestyle=":",
                label=f"closed-form probe (the bar): {probe[key]:.3f}")
  for i, a in enumerate(acc):
    top.annotate(f"{a:.3f}", (i, a), textcoords="offset points", xytext=(0, 8), ha="center",
                 fontsize=9)
  lo = min([a - e for a, e in zip(acc, err)] + ([probe[key]] if probe else []))
  span = max(acc) - lo + 0.01
  top.set_ylim(max(0.0, lo - 0.1 * span), max(acc) + 0.15 * span)  # room for the labels
  top.set_ylabel(f"best {LABEL[key]}")
  top.set_title(f"Freeze-level sweep: {LABEL[key]} and cost per level")
  top.grid(alpha=0.3)
  top.legend(loc="lower right", fontsize=9)
  secs = [max(r["train_seconds"], 0.1) for r in rows]  # a log axis: the head's fit can round to 0
  bottom.bar(x, secs, color=["tab:red" if i == rec else "tab:gray" for i in x], alpha=0.7)
  for i, (s, r) in enumerate(zip(secs, rows)):
    ep = "head fit" if r["level"] == "head" else f"{r['epochs']:.2g} ep"
    bottom.annotate(f"{s:.0f}s\n{ep}, {'cache' if r['cached'] else 'images'}",
                    (i, s), textcoords="offset points",
                    xytext=(0, 2), ha="center", va="bottom", fontsize=8)
  bottom.set_yscale("log")
  bottom.set_ylim(min(secs) / 2, max(secs) * 8)
  bottom.set_ylabel("train time (s, log)")
  bottom.grid(alpha=0.3, axis="y")
  bottom.set_xticks(x, [f"{r['level']}\n{format_params(r['trainable_params'])}"
                        for r in rows])
  bottom.set_xlabel("config.trainable, with its trainable parameters (fewest to the left)")
  return save(fig, path)
