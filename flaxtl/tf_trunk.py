"""VGG16's trunk through TensorFlow (oneDNN) at the CPU's speed: the frozen trunk's one-time feature
pass, and (`trained_layers`) the trained conv layers of the training step, in bf16.

Why: XLA:CPU runs bf16 convolutions at float32 speed, while TensorFlow's oneDNN kernels use the
CPU's bf16 units (AMX tiles, AVX512-BF16): Keras' mixed_bfloat16 VGG16 forward ran ~9x flaxtl's
float32 one on an AMX Xeon (benchmarks/RESULTS.md, issue 17). The frozen trunk's output is only
cached, so any engine exact enough may compute it; the trained layers' gradients come from TF's
own autodiff of the same layers (`trained_layers`).

Built from flaxtl's own params (conv kernels are HWIO in both), flaxtl's preprocessing (which works
on TF tensors) and Keras' VGG16 layer order: the same function as `models.vgg.VGG16` up to the last
conv/pool layer asked for; parameter-free or Dense layers after it (avg_pool, feature_norm, fc1, ..)
run in Flax on its float32 output. bf16: inputs and weights in bf16, float32 out (Keras'
mixed_bfloat16). Imported only when an engine other than XLA runs: no TensorFlow otherwise.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from flaxtl import preprocessing
from flaxtl.models import vgg


@functools.lru_cache(maxsize=None)
def _tf():
  import tensorflow as tf
  try:  # the trunk runs on the host CPU; an accelerator stays JAX's
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices elsewhere (e.g. tf.data): keep them
    pass
  return tf


@functools.lru_cache(maxsize=16)
def _tail(model, start_after: str, stop_at: str, capture: tuple[str, ...]):
  """The layers after TF's part, in Flax (jitted once per configuration)."""
  import jax
  return jax.jit(lambda p, x: model.apply({"params": p}, x, start_after=start_after,
                                          stop_at=stop_at, capture=capture)[1])


def batch_size(image_size: int) -> int:
  """The pass's batch: 64 images at 224 px, 128 at 112 and below (fewer above): 1.06-1.11x the
  bf16 rate of batch 32 on the AMX Xeon (interleaved, loaded; benchmarks/RESULTS.md, issue 17),
  with at most ~0.4 GB of bf16 activations per layer."""
  return int(2 ** round(np.log2(min(128, max(8, 64 * (224 / image_size) ** 2)))))


def supports(model) -> bool:
  """Only VGG16: the model whose layers this module knows."""
  return isinstance(model, vgg.VGG16)


@functools.lru_cache(maxsize=16)
def _forward(mode: str, names: tuple[str, ...], keep: frozenset, bf16: bool, pixels: str):
  """One tf.function per layer configuration and input dtype (uint8 images cross to TF as they
  are, 4x fewer bytes; augmented views are float), traced once per process: images and weights
  are its arguments (as fast as weights held as constants, measured), the batch dimension open."""
  tf = _tf()
  dtype = tf.bfloat16 if bf16 else tf.float32
  convs = [n for n in names if "_conv" in n]
  spec = [tf.TensorSpec([None, None, None, 3], tf.as_dtype(pixels)),
          [(tf.TensorSpec([3, 3, None, None], dtype), tf.TensorSpec([None], dtype))
           for _ in convs]]

  @tf.function(input_signature=spec, autograph=False)
  def forward(images, weights):
    x = tf.cast(preprocessing.preprocess(tf.cast(images, tf.float32), mode), dtype)
    return _layers(tf, x, names, dict(zip(convs, weights)), keep)

  return forward, convs, dtype


def _layers(tf, x, names, weights: dict, keep) -> dict:
  """Keras' VGG16 conv (ReLU) and pool layers `names` on `x`, in x's dtype (weights cast to it):
  {layer in keep: float32 output}."""
  out = {}
  for n in names:
    if "_conv" in n:
      kernel, bias = (tf.cast(w, x.dtype) for w in weights[n])
      x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
    else:
      x = tf.nn.max_pool2d(x, 2, 2, "VALID")
    if n in keep:
      out[n] = tf.cast(x, tf.float32)
  return out


