"""Which parameters train: the user's words -> labels per param path -> optax.multi_transform.

Freezing is config, not code (as in big_vision): `config.trainable` is one of
  'all'                 every layer trains;
  'head'                only the classifier after the conv trunk (predictions; fc1/fc2 with the Keras top);
  'block4'              block 4 and everything after it ("freeze the first 3 blocks");
  'block5_conv2'        from that layer on ("train from block5_conv2");
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


# Cheap parameter-free layers never taken as the boundary: the step recomputes them from the
# layer before, so one cached GAP serves the 'gap' and 'gap_norm' heads alike.
RECOMPUTED = (FEATURE_NORM,)


@dataclasses.dataclass(frozen=True)
class FreezePlan:
  """The outcome of a freezing spec for one model."""
  spec: str
  layers: tuple[str, ...]            # every layer the model runs, in order
  trainable: tuple[str, ...]         # parameter layers that train
  frozen: tuple[str, ...]            # parameter layers that do not
  boundary: str | None               # output of this layer is constant w.r.t. trainable params

  def label(self, path: str) -> str:
    return TRAINABLE if path.split("/")[0] in self.trainable else FROZEN


def _first_layer_of(spec: str, layers: Sequence[str]) -> int:
  matches = [i for i, n in enumerate(layers) if n == spec or n.startswith(spec + "_")]
  if not matches:
    raise ConfigError(f"config.trainable={spec!r}: no layer named or starting with {spec!r}; "
                     f"layers are: {', '.join(layers)}")
  return matches[0]


def plan(spec: str, layers: Sequence[str]) -> FreezePlan:
  """Resolves a `config.trainable` spec against the model's layer sequence."""
  layers = tuple(layers)
  params = parameter_layers(layers)
  spec = spec.strip()
  if spec == "all":
    trainable = params
  elif spec == "head":
    start = layers.index("block5_pool") + 1
    trainable = tuple(n for n in params if layers.index(n) >= start)
  elif spec.startswith("frozen_blocks:"):
    try:
      n = int(spec.split(":", 1)[1])
    except ValueError:
      raise ConfigError(f"config.trainable={spec!r}: N in frozen_blocks:N must be a whole number") from None
    if not 0 <= n <= 5:
      raise ConfigError(f"config.trainable={spec!r}: VGG16 has 5 blocks, N must be 0..5")
    return dataclasses.replace(plan("all" if n == 0 else "head" if n == 5 else f"block{n + 1}",
                                    layers), spec=spec)
  elif spec.startswith("regex:"):
    try:
      pattern = re.compile(spec.split(":", 1)[1])
    except re.error as e:
      raise ConfigError(f"config.trainable={spec!r}: not a valid regular expression ({e})") from None
    trainable = tuple(n for n in params if any(pattern.search(f"{n}/{leaf}")
                                                for leaf in ("kernel", "bias")))
  else:
    start = _first_layer_of(spec, layers)
    trainable = tuple(n for n in params if layers.index(n) >= start)
  if not trainable:
    raise ConfigError(f"config.trainable={spec!r} leaves no trainable parameters")
  frozen = tuple(n for n in params if n not in trainable)
  first = layers.index(trainable[0])
  while first > 0 and layers[first - 1] in RECOMPUTED:
    first -= 1
  boundary = layers[first - 1] if first > 0 else None
  return FreezePlan(spec, layers, trainable, frozen, boundary)


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
