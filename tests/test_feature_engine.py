"""Issue 17: the frozen feature pass through TensorFlow's oneDNN (flaxtl/tf_trunk.py) or Winograd
convolutions (flaxtl/winograd.py) and the engine choice (flaxtl/feature_engine.py). Random-weights
VGG16, generated images, small sizes.

Tolerances (relative Frobenius error against XLA float32, ||a - b|| / ||b||): float32 through
oneDNN or Winograd 1e-5 (measured ~1.6e-6 and ~3e-6: the same sums, reassociated); bf16 2e-2 (measured ~6e-3:
inputs and weights rounded to 8 mantissa bits, through 10-13 convolutions).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from conftest import generated_config, make_class_folders, random_vgg16_file
from flaxtl import feature_engine, features, prepare, tf_trunk, train, weights, winograd
from flaxtl.models import VGG16

F32_TOL, BF16_TOL = 1e-5, 2e-2
CAPTURE = ("block3_pool", "block4_pool", "avg_pool", "feature_norm")


def quiet(*args, **kwargs):
  pass


def rel(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("engine")
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, make_class_folders(tmp / "data", per_class=8, size=40)


@pytest.fixture(scope="module")
def trunk(world):
  """The random VGG16 as a run loads it (GAP + power norm + head), and 64 px images, some of
  them as floats (what the augmented views feed)."""
  params, meta = weights.load(world[0] / "vgg16_random.msgpack")
  model = VGG16(include_top=False, pooling="avg", num_classes=3, feature_norm=True)
  params = {**params, "predictions": {"kernel": np.zeros((512, 3), np.float32),
                                      "bias": np.zeros(3, np.float32)}}
  images = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
  ref = feature_engine.runner("xla", model, {"params": params}, meta["preprocessing"],
                              "feature_norm", CAPTURE)(images)
  return model, params, meta["preprocessing"], images, ref


@pytest.mark.parametrize("engine,tol", [("tf", F32_TOL), ("tf_bf16", BF16_TOL)])
def test_tf_engine_matches_xla_float32(trunk, engine, tol):
  model, params, mode, images, ref = trunk
  seen = []
  out = feature_engine.runner(engine, model, {"params": params}, mode, "feature_norm", CAPTURE)(
      images, progress=seen.append)
  assert sum(seen) == len(images)
  for k in CAPTURE:  # conv/pool layers from TF; avg_pool and feature_norm from Flax on its output
    assert out[k].shape == ref[k].shape and out[k].dtype == np.float32, k
    assert rel(out[k], ref[k]) < tol, (k, rel(out[k], ref[k]))
  if engine == "tf_bf16":  # it is bf16 arithmetic, not float32 in disguise
    assert rel(out["block4_pool"], ref["block4_pool"]) > 1e-4
  # The augmented views' float inputs, a shallower stop and a batch not dividing the rows.
  x = images[:5].astype(np.float32) + 0.5
  want = np.asarray(jax.jit(features.Trunk(model, mode, "block2_pool", ("block2_pool",)))(
      {"params": params}, x)["block2_pool"])
  got = tf_trunk.TFTrunk(model, params, mode, "block2_pool", ("block2_pool",),
                        bf16=engine == "tf_bf16").map(x, batch=2)  # batches of 2, 2, 1
  assert rel(got["block2_pool"], want) < tol


@pytest.mark.parametrize("shape", [(2, 7, 10, 16), (1, 8, 8, 32), (3, 5, 4, 17)])
def test_winograd_conv_equals_lax_conv(shape):
  """Any height and width (edge tiles are padded, then cropped), against lax in float64: within
  5e-6 relative (measured 1.1-1.3e-6; lax's float32 ~1e-7: the transforms' constants, up to 8,
  amplify rounding)."""
  rng = np.random.default_rng(shape[1])
  x = rng.normal(size=shape).astype(np.float32)
  k = rng.normal(size=(3, 3, shape[-1], 24)).astype(np.float32) / 10
  dn = ("NHWC", "HWIO", "NHWC")
  with jax.enable_x64():
    want = np.asarray(jax.lax.conv_general_dilated(x.astype(np.float64), k.astype(np.float64),
                                                   (1, 1), "SAME", dimension_numbers=dn))
  got = np.asarray(jax.jit(winograd.conv_general_dilated, static_argnums=(2, 3),
                           static_argnames="dimension_numbers")(x, k, (1, 1), "SAME",
                                                                dimension_numbers=dn))
  assert got.shape == want.shape and rel(got, want) < 5e-6, rel(got, want)
  # Where it does not apply (3 input channels, stride 2), it is lax's convolution, bit for bit.
  for xs, stride in ((x[..., :3], (1, 1)), (x, (2, 2))):
    ks = k[:, :, :xs.shape[-1]]
    assert not winograd.applies(xs, ks, stride, "SAME", None, None, dn, 1)
    np.testing.assert_array_equal(
        winograd.conv_general_dilated(xs, ks, stride, "SAME", dimension_numbers=dn),
        jax.lax.conv_general_dilated(xs, ks, stride, "SAME", dimension_numbers=dn))


def test_winograd_engine_matches_xla_float32(trunk):
  model, params, mode, images, ref = trunk
  run = feature_engine.runner("winograd", model, {"params": params}, mode, "feature_norm", CAPTURE)
  out = run(images)
  for k in CAPTURE:
    assert out[k].shape == ref[k].shape and out[k].dtype == np.float32, k
    assert rel(out[k], ref[k]) < F32_TOL, (k, rel(out[k], ref[k]))
  # It is Winograd: of VGG16's 10 convolutions to block4_pool only the RGB one stays lax's.
  fast = model.clone(conv_general_dilated=winograd.conv_general_dilated)
  jaxpr = str(jax.make_jaxpr(lambda x: fast.apply({"params": params}, x, stop_at="block4_pool"))(
      images[:1].astype(np.float32)))
  assert jaxpr.count("conv_general_dilated") == 1


def test_training_from_images_runs_the_frozen_layers_by_winograd(trunk):
  """Block 5 from images (augmentation: no cache): under 'auto' the 9 frozen convolutions after
  the RGB one are Winograd's; the trainable layers' gradients equal lax's within 1e-4 (relative);
  the frozen ones get none; 'xla' keeps lax's convolutions everywhere."""
  model, params, mode, images, _ = trunk
  rng = np.random.default_rng(1)
  params = {**params, "predictions": {"kernel": rng.normal(0, 0.1, (512, 3)).astype(np.float32),
                                      "bias": np.zeros(3, np.float32)}}
  x, y = images[:4].astype(np.float32), np.arange(4) % 3

  def grads(m):
    def loss(p):
      logits = m.apply({"params": p}, x, stop_gradient_after="block4_pool")
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return (jax.jit(jax.grad(loss))(params),
            str(jax.make_jaxpr(jax.grad(loss))(params)).count("conv_general_dilated"))

  assert feature_engine.for_frozen_layers("xla", model) is model
  (g_lax, n_lax), (g_fast, n_fast) = grads(model), grads(feature_engine.for_frozen_layers("auto",
                                                                                        model))
  assert n_lax - n_fast == 9, (n_lax, n_fast)
  for layer in ("block5_conv1", "block5_conv3", "predictions"):
    a, b = np.asarray(g_fast[layer]["kernel"]), np.asarray(g_lax[layer]["kernel"])
    assert np.linalg.norm(b) > 0 and rel(a, b) < 1e-4, (layer, rel(a, b))
  assert not np.any(np.asarray(g_fast["block4_conv3"]["kernel"]))


