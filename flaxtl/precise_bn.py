"""Precise batch norm (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's
`update_bn_stats`): before an evaluation, the trainable batch norms' running averages are replaced
by the mean over a few training batches of each layer's batch mean and variance, computed with the
current weights.

Why: the running averages are an EMA that lags the weights by ~1 / (1 - momentum) steps; with
Keras' momentum (0.99, MobileNetV2's 0.999) a network trained from random weights for a few
epochs evaluates on statistics of long-gone weights (MobileNetV2 on sign_digits: val 0.10 with
them, 0.79 with batch statistics; benchmarks/RESULTS.md). Frozen batch norms run in inference
mode, report nothing and keep their statistics.
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp

from flaxtl import parallel

COLLECTION = "batch_norm_moments"  # what models.backbone.BatchNorm sows in training mode


def batches_for(config, weights_meta: dict) -> int:
  """config.model.precise_bn: -1 (auto) = 50 batches when training from random weights, else 0."""
  n = config.model.get("precise_bn", -1)
  if n >= 0:
    return n
  return 50 if str(weights_meta.get("source", "")).startswith("none") else 0


@functools.lru_cache(maxsize=8)
def _moments_fn(apply_fn):
  def moments(variables, x, rng):
    _, out = apply_fn(variables, x, train=True, rngs={"dropout": rng},
                      mutable=["batch_stats", COLLECTION])
    return jax.tree.map(lambda t: t[0], out.get(COLLECTION, {}),
                        is_leaf=lambda t: isinstance(t, tuple))
  return jax.jit(moments)


def recalibrate(apply_fn, params, batch_stats: dict, batches: Iterable[dict], mesh,
                seed: int = 0) -> dict:
  """`batch_stats` with every layer that computes batch moments in training mode set to the mean
  of its batch mean and (biased) variance over `batches` (this process's rows, as the step gets
  them). Unchanged when no batch norm trains or `batches` is empty."""
  fn, sums, n = _moments_fn(apply_fn), None, 0
  variables = {"params": params, "batch_stats": batch_stats}
  for i, batch in enumerate(batches):
    m = fn(variables, parallel.put_batch({"x": batch["x"]}, mesh)["x"], jax.random.key(seed + i))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    n += 1
  if not n or not sums:
    return batch_stats
  out = dict(batch_stats)
  for layer, moments in sums.items():
    out[layer] = {**batch_stats[layer], "mean": moments["mean"] / n, "var": moments["var"] / n}
  return out
