"""Pretrained VGG16 weights: Keras and torchvision files -> flaxtl's parameters, plus metadata.

Why: the published files differ in container (HDF5, safetensors, torch pickle), naming, tensor
layout (torch: OIHW convs, (out, in) Linear, NCHW flatten before fc1) and input preprocessing. `load`
turns each into the layout of `flaxtl.models.vgg` ({layer: {'kernel', 'bias'}}, HWIO convs, (in, out)
Dense) and records the preprocessing the weights expect, so that it travels with them. Every file is
checked against the shapes VGG16 needs; a bad file raises `WeightsError` naming the file and the
layer, never a KeyError deep inside Flax. `save` writes flaxtl's own format (msgpack) atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
import h5py
import numpy as np
from flax import serialization

from flaxtl import download
from flaxtl.errors import FlaxtlError
from flaxtl.models.vgg import BLOCKS, CONV_LAYERS, HEAD, TOP_LAYERS

KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
BASE_URL_ENV = "FLAXTL_WEIGHTS_BASE_URL"
NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
FULL_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
MD5 = {NOTOP_FILE: "6d6bbae143d832006294945121d1f1fc",  # as in keras/src/applications/vgg16.py
       FULL_FILE: "64373286793e3c8b2b4e3219cbf3544b"}
FORMAT = "flaxtl.weights/1"
PREPROCESSING = ("caffe", "torch")  # Keras' files, torchvision's (see flaxtl.preprocessing)
TOP = (*TOP_LAYERS, HEAD)


class WeightsError(FlaxtlError, ValueError):
  """A weights file that cannot be used; the message names the file and the layer at fault."""


def _expected() -> dict[str, tuple[int | None, ...]]:
  """Kernel shape of each VGG16 layer in model order (bias: the last dim); None: any (classes)."""
  shapes, cin = {}, 3
  for b, n, f in BLOCKS:
    for c in range(1, n + 1):
      shapes[f"block{b}_conv{c}"], cin = (3, 3, cin, f), f
  side = 224 // 2 ** len(BLOCKS)  # Keras' top is built for 224x224 inputs: block5_pool is 7x7.
  shapes.update(fc1=(side * side * cin, 4096), fc2=(4096, 4096), predictions=(4096, None))
  return shapes


EXPECTED = _expected()


def _fmt(shape) -> str:
  return "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"


def _fits(shape, want) -> bool:
  return len(shape) == len(want) and all(w is None or w == s for s, w in zip(shape, want))


def _unexpected(file, layer) -> WeightsError:
  return WeightsError(f"{file}: unexpected layer {layer!r} with weights: not a VGG16 layer (VGG16 "
                      f"has {', '.join(EXPECTED)}); is this file for another architecture?")


def _check(params: dict, file) -> list[str]:
  """Raises unless `params` holds VGG16's 13 convs (+ fc1, fc2, predictions); returns the layers."""
  for name in params:
    if name not in EXPECTED:
      raise _unexpected(file, name)
  need = CONV_LAYERS + (TOP if any(n in params for n in TOP) else ())
  for name in need:
    if name not in params:
      raise WeightsError(f"{file}: missing layer {name!r} (VGG16 needs {', '.join(need)})")
    p = params[name]
    if set(p) != {"kernel", "bias"}:
      raise WeightsError(f"{file}: layer {name!r}: expected 'kernel' and 'bias', found {sorted(p)}")
    want = EXPECTED[name]
    if not _fits(p["kernel"].shape, want):
      raise WeightsError(f"{file}: layer {name!r}: kernel has shape {_fmt(p['kernel'].shape)}, "
                         f"VGG16 needs {_fmt(want)}")
    if p["bias"].shape != p["kernel"].shape[-1:]:
      raise WeightsError(f"{file}: layer {name!r}: bias has shape {_fmt(p['bias'].shape)}, "
                         f"VGG16 needs {_fmt(p['kernel'].shape[-1:])}")
  return [n for n in EXPECTED if n in params]


