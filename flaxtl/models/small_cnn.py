"""The reference's small CNN trained from scratch: the baseline that shows what transfer buys.

Conv 32 3x3 + ReLU + MaxPool 2, four times; dropout 0.25 after the 2nd and 4th block; Flatten,
Dense 256 + ReLU, dropout 0.5, Dense (softmax in the loss). Same call interface as VGG16: named
layers it can start after, stop at and capture (Grad-CAM and embeddings use them).
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import linen as nn


class SmallCNN(nn.Module):
  num_classes: int
  dtype: Any = jnp.float32
  uses_dropout = True

  @property
  def layers(self) -> tuple[str, ...]:
    names = []
    for b in range(1, 5):
      names += [f"block{b}_conv", f"block{b}_pool"]
    return tuple(names) + ("flatten", "fc1", "predictions")

  @nn.compact
  def __call__(self, x, *, train: bool = False, start_after: str | None = None,
               stop_at: str | None = None, capture: Iterable[str] = (),
               stop_gradient_after: str | None = None):
    """As VGG16.__call__: the layers after `start_after` up to `stop_at`, `capture`d outputs."""
    layers, capture = self.layers, tuple(capture)
    for name in (start_after, stop_at, stop_gradient_after, *capture):
      if name is not None and name not in layers:
        raise ValueError(f"unknown layer {name!r}; this model has: {', '.join(layers)}")
    first = layers.index(start_after) + 1 if start_after else 0
    last = layers.index(stop_at) if stop_at else len(layers) - 1
    x = jnp.asarray(x, self.dtype)
    captured = {}
    for name in layers[first:last + 1]:
      if name.endswith("_conv"):
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", dtype=self.dtype, name=name)(x))
      elif name.endswith("_pool"):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        if name in ("block2_pool", "block4_pool"):
          x = nn.Dropout(0.25, deterministic=not train)(x)
      elif name == "flatten":
        x = x.reshape((x.shape[0], -1))
      elif name == "fc1":
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
      else:
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
      if name == stop_gradient_after:
        x = jax.lax.stop_gradient(x)
      if name in capture:
        captured[name] = x
    return (x, captured) if capture else x
