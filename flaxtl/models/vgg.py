"""VGG16 in Flax with Keras' layer names and options.

Layer names match `keras.applications.VGG16` (`block1_conv1` ... `block5_pool`, `fc1`, `fc2`,
`predictions`) so "freeze up to block4_pool" means the same thing in both worlds.

The network is a flat sequence of named layers (`layer_names(...)`). `__call__` can start after any
layer (its input is then that layer's output, e.g. a cached `block4_pool` feature map) and can
capture any layers' outputs: the freezing and feature-cache code rely on both.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

# (block, number of convs, filters), as in Keras' vgg16.py.
BLOCKS: tuple[tuple[int, int, int], ...] = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))

CONV_LAYERS: tuple[str, ...] = tuple(
    f"block{b}_conv{c}" for b, n, _ in BLOCKS for c in range(1, n + 1))
TOP_LAYERS: tuple[str, ...] = ("fc1", "fc2")
HEAD = "predictions"
FEATURE_NORM = "feature_norm"


def conv_filters(name: str) -> int:
  """Output channels of a `block{b}_conv{c}` layer."""
  block = int(name[len("block")])
  return {b: f for b, _, f in BLOCKS}[block]


def trunk_layer_names() -> tuple[str, ...]:
  """Convolution and pooling layers in order: block1_conv1, block1_conv2, block1_pool, ..."""
  names = []
  for b, n, _ in BLOCKS:
    names += [f"block{b}_conv{c}" for c in range(1, n + 1)] + [f"block{b}_pool"]
  return tuple(names)


def layer_names(include_top: bool = True, pooling: str | None = None,
                num_classes: int | None = 1000, feature_norm: bool = False) -> tuple[str, ...]:
  """Every layer the model runs, in order; parameter-free layers included.

  After `block5_pool`: `flatten`, `fc1`, `fc2`, `predictions` with the Keras top; else an optional
  `avg_pool`/`max_pool` (Keras' `pooling`), `feature_norm` (see `power_normalize`) and, when
  `num_classes` is set, a new `predictions` Dense.
  """
  names = list(trunk_layer_names())
  if include_top:
    names += ["flatten", "fc1", "fc2", HEAD]
  else:
    if pooling is not None:
      if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
      names.append(f"{pooling}_pool")
      if feature_norm:
        names.append(FEATURE_NORM)
    if num_classes:
      names.append(HEAD)
  return tuple(names)


class VGG16(nn.Module):
  """VGG16 (Simonyan & Zisserman 2014), NHWC, input already preprocessed.

  Attributes:
    include_top: Keras' full classifier: flatten, fc1, fc2 (4096, ReLU) and `predictions`.
    pooling: with include_top=False, None (return the block5_pool map), 'avg' or 'max' (global).
    num_classes: units of `predictions`. With include_top=False, None means no classifier at all
      (Keras' notop model); a number adds a new Dense head after the pooling (the transfer recipe).
    feature_norm: with pooling, `power_normalize` the pooled features before the head.
    dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    conv_general_dilated: the convolution function (None: lax's). The feature pass's 'winograd'
      engine passes `winograd.conv_general_dilated`.
    frozen_conv_general_dilated: the same for the layers up to `stop_gradient_after` only (no
      gradient reaches them): training from images runs them forward every step
      (`feature_engine.for_frozen_layers`).
  Returns logits: softmax is applied by the loss / `predict`, never inside the model.
  """
  include_top: bool = True
  pooling: str | None = None
  num_classes: int | None = 1000
  feature_norm: bool = False
  dtype: Any = jnp.float32
  conv_general_dilated: Any = None
  frozen_conv_general_dilated: Any = None

  @property
  def layers(self) -> tuple[str, ...]:
    return layer_names(self.include_top, self.pooling, self.num_classes, self.feature_norm)

  @nn.compact
  def __call__(self, x, *, start_after: str | None = None, stop_at: str | None = None,
               capture: Iterable[str] = (), stop_gradient_after: str | None = None,
               train: bool = False):
    """Runs the layers after `start_after` up to and including `stop_at` (default: the last).

    Args:
      x: images (N, H, W, 3), or the output of `start_after` when given.
      capture: layer names whose outputs are also returned, as a dict.
      train: accepted for a uniform model interface; VGG16 has no dropout or batch norm.
      stop_gradient_after: the frozen boundary: no gradient flows back past this layer's output,
        so XLA drops the backward pass of everything before it.
    Returns:
      the output of `stop_at`, or (output, {name: output}) when `capture` is non-empty.
    """
    layers = self.layers
    capture = tuple(capture)
    for name in (start_after, stop_at, stop_gradient_after, *capture):
      if name is not None and name not in layers:
        raise ValueError(f"unknown layer {name!r}; this model has: {', '.join(layers)}")
    first = layers.index(start_after) + 1 if start_after else 0
    last = layers.index(stop_at) if stop_at else len(layers) - 1
    x = jnp.asarray(x, self.dtype)
    captured = {}
    frozen = (layers.index(stop_gradient_after) if stop_gradient_after
              and self.frozen_conv_general_dilated else -1)
    for i, name in enumerate(layers[first:last + 1], first):
      x = self._layer(name, x, self.frozen_conv_general_dilated if i <= frozen
                      else self.conv_general_dilated)
      if name == stop_gradient_after:
        x = jax.lax.stop_gradient(x)
      if name in capture:
        captured[name] = x
    return (x, captured) if capture else x

  def _layer(self, name: str, x, conv=None):
    if "_conv" in name:
      return nn.relu(nn.Conv(conv_filters(name), (3, 3), padding="SAME", dtype=self.dtype,
                             conv_general_dilated=conv, name=name)(x))
    if name.endswith("_pool") and name.startswith("block"):
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    if name == "avg_pool":
      return jnp.mean(x, axis=(1, 2))
    if name == "max_pool":
      return jnp.max(x, axis=(1, 2))
    if name == FEATURE_NORM:
      return power_normalize(x)
    if name == "flatten":
      return x.reshape((x.shape[0], -1))  # NHWC flatten, as Keras' Flatten.
    if name in TOP_LAYERS:
      return nn.relu(nn.Dense(4096, dtype=self.dtype, name=name)(x))
    if name == HEAD:
      return nn.Dense(self.num_classes, dtype=self.dtype, name=name)(x)
    raise AssertionError(name)


def power_normalize(x, eps: float = 1e-3):
  """sqrt, then L2 normalisation scaled to unit RMS: the pooled features' "power normalisation"
  (Perronnin et al. 2010, improved Fisher vectors). Why: pooled ReLU features are bursty (a few
  channels dominate); on Caltech-97 the linear head's val accuracy rises 0.893 -> 0.914 with it
  (benchmarks/RESULTS.md). `eps` keeps the gradient finite at 0 for fine-tuning."""
  x = jnp.sign(x) * (jnp.sqrt(jnp.abs(x) + eps) - jnp.sqrt(eps))
  x32 = x.astype(jnp.float32)
  scale = jnp.sqrt(x.shape[-1] / (jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-12))
  return (x32 * scale).astype(x.dtype)


def parameter_layers(names: Sequence[str]) -> tuple[str, ...]:
  """The layers among `names` that hold parameters (convs and Dense layers)."""
  return tuple(n for n in names if "_conv" in n or n in TOP_LAYERS or n == HEAD)
