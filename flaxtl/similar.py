"""python -m flaxtl.similar --workdir runs/X query.jpg --index emb.npz [--top-k 8] [--out grid.png]

The images of an index (`python -m flaxtl.embed`) nearest to a query image by cosine similarity of
the model's embeddings, as a table and a PNG grid (the query, then its neighbours with their
similarity and predicted class). The index must come from the same model; the search is numpy,
in batches of index rows, so an index of any size fits in memory next to one batch of scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxtl.errors import FlaxtlError


def nearest(index: np.ndarray, queries: np.ndarray, k: int,
            batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """(Q, k) indices into `index` and their cosine similarities, most similar first."""
  q = np.asarray(queries, np.float32)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  k = min(k, len(index))
  best_s = np.full((len(q), 0), -np.inf, np.float32)
  best_i = np.zeros((len(q), 0), np.int64)
  for start in range(0, len(index), batch):
    rows = np.asarray(index[start:start + batch], np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    s = np.concatenate([best_s, q @ rows.T], axis=1)
    i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(rows)),
                                                (len(q), len(rows)))], axis=1)
    keep = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, 1)
    best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
  order = np.lexsort((best_i, -best_s), axis=1)  # by similarity, then index: ties stay stable
  return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def similar(workdir: str | Path, query: str | Path, index_path: str | Path, top_k: int = 8,
            out: str | Path | None = None, step: int | None = None) -> dict:
  """The `top_k` nearest index images to `query`; writes the grid PNG (default:
  <query>_similar.png in the current folder)."""
  from flaxtl import embed, inference, plots
  if top_k < 1:
    raise FlaxtlError(f"--top-k {top_k}: at least 1")
  if not Path(query).is_file():
    raise FlaxtlError(f"{query}: no such image file")
  index = embed.load_index(index_path)
  pred = inference.load(workdir, step)
  if str(index["model_id"]) != embed.model_id(pred):
    raise FlaxtlError(f"--index {index_path}: made with another model ({index['workdir']}, step "
                      f"{index['step']}), not {workdir} at step {pred.step}: its embeddings are "
                      "not comparable; embed the images again with this --workdir")
  image = inference.as_batch(str(query), pred.image_size)
  q = embed.embed_images(pred, image)
  idx, sims = nearest(index["embeddings"], q["embedding"], top_k)
  names = [str(c) for c in index["class_names"]]
  proba = inference.softmax(q["logits"])[0]
  rows = [{"rank": r + 1, "file": str(index["files"][i]), "similarity": float(s),
           "predicted": names[int(index["predicted"][i])],
           "label": names[int(index["labels"][i])] if index["labels"][i] >= 0 else None}
          for r, (i, s) in enumerate(zip(idx[0], sims[0]))]
  doc = {"query": str(query), "predicted": names[int(proba.argmax())],
         "probability": float(proba.max()), "neighbours": rows}
  out = Path(out) if out else Path(f"{Path(query).stem}_similar.png")
  shown = []
  for r in rows:
    try:
      shown.append(inference.as_batch(r["file"], pred.image_size)[0])
    except FlaxtlError:
      shown.append(None)
  titles = [f"{r['rank']}. cosine {r['similarity']:.3f}\n{Path(r['file']).name[-24:]}\n"
            f"pred {r['predicted']}" + (f", true {r['label']}" if r["label"] else "")
            for r in rows]
  doc["out"] = str(plots.neighbours(
      image[0], f"query: {Path(query).name[-24:]}\npred {doc['predicted']} "
                f"(p={doc['probability']:.2f})", shown, titles, out,
      f"The {len(rows)} nearest of {len(index['files'])} images by cosine similarity of the "
      f"{index['layer']} embeddings"))
  return doc


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training run directory (the model that made the index).",
                      required=True)
  flags.DEFINE_string("index", None, "The .npz written by python -m flaxtl.embed.", required=True)
  flags.DEFINE_integer("top-k", 8, "How many nearest images to show.", lower_bound=1)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by val accuracy).")
  flags.DEFINE_string("out", None, "PNG to write (default: <query>_similar.png here).")


def main(argv):
  from absl import flags
  from flaxtl import runtime
  FLAGS = flags.FLAGS
  if len(argv) != 2:
    raise FlaxtlError("give exactly one query image")
  runtime.setup_logging()
  doc = similar(FLAGS.workdir, argv[1], FLAGS.index, FLAGS["top-k"].value, FLAGS.out, FLAGS.step)
  w = max(len(r["file"]) for r in doc["neighbours"])
  print(f"query {doc['query']}: predicted {doc['predicted']} ({doc['probability']:.3f})")
  for r in doc["neighbours"]:
    print(f"{r['rank']:3d}  {r['similarity']:.4f}  {r['file']:<{w}}  {r['predicted']}")
  print(f"wrote {doc['out']}")


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("similar")
