"""Issue 14: every mistake a user makes gets a clear message, and no run ever reports a wrong
result.

One test (or a few) per numbered case of the issue. Each checks the message or the corrected
behaviour, and that nothing already written (checkpoints, split.json, caches, exports) changed or
was left half-written. Everything runs on generated images (32 px) with the small CNN, or VGG16
with random weights; nothing from ../shared is needed. The CLI cases run as subprocesses, all at
once (one fixture), since the CLI itself is what they test. The multi-process preemption test is
tests/test_preempt_multiprocess.py.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, generated_config, make_class_folders, write_labels_csv
from flaxtl import (checkpointing, data, evaluate, export, inference, input_pipeline, predict,
                    progress, splitting, sweep, train)
from flaxtl.errors import ConfigError, FlaxtlError
from flaxtl.workdir import RunError


def quiet(*args, **kwargs):
  pass


def snapshot(folder: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder` (what 'nothing changed' compares)."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def config_for(tmp: Path, root: Path, model: str = "small_cnn", **over):
  """generated_config with dotted overrides ('data.image_size': 48)."""
  return generated_config(tmp, root, model, **{"epochs": 1, **over})


# The dataset mistakes are tested on class folders and on the same images listed in a labels CSV.
LAYOUTS = ("class_folders", "csv")


def in_layout(config, layout: str):
  """`config` (on generated class folders) reading the same images in `layout`; for csv, the
  folders are listed in root/labels.csv (call it again after changing them: `relist`)."""
  if layout == "csv":
    write_labels_csv(Path(config.data.root))
    config.data.layout = "csv"
  return config


def relist(config) -> None:
  """What a CSV user does after changing the image folders: the CSV lists them again."""
  if config.data.layout == "csv":
    write_labels_csv(Path(config.data.root))


def no_decoding(monkeypatch):
  monkeypatch.setattr(input_pipeline, "decode_images",
                      lambda *a, **k: pytest.fail("images decoded before the mistake was found"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Generated class folders (3 classes x 10, 32 px) and one finished small-CNN run on them."""
  tmp = tmp_path_factory.mktemp("mistakes")
  root = make_class_folders(tmp / "data", per_class=10, size=32)
  config = config_for(tmp, root)
  res = train.train_and_evaluate(config, tmp / "run", log_fn=quiet)
  import jax
  params = jax.tree.map(np.asarray, jax.device_get(res["state"].params))
  return {"tmp": tmp, "root": root, "config": config, "run": tmp / "run", "params": params,
          "results": res}


