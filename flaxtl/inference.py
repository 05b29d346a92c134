"""A trained model back from its workdir, without re-running data prep or rebuilding the optimizer.

run.json and config.json say which model to build (`models.create`) and how its inputs are
preprocessed; only the params of one checkpoint step are restored (orbax partial restore into an
abstract target from `jax.eval_shape`); `Predictor` runs preprocessing + the full network, jitted,
through `parallel.map_batches` like the feature pass and the evaluation during training.
Every failure names the file at fault, so evaluate/predict/export can report it plainly.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtl import models, preprocessing
from flaxtl.errors import FlaxtlError

RUN_KEYS = ("class_names", "preprocessing", "image_size", "model", "num_classes")


class InferenceError(FlaxtlError, ValueError):
  """A workdir or bundle that cannot give a model back; the message names the file."""


def read_json(path: Path, keys: Sequence[str] = ()) -> dict:
  try:
    doc = json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise InferenceError(f"{path}: missing") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InferenceError(f"{path}: not readable JSON ({e})") from None
  missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
  if missing:
    raise InferenceError(f"{path}: lacks {', '.join(missing)}")
  return doc


def check_info(doc: dict, path: Path) -> None:
  """The fields every model description (run.json, bundle.json) needs, checked before any work."""
  if doc["preprocessing"] not in preprocessing.MODES:
    raise InferenceError(f"{path}: unknown preprocessing {doc['preprocessing']!r} "
                         f"(known: {', '.join(preprocessing.MODES)})")
  if not isinstance(doc["image_size"], int) or doc["image_size"] < 1:
    raise InferenceError(f"{path}: image_size must be a positive integer, got "
                         f"{doc['image_size']!r}")
  if not doc["class_names"] or not all(isinstance(c, str) for c in doc["class_names"]):
    raise InferenceError(f"{path}: class_names must be a non-empty list of names")


def build_model(model_cfg: dict, num_classes: int):
  """`models.create` from the saved `config.model` dict."""
  try:
    return models.create(ml_collections.ConfigDict({"model": dict(model_cfg)}), num_classes)
  except (ValueError, AttributeError, KeyError) as e:
    raise InferenceError(f"model config {model_cfg}: {e}") from None


def abstract_variables(model, image_size: int) -> dict:
  """The shapes of `model`'s variables: params, and batch_stats for a model with batch norm."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x))


def load_variables(workdir: Path, model, image_size: int, step: int | None = None,
                   which: str = "best", item: str = "params") -> tuple[dict, int]:
  """The chosen step's variables (params from `item`: 'params', or 'ema_params' for a run that
  kept an EMA; batch_stats) for `model`, replicated over this process's devices."""
  from flaxtl import checkpointing, parallel
  return checkpointing.restore_params(workdir, abstract_variables(model, image_size),
                                      parallel.replicated(parallel.local_mesh()), step, which, item)


# Test-time augmentation, by name -> the number of views `tta_views` makes of each image.
TTA = {"none": 1, "flip": 2, "flip_crops": 6}
CROP = 7 / 8  # flip_crops: each corner crop's side, as a fraction of the image's
TTA_HELP = (f"Test-time augmentation, one of {', '.join(TTA)}: the views' probabilities averaged "
            "(flip: the image and its mirror image; flip_crops: also its four corner crops).")


def check_tta(tta: str) -> str:
  if not isinstance(tta, str) or tta not in TTA:
    raise InferenceError(f"unknown test-time augmentation {tta!r} (valid: {', '.join(TTA)})")
  return tta


