"""python -m flaxtl.explain --workdir runs/X image.jpg [--class C] [--layer NAME] [--out cam.png]

Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies, as the
gradient-weighted sum of a convolutional layer's channels, for the predicted class or a chosen
one, at the last convolutional layer (block5_conv3 for VGG16) or a named one. The PNG shows the
image as the model saw it and the heatmap over it.

How: the model runs up to the layer (`stop_at`), the rest of the network runs from the layer's
output (`start_after`), and `jax.vjp` of that rest gives d logit_c / d activation directly. flaxtl's
models start and stop at any named layer, so no extra variables are needed (flax's
`Module.perturb` would put a zero variable in every layer, and its docs call it experimental and
for debugging). Batched through `parallel.map_batches`, like every inference.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxtl import preprocessing
from flaxtl.errors import FlaxtlError


def conv_layers(model) -> tuple[str, ...]:
  """The layers whose output is a spatial map Grad-CAM can weigh: convolutions and block pools
  (VGG16, the small CNN); every trunk stage of the other backbones."""
  if hasattr(model, "stage_keras_layers"):
    from flaxtl import models
    return model.layers[:model.layers.index(models.trunk_end_of(model.layers)) + 1]
  return tuple(n for n in model.layers if "_conv" in n or (n.startswith("block") and
                                                           n.endswith("_pool")))


def default_layer(model) -> str:
  """The last convolutional layer (block5_conv3 for VGG16; the last trunk stage otherwise)."""
  if hasattr(model, "stage_keras_layers"):
    return conv_layers(model)[-1]
  return [n for n in conv_layers(model) if "_conv" in n][-1]


def check_layer(model, layer: str | None) -> str:
  layer = layer or default_layer(model)
  if layer not in conv_layers(model):
    raise FlaxtlError(f"--layer {layer!r}: Grad-CAM needs a convolutional layer of this model, "
                      f"one of: {', '.join(conv_layers(model))}")
  return layer


@dataclasses.dataclass(frozen=True)
class GradCAM:
  """(variables, uint8 images) -> {'cam': (N, S, S) in [0, 1], 'peak': the map's maximum before
  scaling (0: no positive evidence at the layer), 'logits'}; `target` -1: each image's predicted
  class, else that class. Hashable, so equal ones share a compile."""
  model: Any
  mode: str
  layer: str
  target: int = -1

  def __call__(self, variables, images):
    x = preprocessing.preprocess(jnp.asarray(images, jnp.float32), self.mode)
    act = self.model.apply(variables, x, stop_at=self.layer)
    logits, vjp = jax.vjp(lambda a: self.model.apply(variables, a, start_after=self.layer)
                          .astype(jnp.float32), act)
    cls = jnp.argmax(logits, -1) if self.target < 0 else jnp.full(len(logits), self.target)
    (grads,) = vjp(jax.nn.one_hot(cls, logits.shape[-1], dtype=logits.dtype))
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # per channel: the pooled gradient
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", act.astype(jnp.float32), weights))
    peak = cam.max(axis=(1, 2))
    cam = cam / (peak[:, None, None] + 1e-12)
    size = images.shape[1:3]
    cam = jax.image.resize(cam, (len(cam), *size), "bilinear")
    return {"cam": jnp.clip(cam, 0.0, 1.0), "peak": peak, "logits": logits}


def gradcam(predictor, images: np.ndarray, layer: str | None = None,
            target: int = -1) -> dict[str, np.ndarray]:
  """Grad-CAM maps of (N, S, S, 3) uint8 images for a restored model (`inference.load`)."""
  from flaxtl import parallel
  fn = GradCAM(predictor.model, predictor.preprocessing, check_layer(predictor.model, layer),
               int(target))
  return parallel.map_batches(fn, predictor.variables, np.asarray(images), predictor.batch_size)


def class_index(value: str | None, class_names: Sequence[str]) -> int:
  """--class as a name or an index; -1 (the predicted class) when not given."""
  if value is None or value == "":
    return -1
  if value in class_names:
    return list(class_names).index(value)
  if value.lstrip("-").isdigit() and 0 <= int(value) < len(class_names):
    return int(value)
  raise FlaxtlError(f"--class {value!r}: not one of this model's classes "
                    f"({', '.join(class_names)}) nor an index below {len(class_names)}")


def explain(workdir: str | Path, image: str | Path, target: str | None = None,
            layer: str | None = None, out: str | Path | None = None, step: int | None = None,
            ) -> dict:
  """Grad-CAM of one image file with a run's model; writes the PNG (default: <image>_gradcam.png
  in the current folder) and returns the map and what it explains."""
  from flaxtl import inference, plots
  if not Path(image).is_file():
    raise FlaxtlError(f"{image}: no such image file")
  pred = inference.load(workdir, step)
  cls = class_index(target, pred.class_names)
  layer = check_layer(pred.model, layer)
  img = inference.as_batch(str(image), pred.image_size)
  res = gradcam(pred, img, layer, cls)
  proba = inference.softmax(res["logits"])[0]
  shown = int(proba.argmax()) if cls < 0 else cls
  doc = {"image": str(image), "layer": layer, "class": pred.class_names[shown],
         "class_probability": float(proba[shown]),
         "predicted": pred.class_names[int(proba.argmax())],
         "predicted_probability": float(proba.max()), "cam": res["cam"][0],
         "empty": bool(res["peak"][0] <= 0), "step": pred.step, "workdir": str(workdir)}
  out = Path(out) if out else Path(f"{Path(image).stem}_gradcam.png")
  doc["out"] = str(plots.gradcam(img[0], doc["cam"], out, title=(
      f"{Path(image).name}: Grad-CAM at {layer} for class {doc['class']} "
      f"(p={doc['class_probability']:.3f}); predicted {doc['predicted']} "
      f"(p={doc['predicted_probability']:.3f})"
      + ("\nempty map: no positive evidence for the class at this layer" if doc["empty"] else ""))))
  return doc


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by val accuracy).")
  flags.DEFINE_string("class", None, "Class to explain, by name or index (default: predicted).")
  flags.DEFINE_string("layer", None, "Convolutional layer (default: the last one).")
  flags.DEFINE_string("out", None, "PNG to write (default: <image>_gradcam.png here).")


def main(argv):
  from absl import flags
  from flaxtl import runtime
  FLAGS = flags.FLAGS
  if len(argv) != 2:
    raise FlaxtlError("give exactly one image file to explain")
  runtime.setup_logging()
  doc = explain(FLAGS.workdir, argv[1], FLAGS["class"].value, FLAGS.layer, FLAGS.out, FLAGS.step)
  print(f"{doc['image']}: predicted {doc['predicted']} ({doc['predicted_probability']:.3f}); "
        f"Grad-CAM for {doc['class']} at {doc['layer']} -> {doc['out']}")
  if doc["empty"]:
    print(f"warning: the map is empty: the gradient-weighted channels of {doc['layer']} hold no "
          "positive evidence for the class (their spatial means cancel, as they can behind a "
          "flattening head); try an earlier --layer", file=sys.stderr)


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("explain")
