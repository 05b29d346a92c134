"""The optimizer a config asks for: schedule over steps, optax transform, frozen layers zeroed.

Durations are steps inside (as big_vision's `utils.steps`): `config.train_steps` when set, else
`config.epochs` x steps per epoch, so a fraction of an epoch is just fewer steps.
"""
from __future__ import annotations

import math
import re

import jax
import optax

from flaxtl import freezing
from flaxtl.errors import ConfigError

NAMES = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def check(config) -> None:
  """Optimizer fields, before any data is read."""
  opt = config.optimizer
  if opt.name not in NAMES:
    raise ConfigError(f"config.optimizer.name={opt.name!r}: one of {', '.join(NAMES)}")
  if opt.schedule not in SCHEDULES:
    raise ConfigError(f"config.optimizer.schedule={opt.schedule!r}: one of {', '.join(SCHEDULES)}")
  if not (opt.learning_rate > 0 and math.isfinite(opt.learning_rate)):
    raise ConfigError(f"config.optimizer.learning_rate={opt.learning_rate}: must be > 0")
  if opt.warmup_epochs < 0 or opt.weight_decay < 0 or opt.grad_clip < 0:
    raise ConfigError("config.optimizer: warmup_epochs, weight_decay and grad_clip must be >= 0")
  if opt.get("plateau_patience", 0) < 0 or not 0 < opt.get("plateau_factor", 0.1) < 1:
    raise ConfigError(f"config.optimizer.plateau_patience={opt.plateau_patience} must be >= 0 and "
                      f"plateau_factor={opt.plateau_factor} in (0, 1)")
  lr_mults(opt)


def total_steps(config, steps_per_epoch: int) -> int:
  return int(config.train_steps) if config.train_steps > 0 else config.epochs * steps_per_epoch


def learning_rate(opt, steps_per_epoch: int, total: int):
  """A schedule over `total` steps: linear warmup, then constant or cosine decay."""
  total = max(1, total)
  warmup = min(int(opt.warmup_epochs * steps_per_epoch), total - 1)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, total)
  if not warmup:
    return opt.learning_rate
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup),
                               optax.constant_schedule(opt.learning_rate)], [warmup])


def transform(opt, lr) -> optax.GradientTransformation:
  if opt.name == "adam":
    tx = optax.adam(lr)
  elif opt.name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(lr, momentum=opt.momentum or None, nesterov=False)
  if opt.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx


def lr_mults(opt) -> list[tuple[re.Pattern, float]]:
  """'predictions:10,^block5:0.1' -> [(pattern, multiplier)] (big_vision's lr_mults, fastai's
  discriminative LRs), checked up front."""
  out = []
  for part in filter(None, (p.strip() for p in getattr(opt, "lr_mults", "").split(","))):
    pattern, sep, mult = part.rpartition(":")
    try:
      out.append((re.compile(pattern), float(mult)))
    except (re.error, ValueError):
      raise ConfigError(f"config.optimizer.lr_mults: {part!r} is not REGEX:MULTIPLIER") from None
    if not sep or out[-1][1] < 0:
      raise ConfigError(f"config.optimizer.lr_mults: {part!r} is not REGEX:MULTIPLIER (>= 0)")
  return out


def _scaled(lr, mult: float):
  return (lambda step: lr(step) * mult) if callable(lr) else lr * mult


def create(config, params, freeze: freezing.FreezePlan, lr) -> optax.GradientTransformation:
  """`config.optimizer` with schedule `lr` on the trainable leaves (times their group's lr_mult);
  frozen leaves get zero updates and no optimizer state."""
  mults = lr_mults(config.optimizer)
  if not mults:
    return freezing.optimizer(transform(config.optimizer, lr), params, freeze)

  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if freeze.label(name) == freezing.FROZEN:
      return freezing.FROZEN
    return f"x{next((m for p, m in mults if p.search(name)), 1.0):g}"

  labels = jax.tree_util.tree_map_with_path(label, params)
  groups = {lab for lab in jax.tree.leaves(labels) if lab != freezing.FROZEN}
  txs = {g: transform(config.optimizer, _scaled(lr, float(g[1:]))) for g in groups}
  return optax.multi_transform({freezing.FROZEN: optax.set_to_zero(), **txs}, labels)


def plateau(opt):
  """ReduceLROnPlateau on the validation loss, once per epoch (Keras' callback): optax's
  `contrib.reduce_on_plateau`, whose state (the LR scale) lives in the train state, so it is
  checkpointed and a resumed run scales exactly as an uninterrupted one. None when off."""
  if not opt.get("plateau_patience", 0):  # configs written before the field: off
    return None
  return optax.contrib.reduce_on_plateau(factor=opt.plateau_factor, patience=opt.plateau_patience,
                                         rtol=1e-4, min_scale=1e-3)
