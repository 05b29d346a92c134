"""Keras weights files -> {'params', 'batch_stats'} for the Keras-named backbones (ResNet50, ...).

Why: the published files and what Keras writes today differ in layout, and batch norm splits into
trainable params and running statistics in Flax. Read here:
  - the official / Keras 2 / legacy `.h5` layout: root (or `model_weights`) attribute `layer_names`,
    per layer `weight_names` ('conv1_bn/gamma:0', ...), possibly split into `layer_names0`, ...;
  - Keras 3 `.weights.h5` (`layers/<object>/vars/0..n`, the layer name in `vars`' attribute 'name',
    or, in older Keras 3, only per-class object names numbered in `model.layers` order), also
    inside a `.keras` archive.
Mapping per kind: Conv2D kernel/bias as is (HWIO); DepthwiseConv2D (kh, kw, C, mult) -> flax
(kh, kw, 1, C*mult); BatchNormalization gamma, beta -> params scale, bias and moving_mean,
moving_variance -> batch_stats mean, var; Normalization mean, variance -> batch_stats (its count
is dropped); Dense as is. The model itself is the specification: every layer it needs must be in
the file with the right shape, else `WeightsError` names the file and the layer. A file's
`predictions` is used only when the model's has the same shape (else the model's head stays new).
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from flaxtl.models.backbone import HEAD, KERAS_CLASS
from flaxtl.download import file_digest
from flaxtl.weights import WeightsError, _attr_list, _has_attr, _sniff, _str  # VGG16's readers

# Keras' weight order per kind (how Keras 3 numbers vars, and legacy files list weight_names).
ORDER = {"conv": ("kernel", "bias"), "depthwise": ("kernel",), "dense": ("kernel", "bias"),
         "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
         "normalization": ("mean", "variance", "count")}
ALIASES = {"depthwise_kernel": "kernel"}  # Keras 2's DepthwiseConv2D weight name


def _arch(model) -> str:
  return type(model).__name__


def _base(name: str) -> str:
  """'conv1_bn/moving_mean:0' -> 'moving_mean'."""
  base = re.sub(r":\d+$", "", name.rsplit("/", 1)[-1])
  return ALIASES.get(base, base)


def _read_array(ds, file, layer: str, key: str) -> np.ndarray:
  try:
    return np.asarray(ds[()], np.float32)
  except (OSError, ValueError, TypeError) as e:
    raise WeightsError(f"{file}: layer {layer!r}: cannot read weight {key!r} ({e}); the file is "
                       "truncated or corrupt") from e


def _legacy(g: h5py.Group, file) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Official / Keras 2 layout -> {layer: [(weight name, array), ...]} in file order."""
  raw = {}
  for layer in _attr_list(g, "layer_names"):
    if layer not in g:
      raise WeightsError(f"{file}: layer {layer!r} is listed in 'layer_names' but has no group")
    items = []
    for key in _attr_list(g[layer], "weight_names"):
      if key not in g[layer]:
        raise WeightsError(f"{file}: layer {layer!r}: weight {key!r} is missing")
      items.append((key, _read_array(g[layer][key], file, layer, key)))
    if items:  # input, activation, padding and pooling layers have none
      raw[layer] = items
  return raw


def _keras3_groups(g: h5py.Group, out: list) -> list:
  """(object key, vars group) of every layer with variables, nested models included."""
  for key, sub in g.items():
    if not isinstance(sub, h5py.Group):
      continue
    v = sub.get("vars")
    if isinstance(v, h5py.Group) and len(v):
      out.append((key, v))
    if isinstance(sub.get("layers"), h5py.Group):
      _keras3_groups(sub["layers"], out)
  return out


