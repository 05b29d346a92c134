"""Imbalanced data (issue 16): the balanced sampler, class-weighted losses (phase 1's probe and
phase 2's step), best-checkpoint selection by val macro-F1 and every reader of that rule.
Generated data, VGG16 with random weights: nothing from ../shared."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import generated_config, make_class_folders, random_vgg16_file
from flaxtl import (checkpointing, data, evaluate, input_pipeline, probe, sweep_report, train,
                    workdir)
from flaxtl.step import TrainState, loss_terms, train_step, zero_metrics

QUIET = dict(log_fn=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# The balanced sampler.

def test_balanced_sampler_class_frequencies_match_uniform_within_tolerance():
  """Classes of 1000, 100 and 10 examples: over 20 epochs (22,200 draws) each class is drawn
  1/3 of the time within 0.02 absolute (a binomial std is 0.0032: > 6 std), each epoch within
  0.07 (1,110 draws, std 0.014: 5 std); within the rarest class every example is drawn 1/10 of
  its class's draws within 25% (std ~3.7%). Epochs keep their length; shuffle stays a
  permutation that keeps the skew."""
  labels = np.repeat([0, 1, 2], [1000, 100, 10]).astype(np.int32)
  rng = np.random.default_rng(5)
  labels = labels[rng.permutation(len(labels))]  # classes interleaved, as a real split is
  n, drawn = len(labels), []
  for epoch in range(20):
    order = input_pipeline.epoch_order(n, seed=3, epoch=epoch, shuffle=True, labels=labels)
    assert order.shape == (n,) and order.min() >= 0 and order.max() < n
    freq = np.bincount(labels[order], minlength=3) / n
    np.testing.assert_allclose(freq, 1 / 3, atol=0.07)
    drawn.append(order)
  drawn = np.concatenate(drawn)
  np.testing.assert_allclose(np.bincount(labels[drawn], minlength=3) / len(drawn), 1 / 3,
                             atol=0.02)
  rare = np.flatnonzero(labels == 2)
  per_example = np.bincount(drawn, minlength=n)[rare]
  np.testing.assert_allclose(per_example / per_example.sum(), 0.1, rtol=0.25)
  plain = input_pipeline.epoch_order(n, seed=3, epoch=0, shuffle=True)
  assert sorted(plain) == list(range(n))  # shuffle: every example once, the skew kept


def test_balanced_sampler_is_a_pure_function_of_seed_and_epoch():
  labels = np.repeat([0, 1], [1000, 10]).astype(np.int32)
  order = lambda seed, epoch: input_pipeline.batch_indices(  # noqa: E731
      len(labels), 64, seed=seed, epoch=epoch, shuffle=True, labels=labels)
  np.testing.assert_array_equal(order(0, 4), order(0, 4))
  assert not np.array_equal(order(0, 4), order(0, 5))
  assert not np.array_equal(order(0, 4), order(1, 4))
  idx = order(0, 4)
  assert idx.shape == (16, 64) and (idx[-1] < 0).sum() == 16 * 64 - len(labels)
  # the padding (masked out) repeats the epoch's first examples: real rows for batch statistics
  np.testing.assert_array_equal(-1 - idx[-1][idx[-1] < 0], idx.reshape(-1)[:16 * 64 - len(labels)])
  # The Feeder feeds exactly those rows, from any start step (a resume).
  feeder = input_pipeline.Feeder(np.arange(len(labels), dtype=np.float32)[:, None], labels)
  rows = list(feeder.epoch(64, seed=0, epoch=4, shuffle=True, balanced=True, start_step=3))
  got = np.concatenate([b["x"][b["mask"] > 0, 0] for b in rows]).astype(np.int64)
  np.testing.assert_array_equal(got, idx[3:][idx[3:] >= 0])


# ---------------------------------------------------------------------------------------------
# Class weights.

def test_class_weights_are_sklearns_balanced():
  labels = np.array([0, 0, 0, 1, 2, 2])  # n=6, k=3: 6/(3*3), 6/(3*1), 6/(3*2)
  np.testing.assert_allclose(data.class_weights(labels, 3), [2 / 3, 2.0, 1.0], rtol=1e-6)


def test_class_weighted_loss_equals_its_closed_form():
  """Hard labels: sum over unmasked rows of w_y * CE; with label smoothing a, of
  -sum_c w_c t_c log p_c; unweighted, the plain sums (the weights change nothing else)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  labels, w = np.array([0, 2, 1, 1, 0]), np.array([0.5, 2.0, 1.25], np.float32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  total, correct, count = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask,
                                           class_weight=tuple(w))
  want = -sum(w[labels[i]] * logp[i, labels[i]] for i in range(4))
  assert float(total) == pytest.approx(want, rel=1e-6) and float(count) == 4
  assert float(correct) == sum(logp[i].argmax() == labels[i] for i in range(4))
  a = 0.3
  smoothed, _, _ = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask, a,
                                    class_weight=tuple(w))
  t = (1 - a) * np.eye(3)[labels] + a / 3
  assert float(smoothed) == pytest.approx(-(w * t * logp)[:4].sum(), rel=1e-6)
  plain, _, _ = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask)
  assert float(plain) == pytest.approx(-sum(logp[i, labels[i]] for i in range(4)), rel=1e-6)


