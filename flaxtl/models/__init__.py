"""Model zoo: VGG16 (Keras layer names) and a small CNN baseline, built from a config."""
from __future__ import annotations

import jax.numpy as jnp

from flaxtl.errors import ConfigError

from flaxtl.models import vgg
from flaxtl.models.vgg import VGG16, layer_names, trunk_layer_names

__all__ = ["VGG16", "create", "layer_names", "min_image_size", "trunk_layer_names"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create(config, num_classes: int):
  """The model `config.model` names, with a new `num_classes`-way classifier."""
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={config.model.dtype!r}: one of {', '.join(DTYPES)}")
  dtype = DTYPES[config.model.dtype]
  if config.model.name == "vgg16":
    if config.model.head in ("gap", "gap_norm"):
      return VGG16(include_top=False, pooling="avg", num_classes=num_classes, dtype=dtype,
                   feature_norm=config.model.head == "gap_norm")
    if config.model.head == "keras_top":
      return VGG16(include_top=True, num_classes=num_classes, dtype=dtype)
    raise ConfigError(f"model.head={config.model.head!r}: 'gap', 'gap_norm' or 'keras_top'")
  if config.model.name == "small_cnn":
    from flaxtl.models.small_cnn import SmallCNN
    return SmallCNN(num_classes=num_classes, dtype=dtype)
  raise ConfigError(f"model.name={config.model.name!r}: 'vgg16' or 'small_cnn'")


def min_image_size(config) -> int:
  """The smallest input the model's pooling leaves a non-empty feature map for."""
  return 32 if config.model.name == "vgg16" else 16
