"""Model zoo: VGG16, ResNet50, MobileNetV2, EfficientNetB0 (Keras layer names) and a small CNN
baseline, built from a config; `description` is what the rest of flaxtl reads about a backbone
(its freeze levels, cache boundaries, preprocessing, published files), so no module outside
`models/` names a backbone's layers."""
from __future__ import annotations

import importlib

import jax.numpy as jnp

from flaxtl.errors import ConfigError

from flaxtl.models import vgg
from flaxtl.models.vgg import FEATURE_NORM, HEAD, VGG16, layer_names, trunk_layer_names

__all__ = ["BACKBONES", "FEATURE_NORM", "HEAD", "VGG16", "create", "description", "description_of",
           "layer_names", "min_image_size", "param_keys", "trunk_end_of", "trunk_layer_names"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.model.name -> (module, class): the Keras-named backbones beside VGG16.
BACKBONES = {"resnet50": ("resnet", "ResNet50"), "mobilenet_v2": ("mobilenet_v2", "MobileNetV2"),
             "efficientnet_b0": ("efficientnet", "EfficientNetB0"),
             "resnet50_torchvision": ("resnet", "ResNet50TV")}
# The backbones whose weights are torchvision's tensors, not Keras files.
TORCHVISION = ("resnet50_torchvision",)
NAMES = ("vgg16", *BACKBONES, "small_cnn")
HEADS = ("gap", "gap_norm", "keras_top")


def _module(name: str):
  return importlib.import_module(f"flaxtl.models.{BACKBONES[name][0]}")


def create(config, num_classes: int):
  """The model `config.model` names, with a new `num_classes`-way classifier."""
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={config.model.dtype!r}: one of {', '.join(DTYPES)}")
  dtype, name, head = DTYPES[config.model.dtype], config.model.name, config.model.head
  if name == "small_cnn":
    from flaxtl.models.small_cnn import SmallCNN
    return SmallCNN(num_classes=num_classes, dtype=dtype)
  if name not in NAMES:
    raise ConfigError(f"model.name={name!r}: one of {', '.join(map(repr, NAMES))}")
  if head not in HEADS:
    raise ConfigError(f"model.head={head!r}: 'gap', 'gap_norm' or 'keras_top'")
  cls = VGG16 if name == "vgg16" else getattr(_module(name), BACKBONES[name][1])
  if head == "keras_top":
    return cls(include_top=True, num_classes=num_classes, dtype=dtype)
  return cls(include_top=False, pooling="avg", num_classes=num_classes, dtype=dtype,
             feature_norm=head == "gap_norm")


def description(name: str):
  """The backbone's `models.backbone.Description` (None for the small CNN)."""
  if name == "vgg16":
    return _vgg16_description()
  if name in BACKBONES:
    return getattr(_module(name), "describe_torchvision" if name in TORCHVISION else "describe")()
  return None


def description_of(model):
  """The Description of a built model (None for the small CNN)."""
  if isinstance(model, VGG16):
    return description("vgg16")
  name = next((n for n, (_, cls) in BACKBONES.items() if type(model).__name__ == cls), None)
  return description(name) if name else None


def _vgg16_description():
  from flaxtl import weights
  from flaxtl.models import backbone as B
  files = {k: B.keras_file(weights.KERAS_BASE_URL, f, weights.MD5[f])
           for k, f in (("notop", weights.NOTOP_FILE), ("full", weights.FULL_FILE))}
  return B.describe("vgg16", vgg.trunk_layer_names(), ("head", "block5", "block4", "block3",
                                                       "block2", "all"),
                    "caffe", files, lambda s: ((s, "conv"),) if "_conv" in s else (), 0.0, 0.0)


def param_keys(model) -> dict[str, tuple[str, ...]]:
  """{stage: the keys its parameters have in `params`}, for the stages `model` runs: VGG16's
  layers are their own keys; a Keras-named backbone's stage holds many Keras layers."""
  if hasattr(model, "stage_keras_layers"):
    return {s: tuple(n for n, _ in model.stage_keras_layers(s)) for s in model.layers}
  return {s: (s,) for s in vgg.parameter_layers(model.layers)}


def batch_norm_keys(model) -> tuple[str, ...]:
  """The batch norm layers' keys (their scale and bias train with model.train_bn)."""
  if not hasattr(model, "stage_keras_layers"):
    return ()
  return tuple(n for s in model.layers for n, kind in model.stage_keras_layers(s) if kind == "bn")


def trunk_end_of(layers) -> str:
  """The last stage of the convolutional trunk: 'head' trains what comes after it."""
  return layers[min(layers.index(n) for n in ("flatten", "avg_pool", "max_pool", HEAD)
                    if n in layers) - 1]


def min_image_size(config) -> int:
  """The smallest input the model's pooling leaves a non-empty feature map for."""
  return 16 if config.model.name == "small_cnn" else 32
