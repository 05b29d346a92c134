"""evaluate / predict / export on one real tiny run (sign digits slice, 32px, 2 epochs).

What must hold: the exported bundle and the SavedModel (loaded without JAX in a fresh process) give
the training-time model's probabilities; evaluate's accuracy is what predict's answers count up to;
bad inputs fail plainly and leave nothing half-written; unreadable images are reported, not fatal.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, requires_sign_digits, requires_weights, tiny_sign_digits_config

pytestmark = [requires_sign_digits, requires_weights]
TOL = 1e-5


def cli(*args, check=True) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One training run for the whole module, plus its test images and the best params."""
  import jax
  from flaxtl import checkpointing, input_pipeline, splitting, train
  from flaxtl.prepare import prepare
  tmp = tmp_path_factory.mktemp("evx")
  config = tiny_sign_digits_config(tmp, per_class=3, image_size=32)  # 30 images per split
  # Only the head learns (block5 steps cost minutes on a loaded CPU); the checkpoint, evaluation
  # and export still carry and run the whole VGG16.
  config.trainable, config.optimizer.learning_rate = "head", 3e-3
  workdir = tmp / "run"
  setup = prepare(config, workdir, log_fn=lambda *a: None)
  results = train.train_and_evaluate(config, workdir, setup=setup, log_fn=lambda *a: None)
  mngr = checkpointing.manager(workdir, read_only=True)
  best = checkpointing.best_step(mngr)
  state = checkpointing.restore(mngr, best, results["state"])  # the trainer's own restore
  mngr.close()
  test = splitting.load_splits(config.data, config.seed, workdir)["test"]
  images, bad = input_pipeline.decode_images(test.paths, config.data.image_size)
  assert not bad and len(images) == len(test) > 0
  return SimpleNamespace(config=config, workdir=workdir, setup=setup, results=results, best=best,
                         params=jax.device_get(state.params), state=state, test=test,
                         images=images, tmp=tmp)


def reference_proba(run) -> np.ndarray:
  """The model applied independently: numpy preprocessing + model.apply."""
  import jax
  from flaxtl.preprocessing import preprocess
  x = preprocess(run.images.astype(np.float32), run.setup.preprocessing)
  logits = run.setup.model.apply({"params": run.params}, x)
  return np.asarray(jax.nn.softmax(logits.astype(np.float32), -1))


def test_bundle_and_saved_model_match_training_model(run, tmp_path):
  import jax
  import tensorflow as tf
  import flaxtl
  from flaxtl import evaluate, export, inference
  ref = reference_proba(run)

  # The trainer's own forward pass (from cached block4_pool features) with the best params.
  out = evaluate.evaluate_split(run.setup.network.logits, run.state.eval_variables,
                                run.setup.feeders["test"], 16)
  assert out["correct"] == run.results["test_correct"]
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(out["logits"], -1)), ref, rtol=0, atol=TOL)

  pred = inference.load(run.workdir)
  assert pred.step == run.best
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), pred.params,
               run.params)
  np.testing.assert_allclose(pred.predict_proba(run.images), ref, rtol=0, atol=TOL)

  out_dir = export.export(run.workdir, tmp_path / "bundle", log_fn=lambda *a: None)
  doc = json.loads((out_dir / "bundle.json").read_text())
  assert doc["source"]["step"] == run.best and doc["image_size"] == 32
  assert doc["preprocessing"] == run.setup.preprocessing == "torch"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dir left
  bundle = flaxtl.load_exported(out_dir)
  assert bundle.class_names == run.setup.class_names
  # The same files decoded at full size (uint8, and float for half of them) go through the
  # training-time resize inside `predict`: the same probabilities.
  raw = [tf.io.decode_image(tf.io.read_file(p), channels=3).numpy() for p in run.test.paths]
  assert raw[0].shape[:2] == (100, 100)
  raw = [a.astype(np.float32) if i % 2 else a for i, a in enumerate(raw)]
  np.testing.assert_allclose(bundle.predict(raw), ref, rtol=0, atol=TOL)

  # The SavedModel in a fresh process where JAX, Flax and flaxtl cannot even be imported.
  np.save(tmp_path / "images.npy", run.images)
  script = f"""
import sys
for m in ("jax", "jaxlib", "flax", "flaxtl"):
  sys.modules[m] = None
import numpy as np, tensorflow as tf
m = tf.saved_model.load({str(out_dir / 'saved_model')!r})
f = m.signatures["serving_default"]
out = f(images=tf.constant(np.load({str(tmp_path / 'images.npy')!r})))
np.save({str(tmp_path / 'sm.npy')!r}, out["probabilities"].numpy())
print([c.decode() for c in m.class_names.numpy()])
"""
  proc = cli("-c", script)
  assert eval(proc.stdout.strip().splitlines()[-1]) == run.setup.class_names
  np.testing.assert_allclose(np.load(tmp_path / "sm.npy"), ref, rtol=0, atol=TOL)