class TFTrunk:
  """0-255 images -> {layer: float32 output} for each layer in `capture`, up to `stop_at`."""

  def __init__(self, model, params: Any, mode: str, stop_at: str, capture: Sequence[str],
               bf16: bool = False):
    tf = _tf()
    trunk = vgg.trunk_layer_names()
    layers = model.layers
    self.tail_from = None  # the last trunk layer TF computes; Flax runs the layers after it
    if stop_at in trunk:
      names = trunk[:trunk.index(stop_at) + 1]
    else:
      names, self.tail_from = trunk, trunk[-1]
    self.capture = tuple(capture)
    tf_capture = tuple(n for n in self.capture if n in names)
    keep = frozenset(tf_capture) | ({self.tail_from} if self.tail_from else set())
    self._forward = functools.partial(_forward, mode, names, keep, bf16)
    convs = [n for n in names if "_conv" in n]
    dtype = tf.bfloat16 if bf16 else tf.float32
    self._weights = [(tf.constant(np.asarray(params[n]["kernel"]), dtype),
                      tf.constant(np.asarray(params[n]["bias"]), dtype)) for n in convs]
    self._tail = None
    rest = tuple(n for n in self.capture if n not in tf_capture)
    if self.tail_from:
      last = max((stop_at, *rest), key=layers.index)
      between = layers[layers.index(self.tail_from) + 1:layers.index(last) + 1]
      self._tail = functools.partial(_tail(model, self.tail_from, last, rest),
                                     {k: v for k, v in params.items() if k in between})

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of 0-255 pixels (uint8 images, or the augmented views' floats)."""
    images = np.asarray(images)
    pixels = "uint8" if images.dtype == np.uint8 else "float32"
    forward = self._forward(pixels)[0]
    out = {k: v.numpy() for k, v in forward(images.astype(pixels, copy=False),
                                           self._weights).items()}
    if self._tail is not None:
      out.update({k: np.asarray(v, np.float32) for k, v in self._tail(out[self.tail_from]).items()})
    return {k: out[k] for k in self.capture}

  def map(self, images: np.ndarray, progress: Callable[[int], Any] | None = None,
          batch: int | None = None) -> dict[str, np.ndarray]:
    """`self` over all rows of `images`, in batches -> {layer: float32 array}."""
    out, step = {}, batch or batch_size(images.shape[1])
    for s in range(0, len(images), step):
      part = self(np.asarray(images[s:s + step]))
      for k, v in part.items():
        if k not in out:
          out[k] = np.empty((len(images), *v.shape[1:]), np.float32)
        out[k][s:s + len(v)] = v
      if progress:
        progress(len(part[self.capture[0]]))
    if not out:  # no rows: shapes from one row of zeros
      zero = self(np.zeros((1, *images.shape[1:]), np.uint8))
      out = {k: np.zeros((0, *v.shape[1:]), np.float32) for k, v in zero.items()}
    return out


@functools.lru_cache(maxsize=16)
def _trained_fns(names: tuple[str, ...]):
  """tf.functions for the trained layers `names`: forward, and the weights' gradients given the
  output's (the forward recomputed under a tape, so TF's own autodiff writes the backward pass;
  one more forward, ~a quarter of the step's FLOPs; keeping the activations was not tried)."""
  tf = _tf()
  convs = [n for n in names if "_conv" in n]
  spec = [tf.TensorSpec([None] * 4, tf.float32),
          [(tf.TensorSpec([3, 3, None, None], tf.float32), tf.TensorSpec([None], tf.float32))
           for _ in convs]]

  def run(x, weights):
    x = tf.cast(x, tf.bfloat16)
    return _layers(tf, x, names, dict(zip(convs, weights)), {names[-1]})[names[-1]]

  @tf.function(input_signature=spec, autograph=False)
  def forward(x, weights):
    return run(x, weights)

  @tf.function(input_signature=[*spec, tf.TensorSpec([None] * 4, tf.float32)], autograph=False)
  def backward(x, weights, dy):
    with tf.GradientTape() as tape:
      tape.watch(weights)
      y = run(x, weights)
    return tape.gradient(y, weights, output_gradients=dy)

  return forward, backward


@functools.lru_cache(maxsize=16)
def trained_layers(names: tuple[str, ...]):
  """(x, [(kernel, bias) per conv in `names`]) -> the last layer's float32 output: VGG16's conv
  and pool layers `names` as a differentiable JAX function whose forward and backward passes run
  in TensorFlow's oneDNN in bf16 (inputs, weights and activations bf16, float32 accumulation:
  Keras' mixed_bfloat16), through host callbacks.

  Why: the training step's trainable convolutions are its cost, and XLA:CPU runs bf16 at float32
  speed; on an AMX Xeon the block 5 step at 224 px ran 3.1x XLA's float32 one (benchmarks/
  RESULTS.md, "The training step in bf16"). The gradient w.r.t. `x` is zero: these layers start
  at the frozen boundary. One CPU device only (a host callback sees whole arrays).
  Deterministic: resume stays exact.
  """
  import jax
  import jax.numpy as jnp
  forward, backward = _trained_fns(names)
  pools = sum(1 for n in names if "_pool" in n)

  def out_shape(x, weights):
    n, h, w, c = x.shape
    channels = weights[-1][0].shape[-1] if weights else c
    return jax.ShapeDtypeStruct((n, h >> pools, w >> pools, channels), jnp.float32)

  def run_forward(x, weights):
    return jax.pure_callback(lambda x, w: forward(x, w).numpy(), out_shape(x, weights), x, weights,
                             vmap_method="sequential")

  @jax.custom_vjp
  def apply(x, weights):
    return run_forward(x, weights)

  def apply_fwd(x, weights):
    return run_forward(x, weights), (x, weights)

  def apply_bwd(res, dy):
    x, weights = res
    grads = jax.pure_callback(
        lambda x, w, dy: jax.tree.map(lambda t: t.numpy(), backward(x, w, dy)),
        jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, jnp.float32), weights),
        x, weights, dy, vmap_method="sequential")
    return jnp.zeros_like(x), grads

  apply.defvjp(apply_fwd, apply_bwd)
  return apply
