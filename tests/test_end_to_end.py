"""The whole product on generated data, with no dataset or weights file from ../shared: train,
evaluate, predict, export and sweep on generated class folders with the small CNN and with VGG16
(random weights written in flaxtl's own format, loaded through the real weights path). Runs in a
clone with nothing beside it, in well under a minute of compute."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, make_class_folders, random_vgg16_file, generated_config
from flaxtl import evaluate, export, inference, predict, sweep, train

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("e2e")
  root = make_class_folders(tmp / "data")
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, root


@pytest.mark.parametrize("model", ["small_cnn", "vgg16"])
def test_train_evaluate_predict_export(world, model):
  tmp, root = world
  workdir = tmp / f"run_{model}"
  config = generated_config(tmp, root, model)
  res = train.train_and_evaluate(config, workdir, log_fn=lambda *a: None)
  assert res["test_count"] == 3 * 2 and res["best_step"] is not None  # 15% of 12 per class
  split = json.loads((workdir / "split.json").read_text())
  assert sorted(len(v) for v in split["splits"].values()) == [6, 6, 24]
  # evaluate: the same best step, the same test figures as training reported.
  doc = evaluate.evaluate(workdir, "test", log_fn=lambda *a: None)
  assert doc["step"] == res["best_step"] and doc["correct"] == res["test_correct"]
  assert doc["loss"] == pytest.approx(res["test_loss"], rel=1e-4)
  for f in ("eval_test.json", "confusion_test.png", "top_losses_test.png", "learning_curves.png"):
    assert (workdir / f).stat().st_size > 0
  # predict: every file of a folder, probabilities that match the predictor's own.
  pred = inference.load(workdir)
  files, errors = predict.find_images([str(root / "circle")])
  rows, bad = predict.predict_files(pred, files, top_k=2)
  assert not errors and not bad and len(rows) == 12
  probs = pred.predict(files)
  assert [r["top_k"][0]["class"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
  # export: the bundle predicts what the workdir predicts, from paths, PIL images and arrays.
  out = export.export(workdir, tmp / f"bundle_{model}", saved_model=False, log_fn=lambda *a: None)
  bundle = inference_from_bundle(out)
  np.testing.assert_allclose(bundle.predict(files[:3]), probs[:3], atol=1e-5)
  pngs = [i for i, f in enumerate(files) if f.endswith(".png")][:3]
  np.testing.assert_allclose(bundle.predict([Image.open(files[i]) for i in pngs]), probs[pngs],
                             atol=1e-5)
  # JPEGs: PIL's decoder rounds a little differently from TensorFlow's, which reads the paths;
  # the gap_norm head's square root magnifies that on a random trunk's near-zero features.
  jpgs = [i for i, f in enumerate(files) if f.endswith(".jpg")][:3]
  from_pil = bundle.predict([Image.open(files[i]) for i in jpgs])
  np.testing.assert_allclose(from_pil, probs[jpgs], atol=2e-2)
  assert (from_pil.argmax(1) == probs[jpgs].argmax(1)).all()


def inference_from_bundle(path):
  import flaxtl
  return flaxtl.load_exported(path)


def test_sweep_on_class_folders(world):
  """The sweep on a dataset flaxtl splits (one root of class folders), levels from head to all;
  a second call reuses every finished level."""
  tmp, root = world
  config = generated_config(tmp, root, epochs=1)
  logs = []
  doc = sweep.sweep(config, tmp / "sweep", ["head", "block5", "all"], log_fn=logs.append,
                    epochs_per_level="all:0.5")
  assert [r["level"] for r in doc["rows"]] == ["head", "block5", "all"]
  assert doc["recommendation"]["test"]["test_count"] == 6
  # Equal training time: block5 trained config.epochs; 'all' got the steps that fit its time.
  assert doc["budget"] == "time" and doc["reference_level"] == "block5"
  assert doc["budget_seconds"] == pytest.approx(doc["rows"][1]["train_seconds"])
  assert 1 <= doc["runs"][2]["steps"] <= 3 * 1  # at most config.epochs of 3 steps (24 images / 8)
  for lv in ("head", "block5", "all"):
    assert json.loads((tmp / "sweep" / lv / "split.json").read_text())["splits"] == json.loads(
        (tmp / "sweep" / "head" / "split.json").read_text())["splits"]  # one split for all
  again = sweep.sweep(config, tmp / "sweep", ["head", "block5", "all"], log_fn=logs.append,
                      epochs_per_level="all:0.5")
  assert sum("already done" in m for m in logs) == 3
  assert [r["val_accuracy"] for r in again["rows"]] == [r["val_accuracy"] for r in doc["rows"]]


def test_cli_with_a_user_config_from_another_folder(world, tmp_path):
  """A config file of the user's own, importing the shipped defaults, run from another folder."""
  tmp, root = world
  (tmp_path / "my_config.py").write_text(
      "from flaxtl.configs import default\n\n"
      "def get_config():\n"
      "  c = default.get_config()\n"
      f"  c.data.root, c.data.layout = {str(root)!r}, 'class_folders'\n"
      "  c.model.name, c.trainable, c.feature_cache = 'small_cnn', 'all', False\n"
      "  c.data.image_size, c.batch_size, c.epochs = 32, 8, 1\n"
      "  return c\n")
  env = {k: v for k, v in os.environ.items() if k != "FLAXTL_DATA_DIR"}
  r = subprocess.run([sys.executable, "-m", "flaxtl.train", "--config", "my_config.py",
                      "--workdir", "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "test acc" in r.stdout and (tmp_path / "run" / "results.json").exists()
