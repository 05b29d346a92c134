"""flaxtl.weights and scripts/convert_vgg16.py: Keras/torchvision parity, validation, save, download.

The Keras files are generated here (random weights, fixed seeds) in the official layout and in the
layouts Keras 3 itself writes; the real torchvision weights in ../shared/weights are checked when
present.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from flaxtl import torch_weights, weights as W
from flaxtl.models import VGG16, layer_names
from flaxtl.models.vgg import BLOCKS, CONV_LAYERS, parameter_layers
from flaxtl.preprocessing import preprocess

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_vgg16.py"
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "weights" / "vgg16_tv_in1k_features.safetensors"
POOLS = tuple(f"block{b}_pool" for b, _, _ in BLOCKS)
NOTOP_PARAMS, FULL_PARAMS = 14_714_688, 138_357_544
# Keras (TensorFlow backend) converting its tensors with numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --- helpers ----------------------------------------------------------------------------------------

def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def md5(path) -> str:
  return hashlib.md5(Path(path).read_bytes()).hexdigest()


def random_params(include_top=False, scale=0.01, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {n: s for n, s in W.EXPECTED.items() if include_top or n in CONV_LAYERS}
  return {n: {"kernel": rng.standard_normal(tuple(d or 10 for d in s), np.float32) * scale,
              "bias": rng.standard_normal(s[-1] or 10, np.float32) * scale}
          for n, s in shapes.items()}


def _set_list(obj, name, items, chunks=1):
  data = np.array([s.encode() for s in items]) if items else np.array([], np.float64)
  if chunks == 1:
    obj.attrs[name] = data
  else:
    for i, part in enumerate(np.array_split(data, chunks)):
      obj.attrs[f"{name}{i}"] = part


def write_official(path, params, chunks=1):
  """The layout of Keras' published VGG16 files: root attribute `layer_names` (all layers, weightless
  ones included), per-layer `weight_names` with Keras 1 names; `chunks` > 1 splits both attributes."""
  vgg = set(params) <= set(W.EXPECTED)
  names = layer_names(include_top="fc1" in params) if vgg else tuple(params)
  names = ["input_1"] + [n for n in names if n in params or not parameter_layers([n])]
  with h5py.File(path, "w") as f:
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.1.5"
    _set_list(f, "layer_names", names, chunks)
    for n in names:
      g = f.create_group(n)
      wn = [f"{n}_W_1:0", f"{n}_b_1:0"] if n in params else []
      _set_list(g, "weight_names", wn, chunks if wn else 1)
      for key, k in zip(wn, ("kernel", "bias")):
        g.create_dataset(key, data=params[n][k])
  return Path(path)


def keras_params(model) -> dict:
  return {l.name: dict(zip(("kernel", "bias"), l.get_weights())) for l in model.layers if l.weights}


@functools.cache
def flax_forward(include_top: bool):
  model = VGG16(include_top=include_top, num_classes=1000 if include_top else None)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, capture=POOLS))


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=300, cwd=ROOT)


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- Keras models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras(tmp_path_factory):
  """Keras imported with KERAS_HOME in a temp dir: importing it writes keras.json there."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    import keras
  return keras


def _reference(keras, include_top: bool, size: int, seed: int) -> SimpleNamespace:
  keras.utils.set_random_seed(seed)
  if include_top:  # logits: compare with the pre-softmax of `predictions`
    model = keras.applications.VGG16(weights=None, classifier_activation=None)
  else:
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
  probe = keras.Model(model.inputs, [model.get_layer(n).output for n in POOLS] + [model.output])
  rgb = np.random.default_rng(seed).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  x = preprocess(rgb, "caffe")
  outs = [keras.ops.convert_to_numpy(o) for o in probe(x, training=False)]
  return SimpleNamespace(model=model, top=include_top, x=x, outs=outs, params=keras_params(model))


@pytest.fixture(scope="module")
def full(keras):
  return _reference(keras, True, 224, seed=0)  # 224: fc1 needs block5_pool to be 7x7x512