def test_cache_keys_on_precision_not_engine(world):
  config = generated_config(world[0], world[1])
  split = type("Split", (), {"paths": ["a.png"], "labels": np.zeros(1)})()
  key = lambda engine: features.cache_key(**features.describe(  # noqa: E731
      config, {"sha256": "x"}, "caffe", split, "block4_pool",
      feature_engine.precision(engine, config.model.dtype)))
  assert key("xla") == key("tf") == key("winograd") != key("tf_bf16")
  # the key float32 XLA features had before engines existed: old caches stay valid
  assert key("xla") == features.cache_key(**features.describe(
      config, {"sha256": "x"}, "caffe", split, "block4_pool"))


def test_explicit_engines_share_or_split_the_cache_by_precision(world, tmp_path):
  tmp, root = world
  logs = {}
  for engine in ("tf_bf16", "tf", "xla"):
    config = generated_config(tmp, root, feature_engine=engine, data__image_size=32)
    config.cache_dir = str(tmp_path / "cache")
    logs[engine] = []
    setup = prepare.prepare(config, None, log_fn=logs[engine].append, fit=False)
    assert setup.feature_engine["requested"] == engine
  computed = lambda e: any("computed and cached" in m for m in logs[e])  # noqa: E731
  assert computed("tf_bf16") and any("engine tf_bf16" in m for m in logs["tf_bf16"])
  assert computed("tf")                              # float32: not the bf16 entries
  assert not computed("xla"), logs["xla"]            # float32 again: tf's entries serve it