def test_weighted_step_follows_the_weighted_gradient():
  """Phase 2's step with class weights: one SGD step (lr 1) on a linear model moves the weights
  by the gradient of (1/rows) sum_i w_yi CE_i, written out here: X^T (w_y (p - onehot)) / rows."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  labels, mask = np.array([0, 1, 2, 2, 1, 0]), np.array([1, 1, 1, 1, 1, 0], np.float32)
  w0, cw = rng.normal(size=(4, 3)).astype(np.float32), (0.25, 3.0, 1.5)
  state = TrainState.create(apply_fn=lambda v, x, **k: x @ v["params"]["w"],
                                  params={"w": jnp.asarray(w0)}, tx=optax.sgd(1.0),
                                  ema_params={}, plateau={}).replace(step=jnp.asarray(0))
  batch = {"x": jnp.asarray(x), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)}
  new, m = train_step(state, zero_metrics(), batch, jax.random.key(0),
                            class_weight=cw)
  logits = x @ w0
  p = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
  g = np.asarray(cw)[labels][:, None] * (p - np.eye(3)[labels]) * mask[:, None] / mask.sum()
  np.testing.assert_allclose(np.asarray(new.params["w"]), w0 - x.T @ g, rtol=1e-5, atol=1e-6)
  ce = -np.log(p[np.arange(6), labels])
  assert float(m["loss"]) == pytest.approx((np.asarray(cw)[labels] * ce * mask).sum(), rel=1e-5)


def test_probe_objective_weighs_each_example_by_its_class():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(7, 5)).astype(np.float32), np.array([0, 0, 0, 0, 1, 1, 2])
  w = {"kernel": rng.normal(size=(5, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
  sw = data.class_weights(y, 3)[y]
  logits = x @ w["kernel"]
  ce = -(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))[np.arange(7), y]
  got = probe._objective(w, jnp.asarray(x), jnp.asarray(y), 0.1, 3, sw=jnp.asarray(sw))
  want = (sw * ce).mean() + 0.05 * (w["kernel"] ** 2).sum()
  assert float(got) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Best checkpoint by val macro-F1: every reader of the rule agrees.

HISTORY = [  # accuracy peaks at epoch 1, macro-F1 at epoch 2 (the minority class found)
    {"epoch": 0, "step": 10, "val_accuracy": 0.80, "val_loss": 0.60, "val_macro_f1": 0.40},
    {"epoch": 1, "step": 20, "val_accuracy": 0.90, "val_loss": 0.40, "val_macro_f1": 0.50},
    {"epoch": 2, "step": 30, "val_accuracy": 0.85, "val_loss": 0.45, "val_macro_f1": 0.70},
    {"epoch": 3, "step": 40, "val_accuracy": 0.86, "val_loss": 0.50, "val_macro_f1": 0.60},
]


@pytest.mark.parametrize("select_by,best_epoch", [("accuracy", 1), ("macro_f1", 2)])
def test_select_best_by_macro_f1_picks_another_epoch(tmp_path, select_by, best_epoch):
  """On a history where accuracy and macro-F1 disagree: the metrics records, orbax's kept best
  checkpoint (what evaluate and predict restore), early stopping and the learning-curve marker
  all pick the rule's epoch."""
  history = [{**r, "select_by": select_by, "train_loss": 0.3, "train_accuracy": 0.9}
             for r in HISTORY]
  assert workdir.best_record(history)["epoch"] == best_epoch
  mngr = checkpointing.manager(tmp_path)
  for r in history:
    checkpointing.save(mngr, r["step"], {"x": np.zeros(2)}, {k: r[k] for k in workdir.RANKED})
  mngr.wait_until_finished()
  assert checkpointing.best_step(mngr) == history[best_epoch]["step"]
  assert set(mngr.all_steps()) == {history[best_epoch]["step"], 40}  # best + latest kept
  mngr.close()
  with checkpointing.manager(tmp_path, read_only=True) as ro:  # as evaluate/predict read it
    assert checkpointing.choose_step(ro) == history[best_epoch]["step"]
  assert train.early_stop(history, 3 - best_epoch) and not train.early_stop(history, 4 - best_epoch)
  from flaxtl import plots
  fig = plots.learning_curves_figure(history)
  labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
  assert any(f"best (epoch {best_epoch + 1}" in t for t in labels), labels
  assert ("val macro-F1" in labels) and (("by val macro-F1" in " ".join(labels))
                                         == (select_by == "macro_f1"))


