"""ResNet50 (v1) in Flax, layer for layer `keras.applications.ResNet50`, with Keras' layer names;
and torchvision's ResNet-50 (v1.5, `ResNet50TV`) under the same names.

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


from flax import linen as nn

from flaxtl.models import backbone as B

# (stack, bottleneck filters, blocks, stride of the first block), as in keras' ResNet50.
STACKS: tuple[tuple[str, int, int, int], ...] = (
    ("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
EPSILON, MOMENTUM = 1.001e-5, 0.99
TV_EPSILON, TV_MOMENTUM = 1e-5, 0.9   # torch.nn.BatchNorm2d's defaults (torch momentum 0.1)
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


class ResNet50(B.Staged):
  """ResNet50 v1 (He et al. 2015) as Keras builds it; VGG16's attributes and call interface."""
  epsilon, momentum = EPSILON, MOMENTUM
  v1_5 = False  # torchvision's variant (ResNet50TV)
  layer_names = staticmethod(layer_names)
  stage_keras_layers = staticmethod(stage_keras_layers)

  def _stage(self, name: str, x, train: bool):
    conv, bn = self.layer_fns(train, use_bias=not self.v1_5)
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
    # v1 strides the first 1x1 conv; v1.5 the 3x3 one, padded 1 on every side as torch pads
    # (TF's 'SAME' at stride 2 pads only below and right).
    x = conv(x, filters, 1, strides=1 if self.v1_5 else stride, name=f"{block}_1_conv")
    x = nn.relu(bn(x, name=f"{block}_1_bn"))
    x = (conv(B.zero_pad(x, ((1, 1), (1, 1))), filters, 3, strides=stride, name=f"{block}_2_conv")
         if self.v1_5 else conv(x, filters, 3, padding="SAME", name=f"{block}_2_conv"))
    x = nn.relu(bn(x, name=f"{block}_2_bn"))
    x = bn(conv(x, 4 * filters, 1, name=f"{block}_3_conv"), name=f"{block}_3_bn")
    return nn.relu(shortcut + x)


class ResNet50TV(ResNet50):
  """torchvision's ResNet-50, "v1.5": the stride of a downsampling block in its 3x3 conv, convs
  without bias, batch norm epsilon 1e-5 and momentum 0.1 (flax's 0.9); Keras' layer names, so
  stages, freeze levels and cache boundaries are ResNet50's. Its max pool pads with -inf, Keras'
  with zeros: the same after the ReLU before it."""
  epsilon, momentum = TV_EPSILON, TV_MOMENTUM
  v1_5 = True


def describe_torchvision() -> B.Description:
  """ResNet50TV's Description: ResNet50's stages, torchvision's preprocessing, no Keras files."""
  return B.describe("resnet50_torchvision", TRUNK, LEVELS, "torch", {}, stage_keras_layers,
                    TV_EPSILON, TV_MOMENTUM)


def describe() -> B.Description:
  """ResNet50's levels, boundaries, preprocessing and published Keras files."""
  # keras/src/applications/resnet.py: WEIGHTS_HASHES["resnet50"]
  files = {
      "full": B.keras_file(BASE_URL, "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                           "2cb95161c43110f7111970584f804107"),
      "notop": B.keras_file(BASE_URL, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "4d473c1dd8becc155b73f8504c6f6626"),
  }
  return B.describe("resnet50", TRUNK, LEVELS, "caffe", files, stage_keras_layers, EPSILON,
                    MOMENTUM)


def parameter_layers(names) -> tuple[str, ...]:
  return B.parameter_layers(names, stage_keras_layers)