def test_bf16_features_are_stored_in_bf16_and_train_the_same_fresh_or_cached(world, tmp_path):
  """tf_bf16 features take half the bytes on disk and in memory; the run that computes them
  trains on exactly what a later run reads back from the cache (bit-identical params)."""
  import ml_dtypes
  tmp, root = world
  config = generated_config(tmp, root, feature_engine="tf_bf16", epochs=1)
  config.cache_dir = str(tmp_path / "cache")
  results = [train.train_and_evaluate(config, tmp_path / f"run{i}", log_fn=lambda *a: None)
             for i in range(2)]
  setup = prepare.prepare(config, None, log_fn=lambda *a: None, fit=False)
  x = setup.feeders["train"].inputs
  assert x.dtype == ml_dtypes.bfloat16
  stored = sorted((tmp_path / "cache").glob("*.npy"))
  assert stored and all(np.load(f).dtype == np.uint16 for f in stored)
  jax.tree.map(np.testing.assert_array_equal, *(jax.device_get(r["state"].params)
                                                for r in results))
  # float32 features stay float32
  config.feature_engine = "xla"
  assert prepare.prepare(config, None, log_fn=lambda *a: None, fit=False
                         ).feeders["train"].inputs.dtype == np.float32


def test_a_deeper_boundary_comes_from_a_cached_shallower_one_as_from_images(world, tmp_path):
  """A user who trained block 4 (block3_pool cached) and tries block 5, then the head, decodes no
  image and runs no trunk pass: block4_pool comes from the cached block3_pool, then avg_pool from
  the block4_pool so stored.
  They equal the features computed from the images to float32 summation order (1e-5)."""
  tmp, root = world
  over = dict(head_init="random", report_probe=False, data__image_size=64)
  setups, logs = {}, {}
  for trainable in ("block4", "block5", "head"):
    config = generated_config(tmp, root, trainable=trainable, **over)
    config.cache_dir = str(tmp_path / "cache")
    if trainable == "head":
      config.report_probe = True  # the head's run fits the probe on avg_pool
    logs[trainable] = []
    setups[trainable] = prepare.prepare(config, None, log_fn=logs[trainable].append, fit=False)
  assert any("decoding" in m for m in logs["block4"])
  for trainable, source in (("block5", "block3_pool"), ("head", "block4_pool")):  # the deepest
    assert not any("decoding" in m or "feature pass" in m for m in logs[trainable]), logs[trainable]
    assert any(f"from the cached {source}" in m for m in logs[trainable]), logs[trainable]
  # The same boundaries from the images, in an empty cache
  for trainable, boundary in (("block5", "block4_pool"), ("head", "avg_pool")):
    config = generated_config(tmp, root, trainable=trainable, **over)
    config.cache_dir = str(tmp_path / f"fresh_{trainable}")
    config.report_probe = trainable == "head"
    fresh_log = []
    fresh = prepare.prepare(config, None, log_fn=fresh_log.append, fit=False)
    assert any("decoding" in m for m in fresh_log)
    for split in ("train", "valid", "test"):
      got = (setups[trainable].feeders[split].inputs if boundary != "avg_pool"
             else setups[trainable].probe_features[split])
      want = (fresh.feeders[split].inputs if boundary != "avg_pool"
              else fresh.probe_features[split])
      assert got.shape == want.shape and got.dtype == want.dtype == np.float32
      assert rel(got, want) < F32_TOL, (trainable, split, rel(got, want))
  # derived features are stored: the next run reads them as any cached features
  again = []
  config = generated_config(tmp, root, trainable="block5", **over)
  config.cache_dir = str(tmp_path / "cache")
  prepare.prepare(config, None, log_fn=again.append, fit=False)
  assert any("block4_pool (from cache)" in m for m in again) and not any(
      "from the cached" in m for m in again), again
  # the dataset copied elsewhere (new paths, new mtimes): the same bytes, so the same features
  import shutil
  moved, log = shutil.copytree(root, tmp_path / "moved"), []
  config = generated_config(tmp, moved, trainable="block5", **over)
  config.cache_dir = str(tmp_path / "cache")
  prepare.prepare(config, None, log_fn=log.append, fit=False)
  assert any("block4_pool (from cache)" in m for m in log) and not any(
      "decoding" in m for m in log), log


