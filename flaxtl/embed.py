"""python -m flaxtl.embed --workdir runs/X [PATH ...] [--split valid] --out emb.npz [--map map.png]

A trained model's embeddings: the pre-logits features (the head's input: the GAP vector of
VGG16's 'gap' head, fc2 with the Keras top, fc1 for the small CNN) of image files and folders, or
of one of the run's splits, with file names and predicted classes, in an .npz that
`python -m flaxtl.similar` searches. `--map` draws the embeddings' 2-D PCA map coloured by class
(the true class for a split, with the misclassified images ringed; the predicted class for files).

One jitted pass gives the logits and the features together (`capture`), through
`parallel.map_batches` like every inference; the .npz is written atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from flaxtl import preprocessing
from flaxtl.errors import FlaxtlError

INDEX_KEYS = ("embeddings", "files", "predicted", "probability", "labels", "class_names",
              "layer", "model_id")


def pre_logits_layer(model) -> str:
  """The layer whose output the classifier reads (the one before `predictions`)."""
  return model.layers[-2]


@dataclasses.dataclass(frozen=True)
class Embed:
  """(variables, uint8 images) -> {'embedding': (N, D) pre-logits features, 'logits'}."""
  model: Any
  mode: str

  def __call__(self, variables, images):
    x = preprocessing.preprocess(jnp.asarray(images, jnp.float32), self.mode)
    layer = pre_logits_layer(self.model)
    logits, feats = self.model.apply(variables, x, capture=(layer,))
    return {"embedding": feats[layer].reshape(len(x), -1).astype(jnp.float32),
            "logits": logits.astype(jnp.float32)}


def model_id(pred) -> str:
  """Which model made an embedding: its run description and checkpoint step (not its path)."""
  doc = json.dumps({"run": pred.info.get("run"), "step": pred.step}, sort_keys=True, default=str)
  return hashlib.sha256(doc.encode()).hexdigest()[:16]


def embed_images(pred, images: np.ndarray) -> dict[str, np.ndarray]:
  """{'embedding', 'logits'} of (N, S, S, 3) uint8 images at the model's size."""
  from flaxtl import parallel
  return parallel.map_batches(Embed(pred.model, pred.preprocessing), pred.variables,
                              np.asarray(images), pred.batch_size)


def embed_files(pred, files: Sequence[str], max_pixels: int = 50_000_000,
                chunk: int = 1024) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
  """Embeddings of image files, decoded in chunks -> (arrays, the files embedded, {bad: why})."""
  from flaxtl import input_pipeline
  parts, good, bad = [], [], {}
  for i in range(0, len(files), chunk):
    part = list(files[i:i + chunk])
    images, errors = input_pipeline.decode_images(part, pred.image_size, max_pixels=max_pixels)
    bad.update(errors)
    good += [p for p in part if p not in errors]
    parts.append(embed_images(pred, images))
  if not good:
    raise FlaxtlError(f"no readable image among {len(files)} file(s)"
                      + (f": {next(iter(bad))}: {next(iter(bad.values()))}" if bad else ""))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, good, bad


