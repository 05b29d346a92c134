"""A trained model back from its workdir, without re-running data prep or rebuilding the optimizer.

run.json and config.json say which model to build (`models.create`) and how its inputs are
preprocessed; only the params of one checkpoint step are restored (orbax partial restore into an
abstract target from `jax.eval_shape`); `Predictor` runs preprocessing + the full network, jitted.
Every failure names the file at fault, so evaluate/predict/export can report it plainly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxtl import models, preprocessing

RUN_KEYS = ("class_names", "preprocessing", "image_size", "model", "num_classes")


class InferenceError(ValueError):
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


def abstract_params(model, image_size: int):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def check_params(params, abstract, source: str) -> None:
  """`params` (arrays, or orbax's metadata of them) must have the names and shapes of `abstract`."""
  flat = jax.tree_util.tree_flatten_with_path
  got = {jax.tree_util.keystr(p): tuple(v.shape if hasattr(v, "shape") else np.shape(v))
         for p, v in flat(params)[0]}
  for path, leaf in flat(abstract)[0]:
    name = jax.tree_util.keystr(path)
    if name not in got:
      raise InferenceError(f"{source}: no parameter {name}")
    if got[name] != leaf.shape:
      raise InferenceError(f"{source}: parameter {name} has shape {got[name]}, the model needs "
                           f"{leaf.shape}")


def replicated() -> NamedSharding:
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())


def choose_step(mngr, step: int | None = None, which: str = "best") -> int:
  from flaxtl import checkpointing
  steps = sorted(mngr.all_steps())
  where = mngr.directory
  if not steps:
    raise InferenceError(f"{where}: no checkpoints")
  if step is not None:
    if step not in steps:
      raise InferenceError(f"{where}: no step {step} (kept steps: {', '.join(map(str, steps))})")
    return step
  if which == "latest":
    return steps[-1]
  if which != "best":
    raise ValueError(f"which={which!r}: 'best' or 'latest'")
  best = checkpointing.best_step(mngr)
  return steps[-1] if best is None else best


