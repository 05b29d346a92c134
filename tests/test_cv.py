"""k-fold cross-validation: folds that are disjoint, stratified and deterministic; every fold a
normal run whose split every verb reads back; one trunk pass for all folds (counted); a killed cv
leaves no cv.json and continues; the sweep choosing from folds. Generated data, VGG16 with random
weights: nothing from ../shared."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import generated_config, make_class_folders, random_vgg16_file
from flaxtl import cv, data, evaluate, features, parallel, splitting, sweep, sweep_report, train

QUIET = dict(log_fn=lambda *a: None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cv")
  root = make_class_folders(tmp / "data", per_class=14)
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, root


@pytest.fixture
def trunk_images(monkeypatch):
  """Counts the images that go through the frozen trunk (features.Trunk via map_batches)."""
  seen = []
  real = parallel.map_batches

  def counting(fn, params, inputs, *a, **k):
    if isinstance(fn, features.Trunk):
      seen.append(len(inputs))
    return real(fn, params, inputs, *a, **k)

  monkeypatch.setattr(parallel, "map_batches", counting)
  return seen


def test_folds_are_disjoint_stratified_and_deterministic():
  labels = np.repeat(np.arange(4), [23, 7, 11, 5])  # uneven classes
  folds = splitting.stratified_folds(labels, 5, seed=3)
  assert set(folds) == set(range(5))
  for c in range(4):  # every fold holds n/5 of each class, rounded
    per_fold = np.bincount(folds[labels == c], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == (labels == c).sum()
  sizes = np.bincount(folds)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(folds, splitting.stratified_folds(labels, 5, seed=3))
  assert (folds != splitting.stratified_folds(labels, 5, seed=4)).any()

  def split(n, tag):
    return data.Split([f"{tag}{i}" for i in range(n)], np.arange(n) % 3, ["a", "b", "c"])
  splits = {"train": split(40, "tr"), "valid": split(12, "va"), "test": split(9, "te")}
  union = splits["train"].paths + splits["valid"].paths
  valids = []
  for f in range(4):
    out = splitting.fold_splits(splits, 4, f, seed=0)
    assert not set(out["train"].paths) & set(out["valid"].paths)
    assert sorted(out["train"].paths + out["valid"].paths) == sorted(union)
    assert out["test"] is splits["test"]  # untouched
    by_path = dict(zip(union, np.concatenate([splits["train"].labels, splits["valid"].labels])))
    assert [by_path[p] for p in out["valid"].paths] == list(out["valid"].labels)
    valids.append(set(out["valid"].paths))
  assert set().union(*valids) == set(union) and sum(map(len, valids)) == len(union)
  both = splitting.fold_splits(splits, 4, 0, seed=0, include_test=True)
  assert "test" not in both and len(both["train"]) + len(both["valid"]) == 61
  with pytest.raises(data.DataError, match=r"too few: c \(3\)"):
    splitting.fold_splits({"train": split(8, "x"), "valid": split(3, "y")}, 4, 0, seed=0)


def test_cv_trains_every_fold_from_one_trunk_pass_and_survives_a_kill(world, trunk_images,
                                                                      monkeypatch):
  tmp, root = world
  # The head alone (phase 1, the closed-form fit) keeps it quick; the sweep below trains block 5.
  config = generated_config(tmp, root, trainable="head", cache_dir=str(tmp / "fresh_cache"))
  workdir = tmp / "cv"
  real = train.train_and_evaluate

  def killed_in_fold_2(cfg, run_dir, **k):
    if run_dir.name == "fold1":
      raise KeyboardInterrupt
    return real(cfg, run_dir, **k)

  monkeypatch.setattr(train, "train_and_evaluate", killed_in_fold_2)
  with pytest.raises(KeyboardInterrupt):
    cv.cross_validate(config, workdir, folds=3, **QUIET)
  assert not (workdir / "cv.json").exists() and (workdir / "fold0" / "cv_run.json").exists()
  n_images = sum(len(s) for s in splitting.load_splits(config.data, 0, workdir).values())
  assert sum(trunk_images) == n_images and len(trunk_images) == 3  # one pass: train, valid, test
  fold0 = (workdir / "fold0" / "metrics.jsonl").read_text()

  monkeypatch.setattr(train, "train_and_evaluate", real)
  doc = cv.cross_validate(config, workdir, folds=3, **QUIET)
  assert sum(trunk_images) == n_images  # the rest of the folds: rows of the cached pass
  assert (workdir / "fold0" / "metrics.jsonl").read_text() == fold0  # reused, not retrained
  saved = json.loads((workdir / "cv.json").read_text())
  assert saved["val_accuracy"] == doc["val_accuracy"] and len(saved["per_fold"]) == 3
  assert (workdir / "cv.png").stat().st_size > 0
  accs = [p["val_accuracy"] for p in doc["per_fold"]]
  assert doc["val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
  assert doc["val_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
  lo, hi = doc["val_accuracy"]["low"], doc["val_accuracy"]["high"]
  assert lo <= doc["val_accuracy"]["mean"] <= hi
  assert sum(p["val_count"] for p in doc["per_fold"]) == doc["val_images"] == 36  # 14 - 2 test
  for p in doc["per_fold"]:
    assert p["low"] <= p["val_accuracy"] <= p["high"] and p["probe_val_accuracy"] is not None
    # The fold's run reads its own split back: evaluate on its valid = the fold's figure.
    ev = evaluate.evaluate(workdir / f"fold{p['fold']}", "valid", write=False, **QUIET)
    assert ev["num_images"] == p["val_count"] and ev["accuracy"] == pytest.approx(p["val_accuracy"])
  table = cv.format_table(doc)
  assert "95% interval" in table and "probe" in table


def test_a_fold_trained_alone_sees_the_same_split(world):
  tmp, root = world
  config = generated_config(tmp, root, epochs=1, trainable="head")
  with config.unlocked():
    config.data.cv_folds, config.data.cv_fold = 3, 2
  res = train.train_and_evaluate(config, tmp / "alone", **QUIET)
  listed = splitting.load_splits(config.data, 0, tmp / "alone")
  expect = splitting.fold_splits(splitting.load_splits(generated_config(tmp, root).data, 0),
                                 3, 2, seed=0)
  assert listed["valid"].paths == expect["valid"].paths
  assert res["test_count"] == len(expect["test"])


def test_sweep_chooses_from_folds(world, trunk_images):
  tmp, root = world
  config = generated_config(tmp, root, epochs=1, cache_dir=str(tmp / "sweep_cache"))
  doc = sweep.sweep(config, tmp / "sweep", levels=["head", "block5"], cv=2, budget="epochs",
                    **QUIET)
  n_images = sum(len(s) for s in splitting.load_splits(config.data, 0).values())
  assert sum(trunk_images) == n_images  # one pass for every level and fold
  for row in doc["rows"]:
    mine = [r for r in doc["runs"] if r["level"] == row["level"]]
    assert sorted(r["fold"] for r in mine) == [0, 1]
    assert row["val_accuracy"] == pytest.approx(np.mean([r["val_accuracy"] for r in mine]))
  probe = doc["probe"]
  head = next(r for r in doc["rows"] if r["level"] == "head")
  assert probe["val_accuracy"] == pytest.approx(head["val_accuracy"])  # the head level IS the fit
  assert "fold" in doc["recommendation"]["test"]["workdir"]
  assert "probe" in sweep_report.format_table(doc)
