"""A config's every field checked before any data is read, weights loaded or file written: an
unknown field (a typo stored silently otherwise) or a bad value is a ConfigError naming the field.

Separate from `prepare` because train and cv check a config before they write anything (the
workdir included); `prepare` calls it first too, so the sweep, lr_find and the API get it.
"""
from __future__ import annotations

import difflib

import numpy as np

from flaxtl import data, feature_engine, freezing, input_pipeline, models, optim, wise_ft
from flaxtl.errors import ConfigError


def unknown_fields(config) -> list[tuple[str, str | None]]:
  """Fields `default.py` does not have (a typo in a config built by hand is otherwise silently
  stored) -> [(field, the closest known field or None)]."""
  from flaxtl.configs import default  # here: configs import flaxtl modules

  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict) and prefix + k != "data.tfds_splits":  # its keys are the user's
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield prefix + k
  known = set(flat(default.get_config().to_dict()))
  names = known | {f.rsplit(".", 1)[0] for f in known if "." in f}  # groups, for the hint
  out = []
  for f in flat(config.to_dict()):
    if f not in known and f.rsplit(".", 1)[0] not in {u for u, _ in out}:
      near = difflib.get_close_matches(f.split(".")[0] if f.split(".")[0] not in names else f,
                                       names, n=1, cutoff=0.7)
      out.append((f if f.split(".")[0] in names else f.split(".")[0], near[0] if near else None))
  return out


def check_config(config) -> None:
  """Every value that can be checked without data, with the field's name in the message."""
  c = config
  unknown = unknown_fields(c)
  if unknown:
    raise ConfigError("; ".join(f"config.{f}: no such field" +
                                (f" (did you mean config.{near}?)" if near else "")
                                for f, near in unknown))
  if c.train_steps < 0 or (c.train_steps == 0 and c.epochs < 1):
    raise ConfigError(f"config.epochs={c.epochs}: must be >= 1 (or set config.train_steps > 0)")
  for field in ("batch_size", "eval_batch_size", "log_every_steps"):
    if c[field] < 1:
      raise ConfigError(f"config.{field}={c[field]}: must be >= 1")
  if c.checkpoint_every_steps < 0 or c.data.max_per_class < 0:
    raise ConfigError("config.checkpoint_every_steps and config.data.max_per_class must be >= 0")
  if c.data.on_bad_image not in ("skip", "error"):
    raise ConfigError(f"config.data.on_bad_image={c.data.on_bad_image!r}: 'skip' or 'error'")
  if c.head_init not in ("probe", "random"):
    raise ConfigError(f"config.head_init={c.head_init!r}: 'probe' or 'random'")
  if not 0 <= c.label_smoothing < 1 or c.early_stopping_patience < 0 or not 0 <= c.ema_decay < 1:
    raise ConfigError("config.label_smoothing and ema_decay must be in [0, 1), "
                      "early_stopping_patience >= 0")
  if c.mixup_alpha < 0:
    raise ConfigError(f"config.mixup_alpha={c.mixup_alpha}: must be >= 0 (0 = no mixup)")
  if c.cutmix_alpha < 0:
    raise ConfigError(f"config.cutmix_alpha={c.cutmix_alpha}: must be >= 0 (0 = no CutMix)")
  if c.data.augment.policy not in input_pipeline.POLICIES:
    raise ConfigError(f"config.data.augment.policy={c.data.augment.policy!r}: '' (none) or "
                      "'trivial' (TrivialAugment Wide)")
  views = c.data.augment_views
  if not isinstance(views, int) or isinstance(views, bool) or views < 0:
    raise ConfigError(f"config.data.augment_views={views!r}: a whole number >= 0")
  if views and not input_pipeline.augment_enabled(c.data.augment):
    raise ConfigError(f"config.data.augment_views={views}: views of what? set an augmentation "
                      "in config.data.augment (e.g. flip=True, crop_min_scale=0.6)")
  for field, value, allowed in (("class_weight", c.class_weight, ("none", "balanced")),
                                ("data.sampler", c.data.sampler, ("shuffle", "balanced")),
                                ("select_best_by", c.select_best_by, ("accuracy", "macro_f1"))):
    if value not in allowed:
      raise ConfigError(f"config.{field}={value!r}: {' or '.join(map(repr, allowed))}")
  shots = c.get("probe_shots", ())
  if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in shots):
    raise ConfigError(f"config.probe_shots={tuple(shots)!r}: images per class, whole numbers >= 1 "
                      "(() for none)")
  for problem in (feature_engine.check(c), wise_ft.check(c)):
    if problem:
      raise ConfigError(problem)
  if c.data.layout not in data.LAYOUTS:
    raise ConfigError(f"config.data.layout={c.data.layout!r}: one of {', '.join(data.LAYOUTS)}")
  optim.check(c)
  model = models.create(c, num_classes=2)  # name, head, dtype; layer names do not depend on classes
  smallest = models.min_image_size(c)
  if c.data.image_size < smallest:
    raise ConfigError(f"config.data.image_size={c.data.image_size}: {c.model.name} halves the "
                      f"image {int(np.log2(smallest))} times, so it needs at least {smallest} px")
  freezing.plan(c.trainable, model, c.model.train_bn)
  if not isinstance(c.model.precise_bn, int) or c.model.precise_bn < -1:
    raise ConfigError(f"config.model.precise_bn={c.model.precise_bn!r}: batches, >= 0 (-1: auto)")
  if c.model.train_bn and not models.batch_norm_keys(model):
    raise ConfigError(f"config.model.train_bn=True: {c.model.name} has no batch norm layers")
  if c.model.name in models.TORCHVISION and not c.model.weights:
    from flaxtl.models.torchvision_weights import needs_file
    raise ConfigError(needs_file(c.model.name))
  if c.model.weights == "none" and c.model.name == "small_cnn":
    raise ConfigError("config.model.weights='none': the small CNN never loads weights; leave it ''")
