"""ResNet50 (v1) in Flax, layer for layer `keras.applications.ResNet50`, with Keras' layer names.

Stages (the boundaries `start_after`/`stop_at`/`capture`/`stop_gradient_after` accept): the stem
`pool1_pool` (conv1_pad ... pool1_pool), then one per residual block, named after its output layer
`conv2_block1_out` ... `conv5_block3_out`, then the head (`avg_pool`/`max_pool`, `predictions`).
Params are flat and keyed by Keras layer: params['conv2_block1_1_conv'] = {'kernel', 'bias'},
params['conv1_bn'] = {'scale', 'bias'} (gamma, beta) and batch_stats['conv1_bn'] = {'mean', 'var'}
(moving mean/variance); `describe().parameter_layers` says which layers each stage holds.
Batch norm in training: see flaxtl.models.backbone. Input: Keras' 'caffe' preprocessing (BGR,
ImageNet means subtracted), NHWC.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax.numpy as jnp
from flax import linen as nn

from flaxtl.models import backbone as B

# (stack, bottleneck filters, blocks, stride of the first block), as in keras' ResNet50.
STACKS: tuple[tuple[str, int, int, int], ...] = (
    ("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
EPSILON, MOMENTUM = 1.001e-5, 0.99
STEM = "pool1_pool"
BLOCKS: tuple[str, ...] = tuple(f"{s}_block{i}" for s, _, n, _ in STACKS for i in range(1, n + 1))
TRUNK: tuple[str, ...] = (STEM, *(f"{b}_out" for b in BLOCKS))
LEVELS = ("head", "conv5", "conv4", "conv3", "conv2", "all")
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"


def layer_names(include_top: bool = True, pooling: str | None = None,
                num_classes: int | None = 1000) -> tuple[str, ...]:
  """Every stage the model runs, in order (as `VGG16.layers`)."""
  return TRUNK + B.head_layers(include_top, pooling, num_classes)


def _block(name: str) -> tuple[int, int, bool]:
  """conv3_block1 -> (filters, stride, has a conv shortcut)."""
  stack, i = name.split("_block")
  filters, _, stride = {s: (f, n, st) for s, f, n, st in STACKS}[stack]
  return filters, stride if i == "1" else 1, i == "1"


def stage_keras_layers(stage: str) -> tuple[tuple[str, str], ...]:
  """(Keras layer, kind) with weights in `stage`, in Keras' `model.layers` order."""
  if stage == STEM:
    return (("conv1_conv", "conv"), ("conv1_bn", "bn"))
  if stage == B.HEAD:
    return ((B.HEAD, "dense"),)
  if stage.endswith("_out"):
    block = stage[:-len("_out")]
    if not _block(block)[2]:
      return tuple((f"{block}_{p}_{k}", k) for p in "123" for k in ("conv", "bn"))
    # Keras' Functional orders the shortcut branch by graph depth: 1, 2, 0 and 3 interleaved.
    return tuple((f"{block}_{p}", p[2:]) for p in ("1_conv", "1_bn", "2_conv", "2_bn", "0_conv",
                                                   "3_conv", "0_bn", "3_bn"))
  return ()


class ResNet50(nn.Module):
  """ResNet50 v1 (He et al. 2015) as Keras builds it; VGG16's attributes and call interface."""
  include_top: bool = True
  pooling: str | None = None
  num_classes: int | None = 1000
  dtype: Any = jnp.float32
  uses_dropout = False

  @property
  def layers(self) -> tuple[str, ...]:
    return layer_names(self.include_top, self.pooling, self.num_classes)

  def keras_layers(self) -> tuple[tuple[str, str], ...]:
    """(Keras layer, kind) for every layer with weights, in Keras' `model.layers` order."""
    return tuple(l for s in self.layers for l in stage_keras_layers(s))

  @nn.compact
  def __call__(self, x, *, start_after: str | None = None, stop_at: str | None = None,
               capture: Iterable[str] = (), stop_gradient_after: str | None = None,
               train: bool = False):
    """As VGG16.__call__; `train` also sets the batch norm mode (module doc of backbone)."""
    return B.run_stages(self.layers, self._stage, jnp.asarray(x, self.dtype),
                        start_after=start_after, stop_at=stop_at, capture=capture,
                        stop_gradient_after=stop_gradient_after, train=train)

  def _stage(self, name: str, x, train: bool):
    conv = functools.partial(B.conv, dtype=self.dtype)
    bn = functools.partial(B.batch_norm, train=train, epsilon=EPSILON, momentum=MOMENTUM,
                           dtype=self.dtype)
    if name == STEM:
      x = conv(B.zero_pad(x, ((3, 3), (3, 3))), 64, 7, strides=2, name="conv1_conv")
      x = nn.relu(bn(x, name="conv1_bn"))
      return nn.max_pool(B.zero_pad(x, ((1, 1), (1, 1))), (3, 3), strides=(2, 2))
    if not name.endswith("_out"):
      return B.pool_or_dense(name, x, self.num_classes, self.dtype)
    block = name[:-len("_out")]
    filters, stride, conv_shortcut = _block(block)
    shortcut = x
    if conv_shortcut:
      shortcut = bn(conv(x, 4 * filters, 1, strides=stride, name=f"{block}_0_conv"),
                    name=f"{block}_0_bn")
    x = conv(x, filters, 1, strides=stride, name=f"{block}_1_conv")
    x = nn.relu(bn(x, name=f"{block}_1_bn"))
    x = nn.relu(bn(conv(x, filters, 3, padding="SAME", name=f"{block}_2_conv"),
                   name=f"{block}_2_bn"))
    x = bn(conv(x, 4 * filters, 1, name=f"{block}_3_conv"), name=f"{block}_3_bn")
    return nn.relu(shortcut + x)


def describe() -> B.Description:
  """ResNet50's levels, boundaries, preprocessing and published Keras files."""
  boundaries = {"head": TRUNK[-1], "all": None}
  for stack, _, _, _ in STACKS:  # the level trains from the stack's first block
    first = TRUNK.index(f"{stack}_block1_out")
    boundaries[stack] = TRUNK[first - 1]
  return B.Description(
      name="resnet50", layers=TRUNK, stages=LEVELS,
      level_boundaries={lv: boundaries[lv] for lv in LEVELS},
      cache_boundaries=tuple(boundaries[lv] for lv in LEVELS if boundaries[lv]),
      preprocessing="caffe",
      keras_weights={  # keras/src/applications/resnet.py: WEIGHTS_HASHES["resnet50"]
          "full": B.keras_file(BASE_URL, "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                               "2cb95161c43110f7111970584f804107"),
          "notop": B.keras_file(BASE_URL, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                "4d473c1dd8becc155b73f8504c6f6626")},
      parameter_layers=B.stage_parameter_layers(TRUNK + (B.HEAD,), stage_keras_layers),
      batch_norm={"epsilon": EPSILON, "momentum": MOMENTUM})


def parameter_layers(names) -> tuple[str, ...]:
  """The stages among `names` that hold parameters (vgg.parameter_layers' contract: stage names;
  `describe().parameter_layers[stage]` lists the Keras layers inside each)."""
  return tuple(n for n in names if stage_keras_layers(n))
