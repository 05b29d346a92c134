"""The reference's small CNN trained from scratch: the baseline that shows what transfer buys.

Conv 32 3x3 + ReLU + MaxPool 2, four times; dropout 0.25 after the 2nd and 4th block; Flatten,
Dense 256 + ReLU, dropout 0.5, Dense (softmax in the loss). Same call interface as VGG16.
"""
from __future__ import annotations

from typing import Any

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
               stop_gradient_after: str | None = None):
    if start_after is not None or stop_gradient_after is not None:
      raise ValueError("SmallCNN trains from scratch: nothing is frozen, use trainable='all'")
    x = jnp.asarray(x, self.dtype)
    for b in range(1, 5):
      x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", dtype=self.dtype, name=f"block{b}_conv")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      if b in (2, 4):
        x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256, dtype=self.dtype, name="fc1")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
