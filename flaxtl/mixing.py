"""mixup and CutMix over the global batch: the mixed inputs and, for the loss
(`step.loss_terms`), each row's partner label and weight. Pure functions of the step's rng, so a
resumed run mixes exactly as it would have; on cached features they mix at the frozen boundary
(manifold mixup, CutMix in feature space), so the cache is kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(rng, x, labels, mask, alpha: float):
  """mixup (Zhang et al. 2018) over the global batch: one lambda ~ Beta(alpha, alpha) per step,
  each row mixed with a permuted partner. On cached features it is manifold mixup at the frozen
  boundary, so it keeps the cache. Rows whose partner is padding stay unmixed. A pure function of
  (seed, step): resume stays exact. Returns the inputs and (partner labels, per-row weight)."""
  k1, k2 = jax.random.split(rng)
  lam = jax.random.beta(k1, alpha, alpha)
  perm = jax.random.permutation(k2, x.shape[0])
  lam_row = jnp.where(mask[perm] > 0, lam, 1.0).astype(jnp.float32)
  shape = (-1,) + (1,) * (x.ndim - 1)
  xf = x.astype(jnp.float32)
  mixed = lam_row.reshape(shape) * xf + (1.0 - lam_row.reshape(shape)) * xf[perm]
  return mixed, (labels[perm], lam_row)


def cutmix(rng, x, labels, mask, alpha: float):
  """CutMix (Yun et al. 2019) over the global batch: a box of area ~(1 - lambda), lambda ~
  Beta(alpha, alpha), pasted from a permuted partner; the label weight is the box's exact area.
  On cached spatial features (e.g. block4_pool's 14x14) the box is cut in feature space, so the
  cache is kept. Rows whose partner is padding stay whole. Needs (B, H, W, C) inputs."""
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  lam = jax.random.beta(k1, alpha, alpha)
  perm = jax.random.permutation(k2, x.shape[0])
  h, w = x.shape[1], x.shape[2]
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = jnp.round(cut * h).astype(jnp.int32), jnp.round(cut * w).astype(jnp.int32)
  cy, cx = jax.random.randint(k3, (), 0, h), jax.random.randint(k4, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy - ch // 2 + ch, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx - cw // 2 + cw, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (H, W)
  keep = mask[perm] > 0
  area = jnp.sum(box) / (h * w)
  lam_row = jnp.where(keep, 1.0 - area, 1.0).astype(jnp.float32)
  paste = box[None, :, :, None] & keep[:, None, None, None]
  return jnp.where(paste, x[perm], x), (labels[perm], lam_row)


def mix_batch(rng, x, labels, mask, mixup_alpha: float, cutmix_alpha: float):
  """mixup, CutMix, or (both set) one of them per step with equal odds, as timm does."""
  if mixup_alpha and cutmix_alpha:
    return jax.lax.cond(jax.random.bernoulli(jax.random.fold_in(rng, 7)),
                        lambda: cutmix(rng, x.astype(jnp.float32), labels, mask, cutmix_alpha),
                        lambda: mixup(rng, x, labels, mask, mixup_alpha))
  if cutmix_alpha:
    return cutmix(rng, x, labels, mask, cutmix_alpha)
  return mixup(rng, x, labels, mask, mixup_alpha)