def _keras3(f: h5py.File, file, model) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Keras 3 `.weights.h5` -> {layer: [(index, array), ...]}; unnamed objects are matched to the
  model's layers of the same Keras class in Keras' `model.layers` order (conv2d, conv2d_1, ...)."""
  groups = _keras3_groups(f["layers"], [])
  raw, unnamed = {}, {}
  for key, v in groups:
    items = [(k, _read_array(v[k], file, key, k)) for k in sorted(v, key=int)]
    if "name" in v.attrs:
      raw[_str(v.attrs["name"])] = items
    else:
      unnamed.setdefault(key.rstrip("_0123456789"), []).append((key, items))
  for cls, found in unnamed.items():
    found.sort(key=lambda kv: int(kv[0][len(cls) + 1:] or 0))
    want = [n for n, kind in model.keras_layers() if KERAS_CLASS[kind] == cls]
    if len(found) != len(want):
      raise WeightsError(f"{file}: {len(found)} unnamed '{cls}' layers, {_arch(model)} has "
                         f"{len(want)}: is this file for another architecture?")
    raw.update((n, items) for n, (_, items) in zip(want, found))
  return raw


def read(path, model) -> tuple[str, dict[str, list[tuple[str, np.ndarray]]]]:
  """(source, {Keras layer: [(weight name, array)]}) of a Keras weights file; `model` names the
  layers of Keras 3 files written without layer names."""
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
  kind = _sniff(path)
  if kind in ("safetensors", "pickle") or (kind == "zip" and not _is_keras_archive(path)):
    hint = ("; torchvision's ResNet-50 (v1.5) is config.model.name='resnet50_torchvision'"
            if _arch(model) == "ResNet50" else "")
    raise WeightsError(f"{path}: PyTorch tensors, not a Keras weights file{hint}")
  try:
    if zipfile.is_zipfile(path):  # a Keras 3 `.keras` archive
      with zipfile.ZipFile(path) as z:
        if "model.weights.h5" not in z.namelist():
          raise WeightsError(f"{path}: a zip archive without model.weights.h5: not a .keras file")
        with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
          return "keras3_weights_h5", _keras3(f, path, model)
    with h5py.File(path, "r") as f:
      g = f["model_weights"] if isinstance(f.get("model_weights"), h5py.Group) else f
      if _has_attr(g, "layer_names"):
        return "keras_h5", _legacy(g, path)
      if isinstance(f.get("layers"), h5py.Group):
        return "keras3_weights_h5", _keras3(f, path, model)
      raise WeightsError(f"{path}: an HDF5 file without Keras weights (no 'layer_names' attribute "
                         "and no Keras 3 'layers' group)")
  except WeightsError:
    raise
  except Exception as e:  # h5py / zip errors on truncated or foreign files
    raise WeightsError(f"{path}: cannot read the file ({type(e).__name__}: {e}); it is truncated, "
                       "corrupt or not a Keras weights file") from e


def _by_kind(items, kind: str, file, layer: str) -> dict[str, np.ndarray]:
  """A layer's weights by Keras name: from their names when they carry them, else by position."""
  order = ORDER[kind]
  bases = [_base(k) for k, _ in items]
  if len(set(bases)) == len(bases) and set(bases) <= set(order):
    return {b: a for b, (_, a) in zip(bases, items)}
  if kind == "conv" and len(items) == 1:  # convs without bias
    order = order[:1]
  if len(items) != len(order):
    raise WeightsError(f"{file}: layer {layer!r}: expected {len(order)} weights "
                       f"({', '.join(order)}), found {len(items)}: {[k for k, _ in items]}")
  return dict(zip(order, (a for _, a in items)))


FLAX = {"bn": {"gamma": ("params", "scale"), "beta": ("params", "bias"),
              "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")},
        "normalization": {"mean": ("batch_stats", "mean"), "variance": ("batch_stats", "variance")}}


def _flax_name(kind: str, weight: str) -> tuple[str, str] | None:
  """Keras weight -> (collection, flax leaf); None: not kept (Normalization's count)."""
  if kind in FLAX:
    return FLAX[kind].get(weight)
  return ("params", weight) if weight in ORDER[kind] else None


def _to_flax(kind: str, weight: str, a: np.ndarray) -> np.ndarray:
  if kind == "depthwise" and a.ndim == 4:  # (kh, kw, C, mult) -> (kh, kw, 1, C * mult)
    return a.reshape(*a.shape[:2], 1, a.shape[2] * a.shape[3])
  if kind == "normalization":
    return a.reshape(-1)
  return a


def _keras_shape(kind: str, shape: tuple) -> tuple:
  """A flax shape in Keras' layout, for messages."""
  return (*shape[:2], shape[3], 1) if kind == "depthwise" and len(shape) == 4 else shape