@pytest.fixture(scope="module")
def notop(keras):
  return _reference(keras, False, 64, seed=1)


def _legacy_weights(ref, path):
  from keras.src.legacy.saving import legacy_h5_format
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, ref.model)


def _keras3_unnamed(ref, path):
  """A `.weights.h5` as older Keras 3 wrote it: no `name` attribute, only object names."""
  ref.model.save_weights(path)
  with h5py.File(path, "r+") as f:
    for g in f["layers"].values():
      if "vars" in g:
        g["vars"].attrs.pop("name", None)


WRITERS = {
    "official.h5": lambda ref, p: write_official(p, ref.params),
    "official_chunked.h5": lambda ref, p: write_official(p, ref.params, chunks=2),
    "keras3.weights.h5": lambda ref, p: ref.model.save_weights(p),
    "keras3_unnamed.weights.h5": _keras3_unnamed,
    "keras3.keras": lambda ref, p: ref.model.save(p),
    "legacy_model_save.h5": lambda ref, p: ref.model.save(p),  # weights under `model_weights`
    "legacy_save_weights.h5": _legacy_weights,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("which,layout,source", [
    ("full", "official.h5", "keras_h5"),
    ("full", "keras3.weights.h5", "keras3_weights_h5"),
    ("full", "legacy_model_save.h5", "keras_h5"),
    ("notop", "official.h5", "keras_h5"),
    ("notop", "official_chunked.h5", "keras_h5"),
    ("notop", "legacy_save_weights.h5", "keras_h5"),
    ("notop", "keras3_unnamed.weights.h5", "keras3_weights_h5"),
    ("notop", "keras3.keras", "keras3_weights_h5"),
])
def test_keras_parity(request, tmp_path, which, layout, source):
  """Every block output and the logits of flaxtl with converted weights match Keras (float32)."""
  ref = request.getfixturevalue(which)
  path = tmp_path / layout
  WRITERS[layout](ref, str(path))
  params, meta = W.load(path)
  assert meta["source"] == source and meta["preprocessing"] == "caffe"
  assert meta["include_top"] == ref.top
  assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert meta["layers"] == list(ref.params) and meta["file"] == str(path)
  assert meta["num_params"] == (FULL_PARAMS if ref.top else NOTOP_PARAMS) == ref.model.count_params()
  path.unlink()  # the full files are 528 MiB
  out, captured = flax_forward(ref.top)(params, ref.x)
  for name, want in zip(POOLS, ref.outs):
    assert captured[name].shape == want.shape and rel(captured[name], want) < 1e-5, name
  assert rel(out, ref.outs[-1]) < 1e-5


# --- preprocessing ----------------------------------------------------------------------------------

def test_preprocess_caffe_matches_keras(keras):
  rgb = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  want = keras.applications.vgg16.preprocess_input(rgb.copy())  # it works in place on numpy input
  np.testing.assert_array_equal(preprocess(rgb, "caffe"), want)  # same float32 operations: exact


def test_preprocess_torch_formula():
  rgb = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  want = (rgb.astype(np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(preprocess(rgb, "torch"), want, rtol=1e-6, atol=1e-6)


# --- torchvision ------------------------------------------------------------------------------------

@pytest.mark.skipif(not REAL.is_file(), reason=f"no shared dir with the real weights ({REAL})")
def test_real_torchvision_weights():
  params, meta = W.load(REAL)
  assert meta["num_params"] == NOTOP_PARAMS
  assert sum(a.size for p in params.values() for a in p.values()) == NOTOP_PARAMS
  assert meta["layers"] == list(CONV_LAYERS) and not meta["include_top"]
  for name in CONV_LAYERS:
    assert params[name]["kernel"].shape == W.EXPECTED[name]
    assert params[name]["kernel"].dtype == np.float32
    assert params[name]["bias"].shape == W.EXPECTED[name][-1:]
  bias = [round(float(v), 4) for v in params["block1_conv1"]["bias"][:4]]
  assert bias == [0.4034, 0.3778, 0.4644, -0.3228]
  assert meta["source"] == "torchvision_safetensors" and meta["preprocessing"] == "torch"
  assert meta["sha256"] == "189f5be16ec42a597061833eaa7f2bd591b03474ffbac3d217054d0c9951f984"


def torch_state_dict(num_classes=None, seed=0) -> dict:
  """A torchvision VGG16 state dict (OIHW convs, (out, in) Linear) with random values."""
  rng = np.random.default_rng(seed)

  def uniform(*shape):  # in place: fc1 alone has 102.8M values
    a = rng.random(shape, np.float32)
    a -= 0.5
    return a

  sd = {}
  for i, n in zip(torch_weights.TORCH_FEATURES, CONV_LAYERS):
    kh, kw, cin, cout = W.EXPECTED[n]
    sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = uniform(cout, cin, kh, kw), uniform(cout)
  if num_classes:
    for i, n in zip(torch_weights.TORCH_CLASSIFIER, W.TOP):
      fin, fout = W.EXPECTED[n]
      fout = fout or num_classes
      sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = uniform(fout, fin), uniform(fout)
  return sd


def test_torchvision_layout_conversion(tmp_path):
  """Convs: OIHW -> HWIO; fc1: torch flattens block5_pool as NCHW, flaxtl as NHWC (rows reordered)."""
  sd = torch_state_dict(num_classes=10)
  save_file(sd, tmp_path / "tv.safetensors")
  params, meta = W.load(tmp_path / "tv.safetensors")
  assert meta["source"] == "torchvision_safetensors" and meta["preprocessing"] == "torch"
  assert meta["include_top"] and meta["layers"] == list(W.EXPECTED)
  assert params["predictions"]["kernel"].shape == (4096, 10)
  model = VGG16(include_top=True, num_classes=10)
  rng = np.random.default_rng(1)
  relu = lambda v: np.maximum(v, 0)

  # block1_conv1 as torch computes it: NCHW cross-correlation, zero padding 1.
  x = rng.standard_normal((2, 3, 6, 6))
  w, b = sd["features.0.weight"], sd["features.0.bias"]
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  want = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + 6, j:j + 6], w[:, :, i, j])
             for i in range(3) for j in range(3)) + b[:, None, None]
  got = model.apply({"params": params}, x.transpose(0, 2, 3, 1), stop_at="block1_conv1")
  assert rel(got, relu(want).transpose(0, 2, 3, 1)) < 1e-5

  # fc1 on a block5_pool map, torch's way: flatten NCHW, x @ W.T + b.
  fmap = rng.standard_normal((2, 512, 7, 7), np.float32)
  want = relu(sd["classifier.0.weight"] @ fmap.reshape(2, -1).T + sd["classifier.0.bias"][:, None]).T
  got = model.apply({"params": params}, fmap.transpose(0, 2, 3, 1), start_after="block5_pool",
                    stop_at="fc1")
  assert rel(got, want) < 1e-5


