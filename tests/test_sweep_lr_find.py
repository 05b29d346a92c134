"""Freeze-level sweep and LR finder: one row per level with the right counts, the stated rule, the
test split touched once and only after the choice; lr_find lands in a known-good range and leaves
a run's checkpoints alone."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from conftest import requires_sign_digits, requires_weights, tiny_sign_digits_config
from flaxtl import freezing, input_pipeline, lr_find, prepare as prepare_mod, sweep, sweep_report

LEVELS = ["head", "block5", "block4", "all"]
VGG_LEVELS = ("head", "block5", "block4", "block3", "block2", "all")


# ---------------------------------------------------------------------------------------------
# The rule, on synthetic rows.

def _row(level, acc, params, secs=1.0):
  return {"level": level, "val_accuracy": acc, "trainable_params": params, "train_seconds": secs}


def test_recommend_cheapest_within_tolerance():
  rows = [_row("head", 0.90, 5), _row("block5", 0.983, 7), _row("block4", 0.987, 13),
          _row("all", 0.99, 15)]
  rec = sweep_report.recommend(rows, 0.01)
  assert rec["level"] == "block5" and rec["best_level"] == "all"
  assert rec["within_tolerance"] == ["block5", "block4", "all"]
  assert sweep_report.recommend(rows, 0.005)["level"] == "block4"
  assert sweep_report.recommend(rows, 0.0)["level"] == "all"
  assert sweep_report.recommend(rows, 0.2)["level"] == "head"
  shuffled = rows[:]
  random.Random(0).shuffle(shuffled)
  assert sweep_report.recommend(shuffled, 0.005)["level"] == "block4"  # by params, not by position


def test_recommend_tolerance_edges_and_ties():
  # Exactly `tolerance` below the best counts as within (despite 0.975 - 0.005 != 0.97 in floats).
  assert sweep_report.recommend([_row("a", 0.97, 1), _row("b", 0.975, 2)], 0.005)["level"] == "a"
  assert sweep_report.recommend([_row("a", 0.9699, 1), _row("b", 0.975, 2)], 0.005)["level"] == "b"
  # Two levels share the best accuracy: the cheaper one.
  assert sweep_report.recommend([_row("x", 0.98, 9), _row("y", 0.98, 3)], 0.0)["level"] == "y"
  # Same params: less train time, then the order given.
  assert sweep_report.recommend([_row("p", 0.98, 3, 9.0), _row("q", 0.98, 3, 2.0)],
                                0.0)["level"] == "q"
  assert sweep_report.recommend([_row("p", 0.98, 3, 2.0), _row("q", 0.98, 3, 2.0)],
                                0.0)["level"] == "p"
  with pytest.raises(ValueError):
    sweep_report.recommend([], 0.01)


def test_feature_mb_and_default_budget():
  """sign_digits' train split against the 1 GiB default: at 224 px (the config) the block4 level's
  input (block3_pool) is over it and trains from images; at 112 px only block1_pool is."""
  from flaxtl.configs import sign_digits
  config = sign_digits.get_config()
  assert config.data.image_size == 224
  assert sweep.feature_mb(config, "block3_pool", 1712) == pytest.approx(
      1712 * 28 * 28 * 256 * 4 / 2**20)
  assert sweep.feature_mb(config, "block4_pool", 1712) < 1024 < sweep.feature_mb(
      config, "block3_pool", 1712)
  config.data.image_size = 112
  assert sweep.feature_mb(config, "block1_pool", 1712) == pytest.approx(
      1712 * 56 * 56 * 64 * 4 / 2**20)
  assert sweep.feature_mb(config, "block2_pool", 1712) < 1024 < sweep.feature_mb(
      config, "block1_pool", 1712)
  assert sweep.feature_mb(config, "avg_pool", 1) == pytest.approx(512 * 4 / 2**20)


def test_level_config_keeps_smoothing_chosen_for_a_fitted_head():
  c = ml_collections.ConfigDict(dict(trainable="block5", head_init="probe", label_smoothing=0.1,
                                     feature_cache=True, seed=0, epochs=3,
                                     data=dict(split_seed=-1)))
  lc = sweep.level_config(c, "block4", seed=2, epochs=3)
  assert (lc.head_init, lc.label_smoothing, lc.trainable, lc.seed) == ("probe", 0.1, "block4", 2)
  assert sweep.smoothing_note(c) == ""
  c.head_init = "random"
  assert sweep.level_config(c, "block4", seed=2, epochs=3).label_smoothing == 0.0
  assert "label_smoothing=0.1" in sweep.smoothing_note(c)


def test_parse_epochs():
  assert sweep.parse_epochs("all:0.25, block2:2,block3:1", VGG_LEVELS) == {
      "all": 0.25, "block2": 2.0, "block3": 1.0}
  assert sweep.parse_epochs("all:0.25", ["head"]) == {}  # levels not swept are ignored
  assert sweep.parse_epochs("", VGG_LEVELS) == {}
  for bad in ("all:1.5", "all:0", "all", "all:-1"):
    with pytest.raises(ValueError):
      sweep.parse_epochs(bad, VGG_LEVELS)


# ---------------------------------------------------------------------------------------------
# The sweep on a real slice, with every test-split evaluation and the choice recorded in order.

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sweep")
  config = tiny_sign_digits_config(tmp, per_class=8, image_size=32)
  config.epochs = 1
  events, setups, logs = [], [], []
  from flaxtl import evaluate
  real_prepare, real_split, real_evaluate, real_recommend = (
      prepare_mod.prepare, evaluate.evaluate_split, evaluate.evaluate, sweep.recommend)

  def prepare(cfg, *args, **kwargs):
    s = real_prepare(cfg, *args, **kwargs)
    setups.append(s)
    return s

  def evaluate_split(fn, params, feeder, *args, **kwargs):  # validation, during training
    owner = [s.config.trainable for s in setups if s.feeders.get("test") is feeder]
    events.append(("test", owner) if owner else ("other", None))
    return real_split(fn, params, feeder, *args, **kwargs)

  def evaluate_run(run_dir, split, *args, **kwargs):  # a finished run's checkpoint, from images
    events.append((split, [Path(run_dir).name]))
    return real_evaluate(run_dir, split, *args, **kwargs)

  def recommend(rows, tolerance):
    out = real_recommend(rows, tolerance)
    events.append(("choice", out["level"]))
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(prepare_mod, "prepare", prepare)
    mp.setattr(evaluate, "evaluate_split", evaluate_split)
    mp.setattr(evaluate, "evaluate", evaluate_run)
    mp.setattr(sweep, "recommend", recommend)
    # 80 images at 32 px: block4's block3_pool features are 1.25 MiB, block5's 0.62 MiB.
    doc = sweep.sweep(config, tmp / "sweep", LEVELS, tolerance=0.05, cache_budget_mb=1.0,
                      epochs_per_level="all:0.5,block3:0.25", log_fn=logs.append,
                      budget="epochs")
  return config, doc, events, setups, logs, tmp


@requires_sign_digits
@requires_weights
def test_sweep_rows_counts_and_files(tiny_sweep):
  config, doc, _, setups, logs, tmp = tiny_sweep
  rows = doc["rows"]
  assert [r["level"] for r in rows] == LEVELS
  model, params = setups[0].model, setups[0].params
  for r in rows:
    counts = freezing.count(params, freezing.plan(r["level"], model.layers))
    assert (r["trainable_params"], r["frozen_params"]) == (counts["trainable"], counts["frozen"])
    assert 0 <= r["val_accuracy"] <= 1 and r["best_epoch"] in (0, 1)  # 0: phase 1's head
    assert r["train_seconds"] > 0 or r["level"] == "head"
  # Over the budget (block4) or no boundary (all): from images.
  assert [r["cached"] for r in rows] == [True, True, False, False]
  assert doc["feature_mb"]["block4"] > 1.0 > doc["feature_mb"]["block5"]
  # One forward pass for both cached boundaries; the next level hits the cache.
  assert sum(m.startswith("feature pass train") for m in logs) == 1
  computed = [m for m in logs if m.startswith("features train") and "computed" in m]
  assert len(computed) == 2 and "avg_pool" in computed[0] + computed[1]
  assert "block4_pool" in computed[0] + computed[1]
  assert sum("from cache" in m for m in logs) >= 3
  # 'all:0.5' -> half of the 10 steps of an epoch (80 images, batch 8).
  history = [json.loads(line) for line in (tmp / "sweep" / "all" / "metrics.jsonl").open()]
  assert [h["step"] for h in history] == [0, 5]  # phase 1 (the fitted head), then 5 steps
  saved = json.loads((tmp / "sweep" / "sweep.json").read_text())
  assert [r["level"] for r in saved["rows"]] == LEVELS and saved["epochs"]["all"] == 0.5
  assert (tmp / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for lv in LEVELS:  # no level's own run looked at test
    assert "test_accuracy" not in json.loads((tmp / "sweep" / lv / "results.json").read_text())
  table = sweep_report.format_table(doc)
  assert all(lv in table for lv in LEVELS) and "recommended" in table
  # sign_digits smooths labels behind a random head; from the fitted head the levels do not.
  assert config.head_init == "random" and config.label_smoothing == 0.1
  for lv in LEVELS:
    saved_cfg = json.loads((tmp / "sweep" / lv / "config.json").read_text())
    assert (saved_cfg["head_init"], saved_cfg["label_smoothing"]) == ("probe", 0.0), lv
  assert sum("label_smoothing=0.1 goes with head_init='random'" in m for m in logs) == 1


@requires_sign_digits
@requires_weights
def test_sweep_recommendation_follows_rule(tiny_sweep):
  _, doc, _, _, _, _ = tiny_sweep
  rows, rec = doc["rows"], doc["recommendation"]
  best = max(r["val_accuracy"] for r in rows)
  within = [r for r in rows if best - r["val_accuracy"] <= 0.05 + 1e-9]
  assert rec["level"] == min(within, key=lambda r: r["trainable_params"])["level"]
  assert rec["level"] == sweep_report.recommend(rows, 0.05)["level"]


@requires_sign_digits
@requires_weights
def test_test_split_evaluated_once_after_choice_for_recommended_only(tiny_sweep):
  _, doc, events, _, _, _ = tiny_sweep
  rec = doc["recommendation"]
  tests = [i for i, e in enumerate(events) if e[0] == "test"]
  choice = [i for i, e in enumerate(events) if e[0] == "choice"]
  assert len(choice) == 1 and len(tests) == 1, events
  assert tests[0] > choice[0]
  assert events[tests[0]][1] == [rec["level"]]
  assert sum(e[0] == "other" for e in events) >= len(LEVELS)  # validation ran for every level
  t = rec["test"]
  assert t["test_count"] == 50 and 0 <= t["test_accuracy"] <= 1


# ---------------------------------------------------------------------------------------------
# lr_find: a synthetic problem whose good learning rates are known from a grid.

class _Linear(nn.Module):
  classes: int

  @nn.compact
  def __call__(self, x, *, start_after=None, stop_gradient_after=None, train=False):
    return nn.Dense(self.classes, name="predictions")(x)


def _synthetic(scale: float, seed=0, n=512, d=16, k=4):
  """Overlapping Gaussian classes (no zero-loss solution), inputs scaled by `scale`: plain SGD's
  good learning rates move as 1/scale^2."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n).astype(np.int32)
  x = ((0.5 * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))) * scale).astype(np.float32)
  config = ml_collections.ConfigDict(dict(
      seed=0, epochs=1, batch_size=32, trainable="all",
      optimizer=dict(name="sgd", learning_rate=0.0, momentum=0.0, weight_decay=0.0,
                     schedule="constant", warmup_epochs=0.0, grad_clip=0.0)))
  model = _Linear(k)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1])["params"])
  plan = freezing.FreezePlan("all", ("predictions",), ("predictions",), (), None)
  network = prepare_mod.Network(model, None, start_after=None, stop_gradient_after=None)
  setup = prepare_mod.Setup(config, model, plan, params, {}, None, list("abcd"),
                            {"train": input_pipeline.Feeder(x, y)}, network, {}, {})
  return setup, x, y


