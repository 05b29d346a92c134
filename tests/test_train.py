"""The trainer on real data: it learns, frozen layers stay bit-identical, the cache changes nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, requires_sign_digits, requires_weights, tiny_sign_digits_config
from flaxtl import train
from flaxtl.step import create_train_state, loss_terms
from flaxtl.prepare import prepare

pytestmark = [requires_sign_digits, requires_weights]


def _leaves(params):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cached")
  config = tiny_sign_digits_config(tmp, per_class=12, image_size=64)
  config.epochs = 3
  setup = prepare(config, tmp / "run")
  initial = _leaves(setup.params)
  results = train.train_and_evaluate(config, tmp / "run", setup=setup)
  return config, setup, initial, results, tmp


def test_short_real_run_learns(cached_run):
  _, _, _, results, tmp = cached_run
  assert results["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert results["test_accuracy"] > 0.5
  saved = json.loads((tmp / "run" / "results.json").read_text())
  assert saved["test_count"] == 50 and saved["best_epoch"] >= 1
  lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_frozen_params_bit_identical_trainable_changed(cached_run):
  _, setup, initial, results, _ = cached_run
  final = _leaves(results["state"].params)
  for path, before in initial.items():
    layer = path.split("'")[1]
    if layer in setup.freeze.frozen:
      assert np.array_equal(before, final[path]), f"frozen {path} changed"
    else:
      assert not np.allclose(before, final[path]), f"trainable {path} did not change"


def test_cache_hit_and_same_gradients_as_from_images(cached_run):
  """A second prepare reuses the cache; gradients from cached block4_pool features equal those
  of the full forward pass from images with the stop-gradient at the boundary."""
  config, setup, _, _, tmp = cached_run
  messages = []
  again = prepare(config, None, log_fn=messages.append)
  # Every split's boundary features come from the cache (the probe's avg_pool bar reads its own).
  boundary = [m for m in messages if "at block4_pool" in m]
  assert len(boundary) == 3 and all("from cache" in m for m in boundary), messages
  config = tiny_sign_digits_config(tmp, per_class=12, image_size=64)
  config.feature_cache = False
  from_images = prepare(config, None, log_fn=lambda *_: None)
  assert from_images.network.start_after is None and from_images.network.stop_gradient_after == "block4_pool"

  def grads(s):
    state = create_train_state(s, 1e-4)
    batch = next(s.feeders["train"].epoch(8, seed=0, epoch=0, shuffle=True))

    def loss(p):
      logits = state.apply_fn({"params": p}, batch["x"])
      total, _, count = loss_terms(logits, batch["label"], batch["mask"])
      return total / count
    return jax.grad(loss)(s.params)

  a, b = grads(again), grads(from_images)
  for layer in setup.freeze.trainable:
    for leaf in ("kernel", "bias"):
      ga, gb = np.asarray(a[layer][leaf]), np.asarray(b[layer][leaf])
      assert np.linalg.norm(ga - gb) <= 1e-4 * np.linalg.norm(gb), (layer, leaf)
      assert np.linalg.norm(gb) > 0
  for layer in setup.freeze.frozen:
    assert not np.any(np.asarray(b[layer]["kernel"])), f"{layer} got a gradient"


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "flaxtl.train", *args], cwd=REPO, timeout=timeout,
                        capture_output=True, text=True)


@pytest.mark.parametrize("override,needle", [
    ("--config.epochz=3", "epochz"),
    ("--config.data.imagesize=64", "imagesize"),
])
def test_misspelt_config_field_is_named(tmp_path, override, needle):
  r = _cli("--config", "sign_digits.py", "--workdir", str(tmp_path / "w"), override)
  assert r.returncode != 0
  assert needle in r.stderr and "Traceback" not in r.stderr


def test_unknown_config_name_lists_known_ones(tmp_path):
  r = _cli("--config", "no_such_config", "--workdir", str(tmp_path / "w"))
  assert r.returncode != 0 and "sign_digits" in r.stderr


def test_bad_trainable_spec_fails_before_training(tmp_path):
  config = tiny_sign_digits_config(tmp_path)
  config.trainable = "block9"
  with pytest.raises(ValueError, match="block9"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