@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.update({"features.1.running_mean": np.zeros(64, np.float32)}),
     r"'features\.1\.running_mean'"),
    (lambda sd: sd.pop("features.19.bias"), r"'block4_conv2'.*'features\.19\.bias'"),
    (lambda sd: sd.update({"features.7.weight": np.zeros((128, 64, 3, 3), np.float32)}),
     r"'block2_conv2' \(features\.7\.weight\)"),
])
def test_torchvision_bad_files(tmp_path, change, match):
  sd = {k: np.zeros(v.shape, np.float32) for k, v in torch_state_dict().items()}
  change(sd)
  save_file(sd, tmp_path / "bad.safetensors")
  with pytest.raises(W.WeightsError, match=match) as e:
    W.load(tmp_path / "bad.safetensors")
  assert str(tmp_path / "bad.safetensors") in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed: the missing-torch message cannot be tested")
def test_pth_without_torch(tmp_path):
  with zipfile.ZipFile(tmp_path / "vgg16.pth", "w") as z:  # torch.save's zip layout
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
  with pytest.raises(W.WeightsError, match="needs `torch`"):
    W.load(tmp_path / "vgg16.pth")


# --- flaxtl's format --------------------------------------------------------------------------------

def test_save_load_roundtrip(tmp_path):
  src = write_official(tmp_path / "notop.h5", random_params())
  params, meta = W.load(src)
  out = W.save(params, meta, tmp_path / "w.msgpack")
  params2, meta2 = W.load(out)
  assert list(params2) == list(CONV_LAYERS)
  for n in params:
    for k in ("kernel", "bias"):
      assert params2[n][k].dtype == np.float32 and np.array_equal(params2[n][k], params[n][k])
  assert meta2["source"] == "flaxtl" and meta2["file"] == str(out)
  assert meta2["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
  assert meta2["origin"] == {"source": "keras_h5", "file": str(src), "sha256": meta["sha256"]}
  for k in ("preprocessing", "layers", "include_top", "num_params"):
    assert meta2[k] == meta[k]
  _, meta3 = W.load(W.save(params2, meta2, tmp_path / "w2.msgpack"))  # the origin survives re-saving
  assert meta3["origin"] == meta2["origin"]


def test_save_is_atomic(tmp_path, monkeypatch):
  params = random_params()
  meta = {"preprocessing": "caffe"}
  out = W.save(params, meta, tmp_path / "w.msgpack")
  before = out.read_bytes()

  def fail(fd):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(W.os, "fsync", fail)  # after the data is written, before the rename
  with pytest.raises(OSError, match="simulated"):
    W.save(random_params(seed=1), meta, out)
  monkeypatch.undo()
  assert out.read_bytes() == before and os.listdir(tmp_path) == ["w.msgpack"]
  bad = {**params, "block1_conv1": {"kernel": np.zeros((3, 3, 3, 3)), "bias": np.zeros(3)}}
  with pytest.raises(W.WeightsError, match="block1_conv1"):
    W.save(bad, meta, out)
  assert out.read_bytes() == before and os.listdir(tmp_path) == ["w.msgpack"]


# --- CLI --------------------------------------------------------------------------------------------

def test_cli_converts(tmp_path):
  src = write_official(tmp_path / "notop.h5", random_params())
  r = run_cli(src, "--out", tmp_path / "w.msgpack")
  assert r.returncode == 0, r.stderr
  for s in ("keras_h5", "caffe", "14,714,688", W.load(src)[1]["sha256"]):
    assert s in r.stdout
  params, meta = W.load(tmp_path / "w.msgpack")
  assert meta["origin"]["file"] == str(src) and np.array_equal(
      params["block5_conv3"]["kernel"], random_params()["block5_conv3"]["kernel"])


def _tiny_keras_h5(keras, path):
  """Another architecture, in the official layout."""
  model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv2d"),
                            keras.layers.Flatten(name="flatten"),
                            keras.layers.Dense(2, name="dense")])
  return write_official(path, keras_params(model))


