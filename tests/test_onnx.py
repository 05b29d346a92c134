"""ONNX export (`python -m flaxtl.export --format onnx`): the file onnxruntime runs gives the bundle's
probabilities (max abs diff <= 1e-5), preprocessing included, for any batch size; the translator
matches JAX on VGG16 (random weights, Keras' head and preprocessing) too; a missing `onnx` package
is a plain error that writes nothing. Generated data; no ../shared needed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import generated_config, make_class_folders

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished small-CNN run on generated class folders (the bundle -> ONNX path is the same for
  every model; VGG16's translation is checked below)."""
  from flaxtl import train
  tmp = tmp_path_factory.mktemp("onnx")
  root = make_class_folders(tmp / "data", per_class=8, size=40)
  config = generated_config(tmp, root, "small_cnn", epochs=1)
  train.train_and_evaluate(config, tmp / "run", log_fn=lambda *a: None)
  return tmp


def test_cli_onnx_export_matches_the_bundle(run):
  import flaxtl
  from flaxtl import input_pipeline, splitting
  out = run / "bundle"
  r = subprocess.run([sys.executable, "-m", "flaxtl.export", "--workdir", str(run / "run"),
                      "--out", str(out), "--format", "onnx"], capture_output=True, text=True,
                     timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert r.returncode == 0, r.stderr[-3000:]
  doc = json.loads((out / "bundle.json").read_text())
  assert doc["onnx"] == "model.onnx" and doc["saved_model"] is None
  assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx", "params.msgpack"]

  bundle = flaxtl.load_exported(out)
  sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
  meta = sess.get_modelmeta().custom_metadata_map
  assert json.loads(meta["class_names"]) == bundle.class_names
  assert meta["preprocessing"] == "unit" and meta["image_size"] == "32"
  (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
  assert (inp.name, inp.type, inp.shape) == ("images", "tensor(uint8)", ["N", 32, 32, 3])
  assert (outp.name, outp.shape) == ("probabilities", ["N", 3])

  # Every image of the run's data, at the model's size, in batches of 1, 5 and all.
  cfg = generated_config(run, run / "data")
  paths = [p for sp in splitting.load_splits(cfg.data, 0).values() for p in sp.paths]
  images, bad = input_pipeline.decode_images(paths, 32)
  assert not bad and len(images) == 24
  ref = bundle.predict_proba(images)
  assert np.allclose(ref.sum(1), 1, atol=1e-5) and ref.std(0).max() > 1e-3  # not constant
  for batch in (images[:1], images[:5], images):
    got = sess.run(None, {"images": batch})[0]
    assert got.shape == (len(batch), 3)
    np.testing.assert_allclose(got, ref[:len(batch)], rtol=0, atol=TOL)


@pytest.mark.parametrize("name,head,mode,tta", [("vgg16", "keras_top", "caffe", "none"),
                                                ("vgg16", "gap", "torch", "none"),
                                                ("vgg16", "gap_norm", "torch", "none"),
                                                ("vgg16", "keras_top", "caffe", "flip"),
                                                ("vgg16", "gap", "torch", "flip_crops")])
def test_the_translation_matches_jax(name, head, mode, tta):
  """VGG16 with both heads and both pretrained preprocessings (caffe's RGB->BGR is a gather on
  a symbolic batch), straight from the translator; with test-time augmentation the views run as
  one batch of 2N or 6N (keras_top's flatten reshapes it)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flaxtl import inference, models, onnx_export
  cfg = ml_collections.ConfigDict({"model": {"name": name, "head": head, "dtype": "float32"}})
  model = models.create(cfg, 4)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  fn = inference.probabilities(model, mode, tta)
  proto = onnx_export.to_onnx(fn, variables, 32, {"class_names": list("abcd")})
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
  np.testing.assert_allclose(sess.run(None, {"images": x})[0], np.asarray(jax.jit(fn)(variables, x)),
                             rtol=0, atol=TOL)


def test_onnx_export_with_tta_matches_the_bundle(run):
  """`export(..., tta=...)` bakes the averaging into the ONNX file; the bundle loads with it."""
  import flaxtl
  from flaxtl import export
  x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  out = export.export(run / "run", run / "bundle_tta", saved_model=False, onnx=True,
                      tta="flip_crops", log_fn=lambda *a: None)
  bundle = flaxtl.load_exported(out)
  assert bundle.tta == "flip_crops"
  sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
  assert sess.get_modelmeta().custom_metadata_map["tta"] == "flip_crops"
  ref = bundle.predict_proba(x)
  assert np.abs(ref - bundle.predict_proba(x, tta="none")).max() > 1e-4  # TTA changes something
  for batch in (x[:1], x):
    np.testing.assert_allclose(sess.run(None, {"images": batch})[0], ref[:len(batch)], rtol=0,
                               atol=TOL)


def test_without_the_onnx_package_a_plain_error_and_nothing_written(run, monkeypatch):
  import importlib.util
  from flaxtl import export, inference
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "onnx" else real(name, *a))
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("model loaded first"))
  with pytest.raises(export.ExportError, match=r'pip install -e "\.\[onnx\]"'):
    export.export(run / "run", run / "no_onnx", saved_model=False, onnx=True)
  assert not (run / "no_onnx").exists()