def _meta(source: str, preprocessing: str, params: dict, path: Path, layers: list[str]) -> dict:
  return dict(source=source, preprocessing=preprocessing, layers=layers, include_top="fc1" in params,
              sha256=download.file_digest(path), file=str(path),
              num_params=int(sum(a.size for p in params.values() for a in p.values())))


def _str(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


# --- Keras HDF5 ---------------------------------------------------------------------------------

def _has_attr(obj, name: str) -> bool:
  return name in obj.attrs or f"{name}0" in obj.attrs


def _attr_list(obj, name: str) -> list[str]:
  """List attribute `name`, joined from `name0`, `name1`, ... where Keras split it (HDF5 caps the
  size of an object header, so long layer lists are stored in chunks)."""
  if name in obj.attrs:
    chunks = [obj.attrs[name]]
  else:
    chunks, i = [], 0
    while f"{name}{i}" in obj.attrs:
      chunks.append(obj.attrs[f"{name}{i}"])
      i += 1
  return [_str(v) for c in chunks for v in np.atleast_1d(c)]


def _dataset(group, key: str, file, layer: str) -> np.ndarray:
  try:
    return np.asarray(group[key][()], np.float32)
  except KeyError:
    raise WeightsError(f"{file}: layer {layer!r}: weight {key!r} is missing") from None
  except (OSError, ValueError, TypeError) as e:
    raise WeightsError(f"{file}: layer {layer!r}: cannot read weight {key!r} ({e}); "
                       "the file is truncated or corrupt") from e


def _pair(group, keys: list[str], file, layer: str) -> dict[str, np.ndarray]:
  if layer not in EXPECTED:
    raise _unexpected(file, layer)
  if len(keys) != 2:
    raise WeightsError(f"{file}: layer {layer!r}: expected 2 weights (kernel, bias), found {keys}")
  return {k: _dataset(group, key, file, layer) for k, key in zip(("kernel", "bias"), keys)}


def _read_keras_h5(f: h5py.File, file) -> dict:
  """Official files, Keras 2 `save_weights` and legacy `model.save('x.h5')` (under `model_weights`):
  layer groups listed in `layer_names`, their weights (kernel first) listed in `weight_names`."""
  g = f["model_weights"] if isinstance(f.get("model_weights"), h5py.Group) else f
  params = {}
  for layer in _attr_list(g, "layer_names"):
    if layer not in g:
      raise WeightsError(f"{file}: layer {layer!r} is listed in 'layer_names' but has no group")
    keys = _attr_list(g[layer], "weight_names")
    if keys:  # input, pooling and flatten layers have none
      params[layer] = _pair(g[layer], keys, file, layer)
  return params


def _keras3_names(layers: h5py.Group) -> dict[str, str]:
  """h5 group key -> layer name. Recent Keras 3 stores the name as attribute `vars.name`; older ones
  only have per-class object names (conv2d, conv2d_1, ..., dense, ...) numbered in creation order,
  which for `keras.applications.VGG16` is model order."""
  names, unnamed = {}, {}
  for key, g in layers.items():
    v = g.get("vars")
    if v is None or not len(v):
      continue
    if "name" in v.attrs:
      names[key] = _str(v.attrs["name"])
    else:
      unnamed.setdefault(key.rstrip("_0123456789"), []).append(key)
  for cls, vgg in (("conv2d", CONV_LAYERS), ("dense", TOP)):
    keys = sorted(unnamed.pop(cls, []), key=lambda k: int(k[len(cls) + 1:] or 0))
    names.update(zip(keys, vgg) if len(keys) == len(vgg) else zip(keys, keys))
  names.update((k, k) for keys in unnamed.values() for k in keys)
  return names


def _read_keras3(f: h5py.File, file) -> dict:
  """Keras 3 `.weights.h5`: `layers/<object name>/vars/{0,1}` (kernel, bias)."""
  params = {}
  for key, layer in _keras3_names(f["layers"]).items():
    vars_ = f["layers"][key]["vars"]
    params[layer] = _pair(vars_, sorted(vars_, key=int), file, layer)
  return params


def _read_h5(f: h5py.File, file) -> tuple[str, dict]:
  legacy = f["model_weights"] if isinstance(f.get("model_weights"), h5py.Group) else f
  if _has_attr(legacy, "layer_names"):
    return "keras_h5", _read_keras_h5(f, file)
  if isinstance(f.get("layers"), h5py.Group):
    return "keras3_weights_h5", _read_keras3(f, file)
  raise WeightsError(f"{file}: an HDF5 file without Keras weights (no 'layer_names' attribute, "
                     "'model_weights' group or Keras 3 'layers' group)")


# --- dispatch -------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
  """The container, from the content: the extension of a downloaded file is often wrong."""
  with open(path, "rb") as f:
    head = f.read(64)
  size = path.stat().st_size
  if head.startswith(b"\x89HDF\r\n\x1a\n") or h5py.is_hdf5(path):  # is_hdf5: also after a user block
    return "hdf5"
  if head.startswith(b"PK\x03\x04"):
    return "zip"
  if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
    return "safetensors"  # u64 header length, then the JSON header
  if head.startswith(b"\x83\xa6format") and FORMAT.encode() in head:  # msgpack {'format': FORMAT..}
    return "flaxtl"
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return "pickle"  # pickle protocol 2-5: torch.save's legacy format
  return "unknown"


def load(path) -> tuple[dict, dict]:
  """Reads a VGG16 weights file of any supported kind -> (params, metadata); see the module doc."""
  from flaxtl import torch_weights as tw  # it imports this module's checks
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
  try:
    kind = _sniff(path)
  except OSError as e:
    raise WeightsError(f"{path}: cannot read the file ({e})") from e
  try:
    if kind == "flaxtl":
      return _load_flaxtl(path)
    if kind == "hdf5":
      try:
        f = h5py.File(path, "r")
      except OSError as e:
        raise WeightsError(f"{path}: cannot open the HDF5 file ({e}); it is truncated or corrupt, "
                           "download it again") from e
      with f:
        source, params = _read_h5(f, path)
    elif kind == "safetensors":
      from safetensors.numpy import load_file
      source, params = "torchvision_safetensors", tw.convert(load_file(str(path)), path)
    elif kind == "zip":
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if "model.weights.h5" in names:  # a Keras 3 `.keras` archive
          with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
            source, params = "keras3_weights_h5", _read_keras3(f, path)
        elif any(n.endswith("data.pkl") for n in names):
          source, params = "torchvision_pth", tw.convert(tw.read(path, path), path)
        else:
          raise WeightsError(f"{path}: a zip archive, neither a torch checkpoint nor a .keras file")
    elif kind == "pickle":
      source, params = "torchvision_pth", tw.convert(tw.read(path, path), path)
    else:
      raise WeightsError(f"{path}: not a weights file (expected Keras HDF5, safetensors, a torch "
                         "checkpoint or flaxtl's format)")
  except (WeightsError, MemoryError):
    raise
  except Exception as e:  # safetensors / zip / h5py errors on corrupt files
    raise WeightsError(f"{path}: cannot read the file ({type(e).__name__}: {e}); it is truncated or "
                       "corrupt") from e
  layers = _check(params, path)
  preprocessing = "torch" if source.startswith("torchvision") else "caffe"
  return params, _meta(source, preprocessing, params, path, layers)


def merge_pretrained(loaded: dict, init: dict, dont_load=(HEAD,),
                     file: str = "the weights file") -> tuple[dict, dict]:
  """`init` with every layer the file has copied in (shapes checked here, once), except the new
  `dont_load` head; -> (params, report of what was loaded, kept random and left unused).

  A layer the model needs but the file lacks is an error: a frozen random layer would train
  silently to nothing (big_vision's merge_params makes the same choice).
  """
  params, report = dict(init), {"loaded": [], "random": [], "unused": []}
  for name, leaves in init.items():
    if name in dont_load:
      report["random"].append(name)
      continue
    if name not in loaded:
      raise WeightsError(f"{file}: the model needs layer {name!r}, which the file lacks "
                         f"(it has: {', '.join(loaded)})")
    for leaf, value in leaves.items():
      got = np.shape(loaded[name].get(leaf))
      if got != np.shape(value):
        raise WeightsError(f"{file}: layer {name}/{leaf} has shape {got}, the model needs "
                           f"{np.shape(value)}")
    params[name] = {k: np.asarray(loaded[name][k], np.float32) for k in leaves}
    report["loaded"].append(name)
  report["unused"] = [n for n in loaded if n not in init]
  return params, report


def for_config(model_cfg) -> tuple[dict, dict]:
  """The pretrained weights `config.model.weights` names (else Keras' official file, from its cache
  or downloaded) -> (params, metadata)."""
  path = os.path.expanduser(model_cfg.weights) if model_cfg.weights else None
  return load(resolve(path))


# --- flaxtl's format ------------------------------------------------------------------------------

def save(params: dict, metadata: dict, out_path) -> Path:
  """Writes {'format', 'metadata', 'params'} as msgpack, atomically: on any failure the previous file
  (if any) is untouched and no partial or temporary file remains."""
  out = Path(out_path)
  _check(params, out)
  if metadata.get("preprocessing") not in PREPROCESSING:
    raise WeightsError(f"{out}: metadata['preprocessing'] must be one of {PREPROCESSING}, got "
                       f"{metadata.get('preprocessing')!r}")
  params = {n: {k: np.asarray(v, np.float32) for k, v in p.items()} for n, p in params.items()}
  state = {"format": FORMAT, "metadata": json.loads(json.dumps(metadata)), "params": params}
  data = serialization.msgpack_serialize(state)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # persist the rename itself
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
      os.fsync(dfd)
    finally:
      os.close(dfd)
  return out


def _load_flaxtl(path: Path) -> tuple[dict, dict]:
  try:
    state = serialization.msgpack_restore(path.read_bytes())
    stored, params = state["metadata"], state["params"]
  except Exception as e:
    raise WeightsError(f"{path}: cannot read flaxtl's format ({type(e).__name__}: {e}); the file is "
                       "truncated or corrupt") from e
  if stored.get("preprocessing") not in PREPROCESSING:
    raise WeightsError(f"{path}: invalid 'preprocessing' in its metadata: "
                       f"{stored.get('preprocessing')!r}")
  layers = _check(params, path)
  meta = {**stored, **_meta("flaxtl", stored["preprocessing"], params, path, layers)}
  meta["origin"] = stored.get("origin") or {k: stored.get(k) for k in ("source", "file", "sha256")}
  return params, meta


# --- finding and downloading the Keras file -------------------------------------------------------

def keras_cache_path(include_top: bool = False) -> Path:
  """Where Keras keeps (and looks for) the official file: $KERAS_HOME/models or ~/.keras/models."""
  home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
  return Path(home) / "models" / (FULL_FILE if include_top else NOTOP_FILE)


def resolve(path=None, *, include_top: bool = False, base_url: str | None = None) -> Path:
  """The weights file to use: `path` when given; else Keras' cached official file, downloaded (from
  `base_url`, $FLAXTL_WEIGHTS_BASE_URL or Keras' URL) into Keras' cache when missing."""
  if path is not None:
    return Path(path)
  cached = keras_cache_path(include_top)
  if cached.is_file():
    return cached
  base = base_url or os.environ.get(BASE_URL_ENV) or KERAS_BASE_URL
  url = f"{base.rstrip('/')}/{cached.name}"
  return download.fetch(url, cached, MD5[cached.name], error=WeightsError,
                        offline_hint=f"put it at {cached} (Keras' cache; set KERAS_HOME to use "
                                     "another directory), or pass the file's path explicitly")