def test_evaluate_accuracy_equals_predict_count(run, tmp_path):
  from PIL import Image
  from flaxtl import inference, predict
  broken = tmp_path / "broken.JPG"
  broken.write_bytes(b"this is not an image")
  proc = cli("-m", "flaxtl.evaluate", "--workdir", str(run.workdir), "--split", "test")
  assert "confusion matrix" in proc.stdout and "most confused" in proc.stdout
  doc = json.loads((run.workdir / "eval_test.json").read_text())
  n = len(run.test)
  assert doc["num_images"] == n and doc["step"] == run.best
  assert sum(m["support"] for m in doc["per_class"].values()) == n
  assert np.asarray(doc["confusion_matrix"]["matrix"]).sum() == n
  assert doc["correct"] == run.results["test_correct"]
  assert 0 <= doc["accuracy"] <= doc["top5_accuracy"] <= 1
  losses = [r["loss"] for r in doc["top_losses"]]
  assert losses == sorted(losses, reverse=True) and len(losses) == 12

  proc = cli("-m", "flaxtl.predict", "--workdir", str(run.workdir), "--json", "--top-k", "3",
             *run.test.paths, str(broken))
  assert "broken.JPG" in proc.stderr
  out = json.loads(proc.stdout)
  assert [e["path"] for e in out["errors"]] == [str(broken)]
  assert [r["path"] for r in out["predictions"]] == run.test.paths
  assert all(len(r["top_k"]) == 3 for r in out["predictions"])
  correct = sum(r["top_k"][0]["class"] == Path(r["path"]).parent.name for r in out["predictions"])
  assert correct == doc["correct"] and correct / n == pytest.approx(doc["accuracy"], abs=1e-12)

  # Only unreadable input: reported, no crash, nothing predicted.
  rows, errors = predict.predict_files(inference.load(run.workdir), [str(broken)])
  assert rows == [] and str(broken) in errors

  for name in ("confusion_test.png", "top_losses_test.png", "learning_curves.png"):
    path = run.workdir / name
    assert path.stat().st_size > 0
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.format == "PNG" and min(im.size) >= 200
      assert np.asarray(im.convert("L")).std() > 5  # something was drawn


