"""Which parameters train: the user's words -> labels per param path -> optax.multi_transform.

Freezing is config, not code (as in big_vision): `config.trainable` is one of
  'all'                 every layer trains;
  'head'                only the classifier after the conv trunk (predictions; fc1/fc2 with the Keras top);
  'block4'              block 4 and everything after it ("freeze the first 3 blocks");
  'block5_conv2'        from that layer on ("train from block5_conv2");
  'conv5', 'block_13'   the same for the other backbones' stages (`models.description(name)`
                        lists each one's levels: ResNet50 conv2..conv5, MobileNetV2 block_N, ...);
  'frozen_blocks:N'     freeze the first N blocks (N=0 is 'all', N=5 is 'head');
  'regex:<pattern>'     layers whose param path ('block5_conv1/kernel', ...) matches train.
Frozen params get `optax.set_to_zero()` (so they carry no optimizer state), and the forward pass stops
gradients at the *boundary* - the last frozen layer before the first trainable one - so no backward
pass runs through the frozen trunk. Everything up to the boundary can be computed once and cached.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import optax

from flaxtl.errors import ConfigError
from flaxtl.models.vgg import FEATURE_NORM, parameter_layers

TRAINABLE, FROZEN = "trainable", "frozen"
LEAVES = ("kernel", "bias", "scale")  # what 'regex:' patterns are tried against, per key


# Cheap parameter-free layers never taken as the boundary: the step recomputes them from the
# layer before, so one cached GAP serves the 'gap' and 'gap_norm' heads alike.
RECOMPUTED = (FEATURE_NORM,)


@dataclasses.dataclass(frozen=True)
class FreezePlan:
  """The outcome of a freezing spec for one model."""
  spec: str
  layers: tuple[str, ...]            # every stage the model runs, in order
  trainable: tuple[str, ...]         # stages with parameters that train
  frozen: tuple[str, ...]            # stages with parameters, none of which train
  boundary: str | None               # output of this stage is constant w.r.t. trainable params
  trainable_keys: tuple[str, ...] | None = None  # params keys that train (None: `trainable`)

  def label(self, path: str) -> str:
    keys = self.trainable if self.trainable_keys is None else self.trainable_keys
    return TRAINABLE if path.split("/")[0] in keys else FROZEN


def _first_layer_of(spec: str, layers: Sequence[str], levels: Sequence[str] = ()) -> int:
  matches = [i for i, n in enumerate(layers) if n == spec or n.startswith(spec + "_")]
  if not matches:
    hint = f"; its freeze levels: {', '.join(levels)}" if levels else ""
    raise ConfigError(f"config.trainable={spec!r}: no layer named or starting with {spec!r}; "
                      f"layers are: {', '.join(layers)}{hint}")
  return matches[0]


def plan(spec: str, model, train_bn: bool = False) -> FreezePlan:
  """Resolves a `config.trainable` spec against a model (or VGG16-style layer names). With
  `train_bn` (fastai's), every batch norm's scale and bias also trains, frozen stages' included."""
  from flaxtl import models
  if hasattr(model, "layers"):
    layers, keys = tuple(model.layers), models.param_keys(model)
    bn = models.batch_norm_keys(model) if train_bn else ()
  else:
    layers, bn = tuple(model), ()
    keys = {s: (s,) for s in parameter_layers(layers)}
  params = tuple(s for s in layers if keys.get(s))
  spec, chosen = spec.strip(), None  # chosen: the params keys that train
  if spec == "all":
    trainable = params
  elif spec == "head":
    start = layers.index(models.trunk_end_of(layers)) + 1
    trainable = tuple(n for n in params if layers.index(n) >= start)
  elif spec.startswith("frozen_blocks:"):
    if "block5_pool" not in layers:
      raise ConfigError(f"config.trainable={spec!r}: frozen_blocks:N counts VGG16's 5 blocks; "
                        "name a level or stage of this model instead (e.g. 'head', 'all')")
    try:
      n = int(spec.split(":", 1)[1])
    except ValueError:
      raise ConfigError(f"config.trainable={spec!r}: N in frozen_blocks:N must be a whole "
                        "number") from None
    if not 0 <= n <= 5:
      raise ConfigError(f"config.trainable={spec!r}: VGG16 has 5 blocks, N must be 0..5")
    return dataclasses.replace(plan("all" if n == 0 else "head" if n == 5 else f"block{n + 1}",
                                    model, train_bn), spec=spec)
  elif spec.startswith("regex:"):
    try:
      pattern = re.compile(spec.split(":", 1)[1])
    except re.error as e:
      raise ConfigError(f"config.trainable={spec!r}: not a valid regular expression "
                        f"({e})") from None
    chosen = {k for s in params for k in keys[s]
              if any(pattern.search(f"{k}/{leaf}") for leaf in LEAVES)}
    trainable = tuple(s for s in params if chosen & set(keys[s]))
  else:
    desc = models.description_of(model) if hasattr(model, "layers") else None
    start = _first_layer_of(spec, layers, desc.stages if desc else ())
    trainable = tuple(n for n in params if layers.index(n) >= start)
  if chosen is None:
    chosen = {k for s in trainable for k in keys[s]}
  if not trainable:
    raise ConfigError(f"config.trainable={spec!r} leaves no trainable parameters")
  chosen |= set(bn)
  trainable = tuple(s for s in params if chosen & set(keys[s]))
  frozen = tuple(n for n in params if n not in trainable)
  first = layers.index(trainable[0])
  while first > 0 and layers[first - 1] in RECOMPUTED:
    first -= 1
  boundary = layers[first - 1] if first > 0 else None
  return FreezePlan(spec, layers, trainable, frozen, boundary,
                    tuple(k for s in params for k in keys[s] if k in chosen))


def param_labels(params: Any, freeze: FreezePlan) -> Any:
  """A tree like `params` with 'trainable'/'frozen' at each leaf, from its 'layer/leaf' path."""
  def label(path, _):
    return freeze.label("/".join(str(getattr(k, "key", k)) for k in path))
  return jax.tree_util.tree_map_with_path(label, params)


def optimizer(tx: optax.GradientTransformation, params: Any,
              freeze: FreezePlan) -> optax.GradientTransformation:
  """`tx` for trainable leaves, zero updates (and no state) for frozen ones."""
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               param_labels(params, freeze))


def count(params: Any, freeze: FreezePlan) -> dict[str, int]:
  """Parameter counts per label, as Keras' summary prints them."""
  labels = jax.tree.leaves(param_labels(params, freeze))
  sizes = [x.size for x in jax.tree.leaves(params)]
  out = {TRAINABLE: 0, FROZEN: 0}
  for lab, size in zip(labels, sizes):
    out[lab] += int(size)
  return out
