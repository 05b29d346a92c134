"""Augmentation with the feature cache kept (issue 16): K augmented views of every training image
in the feature pass, drawn per (seed, epoch); CutMix on cached spatial features. Generated data,
VGG16 with random weights: nothing from ../shared."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import generated_config, make_class_folders, random_vgg16_file
from flaxtl import checkpointing, features, input_pipeline, mixing, train
from flaxtl.errors import ConfigError
from flaxtl.prepare import prepare

AUG = dict(data__augment__flip=True, data__augment__crop_min_scale=0.5, data__augment_views=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("views")
  root = make_class_folders(tmp / "data", per_class=12)
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, root


def test_views_are_cached_deterministic_and_each_epoch_draws_among_them(world):
  """Each view is the trunk's output on the augmentation seeded by (view, image), computed
  independently here; a second prepare reads every view from the cache; the feeder's rows in an
  epoch are the versions its (seed, epoch) draw names, and every version gets drawn."""
  tmp, root = world
  config = generated_config(tmp, root, **AUG)
  log = []
  setup = prepare(config, None, log_fn=log.append)
  assert setup.cached and any("view 2" in m and "computed and cached" in m for m in log), log
  feeder = setup.feeders["train"]
  assert len(feeder.views) == 2 and all(v.shape == feeder.inputs.shape for v in feeder.views)
  assert not setup.feeders["valid"].views
  # Independently: decode, augment with seeds (v, i), run the trunk to the boundary.
  images, _ = input_pipeline.decode_images(setup.splits["train"].paths, 32)
  augment = input_pipeline.augmentation(config.data.augment)
  b = setup.freeze.boundary
  trunk = features.Trunk(setup.model, setup.preprocessing, b, (b,))
  for v, view in enumerate(feeder.views, start=1):
    seeds = np.stack([np.full(len(images), v), np.arange(len(images))], 1).astype(np.int64)
    x = np.asarray(augment(images, seeds), np.float32)
    want = np.asarray(jax.jit(trunk)(setup.variables, x)[b])
    np.testing.assert_allclose(view, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(view, feeder.inputs, atol=1e-3)  # an augmentation, not the plain one
  assert not np.allclose(feeder.views[0], feeder.views[1], atol=1e-3)
  log = []
  again = prepare(config, None, log_fn=log.append)
  assert not any("feature pass" in m for m in log), log  # nothing recomputed
  for a, c in zip(again.feeders["train"].views, feeder.views):
    np.testing.assert_array_equal(a, c)
  # The epoch's rows: version 0 = plain, v = views[v-1]; a pure function of (seed, epoch).
  version = feeder.version(seed=3, epoch=5)
  np.testing.assert_array_equal(version, feeder.version(seed=3, epoch=5))
  assert not np.array_equal(version, feeder.version(seed=3, epoch=6))
  assert set(np.unique(version)) == {0, 1, 2}
  stored = [feeder.inputs, *feeder.views]
  for batch, idx in zip(feeder.epoch(8, seed=3, epoch=5, shuffle=True),
                        input_pipeline.batch_indices(feeder.n, 8, seed=3, epoch=5, shuffle=True)):
    for row, i in zip(batch["x"], idx):
      if i >= 0:
        np.testing.assert_array_equal(row, stored[version[i]][i])


def _params(workdir):
  step = checkpointing.manager(workdir, read_only=True).latest_step()
  tree = ocp.StandardCheckpointer().restore(workdir.resolve() / "checkpoints" / f"{step}/default")
  return step, jax.tree.map(np.asarray, tree["params"])


def test_views_and_cutmix_resume_bit_exactly(world):
  tmp, root = world
  config = generated_config(tmp, root, epochs=2, checkpoint_every_steps=2, cutmix_alpha=1.0,
                            mixup_alpha=0.4, **AUG)
  q = dict(log_fn=lambda *a: None)
  train.train_and_evaluate(config, tmp / "ref", **q)
  calls = iter(range(10**6))
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, tmp / "run", stop_requested=lambda: next(calls) >= 3, **q)
  train.train_and_evaluate(config, tmp / "run", resume=True, **q)
  (sa, pa), (sb, pb) = _params(tmp / "ref"), _params(tmp / "run")
  assert sa == sb
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  run = json.loads((tmp / "ref" / "run.json").read_text())
  assert run["trained_on"] == {"cached_features": True, "augmented_views": 2}


def test_cutmix_pastes_a_box_from_the_partner_and_weighs_labels_by_its_area():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  labels, mask = np.array([0, 1, 2, 3, 0, 1]), np.array([1, 1, 1, 1, 1, 0], np.float32)
  for seed in range(5):
    key = jax.random.key(seed)
    out, (partner, lam) = mixing.cutmix(key, jnp.asarray(x), jnp.asarray(labels), mask, 1.0)
    out, partner, lam = np.asarray(out), np.asarray(partner), np.asarray(lam)
    perm = np.asarray(jax.random.permutation(jax.random.split(key, 4)[1], 6))
    np.testing.assert_array_equal(partner, labels[perm])
    for i in range(6):
      from_partner = np.all(out[i] == x[perm[i]], axis=-1) & ~np.all(out[i] == x[i], axis=-1)
      kept = np.all(out[i] == x[i], axis=-1)
      assert (from_partner | kept).all()  # every position is either own or the partner's
      if mask[perm[i]] == 0 or perm[i] == i:
        assert lam[i] == 1.0 and kept.all() or perm[i] == i
        continue
      ys, xs = np.nonzero(from_partner)
      area = from_partner.mean()
      if len(ys):  # one axis-aligned box, and the label weight is 1 - its area
        assert from_partner[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
      assert lam[i] == pytest.approx(1.0 - area, abs=1e-6)


@pytest.mark.parametrize("over, words", [
    (dict(data__augment_views=2), "config.data.augment_views=2: views of what"),
    (dict(cutmix_alpha=1.0, trainable="head", head_init="random"), "CutMix cuts a box"),
    (dict(cutmix_alpha=-1.0), "config.cutmix_alpha=-1.0"),
], ids=["views_without_augment", "cutmix_on_gap_features", "cutmix_negative"])
def test_mistakes_stop_before_the_feature_pass(world, over, words):
  tmp, root = world
  config = generated_config(tmp, root, cache_dir=str(tmp / "empty_cache"), **over)
  log = []
  with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
    prepare(config, None, log_fn=log.append)
  assert not any("feature pass" in m for m in log)