# When one array fails to read, orbax closes its event loop while tensorstore still finishes
# the other reads; their callbacks then hit the closed loop (noise only, after our error).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_export_failures_leave_nothing(run, tmp_path):
  from flaxtl import export
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="not an empty directory"):
    export.export(run.workdir, occupied, saved_model=False)
  assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
  assert (occupied / "keep.txt").read_text() == "mine"

  def copy(name):
    return Path(shutil.copytree(run.workdir, tmp_path / name, ignore=shutil.ignore_patterns(
        "tensorboard", "*.png")))

  corrupt = copy("corrupt")
  # The array data (not the tree metadata): truncated, as a full disk or a killed copy leaves it.
  data_files = [p for p in (corrupt / "checkpoints" / str(run.best)).glob("default/ocdbt.*/d/*")]
  assert data_files
  for p in data_files:
    p.write_bytes(p.read_bytes()[:100])
  with pytest.raises(export.ExportError, match=rf"checkpoints/{run.best}: params could not"):
    export.export(corrupt, tmp_path / "out_corrupt", saved_model=False)

  wrong = copy("wrong")
  info = json.loads((wrong / "run.json").read_text())
  info.update(num_classes=5, class_names=info["class_names"][:5])
  (wrong / "run.json").write_text(json.dumps(info))
  with pytest.raises(export.ExportError, match=r"run.json\): parameter .*predictions"):
    export.export(wrong, tmp_path / "out_wrong", saved_model=False)

  missing = copy("missing")
  (missing / "run.json").unlink()
  proc = cli("-m", "flaxtl.export", "--workdir", str(missing), "--out",
             str(tmp_path / "out_missing"), check=False)
  assert proc.returncode == 1
  assert f"error: cannot export {missing}: {missing / 'run.json'}: missing" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "missing", "occupied", "wrong"]