def test_sweep_recommendation_ranks_by_the_runs_rule():
  """Level 'a' has the better accuracy, 'b' the better macro-F1 (tolerance 0): the sweep takes
  the rule its runs were trained under."""
  def row(level, acc, f1, params, by):
    return {"level": level, "val_accuracy": acc, "val_macro_f1": f1, "trainable_params": params,
            "train_seconds": 1.0, "select_by": by}
  for by, want in (("accuracy", "a"), ("macro_f1", "b")):
    rows = [row("a", 0.9, 0.5, 1, by), row("b", 0.8, 0.7, 2, by)]
    rec = sweep_report.recommend(rows, 0.0)
    assert rec["level"] == want and rec["by"] == workdir.SELECT_BY[by]


def test_macro_f1_from_scores_matches_the_reports_macro_average():
  rng = np.random.default_rng(3)
  labels, logits = rng.integers(0, 4, 50), rng.normal(size=(50, 4))
  doc = evaluate.classification_metrics(labels, logits, list("abcd"))
  assert evaluate.scores(labels, logits)["macro_f1"] == pytest.approx(doc["macro_avg"]["f1"])


# ---------------------------------------------------------------------------------------------
# A real run on an imbalanced generated dataset.

@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
  """3 classes whose images overlap (30% drawn with a random class's shape), train 60/60/6
  (stripes the minority), valid 20 each: an unweighted fit all but gives up on stripes."""
  tmp = tmp_path_factory.mktemp("imbalance")
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  root = tmp / "data"
  make_class_folders(root / "train", per_class=60, seed=1, mislabeled=0.3)
  make_class_folders(root / "valid", per_class=20, seed=2, mislabeled=0.3)
  for p in sorted((root / "train" / "stripes").iterdir())[6:]:
    p.unlink()
  return tmp, root


def test_class_weight_balanced_raises_minority_recall(imbalanced):
  """trainable='head' (phase 1, the probe, is the run): with class_weight='balanced' the
  minority class's val recall rises by at least 0.4 (measured: 0.05 -> 0.85), and macro-F1
  with it; the run records the rule and its val macro-F1 (select_best_by='macro_f1')."""
  tmp, root = imbalanced
  recall, f1 = {}, {}
  for cw in ("none", "balanced"):
    config = generated_config(tmp, root, trainable="head", class_weight=cw,
                              select_best_by="macro_f1", data__layout="split_folders",
                              probe_shots=())
    res = train.train_and_evaluate(config, tmp / cw, **QUIET)
    doc = evaluate.evaluate(tmp / cw, "valid", write=False, num_top_losses=0, **QUIET)
    recall[cw], f1[cw] = doc["per_class"]["stripes"]["recall"], doc["macro_avg"]["f1"]
    record = json.loads((tmp / cw / "metrics.jsonl").read_text().splitlines()[0])
    assert record["select_by"] == "macro_f1" and res["select_by"] == "macro_f1"
    assert record["val_macro_f1"] == pytest.approx(f1[cw]) == pytest.approx(res["val_macro_f1"])
    assert res["head_fit"]["class_weight"] == cw
  assert recall["balanced"] >= recall["none"] + 0.4, recall
  assert f1["balanced"] > f1["none"], f1