def restore_params(workdir: Path, model, image_size: int, step: int | None = None,
                   which: str = "best") -> tuple[Any, int]:
  """Only `params` of the chosen step (no optimizer state), replicated over all devices."""
  import orbax.checkpoint as ocp
  from flaxtl import checkpointing
  ckpt_dir = Path(workdir).resolve() / "checkpoints"  # orbax reads relative paths as missing
  if not ckpt_dir.is_dir():
    raise InferenceError(f"{ckpt_dir}: missing (not a training workdir?)")
  try:
    with _quiet("absl"):  # orbax warns that a read-only manager is read-only
      mngr = checkpointing.manager(workdir, read_only=True)
  except Exception as e:  # orbax reads step metadata eagerly; junk there surfaces here.
    raise InferenceError(f"{ckpt_dir}: unreadable ({type(e).__name__}: {e})") from None
  with mngr:
    step = choose_step(mngr, step, which)
    abstract = abstract_params(model, image_size)
    # Shapes first, from the metadata: a run.json that does not fit fails here, plainly.
    item_dir = ckpt_dir / str(step) / "default"
    try:
      with _quiet("absl"), ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item_dir).item_metadata
      stored = meta.tree["params"] if meta is not None else None
    except Exception as e:
      raise InferenceError(f"{item_dir}: unreadable checkpoint metadata "
                           f"({_root_cause(e)})") from None
    if stored is None:
      raise InferenceError(f"{item_dir}: no readable checkpoint metadata (corrupt or incomplete)")
    check_params(stored, abstract, f"{ckpt_dir / str(step)} (for the model in "
                                   f"{Path(workdir) / 'run.json'})")
    sharding = replicated()
    target = {"params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)}
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      params = mngr.restore(step, args=args)["params"]
    except Exception as e:  # tensorstore/orbax raise many types for truncated or corrupt files.
      raise InferenceError(f"{ckpt_dir / str(step)}: params could not be restored "
                           f"({_root_cause(e)})") from None
  return params, step


def _root_cause(e: BaseException) -> str:
  """The innermost exception's first line: orbax wraps the useful tensorstore message deep."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


@contextlib.contextmanager
def _quiet(logger: str):
  """Drops the logger's records below ERROR for a while (a filter: TensorFlow resets levels)."""
  log, keep = logging.getLogger(logger), lambda record: record.levelno >= logging.ERROR
  log.addFilter(keep)
  try:
    yield
  finally:
    log.removeFilter(keep)


def forward(model, mode: str):
  """(params, RGB 0-255 images) -> (float32 logits, probabilities): preprocessing + network."""
  def f(params, images):
    x = preprocessing.preprocess(jnp.asarray(images, jnp.float32), mode)
    logits = model.apply({"params": params}, x).astype(jnp.float32)
    return logits, jax.nn.softmax(logits, axis=-1)
  return f


def probabilities(model, mode: str):
  """(params, images) -> probabilities: the function exported to TensorFlow."""
  f = forward(model, mode)
  return lambda params, images: f(params, images)[1]


@functools.lru_cache(maxsize=8)
def _jitted_forward(model, mode: str):
  """One jitted forward per (model, preprocessing): predictors of equal models share compiles."""
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(forward(model, mode), in_shardings=(rep, sharded), out_shardings=rep), rep, sharded


@dataclasses.dataclass
class Predictor:
  """A restored (or exported) classifier: `predict_proba(uint8 SxS images)`, `predict(any size)`."""
  model: Any
  params: Any
  class_names: list[str]
  preprocessing: str
  image_size: int
  batch_size: int = 64
  info: dict = dataclasses.field(default_factory=dict)  # workdir, step, run.json, config

  def __post_init__(self):
    self._fn, rep, self._sharded = _jitted_forward(self.model, self.preprocessing)
    self.params = jax.device_put(self.params, rep)
    # Batches are padded (a multiple of the device count): few compiles, rows sharded.
    self._devices = self._sharded.mesh.size
    self._batch = -(-self.batch_size // self._devices) * self._devices

  @property
  def step(self) -> int | None:
    return self.info.get("step")

  def predict_logits_and_proba(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    shape = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f"expected images of shape (N, {', '.join(map(str, shape))}), got "
                       f"{images.shape}; `predict` resizes images of other sizes")
    # Small inputs get a smaller padded batch (a power of two: few distinct compiles).
    size = min(self._batch, self._devices * 2 ** max(0, int(np.ceil(np.log2(
        max(1, -(-len(images) // self._devices)))))))
    outs = []
    for i in range(0, len(images), size):
      chunk = images[i:i + size]
      pad = np.zeros((size - len(chunk), *shape), chunk.dtype)
      batch = np.concatenate([chunk, pad]) if len(pad) else chunk
      x = jax.make_array_from_callback(batch.shape, self._sharded, lambda idx: batch[idx])
      logits, probs = self._fn(self.params, x)
      outs.append((np.asarray(logits)[:len(chunk)], np.asarray(probs)[:len(chunk)]))
    n = len(self.class_names)
    if not outs:
      return np.zeros((0, n), np.float32), np.zeros((0, n), np.float32)
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

  def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) RGB 0-255 at the model's image size -> (N, classes) probabilities."""
    return self.predict_logits_and_proba(images_uint8)[1]

  def predict(self, images) -> np.ndarray:
    """RGB 0-255 images of any size (uint8 or float; an (N, H, W, 3) array, a list of (H, W, 3)
    arrays or one image) -> probabilities, after the resize training used (data.resize)."""
    from flaxtl import data
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = images[None]
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
      if images.dtype != np.uint8 or images.shape[1:3] != (self.image_size, self.image_size):
        images = data.resize(images, self.image_size).numpy()  # one op for a whole batch
      return self.predict_proba(images)
    out = []
    for img in images:
      img = np.asarray(img)
      if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected RGB images (H, W, 3), got shape {img.shape}")
      if img.dtype != np.uint8 or img.shape[:2] != (self.image_size, self.image_size):
        img = data.resize(img, self.image_size).numpy()
      out.append(img)
    stacked = np.stack(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return self.predict_proba(stacked)


def load(workdir: str | Path, step: int | None = None, which: str = "best",
         batch_size: int = 64) -> Predictor:
  """The model of a training workdir at its best (or latest, or given) checkpoint step."""
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
  params, step = restore_params(workdir, model, run["image_size"], step, which)
  return Predictor(model, params, list(run["class_names"]), run["preprocessing"],
                   int(run["image_size"]), batch_size,
                   info={"workdir": str(workdir.resolve()), "step": int(step), "run": run,
                         "config": config})