def tta_views(x, tta: str) -> list:
  """(N, S, S, 3) float images -> the views TTA averages over: the images; 'flip' adds their
  mirror images (left-right); 'flip_crops' also the four corner crops (CROP of the side) resized
  back to S (bilinear), a zoom in that keeps the model's input size."""
  views = [x]
  if tta in ("flip", "flip_crops"):
    views.append(jnp.flip(x, axis=2))
  if tta == "flip_crops":
    n, s, _, ch = x.shape
    c = round(s * CROP)  # lax.slice, not indexing: a slice (not a gather) on a symbolic batch too
    views += [jax.image.resize(jax.lax.slice(x, (0, i, j, 0), (n, i + c, j + c, ch)), x.shape,
                               "linear") for i in (0, s - c) for j in (0, s - c)]
  assert len(views) == TTA[tta], tta
  return views


@dataclasses.dataclass(frozen=True)
class Forward:
  """(variables, RGB 0-255 images) -> float32 logits; hashable, so equal models share a compile.
  With `tta`, all views go through the model as one batch; the logits are the log of the views'
  mean softmax probability, so softmax, argmax and the loss read them as plain logits."""
  model: Any
  mode: str
  tta: str = "none"

  def _logits(self, variables, x):
    x = preprocessing.preprocess(x, self.mode)
    return self.model.apply(variables, x).astype(jnp.float32)

  def view_logits(self, variables, images):
    """-> (views, N, classes) float32 logits."""
    x = jnp.asarray(images, jnp.float32)
    views = tta_views(x, self.tta)
    z = self._logits(variables, jnp.concatenate(views) if len(views) > 1 else x)
    return z.reshape(len(views), x.shape[0], z.shape[-1])

  def __call__(self, variables, images):
    if self.tta == "none":
      return self._logits(variables, jnp.asarray(images, jnp.float32))
    z = self.view_logits(variables, images)
    return jax.nn.logsumexp(jax.nn.log_softmax(z, -1), axis=0) - np.log(len(z)).astype(np.float32)


