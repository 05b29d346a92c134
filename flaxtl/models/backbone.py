"""What the Keras-named backbones share: the stage runner, Keras-exact layers, `Description`.

Why one place: the three run the same way (a flat sequence of named *stages* whose boundaries carry
Keras' layer names, see `run_stages`) and build their layers the way Keras does (explicit zero
padding, depthwise convs, batch norm with Keras' epsilon/momentum and two-pass batch variance).

Batch norm and freezing: with `train=True`, the batch norms of stages *after* the frozen boundary
(`stop_gradient_after`, or `start_after` when training from cached features) normalise with the
batch statistics and update `batch_stats` (apply with `mutable=['batch_stats']`); those at or before
it use the running averages and leave them untouched, as Keras does for a BatchNormalization layer
with `trainable=False`. Dropout follows the same rule. So a frozen stage computes the same function
whether it runs in the step or was cached beforehand.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxtl.models.vgg import FEATURE_NORM, HEAD, power_normalize

# Keras class -> the object-name prefix that Keras 3 `.weights.h5` files without layer names use.
KERAS_CLASS = {"conv": "conv2d", "depthwise": "depthwise_conv2d", "bn": "batch_normalization",
               "dense": "dense", "normalization": "normalization"}


@dataclasses.dataclass(frozen=True)
class Description:
  """What the rest of flaxtl reads about a backbone (freezing levels, caching, weights, input)."""
  name: str
  layers: tuple[str, ...]                 # trunk stage boundaries, in order (start/stop/capture)
  stages: tuple[str, ...]                 # freeze levels (config.trainable), deepest first
  level_boundaries: dict[str, str | None]  # level -> last frozen trunk stage (None: 'all')
  cache_boundaries: tuple[str, ...]       # boundaries worth caching, deepest first
  preprocessing: str                      # 'caffe' | 'tf' ([-1, 1]) | 'none' (raw 0-255 floats)
  keras_weights: dict[str, dict]          # 'notop' / 'full' -> file, url, hash, hash_algorithm
  parameter_layers: dict[str, tuple[str, ...]]  # stage -> its Keras layers with weights
  batch_norm: dict[str, float]            # Keras' epsilon and momentum (flax momentum: the same)
  min_size: int = 32                      # smallest input side Keras accepts


def keras_file(base_url: str, file: str, file_hash: str | None) -> dict:
  """One published weights file; Keras' get_file reads a 32-digit hash as md5, 64 as sha256."""
  algo = None if file_hash is None else "sha256" if len(file_hash) == 64 else "md5"
  return {"file": file, "url": base_url + file, "hash": file_hash, "hash_algorithm": algo}


def head_layers(include_top: bool, pooling: str | None, num_classes: int | None,
                top: Sequence[str] = ("avg_pool", HEAD)) -> tuple[str, ...]:
  """Layers after the trunk: Keras' top (`top`), or optional pooling + an optional new head."""
  if include_top:
    if not num_classes:
      raise ValueError("include_top=True needs num_classes")
    return tuple(top)
  if pooling not in (None, "avg", "max"):
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
  return ((f"{pooling}_pool",) if pooling else ()) + ((HEAD,) if num_classes else ())


def run_stages(layers: Sequence[str], stage: Callable[[str, Any, bool], Any], x, *,
               start_after: str | None, stop_at: str | None, capture: Iterable[str],
               stop_gradient_after: str | None, train: bool):
  """VGG16's calling convention over stages; `stage(name, x, train_stage)` builds one stage."""
  layers, capture = tuple(layers), tuple(capture)
  for name in (start_after, stop_at, stop_gradient_after, *capture):
    if name is not None and name not in layers:
      raise ValueError(f"unknown layer {name!r}; this model has: {', '.join(layers)}")
  first = layers.index(start_after) + 1 if start_after else 0
  last = layers.index(stop_at) if stop_at else len(layers) - 1
  frozen = max((layers.index(n) for n in (start_after, stop_gradient_after) if n), default=-1)
  captured = {}
  for i in range(first, last + 1):
    name = layers[i]
    x = stage(name, x, train and i > frozen)
    if name == stop_gradient_after:
      x = jax.lax.stop_gradient(x)
    if name in capture:
      captured[name] = x
  return (x, captured) if capture else x


def pool_or_dense(name: str, x, num_classes: int | None, dtype):
  """The parameter-free pools, `feature_norm` and the `predictions` Dense (logits, no softmax)."""
  if name == FEATURE_NORM:
    return power_normalize(x)
  if name == "avg_pool":
    return jnp.mean(x, axis=(1, 2))
  if name == "max_pool":
    return jnp.max(x, axis=(1, 2))
  if name == HEAD:
    return nn.Dense(num_classes, dtype=dtype, name=HEAD)(x)
  raise AssertionError(name)


# --- layers as Keras builds them ------------------------------------------------------------------

