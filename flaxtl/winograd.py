"""3x3, stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016), for
the frozen layers only: the one-time feature pass (feature_engine 'winograd') and, training from
images, the layers before the frozen boundary (`feature_engine.for_frozen_layers`).

Why: each 4x4 output tile costs 36 multiplications per channel pair instead of 144. Written as 36
matrix products plus constant linear transforms (which XLA fuses), VGG16's pass to block4_pool ran
2.2x XLA:CPU's own convolution at 224 px on an AVX2 CPU with features ~3e-6 (relative) apart
(benchmarks/RESULTS.md, issue 17). F(2x2) was slower, F(6x6) slower and less exact. Frozen layers
are never differentiated; the trained layers keep lax's convolution and its parity with Keras.
"""
from __future__ import annotations

import numpy as np
from jax import lax
import jax.numpy as jnp

M, R = 4, 3          # output tile, filter size
A = M + R - 1        # input tile: 6
# Lavin & Gray's interpolation points 0, +-1, +-2 and infinity.
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)
MIN_CHANNELS = 16    # fewer input channels (an RGB first layer): the transforms cost more than they save
NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _combine(matrix: np.ndarray, parts: list) -> list:
  """[sum_i matrix[r, i] * parts[i] for each row r], skipping zeros: constant coefficients that
  XLA fuses into elementwise loops."""
  out = []
  for row in matrix:
    acc = None
    for c, p in zip(row, parts):
      if c:
        t = p if c == 1 else -p if c == -1 else p * np.float32(c)
        acc = t if acc is None else acc + t
    out.append(acc)
  return out


def conv3x3(x, kernel):
  """'SAME' 3x3 stride-1 cross-correlation, NHWC x HWIO -> NHWC, float32 (lax's, reassociated)."""
  n, h, w, _ = x.shape
  th, tw = -(-h // M), -(-w // M)  # tiles; the edge is zero-padded to whole tiles, then cropped
  x = jnp.pad(x, ((0, 0), (1, 1 + th * M - h), (1, 1 + tw * M - w), (0, 0)))
  rows = _combine(BT, [lax.slice_in_dim(x, i, i + M * (th - 1) + 1, M, axis=1) for i in range(A)])
  v = jnp.stack([jnp.stack(_combine(BT, [lax.slice_in_dim(r, j, j + M * (tw - 1) + 1, M, axis=2)
                                         for j in range(A)])) for r in rows])
  u = jnp.einsum("ai,ijck,bj->abck", G.astype(np.float32), kernel, G.astype(np.float32))
  m = jnp.einsum("abntsc,abck->abntsk", v, u)          # 36 products (tiles x Cin) @ (Cin x Cout)
  y = [jnp.stack(_combine(AT, list(r))) for r in _combine(AT, list(m))]  # [p][q] -> (n, th, tw, k)
  y = jnp.stack(y).transpose(2, 3, 0, 4, 1, 5).reshape(n, th * M, tw * M, -1)
  return y[:, :h, :w]


def applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count) -> bool:
  ones = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
  return (rhs.shape[:2] == (R, R) and tuple(window_strides) == (1, 1)
          and padding in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)])
          and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == NHWC
          and lhs.dtype == rhs.dtype == jnp.float32
          and lhs.shape[-1] >= MIN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
  """`lax.conv_general_dilated`'s signature (a Flax `nn.Conv(conv_general_dilated=...)`): Winograd
  where it applies (3x3, stride 1, 'SAME', NHWC, float32, >= 16 input channels), else lax's."""
  if not kw and applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count):
    return conv3x3(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision, **kw)
