"""config.train_engine: the training step's trainable VGG16 conv layers through TensorFlow's
oneDNN in bf16 (`tf_trunk.trained_layers`), against XLA's float32 step on the same params."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtl import config_check, feature_engine, train
from flaxtl.errors import ConfigError
from flaxtl.models.vgg import VGG16
from flaxtl.prepare import Network

pytest.importorskip("tensorflow")
from conftest import generated_config, make_class_folders, random_vgg16_file  # noqa: E402

AMX = {"model": "Test CPU", "bf16_flags": ["amx_bf16", "avx512_bf16"]}
BLOCK5 = ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train_engine")
  root = make_class_folders(tmp / "data", per_class=20)
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, root


def _rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("boundary", ["block4_pool", "block4_conv2"])
def test_trained_layers_match_xla_float32_within_bf16_rounding(boundary):
  """Loss and every gradient of the bf16 oneDNN step within bf16 rounding of XLA's float32 one
  (the same function, not another model); frozen layers get none; the step repeats bit for
  bit (resume stays exact); evaluation (train=False) is XLA's, exactly."""
  model = VGG16(include_top=False, pooling="avg", num_classes=5)
  images = jax.random.uniform(jax.random.key(1), (6, 64, 64, 3), minval=-120.0, maxval=120.0)
  params = model.init(jax.random.key(0), images)["params"]
  x = model.apply({"params": params}, images, stop_at=boundary)  # real (ReLU) boundary features
  labels = jnp.arange(6) % 5
  layers = feature_engine.for_trained_layers("tf_bf16", model, boundary)
  trunk = model.layers
  assert layers == trunk[trunk.index(boundary) + 1:trunk.index("block5_pool") + 1]
  xla = Network(model, None, start_after=boundary, stop_gradient_after=None)
  bf16 = dataclasses.replace(xla, trained_in_tf=layers)

  def loss(net):
    return jax.jit(jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        net({"params": p}, x, train=True), labels).mean()))

  (l32, g32), (l16, g16) = loss(xla)(params), loss(bf16)(params)
  assert abs(float(l16 - l32)) < 0.02 * abs(float(l32))
  trained = [n for n in layers if "_conv" in n] + ["predictions"]
  for name in trained:  # bf16 rounding flips some ReLUs and max-pool picks: ~7% (cosine 0.998)
    for k in ("kernel", "bias"):
      a, b = np.ravel(g16[name][k]), np.ravel(g32[name][k])
      cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
      assert cosine > 0.99 and _rel(a, b) < 0.15, (name, k, cosine, _rel(a, b))
  for name in set(g32) - set(trained):
    assert not np.any(g16[name]["kernel"]) and not np.any(g32[name]["kernel"])
  again = loss(bf16)(params)[1]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(g16)))
  assert np.array_equal(bf16.logits({"params": params}, x), xla.logits({"params": params}, x))


def test_auto_picks_bf16_only_on_amx_cpus_for_vgg16_float32_on_one_device(monkeypatch):
  vgg = VGG16(include_top=False, pooling="avg", num_classes=5)
  monkeypatch.setattr(feature_engine, "cpu", lambda: AMX)
  assert feature_engine.for_trained_layers("auto", vgg, "block4_pool") == BLOCK5
  assert feature_engine.for_trained_layers("auto", vgg, None)[0] == "block1_conv1"  # trainable=all
  assert feature_engine.for_trained_layers("xla", vgg, "block4_pool") == ()
  assert feature_engine.for_trained_layers("auto", vgg, "block5_pool") == ()  # the head only
  assert feature_engine.for_trained_layers(
      "auto", vgg.clone(dtype=jnp.bfloat16), "block4_pool") == ()
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  assert feature_engine.for_trained_layers("auto", vgg, "block4_pool") == ()
  monkeypatch.undo()
  # AVX512-BF16 without AMX: not measured, XLA kept.
  monkeypatch.setattr(feature_engine, "cpu", lambda: {**AMX, "bf16_flags": ["avx512_bf16"]})
  assert feature_engine.for_trained_layers("auto", vgg, "block4_pool") == ()
  assert feature_engine.for_trained_layers("tf_bf16", vgg, "block4_pool") == BLOCK5


@pytest.mark.parametrize("over, message", [
    ({"train_engine": "tf"}, "config.train_engine='tf': one of auto, xla, tf_bf16"),
    ({"train_engine": "tf_bf16", "model__name": "resnet50"},
     "config.train_engine='tf_bf16': VGG16 in float32 only"),
    ({"train_engine": "tf_bf16", "model__dtype": "bfloat16"},
     "config.train_engine='tf_bf16': VGG16 in float32 only"),
])
def test_train_engine_mistakes_name_the_field(tmp_path, over, message):
  c = generated_config(tmp_path, tmp_path, **over)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    config_check.check_config(c)


def test_a_bf16_run_learns_like_float32_and_records_its_engine(world, tmp_path):
  """A short real run (generated class folders, block 5 trained behind a random head) in each
  engine from the same start: train and val losses epoch by epoch within bf16 rounding of
  float32's; run.json says which layers ran in bf16."""
  tmp, root = world
  runs = {}
  for engine in ("xla", "tf_bf16"):
    c = generated_config(tmp, root, train_engine=engine, head_init="random", epochs=3,
                         optimizer__learning_rate=1e-4,
                         data__image_size=64)
    train.train_and_evaluate(c, tmp_path / engine, log_fn=lambda *a: None)
    runs[engine] = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").open()]
    info = json.loads((tmp_path / engine / "run.json").read_text())
    assert info["train_engine"] == {"xla": [], "tf_bf16": list(BLOCK5)}[engine]
  for a, b in zip(runs["xla"], runs["tf_bf16"]):
    assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"], (a, b)
    assert abs(a["val_loss"] - b["val_loss"]) < 0.1 * a["val_loss"], (a, b)
  losses = [r["train_loss"] for r in runs["tf_bf16"]]
  assert losses[-1] < 0.8 * losses[0], losses  # it learned


def test_from_images_the_frozen_layers_run_in_xla_and_the_trained_ones_in_bf16():
  """Training from images (augmentation without cached views): the frozen layers run forward
  in XLA (gradients stop at the boundary), the trained ones through oneDNN, as the cached step."""
  model = VGG16(include_top=False, pooling="avg", num_classes=5)
  images = jax.random.uniform(jax.random.key(2), (4, 64, 64, 3), maxval=255.0)
  params = model.init(jax.random.key(0), images)["params"]
  labels = jnp.arange(4) % 5
  xla = Network(model, "caffe", start_after=None, stop_gradient_after="block4_pool")
  bf16 = dataclasses.replace(xla, trained_in_tf=BLOCK5)
  grads = {}
  for name, net in (("xla", xla), ("bf16", bf16)):
    grads[name] = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        net({"params": p}, images, train=True), labels).mean()))(params)
  for name in params:
    a, b = np.ravel(grads["bf16"][name]["kernel"]), np.ravel(grads["xla"][name]["kernel"])
    if name.startswith("block5") or name == "predictions":
      assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99, name
    else:
      assert not a.any() and not b.any(), name
