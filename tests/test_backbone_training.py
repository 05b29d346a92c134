"""The Keras-named backbones through the whole product (issue 19), on MobileNetV2 with random
weights (model.weights='none') at 32 px on generated class folders: batch norm statistics frozen
where the stage is frozen and updated where it trains, the cached step equal to the step from
images, exact resume with batch_stats, the sweep's levels from the model, and the trained model
back through evaluate/predict/export."""
from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import generated_config, make_class_folders
from flaxtl import checkpointing, export, freezing, inference, models, sweep, train
from flaxtl.step import loss_terms
from flaxtl.errors import ConfigError
from flaxtl.config_check import check_config
from flaxtl.prepare import prepare

QUIET = dict(log_fn=lambda *a: None)
LEVEL = "block_13"  # MobileNetV2's deepest level below the head: blocks 13-16 and out_relu train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("backbones")
  root = make_class_folders(tmp / "data", per_class=12)
  return tmp, root


def mobilenet(tmp, root, **over):
  over = {"model__weights": "none", "trainable": LEVEL, "feature_cache": True,
          "head_init": "random", **over}
  return generated_config(tmp, root, model="mobilenet_v2", **over)


def _checkpoint(workdir):
  step = checkpointing.manager(workdir, read_only=True).latest_step()
  tree = ocp.StandardCheckpointer().restore(workdir.resolve() / "checkpoints" / f"{step}/default")
  return step, jax.tree.map(np.asarray, {k: tree[k] for k in ("params", "batch_stats")})


def test_frozen_batch_norms_keep_their_statistics_trainable_ones_update(world):
  """From images (the frozen stages run in every step): the frozen stages' batch_stats are
  bit-identical after training, every trainable stage's have moved."""
  tmp, root = world
  config = mobilenet(tmp, root, feature_cache=False, epochs=1)
  setup = prepare(config, None, **QUIET)
  assert setup.network.stop_gradient_after == "block_12_add" and not setup.cached
  before = jax.tree.map(np.asarray, setup.batch_stats)
  res = train.train_and_evaluate(config, tmp / "bn", setup=setup, evaluate_test=False, **QUIET)
  after = jax.tree.map(np.asarray, jax.device_get(res["state"].batch_stats))
  keys = models.param_keys(setup.model)
  frozen = {k for s in setup.freeze.frozen for k in keys[s] if k in before}
  trainable = {k for s in setup.freeze.trainable for k in keys[s] if k in before}
  assert len(frozen) == 39 and len(trainable) == 13, (len(frozen), len(trainable))
  for k in frozen:
    jax.tree.map(np.testing.assert_array_equal, after[k], before[k])
  for k in trainable:
    assert not np.array_equal(after[k]["mean"], before[k]["mean"]), k


def test_cached_step_equals_the_step_from_images(world):
  """Gradients and updated batch statistics of the first batch: from the cached block_15_add
  features and from images through the frozen stages (inference mode) agree. Train-mode batch
  norm over 8 images of 2x2 maps is ill-conditioned in float32 (a 1e-6 relative change of the
  cached features moves the gradients by ~4e-3), so the bar is 1e-2 on the whole gradient; frozen
  stages normalising with batch statistics would change the features, and the gradients, by O(1)."""
  tmp, root = world
  a = prepare(mobilenet(tmp, root, trainable="block_16"), None, **QUIET)
  b = prepare(mobilenet(tmp, root, trainable="block_16", feature_cache=False), None, **QUIET)
  assert a.cached and a.network.start_after == "block_15_add" and not b.cached

  def step(s):
    batch = next(s.feeders["train"].epoch(8, seed=0, epoch=0, shuffle=True))

    def loss(p):
      logits, new = s.network({"params": p, "batch_stats": s.batch_stats}, batch["x"],
                              train=True, mutable=["batch_stats"])
      total, _, count = loss_terms(logits, batch["label"], batch["mask"])
      return total / count, new["batch_stats"]
    return jax.grad(loss, has_aux=True)(s.params)

  (ga, sa), (gb, sb) = step(a), step(b)
  def flat(g):
    return np.concatenate([np.ravel(g[k][leaf]) for k in a.freeze.trainable_keys
                           for leaf in sorted(g[k])])
  x, y = flat(ga), flat(gb)
  assert np.linalg.norm(x - y) <= 1e-2 * np.linalg.norm(y) and np.linalg.norm(y) > 0
  frozen = [k for stage in b.freeze.frozen for k in models.param_keys(b.model)[stage]]
  assert not any(np.any(np.asarray(gb[k][leaf])) for k in frozen for leaf in gb[k])
  for k in sb:
    for leaf in sb[k]:
      np.testing.assert_allclose(np.asarray(sa[k][leaf]), np.asarray(sb[k][leaf]), rtol=1e-3,
                                 atol=1e-5, err_msg=k)