def expected(model, size: int = 32) -> dict:
  """Shapes of the model's variables, without computing anything."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  return jax.tree.map(lambda s: tuple(s.shape), shapes)


def _fmt(shape) -> str:
  return "(" + ", ".join(map(str, shape)) + ")"


def _is_keras_archive(path: Path) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return not any(n.endswith("data.pkl") for n in z.namelist())  # torch.save's zip has one
  except zipfile.BadZipFile:
    return True  # not readable as zip: read() says what is wrong


def to_variables(raw: dict, model, file) -> dict:
  """{'params', 'batch_stats'} for `model` from `read`'s layers; `predictions` is left out when
  the file lacks it or it has another number of classes (a notop file, or a new head)."""
  want = expected(model)
  kinds = dict(model.keras_layers())
  for layer in raw:
    if layer not in kinds and layer != HEAD:
      raise WeightsError(f"{file}: unexpected layer {layer!r} with weights: not a layer of "
                         f"{_arch(model)}; is this file for another architecture?")
  out = {"params": {}, "batch_stats": {}}
  for layer, kind in kinds.items():
    if layer not in raw:
      if layer == HEAD:
        continue
      raise WeightsError(f"{file}: missing layer {layer!r} ({_arch(model)} needs {len(kinds)} "
                         f"layers with weights, the file has {len(raw)}); is it for another "
                         "architecture?")
    weights = _by_kind(raw[layer], kind, file, layer)
    need = {(col, leaf): shape for col in want for leaf, shape in want[col].get(layer, {}).items()}
    got = {}
    for weight, a in weights.items():
      where = _flax_name(kind, weight)
      if where is None:
        continue
      if where not in need:
        raise WeightsError(f"{file}: layer {layer!r}: weight {weight!r} in the file, but "
                           f"{_arch(model)}'s {layer!r} has none (use_bias differs?)")
      got[where] = _to_flax(kind, weight, a)
    bad = [w for w in need if w not in got or got[w].shape != need[w]]
    if layer == HEAD and bad:
      continue  # another number of classes: the model's head stays new
    for where in bad:
      weight = next((w for w in weights if _flax_name(kind, w) == where), where[1])
      if where not in got:
        raise WeightsError(f"{file}: layer {layer!r}: weight {weight!r} is missing")
      raise WeightsError(f"{file}: layer {layer!r}: {weight!r} has shape "
                         f"{_fmt(weights[weight].shape)}, {_arch(model)} needs "
                         f"{_fmt(_keras_shape(kind, need[where]))}")
    for (col, leaf), a in got.items():
      out[col].setdefault(layer, {})[leaf] = a
  return out


def load(path, model) -> tuple[dict, dict]:
  """(variables, metadata) for `model` from a Keras weights file; see the module doc."""
  path = Path(path)
  source, raw = read(path, model)
  variables = to_variables(raw, model, path)
  return variables, metadata(source, path, variables, model)


def metadata(source: str, path: Path, variables: dict, model) -> dict:
  """What a run records about the file its backbone's variables came from."""
  return dict(
      source=source, file=str(path), sha256=file_digest(path), include_top=HEAD in variables["params"],
      layers=[n for n, _ in model.keras_layers() if n in variables["params"] or
              n in variables["batch_stats"]],
      num_params=int(sum(a.size for a in jax.tree.leaves(variables))))


def merge(variables: dict, loaded: dict) -> dict:
  """`variables` (e.g. from model.init) with every layer that `loaded` has replaced by it."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, layers in loaded.items():
    for layer, leaves in layers.items():
      have = out.get(col, {}).get(layer)
      if have is None or jax.tree.map(np.shape, dict(have)) != jax.tree.map(np.shape, leaves):
        raise WeightsError(f"merge: {col}/{layer} does not match the model's variables")
      out[col][layer] = {k: jnp.asarray(v) for k, v in leaves.items()}
  return out


def resolve(description, path=None) -> Path:
  """The weights file for a Keras-named backbone: `path` when given; else Keras' official notop
  file from Keras' cache ($KERAS_HOME/models), downloaded there (from $FLAXTL_WEIGHTS_BASE_URL or
  Keras' URL, hash-checked where Keras publishes one) when missing."""
  import os
  from flaxtl import download, weights
  if path:
    return Path(os.path.expanduser(path))
  f = description.keras_weights["notop"]
  home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
  cached = Path(home) / "models" / f["file"]
  if cached.is_file():
    return cached
  base = os.environ.get(weights.BASE_URL_ENV)
  url = f"{base.rstrip('/')}/{f['file']}" if base else f["url"]
  digest = {f["hash_algorithm"]: f["hash"]} if f["hash"] else {}
  return download.fetch(url, cached, digest.get("md5"), sha256=digest.get("sha256"),
                        error=WeightsError,
                        offline_hint=f"put it at {cached} (Keras' cache; set KERAS_HOME to use "
                                     "another directory), pass the file's path as "
                                     "config.model.weights, or set it to 'none' to train from "
                                     "random weights")


def for_config(model_cfg, model, description) -> tuple[dict | None, dict]:
  """(variables or None, metadata) for `config.model`: a Keras file (given, cached or fetched),
  or none at all with model.weights='none' (random init, the weights' preprocessing kept)."""
  if model_cfg.weights == "none":
    return None, {"source": "none (random init)", "preprocessing": description.preprocessing}
  variables, meta = load(resolve(description, model_cfg.weights), model)
  return variables, {**meta, "preprocessing": description.preprocessing}