def test_auto_probes_once_per_machine_and_records_it_in_run_json(world, tmp_path, monkeypatch):
  tmp, root = world
  monkeypatch.setattr(feature_engine, "AUTO_MIN_IMAGES", 0)  # a tiny pass still probes,
  monkeypatch.setattr(feature_engine, "PROBE_BATCH", 8)      # on small batches
  # 64 px: at 32 px XLA's convolutions on block 5's 2x2 maps are 13-34x slower (conftest)
  config = generated_config(tmp, root, epochs=1, trainable="head", data__image_size=64)
  config.cache_dir = str(tmp_path / "cache")
  log = []
  train.train_and_evaluate(config, tmp_path / "run1", log_fn=log.append)
  info = json.loads((tmp_path / "run1" / "run.json").read_text())["feature_engine"]
  engines = feature_engine.candidates(VGG16())
  assert info["requested"] == "auto" and info["how"] == "probe"
  assert info["engine"] in engines and set(info["probe"]["images_per_s"]) == set(engines)
  assert info["precision"] == feature_engine.precision(info["engine"], "float32")
  assert any(f"engine {info['engine']}" in m for m in log if m.startswith("feature pass "))
  assert list((tmp_path / "cache" / "engine").glob("*.json"))

  # Other images (so a feature pass is due), same machine, size and boundary: no second probe.
  # (run.json holds setup.feature_engine, as above.)
  monkeypatch.setattr(feature_engine, "probe", lambda *a, **k: pytest.fail("probed again"))
  config.data.max_per_class = 6
  again = prepare.prepare(config, None, log_fn=quiet, fit=False).feature_engine
  assert again["engine"] == info["engine"] and again["how"].startswith("probe from ")
  # Everything cached: no engine runs, the cached precision is said.
  cached = prepare.prepare(config, None, log_fn=quiet, fit=False).feature_engine
  assert cached["engine"] is None and cached["how"] == f"all features cached ({info['precision']})"


def test_a_round_slowed_by_another_process_does_not_decide_the_engine(monkeypatch):
  """The probe's choice is kept for every later run on the machine, so one round that another
  process slowed down (seen: winograd 4.7 img/s against xla 4.9, while alone 6.7 against 4.5)
  must not pick the slower engine: an engine's rate is its fastest round."""
  clock = [0.0]
  seconds = {"xla": iter([1.0, 1.0, 1.0]), "winograd": iter([1.0, 4.0, 0.5])}  # first, rounds

  def fake_runner(engine, *args):
    def run(images):
      clock[0] += next(seconds[engine])
      return {"block4_pool": np.ones((2, 3), np.float32)}
    return run

  monkeypatch.setattr(feature_engine, "runner", fake_runner)
  monkeypatch.setattr(feature_engine, "PROBE_ROUNDS", 2)
  monkeypatch.setattr(feature_engine, "PROBE_BATCH", 8)
  monkeypatch.setattr(feature_engine.time, "perf_counter", lambda: clock[0])
  doc = feature_engine.probe(None, None, "", 8, "block4_pool", ["xla", "winograd"],
                             log_fn=lambda *a: None)
  assert doc["images_per_s"] == {"xla": 8.0, "winograd": 16.0}  # the median would say 3.6
  assert doc["choice"] == "winograd"


@pytest.mark.parametrize("flags", [[], ["avx512_bf16"]])
def test_asking_for_bf16_on_a_cpu_without_bf16_units_warns(monkeypatch, tmp_path, caplog, flags):
  """Machines change: on a CPU without avx512_bf16/amx_bf16 oneDNN's bf16 is no faster than
  float32 and less precise, so an explicit 'tf_bf16' is honoured with a warning; with the units,
  no word."""
  monkeypatch.setattr(feature_engine, "cpu", lambda: {"model": "Test CPU", "bf16_flags": flags})
  with caplog.at_level("WARNING", logger="flaxtl"):
    c = feature_engine.choose("tf_bf16", VGG16(), {}, "caffe", 64, "block4_pool", "float32", 5000,
                              tmp_path, quiet)
  assert (c.engine, c.precision, c.how) == ("tf_bf16", "bfloat16", "asked")
  warned = [r.getMessage() for r in caplog.records if "no bf16 units" in r.getMessage()]
  assert bool(warned) == (not flags)
  assert all("Test CPU" in m and "'auto'" in m for m in warned)