def test_resume_with_batch_stats_is_bit_exact(world):
  tmp, root = world
  config = mobilenet(tmp, root, epochs=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp / "ref", **QUIET)
  calls = iter(range(10**6))
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, tmp / "run", stop_requested=lambda: next(calls) >= 3, **QUIET)
  train.train_and_evaluate(config, tmp / "run", resume=True, **QUIET)
  (sa, a), (sb, b) = _checkpoint(tmp / "ref"), _checkpoint(tmp / "run")
  assert sa == sb and a["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_trained_model_predicts_and_exports_with_its_batch_stats(world):
  """evaluate/predict restore params and batch_stats; the SavedModel gives the same
  probabilities as the bundle, and the bundle as the workdir."""
  tmp, root = world
  workdir = tmp / "ref"  # trained by the resume test (or train it here when run alone)
  if not (workdir / "results.json").exists():
    train.train_and_evaluate(mobilenet(tmp, root, epochs=2), workdir, **QUIET)
  pred = inference.load(workdir)
  assert set(pred.variables) == {"params", "batch_stats"}
  from PIL import Image
  images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32)))
                     for f in sorted(root.glob("*/*"))[:8]])
  p = pred.predict(images)
  out = export.export(workdir, tmp / "exported", onnx=True, **QUIET)
  bundle = export.load_exported(out)
  np.testing.assert_allclose(bundle.predict(images), p, atol=1e-6)
  import onnxruntime
  q = onnxruntime.InferenceSession(str(out / export.ONNX_FILE)).run(None, {"images": images})[0]
  np.testing.assert_allclose(q, p, atol=1e-5)
  import tensorflow as tf
  served = tf.saved_model.load(str(out / export.SAVED_MODEL_DIR)).signatures["serving_default"]
  q = served(images=tf.constant(images))["probabilities"].numpy()
  np.testing.assert_allclose(q, p, atol=1e-5)


def test_sweep_levels_come_from_the_model(world):
  """A tiny sweep with the model's own levels: MobileNetV2's, each at its own boundary."""
  tmp, root = world
  config = mobilenet(tmp, root, epochs=1, head_init="probe")
  desc = models.description("mobilenet_v2")
  assert sweep.default_levels(config) == desc.stages
  levels = ["head", LEVEL, "all"]
  doc = sweep.sweep(config, tmp / "sweep", levels, budget="epochs", **QUIET)
  assert [r["level"] for r in doc["rows"]] == levels
  model = models.create(config, 3)
  for level in levels[1:]:
    assert freezing.plan(level, model).boundary == desc.level_boundaries[level]
  assert all(r["val_accuracy"] is not None for r in doc["rows"])


@pytest.mark.parametrize("over,needle", [
    ({"trainable": "conv5"}, "no layer named or starting with .conv5.; .*its freeze levels: head, "
                             "block_13, block_6"),
    ({"trainable": "frozen_blocks:2"}, "frozen_blocks:N counts VGG16's"),
    ({"model__name": "vgg16", "trainable": "block5", "model__train_bn": True},
     "vgg16 has no batch norm"),
    ({"model__name": "resnet5O"}, "model.name='resnet5O'"),
])
def test_backbone_config_mistakes_are_named(world, over, needle):
  tmp, root = world
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
    check_config(mobilenet(tmp, root, **over))


