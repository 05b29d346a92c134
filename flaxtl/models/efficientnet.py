"""EfficientNetB0 in Flax, layer for layer `keras.applications.EfficientNetB0`, with Keras' names.

The input is raw RGB in [0, 255] (flaxtl preprocessing 'none'): as in Keras the stem rescales
(`rescaling`: x / 255) and normalises (`normalization`: (x - mean) / sqrt(variance), mean and
variance read from the weights file into batch_stats['normalization'] = {'mean', 'variance'}).
Keras' quirk: the published files store the ImageNet *std* as the variance, so Keras, only when it
loads weights='imagenet', adds `rescaling_1` multiplying by 1/sqrt(std) (tensorflow#49930);
`stddev_rescaling=True` (default) is that model, False is `weights=None`'s.
Stages: the stem `stem_activation`, one per MBConv block named after its output layer
(`block1a_project_bn`, `block2a_project_bn`, `block2b_add`, ...), `top_activation`, then the head:
`avg_pool` (+ `top_dropout` with include_top) or `max_pool`, and `predictions`.
Params are flat and keyed by Keras layer (params['block2a_dwconv']['kernel'] of shape (3, 3, 1, C);
Keras: (3, 3, C, 1)); BN scale/bias in params, moving mean/var in batch_stats; epsilon 1e-3,
momentum 0.99. Training: batch norm, dropout and Keras' drop-connect (`{block}drop`, rate
0.2 * block / 16) follow flaxtl.models.backbone (frozen stages are deterministic).
"""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxtl.models import backbone as B

# (kernel, repeats, filters in, filters out, expansion, stride) per stack; se_ratio 0.25, id_skip
# everywhere (keras' DEFAULT_BLOCKS_ARGS; B0: width and depth coefficients 1.0).
STACKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
STEM_FILTERS, TOP_FILTERS, SE_RATIO = 32, 1280, 0.25
EPSILON, MOMENTUM = 1e-3, 0.99
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
STEM, TOP = "stem_activation", "top_activation"
LEVELS = ("head", "block6a", "block4a", "block3a", "block2a", "all")
BASE_URL = "https://storage.googleapis.com/keras-applications/"


def _blocks() -> dict[str, tuple]:
  """Output stage -> (block name, kernel, filters in, filters out, expansion, stride, index)."""
  out, b = {}, 0
  for i, (k, repeats, fin, fout, t, s) in enumerate(STACKS):
    for j in range(repeats):
      fin, s = (fout, 1) if j else (fin, s)
      name = f"block{i + 1}{chr(j + 97)}_"
      out[name + ("add" if s == 1 and fin == fout else "project_bn")] = (
          name, k, fin, fout, t, s, b)
      b += 1
  return out


BLOCK_OUT = _blocks()
NUM_BLOCKS = len(BLOCK_OUT)
TRUNK: tuple[str, ...] = (STEM, *BLOCK_OUT, TOP)


def layer_names(include_top: bool = True, pooling: str | None = None,
                num_classes: int | None = 1000) -> tuple[str, ...]:
  """Every stage the model runs, in order (as `VGG16.layers`)."""
  return TRUNK + B.head_layers(include_top, pooling, num_classes,
                               top=("avg_pool", "top_dropout", B.HEAD))


def stage_keras_layers(stage: str) -> tuple[tuple[str, str], ...]:
  """(Keras layer, kind) with weights in `stage`, in Keras' `model.layers` order."""
  if stage == STEM:
    return (("normalization", "normalization"), ("stem_conv", "conv"), ("stem_bn", "bn"))
  if stage == TOP:
    return (("top_conv", "conv"), ("top_bn", "bn"))
  if stage == B.HEAD:
    return ((B.HEAD, "dense"),)
  if stage in BLOCK_OUT:
    p, _, _, _, expansion = BLOCK_OUT[stage][:5]
    expand = ((p + "expand_conv", "conv"), (p + "expand_bn", "bn")) if expansion != 1 else ()
    return expand + ((p + "dwconv", "depthwise"), (p + "bn", "bn"), (p + "se_reduce", "conv"),
                     (p + "se_expand", "conv"), (p + "project_conv", "conv"),
                     (p + "project_bn", "bn"))
  return ()


