"""MobileNetV2 (alpha=1.0) in Flax, layer for layer `keras.applications.MobileNetV2`, Keras' names.

Stages: the stem `Conv1_relu` (Conv1, bn_Conv1, Conv1_relu), one per inverted residual block named
after its output layer (`expanded_conv_project_BN`, `block_1_project_BN`, `block_2_add`, ...,
`block_16_project_BN`), `out_relu` (Conv_1, Conv_1_bn, out_relu), then the head: `avg_pool` (Keras'
unnamed `global_average_pooling2d`) or `max_pool`, and `predictions`.
Params are flat and keyed by Keras layer: params['block_1_expand'] = {'kernel'} (no biases),
params['block_1_depthwise'] = {'kernel'} of shape (3, 3, 1, C) (Keras: (3, 3, C, 1)),
params['bn_Conv1'] = {'scale', 'bias'}, batch_stats['bn_Conv1'] = {'mean', 'var'}.
Batch norm: epsilon 1e-3, momentum 0.999 (Keras' values here, not its 0.99 default); training
mode: see flaxtl.models.backbone. Input: Keras' 'tf' preprocessing (x / 127.5 - 1), NHWC.
"""
from __future__ import annotations



from flaxtl.models import backbone as B

# (expansion, stride, output filters) of blocks 0..16, as in keras' MobileNetV2 (alpha=1.0).
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 1, 16), (6, 2, 24), (6, 1, 24), (6, 2, 32), (6, 1, 32), (6, 1, 32), (6, 2, 64), (6, 1, 64),
    (6, 1, 64), (6, 1, 64), (6, 1, 96), (6, 1, 96), (6, 1, 96), (6, 2, 160), (6, 1, 160),
    (6, 1, 160), (6, 1, 320))
STEM_FILTERS, TOP_FILTERS = 32, 1280
EPSILON, MOMENTUM = 1e-3, 0.999
STEM, TOP = "Conv1_relu", "out_relu"
LEVELS = ("head", "block_13", "block_6", "block_3", "block_1", "all")
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


def _prefix(i: int) -> str:
  return f"block_{i}_" if i else "expanded_conv_"


def _blocks() -> dict[str, tuple[int, int, int, int, int]]:
  """Output stage name -> (block id, input channels, expansion, stride, filters)."""
  out, cin = {}, STEM_FILTERS
  for i, (t, s, f) in enumerate(BLOCKS):
    out[_prefix(i) + ("add" if cin == f and s == 1 else "project_BN")] = (i, cin, t, s, f)
    cin = f
  return out


BLOCK_OUT = _blocks()
TRUNK: tuple[str, ...] = (STEM, *BLOCK_OUT, TOP)


def layer_names(include_top: bool = True, pooling: str | None = None,
                num_classes: int | None = 1000) -> tuple[str, ...]:
  """Every stage the model runs, in order (as `VGG16.layers`)."""
  return TRUNK + B.head_layers(include_top, pooling, num_classes)


def stage_keras_layers(stage: str) -> tuple[tuple[str, str], ...]:
  """(Keras layer, kind) with weights in `stage`, in Keras' `model.layers` order."""
  if stage == STEM:
    return (("Conv1", "conv"), ("bn_Conv1", "bn"))
  if stage == TOP:
    return (("Conv_1", "conv"), ("Conv_1_bn", "bn"))
  if stage == B.HEAD:
    return ((B.HEAD, "dense"),)
  if stage in BLOCK_OUT:
    i = BLOCK_OUT[stage][0]
    p = _prefix(i)
    expand = ((p + "expand", "conv"), (p + "expand_BN", "bn")) if i else ()
    return expand + ((p + "depthwise", "depthwise"), (p + "depthwise_BN", "bn"),
                     (p + "project", "conv"), (p + "project_BN", "bn"))
  return ()


class MobileNetV2(B.Staged):
  """MobileNetV2 (Sandler et al. 2018), alpha=1.0, as Keras builds it; VGG16's call interface."""
  epsilon, momentum = EPSILON, MOMENTUM
  layer_names = staticmethod(layer_names)
  stage_keras_layers = staticmethod(stage_keras_layers)

  def _stage(self, name: str, x, train: bool):
    conv, bn = self.layer_fns(train)
    if name == STEM:
      return B.relu6(bn(conv(x, STEM_FILTERS, 3, strides=2, padding="SAME", name="Conv1"),
                        name="bn_Conv1"))
    if name == TOP:
      return B.relu6(bn(conv(x, TOP_FILTERS, 1, name="Conv_1"), name="Conv_1_bn"))
    if name not in BLOCK_OUT:
      return B.pool_or_dense(name, x, self.num_classes, self.dtype)
    i, cin, expansion, stride, filters = BLOCK_OUT[name]
    p, inputs = _prefix(i), x
    if i:
      x = B.relu6(bn(conv(x, expansion * cin, 1, name=p + "expand"), name=p + "expand_BN"))
    if stride == 2:
      x = B.zero_pad(x, B.correct_pad(x, 3))
    x = B.depthwise(x, 3, strides=stride, padding="SAME" if stride == 1 else "VALID",
                    name=p + "depthwise", dtype=self.dtype)
    x = B.relu6(bn(x, name=p + "depthwise_BN"))
    x = bn(conv(x, filters, 1, name=p + "project"), name=p + "project_BN")
    return inputs + x if name.endswith("_add") else x


def describe() -> B.Description:
  """MobileNetV2's levels, boundaries, preprocessing and published Keras files (224 px)."""
  # keras/src/applications/mobilenet_v2.py; Keras publishes no hash for them
  files = {
      "full": B.keras_file(
          BASE_URL, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", None),
      "notop": B.keras_file(
          BASE_URL, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", None),
  }
  return B.describe("mobilenet_v2", TRUNK, LEVELS, "tf", files, stage_keras_layers, EPSILON,
                    MOMENTUM)


def parameter_layers(names) -> tuple[str, ...]:
  return B.parameter_layers(names, stage_keras_layers)