def conv(x, features: int, kernel: int, *, name: str, strides: int = 1, padding: str = "VALID",
         use_bias: bool = True, groups: int = 1, dtype=jnp.float32):
  """Keras Conv2D (HWIO kernel); padding 'SAME' is TF's (extra row/column at the bottom/right)."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 use_bias=use_bias, feature_group_count=groups, dtype=dtype, name=name)(x)


def depthwise(x, kernel: int, *, name: str, strides: int = 1, padding: str = "SAME", dtype):
  """Keras DepthwiseConv2D (depth multiplier 1, no bias): kernel (kh, kw, 1, C) in flax."""
  return DepthwiseConv(kernel, strides, padding, dtype, name=name)(x)


class DepthwiseConv(nn.Module):
  """A depthwise convolution, computed as k*k shifted multiply-adds. Why: XLA:CPU runs the
  grouped convolution (`feature_group_count=C`) 5-25x slower than this sum on the project's CPUs
  (benchmarks/RESULTS.md, issue 19); the kernel gradient, whose plain form is column reductions
  (slow there too), is a custom VJP of ones-vector matmuls. The params are nn.Conv's (`kernel`,
  (k, k, 1, C))."""
  kernel_size: int
  strides: int = 1
  padding: str = "SAME"  # TF's 'SAME' (stride 1 here) or 'VALID' (after explicit zero padding)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel_size, self.strides, x.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    x, w = jnp.asarray(x, self.dtype), w.astype(self.dtype)
    if self.padding == "SAME":
      if s != 1:
        raise NotImplementedError("'SAME' depthwise with strides > 1: pad explicitly, 'VALID'")
      x = zero_pad(x, (((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2)))  # TF: the extra row below
    return _depthwise_valid(x, w, s)


def _taps(x, w, s: int):
  """'VALID' depthwise convolution with stride `s` as a sum over the kernel's taps."""
  k, (n, h, wd, c) = w.shape[0], x.shape
  oh, ow = (h - k) // s + 1, (wd - k) // s + 1
  out = None
  for i in range(k):
    for j in range(k):
      tap = jax.lax.slice(x, (0, i, j, 0), (n, i + s * (oh - 1) + 1, j + s * (ow - 1) + 1, c),
                          (1, s, s, 1)) * w[i, j, 0]
      out = tap if out is None else out + tap
  return out


def _kernel_grad(x, g, k: int, s: int):
  """d(sum g * _taps(x, w)) / dw: per tap, a ones-vector matmul over the (N*H*W, C) products.
  Why: on XLA:CPU (Eigen path) it is 1-6x faster than the grouped convolution's kernel gradient
  and column reductions (issue 19's profile)."""
  n, _, _, c = x.shape
  oh, ow = g.shape[1:3]
  rows = [_channel_sum(jax.lax.slice(x, (0, i, j, 0), (n, i + s * (oh - 1) + 1,
                                                       j + s * (ow - 1) + 1, c), (1, s, s, 1)) * g)
          for i in range(k) for j in range(k)]
  return jnp.stack(rows).reshape(k, k, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_valid(x, w, s: int):
  return _taps(x, w, s)


def _depthwise_fwd(x, w, s):
  return _taps(x, w, s), (x, w)


def _depthwise_bwd(s, res, g):
  x, w = res
  dx = jax.vjp(lambda x: _taps(x, w, s), x)[1](g)[0]
  return dx, _kernel_grad(x, g, w.shape[0], s).astype(w.dtype)


_depthwise_valid.defvjp(_depthwise_fwd, _depthwise_bwd)


def batch_norm(x, *, name: str, train: bool, epsilon: float, momentum: float, dtype):
  """Keras BatchNormalization: batch mean/variance two-pass and biased, as tf.nn.moments."""
  return BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, name=name)(x, train)


class BatchNorm(nn.Module):
  """nn.BatchNorm's variables and arithmetic (two-pass biased variance, running averages with
  `momentum`), with every per-channel sum over N*H*W, forward and backward, as a matmul. Why:
  XLA:CPU with Eigen convolutions (`runtime.configure_cpu`) runs those column reductions ~10x
  slower than a ones-vector matmul, which made the BN backbones' steps 0.06-0.13x Keras
  (issue 19)."""
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      x32 = jnp.asarray(x, jnp.float32)
      n = x32.size // c
      mean = _channel_sum(x32) / n
      var = _channel_sum(jnp.square(x32 - mean)) / n
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      self.sow("batch_norm_moments", "mean", mean)  # kept only when asked (flaxtl.precise_bn)
      self.sow("batch_norm_moments", "var", var)
    else:
      mean, var = ra_mean.value, ra_var.value
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    return _affine(jnp.asarray(x, self.dtype), a.astype(self.dtype),
                   (bias - mean * a).astype(self.dtype))


def _channel_sum(x):
  """(..., C) -> (C,) as a ones-vector matmul (its transpose, in the backward, is a broadcast)."""
  flat = x.reshape(-1, x.shape[-1])
  return (jnp.ones((1, flat.shape[0]), flat.dtype) @ flat)[0]


@jax.custom_vjp
def _affine(x, a, b):
  """x * a + b per channel; the backward's sums over N*H*W are matmuls (`_channel_sum`)."""
  return x * a + b