def _truncated(path):
  write_official(path, random_params())
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return path


def _with(change):
  def make(path):
    params = random_params()
    change(params)
    return write_official(path, params)
  return make


BAD = {
    "truncated": (_truncated, None),
    "text": (lambda p: (p.write_text("not weights\n"), p)[1], None),
    "other_architecture": ("tiny_keras", "conv2d"),
    "missing_layer": (_with(lambda p: p.pop("block3_conv2")), "block3_conv2"),
    "wrong_shape": (_with(lambda p: p["block2_conv1"].update(kernel=np.zeros((3, 3, 64, 64),
                                                                            np.float32))),
                    "block2_conv1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_rejects_bad_input(request, tmp_path, case):
  """Non-zero exit, a message naming the file (and the layer, where one is at fault), no output.
  A truncated HDF5 file fails at open (HDF5 checks its end-of-file address), before any layer."""
  make, layer = BAD[case]
  path = tmp_path / "weights.h5"
  if make == "tiny_keras":
    path = _tiny_keras_h5(request.getfixturevalue("keras"), path)
  else:
    path = make(path)
  out = tmp_path / "out.msgpack"
  r = run_cli(path, "--out", out)
  assert r.returncode == 1 and str(path) in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert layer is None or f"'{layer}'" in r.stderr, r.stderr
  assert not out.exists() and sorted(os.listdir(tmp_path)) == ["weights.h5"]
  if case == "wrong_shape":  # an existing output is left untouched
    out.write_bytes(b"old")
    assert run_cli(path, "--out", out).returncode == 1 and out.read_bytes() == b"old"


def test_cli_uses_keras_cache_and_reports_offline(tmp_path):
  cache = tmp_path / "keras_home" / "models"
  env = {"KERAS_HOME": str(tmp_path / "keras_home"),
         W.BASE_URL_ENV: f"http://127.0.0.1:{closed_port()}"}
  r = run_cli("--out", tmp_path / "w.msgpack", env=env)
  assert r.returncode == 1 and str(cache / W.NOTOP_FILE) in r.stderr, r.stderr
  assert not (tmp_path / "w.msgpack").exists() and os.listdir(cache) == []
  write_official(cache / W.NOTOP_FILE, random_params())
  r = run_cli("--out", tmp_path / "w.msgpack", env=env)
  assert r.returncode == 0 and str(cache / W.NOTOP_FILE) in r.stdout, r.stderr


# --- download ---------------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
  """A local HTTP server on 127.0.0.1 serving a small file in the notop layout."""
  root = tmp_path / "srv"
  root.mkdir()
  small = {n: {"kernel": np.full((3, 3, 1, 2), i, np.float32), "bias": np.zeros(2, np.float32)}
           for i, n in enumerate(CONV_LAYERS)}
  write_official(root / W.NOTOP_FILE, small)

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(Quiet, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield SimpleNamespace(file=root / W.NOTOP_FILE, url=f"http://127.0.0.1:{httpd.server_address[1]}")
  httpd.shutdown()
  httpd.server_close()
  thread.join()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  return tmp_path / "keras_home" / "models"


def test_download_into_keras_cache(server, keras_home, monkeypatch):
  monkeypatch.setitem(W.MD5, W.NOTOP_FILE, md5(server.file))
  monkeypatch.setenv(W.BASE_URL_ENV, server.url)
  path = W.resolve()
  assert path == keras_home / W.NOTOP_FILE == W.keras_cache_path()
  assert path.read_bytes() == server.file.read_bytes() and os.listdir(keras_home) == [W.NOTOP_FILE]
  monkeypatch.setenv(W.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}")
  assert W.resolve() == path  # cached: no network needed
  assert W.resolve(server.file) == server.file


def test_download_checksum_mismatch_leaves_nothing(server, keras_home):
  good = md5(server.file)
  data = bytearray(server.file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  server.file.write_bytes(bytes(data))
  with pytest.raises(W.WeightsError, match="checksum mismatch"):
    W.download.fetch(f"{server.url}/{W.NOTOP_FILE}", keras_home / W.NOTOP_FILE, good,
                     error=W.WeightsError)
  assert os.listdir(keras_home) == []
  with pytest.raises(W.WeightsError, match="checksum mismatch"):  # the official md5, via resolve
    W.resolve(base_url=server.url)
  assert os.listdir(keras_home) == []


def test_download_offline_says_where_to_put_the_file(keras_home):
  url = f"http://127.0.0.1:{closed_port()}"
  with pytest.raises(W.WeightsError) as e:
    W.resolve(base_url=url)
  msg = str(e.value)
  assert str(keras_home / W.NOTOP_FILE) in msg and f"{url}/{W.NOTOP_FILE}" in msg
  assert os.listdir(keras_home) == []