def _good_range(setup, x, y, steps=100):
  """Learning rates (half-decade grid) whose constant-LR SGD run ends within 10% of the best
  run's loss reduction: (lowest good, highest good)."""
  lrs = 10.0 ** np.arange(-6, 1.01, 0.5)
  idx = np.random.default_rng(1).integers(0, len(y), (steps, 32))
  x, y = jnp.asarray(x), jnp.asarray(y)

  def run(lr):
    def loss(p, i):
      logits = setup.model.apply({"params": p}, x[i])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[i]).mean()

    def step(p, i):
      value, g = jax.value_and_grad(loss)(p, i)
      return jax.tree.map(lambda a, b: a - lr * b, p, g), value
    return jax.lax.scan(step, setup.params, jnp.asarray(idx))[1][-16:].mean()

  final = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(lrs)))
  final = np.where(np.isfinite(final), final, np.inf)
  initial = float(optax.softmax_cross_entropy_with_integer_labels(
      setup.model.apply({"params": setup.params}, x), y).mean())
  good = lrs[final <= final.min() + 0.1 * (initial - final.min())]
  return good.min(), good.max()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_lr_find_suggestion_in_known_good_range(scale, tmp_path):
  setup, x, y = _synthetic(scale)
  lo, hi = _good_range(setup, x, y)
  assert hi / lo <= 100  # the known range is narrow enough for the check to mean something
  doc = lr_find.lr_find(setup, tmp_path, log_fn=lambda *_: None)  # the defaults: 1e-7..10, 100
  assert lo <= doc["suggestion"] <= hi, (doc["suggestion"], lo, hi)
  lrs = np.asarray(doc["lrs"])
  assert np.all(np.diff(lrs) > 0) and np.isclose(lrs[0], 1e-7)
  assert len(doc["losses"]) == doc["steps"] <= 100
  if scale == 30.0:  # LRs 100x past the good ones blow the loss up: the run stops early
    assert doc["stopped"].startswith("running loss above") and doc["steps"] < 100
  assert (tmp_path / "lr_find" / "lr_find.png").exists()


def _snapshot(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@requires_sign_digits
@requires_weights
def test_lr_find_real_slice_leaves_checkpoints_alone(tiny_sweep):
  """On a finished run's workdir: only lr_find/ is written; checkpoints/ stays byte-identical."""
  config, _, _, _, _, tmp = tiny_sweep
  run_dir = tmp / "sweep" / "head"
  assert any((run_dir / "checkpoints").iterdir())
  before = _snapshot(run_dir)
  config = config.copy_and_resolve_references()
  config.trainable = "head"
  doc = lr_find.run(config, run_dir, num_steps=25, log_fn=lambda *_: None)
  after = _snapshot(run_dir)
  assert {k: v for k, v in after.items() if not k.startswith("lr_find/")} == before
  assert {"lr_find/lr_find.json", "lr_find/lr_find.png"} <= set(after)
  saved = json.loads((run_dir / "lr_find" / "lr_find.json").read_text())
  assert saved["steps"] == len(saved["losses"]) <= 25 and saved["suggestion"] == doc["suggestion"]
  assert min(saved["lrs"]) <= doc["suggestion"] <= max(saved["lrs"])
