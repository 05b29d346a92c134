"""torchvision's ResNet-50 tensors (`resnet50-*.pth`, or the same state dict as .safetensors) ->
{'params', 'batch_stats'} for `ResNet50TV`, through the Keras-named layers `keras_weights` checks.

Why a mapping and not a second model: torchvision's module paths name the same layers Keras does
(`layer2.0.conv2` is `conv3_block1_2_conv`, `layer2.0.downsample.0` its shortcut `_0_conv`), so
stages, freeze levels and caches stay ResNet50's. Per tensor: conv OIHW -> HWIO; batch norm
weight, bias, running_mean, running_var -> gamma, beta, moving mean and variance
(num_batches_tracked is dropped); fc (out, in) -> predictions (in, out).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flaxtl.models import keras_weights
from flaxtl.weights import WeightsError, _sniff

_KEY = re.compile(r"^(?:(?P<stem>conv1|bn1|fc)|layer(?P<stack>[1-4])\.(?P<block>\d+)\."
                  r"(?:(?P<kind>conv|bn)(?P<i>[123])|downsample\.(?P<ds>[01])))$")
_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
       ("running_var", "moving_variance"))
FILES = ("resnet50-11ad3fa6.pth (IMAGENET1K_V2) or resnet50-0676ba61.pth (IMAGENET1K_V1), "
         "https://download.pytorch.org/models/")


def keras_layer(module: str) -> tuple[str, str] | None:
  """torchvision module path -> (Keras layer, kind): 'layer2.0.downsample.1' -> ('conv3_block1_0_bn',
  'bn'); None when ResNet-50 has no such module."""
  m = _KEY.match(module)
  if not m:
    return None
  if m["stem"]:
    return {"conv1": ("conv1_conv", "conv"), "bn1": ("conv1_bn", "bn"),
            "fc": ("predictions", "dense")}[m["stem"]]
  block = f"conv{int(m['stack']) + 1}_block{int(m['block']) + 1}"
  if m["kind"]:
    return f"{block}_{m['i']}_{m['kind']}", m["kind"]
  return f"{block}_0_{'conv' if m['ds'] == '0' else 'bn'}", "conv" if m["ds"] == "0" else "bn"


def to_keras_layers(sd: dict, file) -> dict[str, list[tuple[str, np.ndarray]]]:
  """A torchvision ResNet-50 state dict -> {Keras layer: [(Keras weight name, array)]}."""
  by_layer: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for key, a in sd.items():
    module, _, leaf = key.rpartition(".")
    where = keras_layer(module)
    if leaf == "num_batches_tracked" and where and where[1] == "bn":
      continue
    if where is None or leaf not in ({"weight", "bias"} | {t for t, _ in _BN}):
      raise WeightsError(f"{file}: unexpected tensor {key!r}: not in torchvision's ResNet-50 "
                         "(conv1, bn1, layer1-4.N.conv1-3/bn1-3/downsample.0-1, fc); is this file "
                         "for another architecture?")
    by_layer.setdefault(where, {})[leaf] = np.asarray(a, np.float32)
  raw = {}
  for (layer, kind), t in by_layer.items():
    if kind == "bn":
      raw[layer] = [(k, t[leaf]) for leaf, k in _BN if leaf in t]
    elif kind == "conv":
      raw[layer] = [("kernel", t["weight"].transpose(2, 3, 1, 0))] + (
          [("bias", t["bias"])] if "bias" in t else [])  # torchvision's have none: flagged later
    else:
      raw[layer] = [("kernel", t["weight"].T), ("bias", t["bias"])]
  return raw


def read(path: Path) -> tuple[str, dict]:
  """(source, state dict as numpy) of a .pth (needs torch) or .safetensors file."""
  from flaxtl import torch_weights
  kind = _sniff(path)
  if kind == "safetensors":
    from safetensors.numpy import load_file
    return "torchvision_safetensors", load_file(str(path))
  if kind in ("zip", "pickle"):
    return "torchvision_pth", torch_weights.read(path, path)
  hint = (": a Keras file; Keras' ResNet50 (v1) is config.model.name='resnet50'"
          if kind == "hdf5" else "")
  raise WeightsError(f"{path}: not torchvision tensors (a .pth or .safetensors state dict){hint}")


def load(path, model) -> tuple[dict, dict]:
  """(variables, metadata) for `model` (ResNet50TV) from torchvision's file."""
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
  try:
    source, sd = read(path)
  except WeightsError:
    raise
  except Exception as e:  # safetensors / zip errors on truncated files
    raise WeightsError(f"{path}: cannot read the file ({type(e).__name__}: {e}); it is truncated "
                       "or corrupt") from e
  variables = keras_weights.to_variables(to_keras_layers(sd, path), model, path)
  return variables, {**keras_weights.metadata(source, path, variables, model),
                     "preprocessing": "torch"}


def needs_file(name: str) -> str:
  """The message when no torchvision file is given (flaxtl downloads Keras' files only)."""
  return (f"config.model.weights: {name} loads torchvision's tensors; give the file ({FILES}), "
          "or 'none' for random init")


def for_config(model_cfg, model) -> tuple[dict | None, dict]:
  """(variables or None, metadata) for `config.model`: torchvision's file, which must be given
  (flaxtl downloads Keras' files only), or 'none' for random init."""
  if model_cfg.weights == "none":
    return None, {"source": "none (random init)", "preprocessing": "torch"}
  if not model_cfg.weights:
    raise WeightsError(needs_file(model_cfg.name))
  import os
  return load(os.path.expanduser(model_cfg.weights), model)
