"""The optimizer a config asks for: schedule over steps, optax transform, frozen layers zeroed.

Durations are steps inside (as big_vision's `utils.steps`): `config.train_steps` when set, else
`config.epochs` x steps per epoch, so a fraction of an epoch is just fewer steps.
"""
from __future__ import annotations

import math

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


def create(config, params, freeze: freezing.FreezePlan, lr) -> optax.GradientTransformation:
  """`config.optimizer` with schedule `lr` on the trainable leaves; frozen leaves get zero updates
  and no optimizer state."""
  return freezing.optimizer(transform(config.optimizer, lr), params, freeze)