def save_index(path: Path, doc: dict) -> Path:
  """The .npz, via a temp file in the same folder + rename: never half a file."""
  path = Path(path)
  if path.suffix != ".npz":
    raise FlaxtlError(f"--out {path}: an index is an .npz file")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **doc)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def load_index(path: str | Path) -> dict[str, np.ndarray]:
  """An index written by `embed`, checked; a wrong file is a FlaxtlError naming it."""
  path = Path(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      doc = {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise FlaxtlError(f"--index {path}: no such file (make one with python -m flaxtl.embed)") from None
  except (OSError, ValueError) as e:
    raise FlaxtlError(f"--index {path}: not a readable .npz ({e})") from None
  missing = [k for k in INDEX_KEYS if k not in doc]
  if missing:
    raise FlaxtlError(f"--index {path}: lacks {', '.join(missing)}; not made by flaxtl.embed")
  if not len(doc["embeddings"]):
    raise FlaxtlError(f"--index {path}: holds no embeddings")
  return doc


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The first two principal components of the rows -> (N, 2) coordinates, share of variance.

  From the eigenvectors of the (D, D) covariance (numpy `eigh`), the same axes as the SVD of the
  centred data: LAPACK's SVD under OpenBLAS threads ran 20x slower than `eigh` on a loaded
  2-core machine."""
  x = np.asarray(x, np.float64)
  xc = x - x.mean(0)
  values, vectors = np.linalg.eigh(xc.T @ xc)
  top = vectors[:, ::-1][:, :2]
  top = top * np.where(top[np.abs(top).argmax(0), [0, 1]] < 0, -1, 1)  # a fixed sign per axis
  share = values[::-1][:2] / max(values.sum(), 1e-12)
  return xc @ top, share


def embed(workdir: str | Path, paths: Sequence[str] = (), split: str | None = None,
          out: str | Path = "emb.npz", map_png: str | Path | None = None,
          step: int | None = None, log_fn: Callable = print) -> dict:
  """Embeds files/folders (`paths`) or a split of the run, writes the .npz (and the map)."""
  from flaxtl import evaluate, inference, plots, predict
  workdir = Path(workdir)
  if bool(paths) == bool(split):
    raise FlaxtlError("give image files/folders to embed, or --split NAME (one of the run's "
                      "splits), not both")
  pred = inference.load(workdir, step)
  if split:
    sp, images, bad = evaluate.split_images(pred, workdir, split, log_fn)
    arrays, files, labels = embed_images(pred, images), list(sp.paths), sp.labels
  else:
    found, missing = predict.find_images(paths)
    for p, why in missing.items():
      log_fn(f"warning: {p}: {why}")
    if not found:
      raise FlaxtlError(f"no image files in {', '.join(map(str, paths))}")
    max_pixels = pred.info["config"].data.get("max_pixels", 50_000_000)
    arrays, files, bad = embed_files(pred, found, max_pixels)
    labels = np.full(len(files), -1)
  for p, why in bad.items():
    log_fn(f"warning: {p}: {why}")
  proba = inference.softmax(arrays["logits"])
  doc = {"embeddings": arrays["embedding"], "files": np.asarray(files, dtype=str),
         "predicted": proba.argmax(1).astype(np.int32),
         "probability": proba.max(1).astype(np.float32),
         "labels": np.asarray(labels, np.int32), "class_names": np.asarray(pred.class_names),
         "layer": np.asarray(pre_logits_layer(pred.model)), "model_id": np.asarray(model_id(pred)),
         "workdir": np.asarray(str(workdir.resolve())), "step": np.asarray(pred.step)}
  save_index(Path(out), doc)
  log_fn(f"{len(files)} embedding(s) of {doc['embeddings'].shape[1]} features at "
         f"{doc['layer']} -> {out}")
  if map_png:
    xy, share = pca_2d(doc["embeddings"])
    known = split is not None
    colour = doc["labels"] if known else doc["predicted"]
    what = f"the {split} split" if known else f"{len(files)} image(s)"
    plots.embedding_map(
        xy, colour, pred.class_names, Path(map_png),
        f"Embeddings of {what} ({doc['layer']}, {workdir.name}), PCA; colour: "
        f"{'true' if known else 'predicted'} class",
        (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%})"),
        wrong=(doc["predicted"] != doc["labels"]) if known else None)
    log_fn(f"map -> {map_png}")
  return doc


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by val accuracy).")
  flags.DEFINE_string("split", None, "Embed this split of the run (train, valid, test) instead "
                      "of files.")
  flags.DEFINE_string("out", "emb.npz", "The .npz to write.")
  flags.DEFINE_string("map", None, "Also write a 2-D PCA map of the embeddings to this PNG.")


def main(argv):
  from absl import flags
  from flaxtl import runtime
  FLAGS = flags.FLAGS
  runtime.setup_logging()
  embed(FLAGS.workdir, argv[1:], FLAGS.split, FLAGS.out, FLAGS.map, FLAGS.step,
        log_fn=lambda m: print(m, flush=True))


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("embed")