@pytest.fixture(scope="module")
def vgg_file(world):
  """VGG16's convolutions, He-random, as a flaxtl weights file: shapes from jax.eval_shape (no
  init computed: conftest.random_vgg16_file's eager init takes seconds)."""
  import jax
  import jax.numpy as jnp
  from flaxtl import weights
  from flaxtl.models import VGG16
  shapes = jax.eval_shape(lambda x: VGG16(include_top=False, num_classes=None).init(
      jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  rng = np.random.default_rng(7)
  params = {name: {"kernel": rng.standard_normal(p["kernel"].shape, np.float32)
                   * np.float32(np.sqrt(2 / np.prod(p["kernel"].shape[:-1]))),
                   "bias": np.zeros(p["bias"].shape, np.float32)} for name, p in shapes.items()}
  return weights.save(params, {"preprocessing": "caffe", "source": "random (test)"},
                      world["tmp"] / "vgg16_random.msgpack")


# ---------------------------------------------------------------------------------------------
# The CLI cases: four subprocesses at once, then one test each.

CLI_CASES = {
    "stray": ["--config", "sign_digits", "--workdir", "{tmp}/stray_run", "extra_arg"],
    "misspelt_group": ["--config", "sign_digits", "--workdir", "{tmp}/misspelt_run",
                       "--config.optimiser.learning_rate=0.1"],
    "old_import": ["--config", "my.py", "--workdir", "{tmp}/import_run"],
    "help": ["--help"],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  (tmp / "my.py").write_text("from configs import default\n\n"
                             "def get_config():\n  return default.get_config()\n")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  procs = {name: subprocess.Popen(
      [sys.executable, "-m", "flaxtl.train", *[a.format(tmp=tmp) for a in args]], cwd=tmp,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name, args in CLI_CASES.items()}
  out = {"tmp": tmp}
  try:
    for name, p in procs.items():
      stdout, stderr = p.communicate(timeout=180)
      out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


def assert_plain_error(r, *words):
  assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("error: "), r.stderr[-2000:]
  for w in words:
    assert w in line, line


# ---------------------------------------------------------------------------------------------
# 1. A sweep on class folders, interrupted, then run again.

def test_interrupted_sweep_reuses_the_finished_level_and_completes(world, vgg_file, monkeypatch):
  tmp, root = world["tmp"], world["root"]
  config = config_for(tmp, root, "vgg16")
  out, real = tmp / "sweep", train.train_and_evaluate

  def interrupted(cfg, run_dir, **kwargs):
    if cfg.trainable == "block5":
      raise KeyboardInterrupt  # Ctrl-C as the second level starts training
    return real(cfg, run_dir, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(config, out, ["head", "block5"], log_fn=quiet)
  assert (out / "head" / "sweep_run.json").exists()
  assert not (out / "block5" / "sweep_run.json").exists() and not (out / "sweep.json").exists()
  head_files = snapshot(out / "head")
  monkeypatch.setattr(train, "train_and_evaluate", real)
  logs = []
  doc = sweep.sweep(config, out, ["head", "block5"], log_fn=logs.append)
  reused = [m for m in logs if "already done" in m]
  assert len(reused) == 1 and "head" in reused[0]
  assert [r["level"] for r in doc["rows"]] == ["head", "block5"]
  assert doc["recommendation"]["test"]["test_count"] == 3 * 2  # 15% of 10 images per class
  assert (out / "sweep.json").exists() and (out / "block5" / "sweep_run.json").exists()
  assert snapshot(out / "head") == head_files  # the finished level was not touched
  assert (json.loads((out / "head" / "split.json").read_text())["splits"]
          == json.loads((out / "block5" / "split.json").read_text())["splits"])


# ---------------------------------------------------------------------------------------------
# 2. --resume with a changed config; --resume where there is nothing to resume.

def test_resume_refuses_a_changed_config_naming_the_field_and_changes_nothing(world, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(world["run"], run)
  before = snapshot(run)
  for field, value in (("data.image_size", 48), ("trainable", "regex:fc1|predictions")):
    c = copy.deepcopy(world["config"])
    c.update_from_flattened_dict({field: value})
    with pytest.raises(checkpointing.CheckpointError, match="--resume with a changed config") as e:
      train.train_and_evaluate(c, run, resume=True, log_fn=quiet)
    assert field in str(e.value) and "start a new --workdir" in str(e.value)
    assert snapshot(run) == before, field

  # More epochs: accepted, and the run goes on from where it stopped.
  c = copy.deepcopy(world["config"])
  c.epochs = 2
  logs = []
  res = train.train_and_evaluate(c, run, resume=True, log_fn=logs.append)
  assert any("resumed from step 3" in m for m in logs)
  history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  first = [json.loads(l) for l in (world["run"] / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in history] == [3, 6] and history[0] == first[0]
  assert res["best_step"] in (3, 6)


def test_resume_with_nothing_to_resume(world, tmp_path):
  config = world["config"]
  with pytest.raises(RunError, match="does not exist"):
    train.train_and_evaluate(config, tmp_path / "nowhere", resume=True, log_fn=quiet)
  assert not (tmp_path / "nowhere").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(RunError, match="holds no run to resume"):
    train.train_and_evaluate(config, tmp_path / "empty", resume=True, log_fn=quiet)
  assert list((tmp_path / "empty").iterdir()) == []


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(world, tmp_path):
  """config.json is written as training starts; a kill before (or during) the first save leaves
  no step: --resume starts again from step 0 and ends as the uninterrupted run did."""
  import jax
  run = tmp_path / "killed"
  (run / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)  # a cut save
  for name in ("config.json", "split.json"):
    shutil.copyfile(world["run"] / name, run / name)
  logs = []
  res = train.train_and_evaluate(world["config"], run, resume=True, log_fn=logs.append)
  assert any("resumed from step 0" in m for m in logs)
  assert res["best_step"] == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(res["state"].params),
               world["params"])


# ---------------------------------------------------------------------------------------------
# 3. A stale split.json.

@pytest.mark.parametrize("layout", LAYOUTS)
def test_stale_split_is_redone_before_training_and_refused_after(tmp_path, caplog, layout):
  root = make_class_folders(tmp_path / "data", per_class=8, size=32)
  jpeg = (root / "circle" / "circle_00.jpg").read_bytes()
  sos = jpeg.index(b"\xff\xda")  # cut in the middle of the pixels: the header reads fine
  (root / "circle" / "truncated.jpg").write_bytes(jpeg[:sos + (len(jpeg) - sos) // 2])
  (root / "square" / "empty.jpg").write_bytes(b"")  # found by the header scan
  config = in_layout(config_for(tmp_path, root, **{"data.on_bad_image": "error"}), layout)
  work = tmp_path / "run"
  with pytest.raises(data.DataError, match=r"2 unusable image file\(s\)") as e:
    train.train_and_evaluate(config, work, log_fn=quiet)
  assert "truncated.jpg" in str(e.value) and "empty.jpg" in str(e.value)
  assert (work / "split.json").exists() and not (work / "checkpoints").exists()

  # The user deletes the bad files and runs the same call again: it trains.
  (root / "circle" / "truncated.jpg").unlink()
  (root / "square" / "empty.jpg").unlink()
  if layout == "csv":  # still listed: each missing file named with its line, nothing trained
    with pytest.raises(data.DataError, match=r"labels.csv: 2 listed file\(s\) not found") as e:
      train.train_and_evaluate(config, work, log_fn=quiet)
    assert re.search(r"line \d+: circle/truncated.jpg", str(e.value)), str(e.value)
    assert re.search(r"line \d+: square/empty.jpg", str(e.value)), str(e.value)
    assert not (work / "checkpoints").exists()
    relist(config)
  with caplog.at_level(logging.INFO, logger="flaxtl"):
    res = train.train_and_evaluate(config, work, log_fn=quiet)
  assert res["num_skipped"] == 0 and res["best_step"] == 3
  said = [r.getMessage() for r in caplog.records if "splitting again" in r.getMessage()]
  assert len(said) == 1 and "circle/truncated.jpg" in said[0] and "listed but missing" in said[0]
  listed = {p for rows in json.loads((work / "split.json").read_text())["splits"].values()
            for p, _ in rows}
  assert len(listed) == 24 and not any("truncated" in p or "empty" in p for p in listed)

  # Once checkpoints exist, a changed folder is refused: they were trained on the old split.
  before = snapshot(work)
  shutil.copyfile(root / "square" / "square_03.png", root / "square" / "new_one.png")
  (root / "stripes" / "stripes_01.png").unlink()
  relist(config)
  for call in (lambda: splitting.load_splits(config.data, config.seed, work),
               lambda: evaluate.evaluate(work, "test", write=False, log_fn=quiet),
               lambda: train.train_and_evaluate(config, work, resume=True, log_fn=quiet)):
    with pytest.raises(data.DataError, match="no longer matches") as e:
      call()
    msg = str(e.value)
    assert "square/new_one.png" in msg and "stripes/stripes_01.png" in msg
    assert "start a new --workdir" in msg
  assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------
# 4-6. Mistakes that used to exit 0 with nothing, or with a traceback: stopped before any data.

@pytest.mark.parametrize("model,over,error,words", [
    ("small_cnn", {"epochs": -1}, ConfigError, "config.epochs=-1"),
    ("small_cnn", {"batch_size": 0}, ConfigError, "config.batch_size=0"),
    ("small_cnn", {"trainable": "regex:["}, ConfigError, "regex:["),
    ("small_cnn", {"optimizer.name": "adamx"}, ConfigError, "adamx"),
    ("vgg16", {"data.image_size": 16}, ConfigError, "config.data.image_size=16"),
    ("vgg16", {"data.image_size": 31}, ConfigError, "config.data.image_size=31"),
    ("vgg16", {"probe_shots": (1, 0)}, ConfigError, "config.probe_shots=(1, 0)"),
    ("small_cnn", {"class_weight": "auto"}, ConfigError,
     "config.class_weight='auto': 'none' or 'balanced'"),
    ("small_cnn", {"data.sampler": "oversample"}, ConfigError,
     "config.data.sampler='oversample': 'shuffle' or 'balanced'"),
    ("small_cnn", {"select_best_by": "f1"}, ConfigError,
     "config.select_best_by='f1': 'accuracy' or 'macro_f1'"),
    ("vgg16", {"feature_engine": "onednn"}, ConfigError, "config.feature_engine='onednn'"),
    ("small_cnn", {"feature_engine": "tf"}, ConfigError, "config.feature_engine='tf'"),
    ("vgg16", {"feature_engine": "winograd", "model.dtype": "bfloat16"}, ConfigError,
     "config.feature_engine='winograd': VGG16 in float32 only"),
], ids=["epochs=-1", "batch_size=0", "bad_regex", "adamx", "vgg16_at_16px", "vgg16_at_31px",
        "probe_shots=0", "class_weight=auto", "sampler=oversample", "select_best_by=f1",
        "feature_engine=onednn", "tf_engine_for_small_cnn",
        "winograd_in_bf16"])
def test_config_mistakes_stop_before_any_data_is_read(world, tmp_path, monkeypatch, model, over,
                                                      error, words):
  no_decoding(monkeypatch)
  monkeypatch.setattr(splitting, "load_splits", lambda *a, **k: pytest.fail("data read first"))
  config = config_for(tmp_path, world["root"], model, **over)
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, tmp_path / "run", log_fn=quiet)
  assert words in str(e.value)
  assert not (tmp_path / "run").exists()  # not even an empty workdir


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_class_is_refused_naming_the_root(world, tmp_path, monkeypatch, layout):
  root = tmp_path / "one_class"
  shutil.copytree(world["root"] / "circle", root / "circle")
  no_decoding(monkeypatch)
  config = in_layout(config_for(tmp_path, root), layout)
  with pytest.raises(data.DataError, match="needs at least 2 classes") as e:
    train.train_and_evaluate(config, tmp_path / "run", log_fn=quiet)
  assert str(root.resolve() / ("labels.csv" if layout == "csv" else "")) in str(e.value)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_stray_argument(cli):
  assert_plain_error(cli["stray"], "unexpected arguments: extra_arg")
  assert not (cli["tmp"] / "stray_run").exists()


def test_cli_misspelt_config_group(cli):
  assert_plain_error(cli["misspelt_group"], "optimiser", 'Did you mean "optimizer"')
  assert not (cli["tmp"] / "misspelt_run").exists()


def test_cli_config_with_the_old_import(cli):
  assert_plain_error(cli["old_import"], "No module named 'configs'",
                     "from flaxtl.configs import default")


# ---------------------------------------------------------------------------------------------
# 7. Files dropped without a word.

def _rgb(seed: int, size: int = 36) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def test_webp_and_tiff_are_read_like_png(tmp_path):
  a, b = _rgb(1), _rgb(2)
  folder = tmp_path / "data" / "x"
  folder.mkdir(parents=True)
  Image.fromarray(a).save(folder / "a.png")
  Image.fromarray(a).save(folder / "a.webp", lossless=True)
  Image.fromarray(a).save(folder / "a.TIFF")
  Image.fromarray(a).save(folder / "a_deflate.tif", compression="tiff_deflate")
  Image.fromarray(a).save(folder / "webp_inside.jpg", format="WEBP", lossless=True)
  Image.fromarray(b[..., 0]).save(folder / "gray.tif")
  Image.fromarray(b[..., 0]).save(folder / "gray.png")
  paths = data.list_classes(tmp_path / "data")["x"]
  names = [Path(p).name for p in paths]
  assert sorted(names) == sorted(["a.png", "a.webp", "a.TIFF", "a_deflate.tif", "webp_inside.jpg",
                                  "gray.tif", "gray.png"])
  assert sorted(predict.find_images([str(folder)])[0]) == paths  # predict reads the same files
  images, bad = input_pipeline.decode_images(paths, 24)
  assert not bad and images.shape == (7, 24, 24, 3)
  by = dict(zip(names, images))
  for name in ("a.webp", "a.TIFF", "a_deflate.tif", "webp_inside.jpg"):
    np.testing.assert_array_equal(by[name], by["a.png"], err_msg=name)
  np.testing.assert_array_equal(by["gray.tif"], by["gray.png"])


def test_images_in_sub_folders_are_read_by_train_evaluate_and_predict(tmp_path, caplog):
  root = tmp_path / "data"
  for c in ("a", "b"):
    (root / c / "more" / "deeper").mkdir(parents=True)
    (root / c / ".ipynb_checkpoints").mkdir()
    Image.fromarray(_rgb(3)).save(root / c / "top.png")
    Image.fromarray(_rgb(4)).save(root / c / "more" / "sub.jpg")
    Image.fromarray(_rgb(5)).save(root / c / "more" / "deeper" / "subsub.png")
    Image.fromarray(_rgb(6)).save(root / c / ".ipynb_checkpoints" / "hidden.png")
  with caplog.at_level(logging.INFO, logger="flaxtl"):
    classes = data.list_classes(root)
  assert {c: [os.path.relpath(p, root / c) for p in f] for c, f in classes.items()} == {
      c: ["more/deeper/subsub.png", "more/sub.jpg", "top.png"] for c in ("a", "b")}
  assert "4 image(s) in sub-folders" in caplog.text
  found, errors = predict.find_images([str(root / "a")])
  assert found == classes["a"] and not errors
  # split_folders (what evaluate re-reads) lists the same way
  for split in data.SPLITS:
    shutil.copytree(root, tmp_path / "splits" / split)
  assert all(len(s) == 6 for s in data.split_folders(tmp_path / "splits").values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unreadable_files_never_take_a_valid_or_test_slot(world, tmp_path, caplog, layout):
  clean, dirty = tmp_path / "clean", tmp_path / "dirty"
  shutil.copytree(world["root"], clean)
  shutil.copytree(world["root"], dirty)
  bad = []
  for c in ("circle", "square", "stripes"):
    (dirty / c / "aaa_empty.jpg").write_bytes(b"")
    (dirty / c / "zzz_notes.png").write_text("not an image")
    bad += [str(dirty / c / "aaa_empty.jpg"), str(dirty / c / "zzz_notes.png")]
  cfg = in_layout(config_for(tmp_path, clean), layout)
  a = splitting.load_splits(cfg.data, cfg.seed)
  cfg.data.root = str(dirty)
  relist(cfg)
  b = splitting.load_splits(cfg.data, cfg.seed, tmp_path / "run")
  rel = lambda sp, r: [os.path.relpath(p, r) for p in sp.paths]  # noqa: E731
  for s in ("valid", "test"):  # the same stratified split as without the bad files
    assert rel(b[s], dirty) == rel(a[s], clean) and b[s].labels.tolist() == a[s].labels.tolist()
  extra = set(b["train"].paths) - {str(dirty / r) for r in rel(a["train"], clean)}
  assert sorted(extra) == sorted(bad)  # the bad files ride in train, where decoding reports them
  doc = json.loads((tmp_path / "run" / "split.json").read_text())
  assert sorted(p for p, _ in doc["unreadable"]) == sorted(os.path.relpath(p, dirty) for p in bad)
  # ... and the run still reports them, once, as before.
  from flaxtl.prepare import prepare
  with caplog.at_level(logging.WARNING, logger="flaxtl"):
    setup = prepare(cfg, tmp_path / "run", log_fn=quiet)
  assert sorted(setup.skipped) == sorted(bad)
  assert sum("skipping 6 unusable" in r.getMessage() for r in caplog.records) == 1
  assert [setup.feeders[s].n for s in data.SPLITS] == [len(a[s]) for s in data.SPLITS]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_per_class_caps_each_class_before_the_split(world, tmp_path, layout):
  root = shutil.copytree(world["root"], tmp_path / "data")
  cfg = in_layout(config_for(tmp_path, root, **{"data.max_per_class": 8}), layout)
  splits = splitting.load_splits(cfg.data, cfg.seed)
  for k in range(3):
    per_split = [int((splits[s].labels == k).sum()) for s in data.SPLITS]
    assert per_split == [6, 1, 1]  # 8 images of the class in all, split 70/15/15
  names = {Path(p).name for s in splits.values() for p in s.paths}
  assert {f"circle_{i:02d}.{'png' if i % 2 else 'jpg'}" for i in range(8)} <= names
  assert "circle_08.jpg" not in names
  if layout == "csv":
    return
  # split_folders keeps the cap per split
  for split in data.SPLITS:
    shutil.copytree(world["root"], tmp_path / "splits" / split)
  cfg.data.root, cfg.data.layout = str(tmp_path / "splits"), "split_folders"
  splits = splitting.load_splits(cfg.data, cfg.seed)
  assert [len(splits[s]) for s in data.SPLITS] == [24, 24, 24]


# ---------------------------------------------------------------------------------------------
# 8. What `predict` takes.

def test_predict_takes_every_documented_input(world, tmp_path):
  pred = inference.load(world["run"])
  png = world["root"] / "circle" / "circle_01.png"
  rgb = np.asarray(Image.open(png).convert("RGB"))
  p = pred.predict(rgb[None])
  assert p.shape == (1, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
  np.testing.assert_allclose(pred.predict(Image.open(png)), p, atol=1e-6)  # one PIL image
  np.testing.assert_allclose(pred.predict(str(png)), p, atol=1e-6)  # a path
  np.testing.assert_allclose(pred.predict(png), p, atol=1e-6)  # a Path
  np.testing.assert_allclose(pred.predict(rgb), p, atol=1e-6)  # one (H, W, 3) array
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
  np.testing.assert_allclose(pred.predict(rgba), p, atol=1e-6)  # alpha dropped
  gray = rgb[..., 1]
  np.testing.assert_allclose(pred.predict(gray), pred.predict(np.stack([gray] * 3, -1)), atol=1e-6)
  batch = np.stack([_rgb(i, 40) for i in range(5)])  # uint8 batch, another size
  pb = pred.predict(batch)
  assert pb.shape == (5, 3)
  np.testing.assert_allclose(pred.predict(batch[2]), pb[2:3], atol=1e-6)
  np.testing.assert_allclose(pred.predict(batch.astype(np.float32)), pb, atol=1e-6)  # float 0-255
  with pytest.raises(inference.InferenceError, match=r"\[0, 1\].*0-255"):
    pred.predict(batch.astype(np.float32) / 255)
  with pytest.raises(inference.InferenceError, match="shape"):
    pred.predict(np.zeros((2, 3, 8, 8, 3), np.uint8))
  # The exported bundle takes the same inputs and gives the same answers.
  import flaxtl
  out = export.export(world["run"], tmp_path / "bundle", saved_model=False, log_fn=quiet)
  bundle = flaxtl.load_exported(out)
  np.testing.assert_allclose(bundle.predict([str(png), Image.open(png), rgb]),
                             np.concatenate([p, p, p]), atol=1e-6)
  with pytest.raises(FlaxtlError, match=r"\[0, 1\]"):
    bundle.predict(rgb / 255.0)


# ---------------------------------------------------------------------------------------------
# 9. Smaller things.

def test_help_lists_config_and_workdir(cli):
  r = cli["help"]
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--config:" in r.stdout and "--workdir:" in r.stdout and "--resume:" in r.stdout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_root_that_is_a_file(world, tmp_path, monkeypatch, layout):
  (tmp_path / "images.zip").write_bytes(b"PK\x03\x04")
  no_decoding(monkeypatch)
  config = config_for(tmp_path, tmp_path / "images.zip", **{"data.layout": layout})
  with pytest.raises(data.DataError, match="images.zip is a file; it must be a folder of images"):
    train.train_and_evaluate(config, tmp_path / "run", log_fn=quiet)


def test_convert_vgg16_out_into_a_new_folder(vgg_file, tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("convert_vgg16",
                                                REPO / "scripts" / "convert_vgg16.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "new" / "folder" / "vgg16.msgpack"
  assert script.main([str(vgg_file), "--out", str(out)]) == 0, capsys.readouterr().err
  from flaxtl import weights
  params, meta = weights.load(out)
  assert meta["preprocessing"] == "caffe" and "block5_conv3" in params
  assert [p.name for p in out.parent.iterdir()] == ["vgg16.msgpack"]  # no temp file left


def test_report_shows_full_class_names():
  names = ["accordion_and_more", "b", "a_rather_long_class_name_indeed"]
  labels = np.array([0, 0, 1, 2, 2])
  logits = np.eye(3, dtype=np.float32)[[0, 2, 1, 2, 2]] * 3
  doc = evaluate.classification_metrics(labels, logits, names)
  doc.update(split="test", step=7, top_losses=evaluate.top_losses(
      [f"f{i}.png" for i in range(5)], labels, logits, names, 2))
  text = evaluate.format_report(doc)
  for i, name in enumerate(names):
    assert sum(name in line for line in text.splitlines()) >= 2, text  # table row + matrix row
    assert any(line.startswith(f"{i} {name}") for line in text.splitlines()), text
  header = next(l for l in text.splitlines() if l.split() == ["0", "1", "2"])
  assert header


def test_progress_lines_without_a_terminal(monkeypatch):
  clock = iter(range(0, 1000, 10))  # each call: 10 s later
  monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
  lines = []
  bar = progress.Progress(8, "epoch 1", lines.append, every_s=30, unit="step")
  for _ in range(8):
    bar.update()
  bar.close()
  assert bar.bar is None and len(lines) == 2  # at 30 s and 60 s; none for the last step
  assert lines[0].startswith("epoch 1: 3/8 step (") and "s left" in lines[0]
  lines.clear()
  bar = progress.Progress(3, "frozen trunk", lines.append, every_s=0)
  for _ in range(3):
    bar.update()
  assert len(lines) == 2


def test_progress_on_a_terminal_of_zero_columns(monkeypatch):
  """tqdm on a terminal that reports 0 columns draws a 1-character bar in an endless line of
  carriage returns (CI pseudo-terminals); Progress prints its log lines there instead."""
  import fcntl
  import pty
  import struct
  import termios
  master, slave = pty.openpty()
  tty = os.fdopen(os.dup(slave), "w")
  try:
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("COLUMNS", raising=False)
    lines = []
    bar = progress.Progress(3, "epoch 1", lines.append, every_s=0)
    assert bar.bar is None
    for _ in range(3):
      bar.update()
    assert len(lines) == 2
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    bar = progress.Progress(3, "epoch 1", lines.append, every_s=0)
    assert bar.bar is not None  # a real width: the tqdm bar
    bar.close()
    monkeypatch.setenv("COLUMNS", "0")
    assert progress.Progress(3, "epoch 1", lines.append).bar is None
  finally:
    monkeypatch.undo()
    tty.close()
    os.close(master)
    os.close(slave)