class EfficientNetB0(B.Staged):
  """EfficientNetB0 (Tan & Le 2019) as Keras builds it; VGG16's call interface; logits out."""
  stddev_rescaling: bool = True   # Keras' extra `rescaling_1` of weights='imagenet' (module doc)
  dropout_rate: float = 0.2       # `top_dropout`, include_top only
  drop_connect_rate: float = 0.2  # Keras' stochastic depth, scaled by the block's depth
  uses_dropout = True
  epsilon, momentum = EPSILON, MOMENTUM
  layer_names = staticmethod(layer_names)
  stage_keras_layers = staticmethod(stage_keras_layers)

  def _stage(self, name: str, x, train: bool):
    conv, bn = self.layer_fns(train)
    if name == STEM:
      x = B.Normalization(name="normalization")(x * np.float32(1.0 / 255.0))
      if self.stddev_rescaling:
        x = x * np.array([1.0 / np.sqrt(s) for s in IMAGENET_STDDEV_RGB], np.float32)
      x = conv(B.zero_pad(x, B.correct_pad(x, 3)), STEM_FILTERS, 3, strides=2, name="stem_conv")
      return nn.swish(bn(x, name="stem_bn"))
    if name == TOP:
      return nn.swish(bn(conv(x, TOP_FILTERS, 1, name="top_conv"), name="top_bn"))
    if name == "top_dropout":
      return nn.Dropout(self.dropout_rate, deterministic=not train, name=name)(x)
    if name not in BLOCK_OUT:
      return B.pool_or_dense(name, x, self.num_classes, self.dtype)
    p, k, fin, fout, expansion, stride, index = BLOCK_OUT[name]
    inputs, filters = x, fin * expansion
    if expansion != 1:
      x = nn.swish(bn(conv(x, filters, 1, name=p + "expand_conv"), name=p + "expand_bn"))
    if stride == 2:
      x = B.zero_pad(x, B.correct_pad(x, k))
    x = B.depthwise(x, k, strides=stride, padding="SAME" if stride == 1 else "VALID",
                    name=p + "dwconv", dtype=self.dtype)
    x = nn.swish(bn(x, name=p + "bn"))
    se = jnp.mean(x, axis=(1, 2), keepdims=True)  # se_squeeze + se_reshape
    se = nn.swish(B.conv(se, max(1, int(fin * SE_RATIO)), 1, name=p + "se_reduce",
                         dtype=self.dtype))
    se = nn.sigmoid(B.conv(se, filters, 1, name=p + "se_expand", dtype=self.dtype))
    x = bn(conv(x * se, fout, 1, name=p + "project_conv"), name=p + "project_bn")
    if not name.endswith("_add"):
      return x
    rate = self.drop_connect_rate * index / NUM_BLOCKS  # as Keras: 0.2 * b / 16
    if rate > 0:
      x = nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train, name=p + "drop")(x)
    return x + inputs


def describe() -> B.Description:
  """EfficientNetB0's levels, boundaries, preprocessing and published Keras files."""
  # keras/src/applications/efficientnet.py: WEIGHTS_HASHES["b0"]
  files = {
      "full": B.keras_file(BASE_URL, "efficientnetb0.h5", "902e53a9f72be733fc0bcb005b3ebbac"),
      "notop": B.keras_file(BASE_URL, "efficientnetb0_notop.h5",
                            "50bc09e76180e00e4465e1a485ddc09d"),
  }
  return B.describe("efficientnet_b0", TRUNK, LEVELS, "none", files, stage_keras_layers, EPSILON,
                    MOMENTUM)


def parameter_layers(names) -> tuple[str, ...]:
  return B.parameter_layers(names, stage_keras_layers)