@dataclasses.dataclass
class Predictor:
  """A restored (or exported) classifier: `predict(images)` takes paths, PIL images or arrays."""
  model: Any
  variables: Any  # what model.apply takes: {'params'[, 'batch_stats']}
  class_names: list[str]
  preprocessing: str
  image_size: int
  batch_size: int = 64
  info: dict = dataclasses.field(default_factory=dict)  # workdir, step, run.json, config
  tta: str = "none"  # the test-time augmentation the predict methods use unless given one

  @property
  def params(self):
    """The weights alone (no batch norm statistics)."""
    return self.variables["params"]

  @property
  def step(self) -> int | None:
    return self.info.get("step")

  def predict_logits(self, images_uint8: np.ndarray, tta: str | None = None) -> np.ndarray:
    """(N, S, S, 3) RGB 0-255 at the model's image size -> (N, classes) float32 logits. `tta`
    (default: the predictor's): a name in TTA; then the logits are log mean probabilities."""
    from flaxtl import parallel
    tta = check_tta(self.tta if tta is None else tta)
    images = np.asarray(images_uint8)
    shape = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != shape:
      raise InferenceError(f"expected images of shape (N, {', '.join(map(str, shape))}), got "
                           f"{images.shape}; `predict` resizes images of other sizes")
    # batch_size counts what goes through the model at once: every view of every image.
    return parallel.map_batches(Forward(self.model, self.preprocessing, tta), self.variables,
                                images, max(1, self.batch_size // TTA[tta]))

  def predict_proba(self, images_uint8: np.ndarray, tta: str | None = None) -> np.ndarray:
    """(N, S, S, 3) RGB 0-255 at the model's image size -> (N, classes) probabilities (with
    `tta`, the mean of the views' probabilities)."""
    return softmax(self.predict_logits(images_uint8, tta))

  def predict(self, images, tta: str | None = None) -> np.ndarray:
    """Probabilities for one image or many: file paths, PIL images, or RGB/grayscale/RGBA arrays
    ((H, W[, C]) or (N, H, W[, C])), uint8 or float 0-255, any size (resized as in training)."""
    return self.predict_proba(as_batch(images, self.image_size), tta)


def probabilities(model, mode: str, tta: str = "none"):
  """(variables, images) -> probabilities: the function exported (SavedModel, ONNX); with `tta`,
  the mean of the views' probabilities, computed directly (what the ONNX translator knows)."""
  f = Forward(model, mode, check_tta(tta))
  if tta == "none":
    return lambda variables, images: jax.nn.softmax(f(variables, images), axis=-1)
  return lambda variables, images: jax.nn.softmax(f.view_logits(variables, images),
                                                  axis=-1).mean(0)


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _one_image(img, image_size: int) -> np.ndarray:
  """One image of any accepted form -> (S, S, 3) uint8."""
  from flaxtl import input_pipeline
  if isinstance(img, (str, Path)):
    arr, bad = input_pipeline.decode_images([str(img)], image_size)
    if bad:
      raise InferenceError(f"{img}: {bad[str(img)]}")
    return arr[0]
  if type(img).__module__.startswith("PIL."):
    img = np.asarray(img.convert("RGB"))
  return _as_rgb(np.asarray(img), image_size)[0]


def _as_rgb(x: np.ndarray, image_size: int) -> np.ndarray:
  """(H, W), (H, W, 1|3|4) or (N, H, W[, C]) -> (N, S, S, 3) uint8; float must be 0-255."""
  from flaxtl import input_pipeline
  single = x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] > 4)
  if x.ndim == 2 or (x.ndim == 3 and not single):
    x = x[..., None]  # grayscale, one image or a batch
  if single:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise InferenceError(f"expected an image (H, W), (H, W, 1|3|4) or a batch (N, H, W[, C]), "
                         f"got shape {x.shape}")
  x = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x[..., :3]  # gray -> RGB, RGBA -> RGB
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.number):
      raise InferenceError(f"images of dtype {x.dtype}: pass uint8 or float RGB 0-255")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
      raise InferenceError(f"float images must be RGB 0-255, got values in [{lo:g}, {hi:g}]")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0 and x.size:
      raise InferenceError("float images with values in [0, 1]: flaxtl takes RGB 0-255 (as "
                           "training did); multiply by 255 or pass uint8 arrays")
  if x.dtype != np.uint8 or x.shape[1:3] != (image_size, image_size):
    x = input_pipeline.resize(x, image_size).numpy()  # one op for a whole batch
  return x


def as_batch(images, image_size: int) -> np.ndarray:
  """Any accepted input -> (N, S, S, 3) uint8 at the model's size."""
  if isinstance(images, np.ndarray):
    return _as_rgb(images, image_size)
  if isinstance(images, (str, Path)) or type(images).__module__.startswith("PIL."):
    images = [images]
  out = [_one_image(img, image_size) for img in images]
  return np.stack(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


def load(workdir: str | Path, step: int | None = None, which: str = "best",
         batch_size: int = 64, tta: str = "none") -> Predictor:
  """The model of a training workdir at its best (or latest, or given) checkpoint step; `tta`:
  the test-time augmentation its predict methods use by default."""
  check_tta(tta)
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise InferenceError(f"workdir {workdir}: not a directory")
  run = read_json(workdir / "run.json", RUN_KEYS)
  config = ml_collections.ConfigDict(read_json(workdir / "config.json", ("model", "data")))
  check_info(run, workdir / "run.json")
  if len(run["class_names"]) != run["num_classes"]:
    raise InferenceError(f"{workdir / 'run.json'}: {len(run['class_names'])} class names for "
                         f"num_classes={run['num_classes']}")
  model = build_model(run["model"], run["num_classes"])
  variables, step = load_variables(workdir, model, run["image_size"], step, which,
                                   run.get("params_item", "params"))
  return Predictor(model, variables, list(run["class_names"]), run["preprocessing"],
                   int(run["image_size"]), batch_size,
                   info={"workdir": str(workdir.resolve()), "step": int(step), "run": run,
                         "config": config}, tta=tta)
