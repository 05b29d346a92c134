"""python -m flaxtl.export --workdir runs/X --out DIR [--step N] [--format saved_model|onnx|both]
    [--tta flip]

A self-contained inference bundle: params.msgpack (the model's variables: params and, with batch
norm, batch_stats; flax.serialization), bundle.json (model config, class names, preprocessing,
image size, provenance), and the model with its preprocessing as a
TensorFlow SavedModel (through jax2tf) and/or an ONNX file (flaxtl.onnx_export), each serving uint8
[N, S, S, 3] images -> probabilities without JAX; with --tta the exported function averages the
views' probabilities itself (bundle.json records it). `load_exported(DIR)` gives the bundle back as
an `inference.Predictor` with the same test-time augmentation. The bundle is built in a temporary
directory next to DIR and renamed at the end, so a failure never leaves a half-written DIR.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from flaxtl.errors import FlaxtlError

FORMAT = "flaxtl.bundle/1"
PARAMS_FILE = "params.msgpack"
BUNDLE_FILE = "bundle.json"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
FORMATS = ("saved_model", "onnx", "both")


class ExportError(FlaxtlError, ValueError):
  """An export that cannot be made (bad workdir, occupied --out); names the file or directory."""


def version() -> str:
  from importlib import metadata
  try:
    return metadata.version("flaxtl")
  except metadata.PackageNotFoundError:
    return "unknown"


def save_saved_model(predictor, path: Path) -> None:
  """Preprocessing + network as a SavedModel; 'serving_default': images uint8 [N, S, S, 3] ->
  {'probabilities': float32 [N, classes]}. Lowered for CPU and CUDA; the batch is polymorphic."""
  import jax
  from jax.experimental import jax2tf
  from flaxtl import checkpointing, inference, input_pipeline
  tf = input_pipeline._tf()
  params = jax.tree.map(lambda a: tf.Variable(np.asarray(a), trainable=False), predictor.variables)
  fn = jax2tf.convert(inference.probabilities(predictor.model, predictor.preprocessing,
                                              predictor.tta),
                      polymorphic_shapes=[None, "(b, ...)"], with_gradient=False,
                      native_serialization_platforms=("cpu", "cuda"))
  s = predictor.image_size

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="images")])
  def serve(images):
    return {"probabilities": fn(params, images)}

  module = tf.Module()
  module.params = params
  module.class_names = tf.Variable(predictor.class_names, trainable=False)
  module.serve = serve
  with checkpointing._quiet("absl"):  # TensorFlow logs each saver step at INFO
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def save_onnx(predictor, path: Path) -> None:
  """Preprocessing + network + softmax as ONNX: input 'images' uint8 [N, S, S, 3], output
  'probabilities' float32 [N, classes], class names in the metadata. Computed in float32 (a
  bfloat16 model's params are float32; onnxruntime's CPU convolutions have no bfloat16)."""
  import dataclasses
  import jax
  from flaxtl import inference, onnx_export
  model = predictor.model
  if getattr(model, "dtype", None) is not None and model.dtype != jax.numpy.float32:
    model = dataclasses.replace(model, dtype=jax.numpy.float32)
  params = jax.tree.map(np.asarray, predictor.variables)
  try:
    proto = onnx_export.to_onnx(
        inference.probabilities(model, predictor.preprocessing, predictor.tta), params,
        predictor.image_size,
        {"class_names": predictor.class_names, "image_size": str(predictor.image_size),
         "preprocessing": predictor.preprocessing, "tta": predictor.tta,
         "input": "RGB uint8 [N, S, S, 3], resized as flaxtl.input_pipeline.resize does",
         "flaxtl_version": version()})
  except onnx_export.UnsupportedError as e:
    raise ExportError(f"this model cannot be written as ONNX yet ({e}); export the SavedModel "
                      "(--format saved_model) instead") from None
  path.write_bytes(proto.SerializeToString())


def require_onnx() -> None:
  """The `onnx` package, or a plain error before any work."""
  import importlib.util
  if importlib.util.find_spec("onnx") is None:
    raise ExportError("--format onnx needs the `onnx` package: pip install -e \".[onnx]\" (or "
                      "pip install onnx onnxruntime); nothing was written")


def export(workdir: str | Path, out: str | Path, step: int | None = None,
           saved_model: bool = True, onnx: bool = False, tta: str = "none", log_fn=print) -> Path:
  """Writes the bundle of `workdir`'s best (or given) step to `out`, atomically, with a
  SavedModel and/or an ONNX file; `tta` (`inference.TTA`) is baked into both."""
  import jax
  from flax import serialization
  from flaxtl import inference
  try:
    inference.check_tta(tta)
  except FlaxtlError as e:
    raise ExportError(f"{e}; nothing was written") from None
  if onnx:
    require_onnx()
  out = Path(out).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"{out} already exists and is not an empty directory: "
                      "choose a new one (nothing was written)")
  try:
    predictor = inference.load(workdir, step, tta=tta)
  except FlaxtlError as e:
    raise ExportError(f"cannot export {workdir}: {e} (nothing was written)") from None
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, predictor.variables))
    (tmp / PARAMS_FILE).write_bytes(blob)
    info = predictor.info
    doc = {"format": FORMAT, "flaxtl_version": version(),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": info["run"]["model"], "num_classes": len(predictor.class_names),
           "class_names": predictor.class_names, "preprocessing": predictor.preprocessing,
           "image_size": predictor.image_size, "tta": tta,
           "resize": "flaxtl.input_pipeline.resize: tf.image.resize bilinear antialias, rounded to uint8",
           "input": "RGB 0-255, (N, image_size, image_size, 3)",
           "params": {"file": PARAMS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
           "saved_model": SAVED_MODEL_DIR if saved_model else None,
           "onnx": ONNX_FILE if onnx else None,
           "source": {"workdir": info["workdir"], "step": info["step"],
                      "weights": info["run"].get("weights"),
                      "trainable": info["run"].get("trainable")}}
    (tmp / BUNDLE_FILE).write_text(json.dumps(doc, indent=2))
    if saved_model:
      log_fn("writing the TensorFlow SavedModel (jax2tf) ...")
      save_saved_model(predictor, tmp / SAVED_MODEL_DIR)
    if onnx:
      log_fn("writing the ONNX model ...")
      save_onnx(predictor, tmp / ONNX_FILE)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    if out.exists():
      out.rmdir()  # empty (checked above); rename cannot replace a directory everywhere
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def load_exported(path: str | Path, batch_size: int = 64):
  """An exported bundle -> `inference.Predictor` (`.predict(images)`, `.class_names`)."""
  from flax import serialization
  from flaxtl import checkpointing, inference
  path = Path(path)
  doc = inference.read_json(path / BUNDLE_FILE, ("format", "model", "class_names",
                                                 "preprocessing", "image_size", "params"))
  if doc["format"] != FORMAT:
    raise inference.InferenceError(f"{path / BUNDLE_FILE}: format {doc['format']!r}, "
                                   f"this flaxtl reads {FORMAT!r}")
  inference.check_info(doc, path / BUNDLE_FILE)
  params_path = path / doc["params"]["file"]
  try:
    blob = params_path.read_bytes()
  except OSError as e:
    raise inference.InferenceError(f"{params_path}: {e.strerror or e}") from None
  if hashlib.sha256(blob).hexdigest() != doc["params"]["sha256"]:
    raise inference.InferenceError(f"{params_path}: checksum differs from {BUNDLE_FILE} "
                                   "(corrupt or replaced)")
  variables = serialization.msgpack_restore(blob)
  if "params" not in variables:  # bundles from before batch norm models held the params alone
    variables = {"params": variables}
  model = inference.build_model(doc["model"], len(doc["class_names"]))
  checkpointing.check_params(variables, inference.abstract_variables(model, doc["image_size"]),
                             str(params_path))
  tta = doc.get("tta", "none")  # bundles from before test-time augmentation have none
  try:
    inference.check_tta(tta)
  except FlaxtlError as e:
    raise inference.InferenceError(f"{path / BUNDLE_FILE}: {e}") from None
  return inference.Predictor(model, variables, list(doc["class_names"]), doc["preprocessing"],
                             int(doc["image_size"]), batch_size, info={**doc, "path": str(path)},
                             tta=tta)


# ---------------------------------------------------------------------------------------------

def define_flags() -> None:
  from absl import flags
  from flaxtl import inference
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_string("out", None, "Bundle directory to create (must not exist or be empty).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by val accuracy).")
  flags.DEFINE_enum("format", "saved_model", FORMATS, "The model file(s) beside the params: a "
                    "TensorFlow SavedModel, an ONNX file (needs `pip install -e \".[onnx]\"`), or "
                    "both; each includes the preprocessing.")
  flags.DEFINE_bool("no-saved-model", False, "Skip the TensorFlow SavedModel.")
  flags.DEFINE_string("tta", "none", inference.TTA_HELP + " Baked into the exported model.")


def main(argv):
  from absl import flags
  import jax
  from flaxtl import cli
  FLAGS = flags.FLAGS
  cli.start(argv, config=False)
  if jax.process_index() != 0:
    return
  fmt = FLAGS.format
  out = export(FLAGS.workdir, FLAGS.out, FLAGS.step,
               saved_model=fmt != "onnx" and not FLAGS["no-saved-model"].value,
               onnx=fmt in ("onnx", "both"), tta=FLAGS.tta)
  print(f"exported {FLAGS.workdir} to {out}; load it with flaxtl.load_exported({str(out)!r})")


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("export")