def test_train_bn_trains_every_batch_norm_and_caches_nothing(world):
  tmp, root = world
  model = models.create(mobilenet(tmp, root), 3)
  plan = freezing.plan("head", model, train_bn=True)
  bn = models.batch_norm_keys(model)
  assert plan.boundary is None and set(bn) <= set(plan.trainable_keys)
  assert freezing.plan("head", model).trainable_keys == ("predictions",)
  assert "Conv1" not in plan.trainable_keys and "bn_Conv1" in plan.trainable_keys


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "resnet50_torchvision"])
def test_the_other_backbones_export_to_onnx(name, tmp_path):
  """ResNet50 (max pool, shortcut convs), EfficientNetB0 (swish, squeeze-excite, the
  normalisation in the stem) and torchvision's ResNet-50 (convs without bias, symmetric padding,
  torch's preprocessing), random weights and batch norm statistics: ONNX equals JAX."""
  import jax.numpy as jnp
  import onnxruntime
  config = generated_config(tmp_path, tmp_path, model=name, model__head="gap")
  model = models.create(config, 3)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(np.asarray,
                           dict(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
  variables["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables["batch_stats"])
  pred = inference.Predictor(model, variables, ["a", "b", "c"],
                             models.description(name).preprocessing, 32)
  export.save_onnx(pred, tmp_path / "model.onnx")
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  q = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"images": images})[0]
  np.testing.assert_allclose(q, pred.predict_proba(images), atol=1e-5)


def test_precise_bn_sets_the_mean_batch_moments_computed_independently(world):
  """ResNet50 from random weights, conv5 trainable on cached conv4 features: recalibration sets
  conv5_block1's first batch norms (after 1x1 stride-2 convs of the cached input, so computable
  here in numpy) to the mean over the batches of their batch mean and biased variance; frozen
  layers' statistics are untouched, and a run from random weights recalibrates by default."""
  from flaxtl import parallel, precise_bn
  tmp, root = world
  config = generated_config(tmp, root, model="resnet50", model__weights="none",
                            trainable="conv5", feature_cache=True, head_init="random",
                            data__image_size=64)
  setup = prepare(config, None, **QUIET)
  assert setup.cached and setup.network.start_after == "conv4_block6_out"
  assert precise_bn.batches_for(config, setup.weights_meta) == 50
  config.model.precise_bn = 0
  assert precise_bn.batches_for(config, setup.weights_meta) == 0
  feeder = setup.feeders["train"]
  batches = list(feeder.epoch(8, seed=0, epoch=0, shuffle=True))[:3]
  new = precise_bn.recalibrate(setup.network, setup.params, setup.batch_stats, batches,
                               parallel.local_mesh())
  for layer in ("conv5_block1_0", "conv5_block1_1"):
    k, b = (np.asarray(setup.params[f"{layer}_conv"][n], np.float64) for n in ("kernel", "bias"))
    y = [np.asarray(batch["x"], np.float64)[:, ::2, ::2] @ k[0, 0] + b for batch in batches]
    mean = np.mean([t.mean(axis=(0, 1, 2)) for t in y], axis=0)
    var = np.mean([t.var(axis=(0, 1, 2)) for t in y], axis=0)
    np.testing.assert_allclose(new[f"{layer}_bn"]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new[f"{layer}_bn"]["var"], var, rtol=1e-4, atol=1e-5)
    assert not np.allclose(setup.batch_stats[f"{layer}_bn"]["var"], var)
  frozen = [k for s in setup.freeze.frozen for k in models.param_keys(setup.model)[s]
            if k in setup.batch_stats]
  assert frozen and all(new[k] is setup.batch_stats[k] for k in frozen)
  assert set(new) == set(setup.batch_stats)