def test_relative_workdir_loads_the_same_model(run, monkeypatch):
  """`--workdir runs/X` is relative: orbax must still find the checkpoint (it did not, once)."""
  import jax
  from flaxtl import inference
  workdir = Path(run.workdir).resolve()
  monkeypatch.chdir(workdir.parent)
  relative = inference.load(workdir.name)
  absolute = inference.load(workdir)
  for a, b in zip(jax.tree.leaves(relative.params), jax.tree.leaves(absolute.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Test-time augmentation (issue 16): the views' probabilities averaged, in the jitted forward.

def test_tta_flip_averages_the_image_and_its_mirror_image(run):
  import flaxtl
  from flaxtl import inference
  pred = inference.load(run.workdir)
  # A mirror-symmetric copy of each image (left half mirrored onto the right): flipping it changes
  # nothing, so averaging over the flip must give the plain prediction.
  sym = run.images.copy()
  sym[:, :, 16:] = sym[:, :, :16][:, :, ::-1]
  assert np.array_equal(sym[:, :, ::-1], sym)
  np.testing.assert_allclose(pred.predict_proba(sym, tta="flip"), pred.predict_proba(sym),
                             rtol=0, atol=1e-6)

  # Real images: the mean of the plain probabilities of each image and of its mirror image made
  # by numpy, each computed without TTA.
  plain = pred.predict_proba(run.images)
  mirrored = pred.predict_proba(run.images[:, :, ::-1])
  flip = pred.predict_proba(run.images, tta="flip")
  assert np.abs(flip - plain).max() > 1e-3  # not a no-op on these images
  np.testing.assert_allclose(flip, (plain + mirrored) / 2, rtol=0, atol=TOL)
  # The logits are the log of that mean (what evaluate's loss and accuracy read).
  np.testing.assert_allclose(np.exp(pred.predict_logits(run.images, tta="flip")),
                             (plain + mirrored) / 2, rtol=0, atol=TOL)
  # A predictor loaded with a TTA uses it by default (the API passes it through).
  loaded = flaxtl.load(run.workdir, tta="flip")
  assert loaded.tta == "flip"
  np.testing.assert_allclose(loaded.predict_proba(run.images), flip, rtol=0, atol=1e-7)


def test_tta_flip_crops_averages_six_views(run):
  """flip_crops: the image, its mirror image and its four 28 px corner crops resized back to 32 px;
  here the crops are cut by numpy and resized by TensorFlow (bilinear), each view predicted
  without TTA."""
  import tensorflow as tf
  from flaxtl import inference
  pred = inference.load(run.workdir)
  x = run.images[:8].astype(np.float32)
  c = 28
  assert round(32 * inference.CROP) == c
  crops = [tf.image.resize(x[:, i:i + c, j:j + c], (32, 32), "bilinear").numpy()
           for i in (0, 32 - c) for j in (0, 32 - c)]
  views = [x, x[:, :, ::-1], *crops]
  expected = np.mean([pred.predict_proba(v) for v in views], axis=0)
  got = pred.predict_proba(run.images[:8], tta="flip_crops")
  assert np.abs(got - pred.predict_proba(run.images[:8], tta="flip")).max() > 1e-3
  np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_evaluate_and_predict_with_tta_flip(run):
  from flaxtl import inference, input_pipeline, splitting
  valid = splitting.load_splits(run.config.data, run.config.seed, run.workdir)["valid"]
  images, bad = input_pipeline.decode_images(valid.paths, run.config.data.image_size)
  assert not bad
  ref = inference.load(run.workdir).predict_proba(images, tta="flip")
  labels = np.asarray(valid.labels)

  proc = cli("-m", "flaxtl.evaluate", "--workdir", str(run.workdir), "--split", "valid",
             "--tta", "flip")
  assert "valid split, step" in proc.stdout and "test-time augmentation flip" in proc.stdout
  doc = json.loads((run.workdir / "eval_valid.json").read_text())
  assert doc["tta"] == "flip" and doc["num_images"] == len(valid)
  assert doc["correct"] == int((ref.argmax(1) == labels).sum())
  assert doc["accuracy"] == pytest.approx(doc["correct"] / len(valid), abs=1e-12)
  assert doc["loss"] == pytest.approx(-np.log(ref[np.arange(len(labels)), labels]).mean(),
                                      abs=1e-5)

  proc = cli("-m", "flaxtl.predict", "--workdir", str(run.workdir), "--json", "--top-k", "1",
             "--tta", "flip", *valid.paths)
  out = json.loads(proc.stdout)
  assert out["tta"] == "flip" and [r["path"] for r in out["predictions"]] == valid.paths
  top = [(run.setup.class_names.index(r["top_k"][0]["class"]), r["top_k"][0]["probability"])
         for r in out["predictions"]]
  assert [k for k, _ in top] == list(ref.argmax(1))
  np.testing.assert_allclose([p for _, p in top], ref.max(1), rtol=0, atol=TOL)


def test_export_with_tta_flip_bakes_it_into_the_saved_model(run, tmp_path):
  import tensorflow as tf
  import flaxtl
  from flaxtl import export, inference
  ref = inference.load(run.workdir, tta="flip").predict_proba(run.images)
  out = export.export(run.workdir, tmp_path / "bundle", tta="flip", log_fn=lambda *a: None)
  assert json.loads((out / "bundle.json").read_text())["tta"] == "flip"
  bundle = flaxtl.load_exported(out)
  assert bundle.tta == "flip"
  np.testing.assert_allclose(bundle.predict_proba(run.images), ref, rtol=0, atol=TOL)
  served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
  got = served(images=tf.constant(run.images))["probabilities"].numpy()
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
  plain = inference.load(run.workdir).predict_proba(run.images)
  assert np.abs(got - plain).max() > 1e-3  # the averaging is in the exported function


def test_unknown_tta_is_a_plain_error_listing_the_valid_ones(run, tmp_path):
  from flaxtl import inference
  with pytest.raises(inference.InferenceError, match=r"unknown test-time augmentation 'mirror' "
                                                     r"\(valid: none, flip, flip_crops\)"):
    inference.load(run.workdir).predict_proba(run.images[:1], tta="mirror")
  image = run.test.paths[0]
  for verb, extra in (("evaluate", []), ("predict", [image]),
                      ("export", ["--out", str(tmp_path / "out")])):
    proc = cli("-m", f"flaxtl.{verb}", "--workdir", str(run.workdir), "--tta", "mirror", *extra,
               check=False)
    assert proc.returncode == 1, (verb, proc.stderr[-2000:])
    assert ("error: " in proc.stderr and "unknown test-time augmentation 'mirror' (valid: none, "
            "flip, flip_crops)" in proc.stderr), (verb, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()