def _affine_fwd(x, a, b):
  return x * a + b, (x, a)


def _affine_bwd(res, g):
  x, a = res
  return g * a, _channel_sum(g * x).astype(a.dtype), _channel_sum(g).astype(a.dtype)


_affine.defvjp(_affine_fwd, _affine_bwd)


def zero_pad(x, pads):
  """Keras ZeroPadding2D(((top, bottom), (left, right)))."""
  return jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))


def correct_pad(x, kernel: int):
  """keras.applications.imagenet_utils.correct_pad: the padding of a stride-2 'valid' conv."""
  adjust = (1 - x.shape[1] % 2, 1 - x.shape[2] % 2)
  c = kernel // 2
  return ((c - adjust[0], c), (c - adjust[1], c))


def relu6(x):
  return jnp.minimum(jnp.maximum(x, 0), 6)


class Normalization(nn.Module):
  """Keras' Normalization layer: (x - mean) / max(sqrt(variance), 1e-7); its adapted mean and
  variance are constants from the weights file, kept in `batch_stats` (never updated) so that they
  travel with the model but are never trained."""
  features: int = 3

  @nn.compact
  def __call__(self, x):
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,)).value
    variance = self.variable("batch_stats", "variance", jnp.ones, (self.features,)).value
    return (x - mean) / jnp.maximum(jnp.sqrt(variance), 1e-7)  # 1e-7: keras.backend.epsilon()


def stage_parameter_layers(stages: Sequence[str], layers_of: Callable[[str], Sequence[tuple]]):
  """{stage: (its Keras layers with weights, in Keras' `model.layers` order)}, stages with any."""
  return {s: tuple(n for n, _ in layers_of(s)) for s in stages if layers_of(s)}


class Staged(nn.Module):
  """The call interface the backbones share (VGG16's): a sequence of named stages, entered after
  and left at any of them. A subclass names its stages (`layer_names`, `stage_keras_layers`) and
  builds one stage in `_stage(name, x, train)`."""
  include_top: bool = True
  pooling: str | None = None
  num_classes: int | None = 1000
  feature_norm: bool = False  # VGG16's option: `power_normalize` the pooled features
  dtype: Any = jnp.float32
  uses_dropout = False

  @property
  def layers(self) -> tuple[str, ...]:
    names = self.layer_names(self.include_top, self.pooling, self.num_classes)
    if self.feature_norm and not self.include_top and self.pooling:
      i = names.index(f"{self.pooling}_pool") + 1
      names = names[:i] + (FEATURE_NORM,) + names[i:]
    return names

  def layer_fns(self, train: bool, use_bias: bool = False):
    """(conv, batch norm) with this backbone's epsilon, momentum and dtype."""
    return (functools.partial(conv, use_bias=use_bias, dtype=self.dtype),
            functools.partial(batch_norm, train=train, epsilon=self.epsilon,
                              momentum=self.momentum, dtype=self.dtype))

  def keras_layers(self) -> tuple[tuple[str, str], ...]:
    """(Keras layer, kind) for every layer with weights, in Keras' `model.layers` order."""
    return tuple(l for s in self.layers for l in self.stage_keras_layers(s))

  @nn.compact
  def __call__(self, x, *, start_after: str | None = None, stop_at: str | None = None,
               capture: Iterable[str] = (), stop_gradient_after: str | None = None,
               train: bool = False):
    """As VGG16.__call__; `train` also sets the batch norm (and dropout) mode (module doc)."""
    return run_stages(self.layers, self._stage, jnp.asarray(x, self.dtype),
                      start_after=start_after, stop_at=stop_at, capture=capture,
                      stop_gradient_after=stop_gradient_after, train=train)


def describe(name: str, trunk: tuple[str, ...], levels: Sequence[str], preprocessing: str,
             keras_weights: dict, stage_keras_layers: Callable, epsilon: float,
             momentum: float) -> "Description":
  """A backbone's Description. Level 'x' trains from the first stage named 'x_...' on (its
  boundary is the stage before); 'head' trains after the last trunk stage; 'all' has none."""
  boundaries = {"head": trunk[-1], "all": None}
  for lv in levels[1:-1]:
    first = next(i for i, n in enumerate(trunk) if n.startswith(lv + "_"))
    boundaries[lv] = trunk[first - 1]
  return Description(
      name=name, layers=trunk, stages=tuple(levels),
      level_boundaries={lv: boundaries[lv] for lv in levels},
      cache_boundaries=tuple(boundaries[lv] for lv in levels if boundaries[lv]),
      preprocessing=preprocessing, keras_weights=keras_weights,
      parameter_layers=stage_parameter_layers(trunk + (HEAD,), stage_keras_layers),
      batch_norm={"epsilon": epsilon, "momentum": momentum})


def parameter_layers(names, stage_keras_layers: Callable) -> tuple[str, ...]:
  """The stages among `names` that hold parameters (vgg.parameter_layers' contract: stage names;
  `describe().parameter_layers[stage]` lists the Keras layers inside each)."""
  return tuple(n for n in names if stage_keras_layers(n))
