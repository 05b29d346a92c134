"""Reliability (issue 6): bad input is reported not fatal, dataset mistakes stop a run before any
compute, preemption and kill -9 lose nothing and resume bit-exactly, non-finite losses stop a run
with the last good checkpoint kept, and nothing on disk is ever half-written.

Runs are tiny (32px, a few images per class) so the file stays within minutes on two shared cores.
The subprocess tests use the real CLI (`python -m flaxtl.train`) and real signals.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import (REPO, SIGN_DIGITS, requires_sign_digits, requires_weights,
                      tiny_sign_digits_config)
from flaxtl import checkpointing, data, features, input_pipeline, train, workdir
from flaxtl.prepare import prepare

pytestmark = requires_sign_digits
REAL = sorted((SIGN_DIGITS / "train" / "0").glob("*.JPG"))


def _put(path: Path, payload: bytes | str | Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(payload, Path):
    shutil.copyfile(payload, path)
  elif isinstance(payload, str):
    path.write_text(payload)
  else:
    path.write_bytes(payload)
  return path


def _bad_files(folder: Path) -> dict[str, str]:
  """One of each kind of unusable file: {name: words the skip reason must contain}."""
  jpeg = REAL[0].read_bytes()
  _put(folder / "empty.jpg", b"")
  _put(folder / "truncated.jpg", jpeg[:len(jpeg) // 2])
  _put(folder / "text.jpg", "name,label\nnot,an image\n")
  # (TIFF or WebP content, whatever the extension, is read: tests/test_mistakes.py.)
  # 10^8 pixels of one grey compress to ~100 KB; it must be refused from its header.
  Image.new("L", (10_000, 10_000), 128).save(folder / "huge.png")
  return {"empty.jpg": "empty", "truncated.jpg": "decode", "text.jpg": "not a readable image",
          "huge.png": "too large (10000x10000 > data.max_pixels"}


def _small_dataset(root: Path, classes=("0", "1"), n=(4, 2, 2)) -> Path:
  """root/{train,valid,test}/<class>/ with distinct real images (no file in two splits)."""
  for c in classes:
    files = sorted((SIGN_DIGITS / "train" / c).glob("*.JPG"))
    i = 0
    for split, k in zip(data.SPLITS, n):
      for f in files[i:i + k]:
        _put(root / split / c / f.name, f)
      i += k
  return root


def _config(tmp: Path, root: Path | None = None, **overrides):
  """The tiny sign-digits config; `overrides` are dotted names ('data__image_size' style)."""
  c = tiny_sign_digits_config(tmp, per_class=4)
  if root is not None:
    c.data.root, c.data.max_per_class = str(root), 0
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return c


SMALL_CNN = dict(model__name="small_cnn", trainable="all")


# ---------------------------------------------------------------------------------------------
# 1. Bad images: skipped with one warning and counted, or an error before training.

def test_decode_images_names_every_bad_file_and_scans_in_parallel(tmp_path, monkeypatch):
  expected = _bad_files(tmp_path)
  good = _put(tmp_path / "good.jpg", REAL[0])
  running, peak, lock = [0], [0], threading.Lock()
  real_check = input_pipeline.header_problem

  def slow_check(path, max_pixels):
    with lock:
      running[0] += 1
      peak[0] = max(peak[0], running[0])
    time.sleep(0.2)
    try:
      return real_check(path, max_pixels)
    finally:
      with lock:
        running[0] -= 1

  monkeypatch.setattr(input_pipeline, "header_problem", slow_check)
  paths = [str(good)] + [str(tmp_path / n) for n in expected]
  images, bad = input_pipeline.decode_images(paths, 32)  # default thread count, as prepare() calls it
  assert images.shape == (1, 32, 32, 3)
  assert sorted(Path(p).name for p in bad) == sorted(expected)
  for name, words in expected.items():
    assert words in bad[str(tmp_path / name)], (name, bad[str(tmp_path / name)])
  assert peak[0] >= 2, "the header scan ran one file at a time"


def test_header_refuses_a_huge_image_without_decoding_it(tmp_path, monkeypatch):
  Image.new("L", (10_000, 10_000), 0).save(tmp_path / "huge.png")
  monkeypatch.setattr(Image.Image, "load", lambda *a: pytest.fail("pixels were decoded"))
  assert "too large (10000x10000" in input_pipeline.header_problem(str(tmp_path / "huge.png"), 50_000_000)
  assert input_pipeline.header_problem(str(tmp_path / "huge.png"), 10**9) is None  # the limit is a setting


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
  root = _small_dataset(tmp_path_factory.mktemp("bad") / "data")
  expected = _bad_files(root / "train" / "0")
  _put(root / "valid" / "1" / "zero.png", b"")
  _put(root / "train" / "1" / "notes.txt", "not an image name: not listed, not reported")
  return root, {**expected, "zero.png": "empty"}


def test_bad_files_are_skipped_with_one_warning_and_counted(bad_dataset, tmp_path, caplog):
  root, expected = bad_dataset
  config = _config(tmp_path, root, epochs=1, batch_size=4, **SMALL_CNN)
  with caplog.at_level(logging.WARNING, logger="flaxtl"):
    results = train.train_and_evaluate(config, tmp_path / "run", log_fn=lambda *a: None)
  warnings = [r for r in caplog.records if "unusable" in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
  for name, words in expected.items():
    line = next(l for l in warnings[0].getMessage().splitlines() if name in l)
    assert words in line, line
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["num_skipped"] == len(expected) == 5
  assert sorted(Path(p).name for p in saved["skipped_files"]) == sorted(expected)
  assert results["test_count"] == 4 and json.loads(
      (tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 2  # 8 good train images / 4


def test_bad_files_are_an_error_before_training_when_asked(bad_dataset, tmp_path, monkeypatch):
  root, expected = bad_dataset
  config = _config(tmp_path, root, data__on_bad_image="error", **SMALL_CNN)
  monkeypatch.setattr(train, "create_train_state", lambda *a, **k: pytest.fail("trained"))
  with pytest.raises(data.DataError, match=r"5 unusable image file\(s\)") as e:
    train.train_and_evaluate(config, tmp_path / "run")
  for name in expected:
    assert name in str(e.value)
  assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# 2. Dataset mistakes: caught with a clear message before weights, model init or decoding.

@pytest.mark.parametrize("mistake,message", [
    ("empty_class", r"class folder .*train/2 holds no images"),
    ("missing_in_valid", r"valid: class folders differ from train/ \(missing: \['1'\]"),
    ("extra_in_test", r"test: class folders differ from train/ \(missing: -, not in train: \['7"),
    ("too_few_for_batch", r"train split has 8 usable images, fewer than batch_size=16"),
    ("test_overlaps_train", r"1 test image\(s\) are byte-identical to training images"),
])
def test_dataset_mistakes_fail_before_any_compute(tmp_path, monkeypatch, mistake, message):
  root = _small_dataset(tmp_path / "data")
  if mistake == "empty_class":
    (root / "train" / "2").mkdir()
  elif mistake == "missing_in_valid":
    shutil.rmtree(root / "valid" / "1")
  elif mistake == "extra_in_test":
    _put(root / "test" / "7" / "x.jpg", REAL[-1])
  elif mistake == "test_overlaps_train":
    _put(root / "test" / "1" / "renamed_copy.jpg", next((root / "train" / "0").iterdir()))
  config = _config(tmp_path, root, batch_size=16 if mistake == "too_few_for_batch" else 4)
  from flaxtl import prepare as prepare_mod, weights
  monkeypatch.setattr(weights, "for_config", lambda *a, **k: pytest.fail("weights before checks"))
  monkeypatch.setattr(prepare_mod, "init_variables", lambda *a, **k: pytest.fail("init before checks"))
  monkeypatch.setattr(input_pipeline, "decode_images", lambda *a, **k: pytest.fail("decoded first"))
  with pytest.raises(data.DataError, match=message):
    train.train_and_evaluate(config, tmp_path / "run")


def test_a_class_left_empty_by_bad_files_is_named(tmp_path):
  root = _small_dataset(tmp_path / "data")
  for f in (root / "train" / "1").iterdir():
    f.write_bytes(b"")
  config = _config(tmp_path, root, batch_size=2, **SMALL_CNN)
  with pytest.raises(data.DataError, match=r"split 'train' has no usable images of class\(es\) 1"):
    prepare(config)


# ---------------------------------------------------------------------------------------------
# 6. The workdir: unwritable or holding another run's checkpoints fails at start.

def test_unwritable_workdir_fails_before_data(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "prepare", lambda *a, **k: pytest.fail("prepared data first"))
  config = _config(tmp_path)
  (tmp_path / "file.txt").write_text("a regular file")
  with pytest.raises(train.RunError, match=r"workdir .*file.txt/run is not writable"):
    train.train_and_evaluate(config, tmp_path / "file.txt" / "run")
  if os.geteuid() != 0:  # root writes through permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(train.RunError, match="is not writable"):
      train.train_and_evaluate(config, locked / "run")


def test_existing_checkpoints_without_resume_are_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "prepare", lambda *a, **k: pytest.fail("prepared data first"))
  old = _put(tmp_path / "run" / "checkpoints" / "40" / "default" / "data", b"old run")
  _put(tmp_path / "run" / "metrics.jsonl", '{"epoch": 0}\n')
  with pytest.raises(train.RunError, match="pass --resume to continue it"):
    train.train_and_evaluate(_config(tmp_path), tmp_path / "run")
  assert old.read_bytes() == b"old run"
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"epoch": 0}\n'


def test_cli_unwritable_workdir_exits_nonzero_at_once(tmp_path):
  (tmp_path / "file.txt").write_text("a regular file")
  p = subprocess.run([sys.executable, "-m", "flaxtl.train", "--config", "sign_digits",
                      "--workdir", str(tmp_path / "file.txt" / "run")],
                     cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert p.returncode not in (0, 75)
  assert "not writable" in p.stderr and "feature pass" not in p.stdout, p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 7. Nothing written is ever half-written.

def test_feature_cache_truncated_or_corrupt_entry_is_detected_and_rebuilt(tmp_path, caplog):
  array = np.random.default_rng(0).normal(size=(50, 7, 7, 8)).astype(np.float32)
  npy = tmp_path / "k.npy"
  for damage in ("truncate", "flip_a_byte"):
    features.store(tmp_path, "k", array, {"note": "test"})
    raw = npy.read_bytes()
    npy.write_bytes(raw[:len(raw) // 2] if damage == "truncate"
                    else raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxtl"):
      assert features.load(tmp_path, "k") is None, damage  # the trainer then recomputes + stores
    assert "unreadable" in caplog.text and not npy.exists() and not (tmp_path / "k.json").exists()
  features.store(tmp_path, "k", array, {})
  assert np.array_equal(features.load(tmp_path, "k"), array)  # the rebuilt entry reads back


def test_writes_go_through_a_temp_file(tmp_path, monkeypatch):
  """If the final rename never happens (a kill), the previous files are intact, no partial file."""
  features.store(tmp_path, "k", np.ones((3, 2), np.float32), {})
  recorder = workdir.Recorder(tmp_path, None)
  recorder.epoch({"epoch": 0, "step": 1, "train_loss": 1.0})
  recorder.write_json("results.json", {"ok": 1})
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

  def killed(*a):
    raise KeyboardInterrupt("killed before the rename")

  monkeypatch.setattr(os, "replace", killed)
  for write in (lambda: features.store(tmp_path, "k", np.zeros((9, 9), np.float32), {}),
                lambda: recorder.epoch({"epoch": 1, "step": 2, "train_loss": 0.5}),
                lambda: recorder.write_json("results.json", {"ok": 2})):
    with pytest.raises(KeyboardInterrupt):
      write()
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before}
  assert after == before
  monkeypatch.undo()
  assert np.array_equal(features.load(tmp_path, "k"), np.ones((3, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# 4/5. Cached-features path, in process: mid-epoch stop + resume is bit-exact; NaN keeps the last
# good checkpoint.

def _final_params(workdir: Path) -> tuple[int, dict]:
  mngr = checkpointing.manager(workdir, read_only=True)
  step = mngr.latest_step()
  tree = ocp.StandardCheckpointer().restore(workdir.resolve() / "checkpoints" / f"{step}/default")
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def _assert_same_params(a: Path, b: Path):
  (sa, pa), (sb, pb) = _final_params(a), _final_params(b)
  assert sa == sb and pa.keys() == pb.keys()
  for k in pa:
    assert np.array_equal(pa[k], pb[k]), f"{k} differs after resume"


DETERMINISTIC = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _records(workdir: Path) -> list[dict]:
  return [{k: r[k] for k in DETERMINISTIC}
          for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def head_setup(tmp_path_factory):
  """VGG16 (ImageNet), only the head trains on cached avg_pool features: 10 steps an epoch."""
  tmp = tmp_path_factory.mktemp("head")
  config = _config(tmp, trainable="head", batch_size=2, eval_batch_size=20, epochs=2,
                   checkpoint_every_steps=3, log_every_steps=100, data__max_per_class=2)
  setup = prepare(config, log_fn=lambda *a: None)
  assert setup.network.start_after == "avg_pool"
  return config, setup, tmp


def _stop_at(step: int):
  """A stop_flag, True from its call number `step` on (counting from 0: the loop's arming call),
  i.e. after `step` steps of the run's first epoch; each epoch's end also calls it once."""
  calls = iter(range(10**6))
  return lambda: next(calls) >= step


@requires_weights
def test_cached_features_mid_epoch_preempt_and_resume_is_bit_exact(head_setup):
  config, setup, tmp = head_setup
  quiet = dict(log_fn=lambda *a: None, evaluate_test=False, setup=setup)
  train.train_and_evaluate(config, tmp / "ref", **quiet)
  stopped = []
  # Mid-epoch 1; at epoch 1's last step (-> after its record and save); mid-epoch 2 after resumes.
  for stop_after, resume in ((4, False), (6, True), (1, True)):
    with pytest.raises(train.Preempted) as e:
      train.train_and_evaluate(config, tmp / "run", resume=resume,
                                 stop_requested=_stop_at(stop_after), **quiet)
    step = e.value.step
    stopped.append(step)
    mngr = checkpointing.manager(tmp / "run", read_only=True)
    assert mngr.latest_step() == step
    if step % 10:  # mid-epoch: the current step (not a periodic every-3rd one), sums so far
      assert (step % 10) % 3 != 0
      assert checkpointing.custom(mngr, step)["train_sums"]["count"] == 2 * (step % 10)
    else:  # an epoch's end: validated, recorded, ranked for "best" like any epoch
      assert mngr.metrics(step) and _records(tmp / "run")[-1]["step"] == step
  assert stopped == [4, 10, 11]
  train.train_and_evaluate(config, tmp / "run", resume=True, **quiet)
  _assert_same_params(tmp / "ref", tmp / "run")
  assert _records(tmp / "run") == _records(tmp / "ref")  # resumed epochs' metrics are whole


@requires_weights
def test_a_stop_request_waits_for_one_step_not_a_queue(head_setup, monkeypatch):
  """Async dispatch lets the loop run log_every_steps (here 100) steps ahead of the device, and a
  stop request (a preemption notice: ~30 s) would wait for all of them. Each step must be
  dispatched only once the previous one has finished: its inputs are ready."""
  config, setup, tmp = head_setup
  real_factory, ready = train.jit_train_step, []

  def slow_factory(*args):
    real = real_factory(*args)

    @jax.jit
    def slow(state, metrics, batch, rng):  # the step plus ~3 GFLOP: a queue would form
      state, metrics = real(state, metrics, batch, rng)
      x = jax.lax.fori_loop(0, 30, lambda i, x: jnp.tanh(x @ x), jnp.full((384, 384), 1e-3))
      return state, {**metrics, "count": metrics["count"] + 0.0 * x[0, 0]}

    def step(state, metrics, batch, rng):
      ready.append(all(a.is_ready() for a in jax.tree.leaves(metrics)))
      return slow(state, metrics, batch, rng)
    return step

  monkeypatch.setattr(train, "jit_train_step", slow_factory)
  train.train_and_evaluate(config, tmp / "in_flight", log_fn=lambda *a: None, evaluate_test=False,
                           setup=setup)
  assert len(ready) == 20 and all(ready), ready


@requires_weights
def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(head_setup):
  config, setup, tmp = head_setup
  config = config.copy_and_resolve_references()
  # Warm-up from 0: step 0 changes nothing, so step 1 is a good checkpoint; then it blows up.
  config.optimizer.update(name="sgd", momentum=0.0, learning_rate=1e38, warmup_epochs=1.0)
  config.checkpoint_every_steps = 1
  setup = dataclasses.replace(setup, config=config)
  with pytest.raises(train.RunError, match=r"non-finite (loss|params) at step \d+") as e:
    train.train_and_evaluate(config, tmp / "nan", setup=setup, log_fn=lambda *a: None)
  bad_step = int(str(e.value).split("at step ")[1].split(":")[0])
  mngr = checkpointing.manager(tmp / "nan", read_only=True)
  kept = mngr.latest_step()
  assert kept is not None and kept <= bad_step, (kept, bad_step)
  assert f"last good checkpoint (step {kept}) is kept" in str(e.value)
  step, params = _final_params(tmp / "nan")
  assert all(np.isfinite(v).all() for v in params.values())


# ---------------------------------------------------------------------------------------------
# 3/4. The real CLI, real signals: SIGINT, SIGTERM -> exit 75 + checkpoint; kill -9 -> resume from
# the last complete checkpoint; the final params equal an uninterrupted run's bit for bit. Image
# path with augmentation (random crop + flip) and dropout: every random draw is f(seed, epoch,
# step), so a resume from any step replays exactly.

IMAGE_RUN = dict(model__name="small_cnn", trainable="all", data__image_size=32,
                 data__max_per_class=4, batch_size=2, eval_batch_size=40, epochs=3,
                 checkpoint_every_steps=3, log_every_steps=100, data__augment__flip=True,
                 data__augment__crop_min_scale=0.8)
STEPS_PER_EPOCH = 20


def _env(tmp: Path) -> dict:
  """Quiet TF; a compilation cache shared by the runs of one test (later runs skip XLA compiles)."""
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLAXTL_CACHE_DIR": str(tmp / "cache"),
          "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _steps(workdir: Path) -> list[int]:
  ckpt = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


class Run:
  """`python -m flaxtl.train` in the background, output to files (no pipe to fill up)."""

  def __init__(self, tmp: Path, workdir: Path, name: str, resume: bool):
    self.log = tmp / f"{name}.log"
    args = [sys.executable, "-m", "flaxtl.train", "--config", "sign_digits",
            "--workdir", str(workdir)] + [f"--config.{k.replace('__', '.')}={v}"
                                          for k, v in IMAGE_RUN.items()]
    self.workdir = workdir
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen(args + ["--resume"] * resume, cwd=REPO, env=_env(tmp),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

  def output(self) -> str:
    return self.log.read_text()

  def wait_for_step(self, at_least: int, timeout: float = 240) -> int:
    """Polls the checkpoint folder: a step dir appears only once its save has committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        pytest.fail(f"exited ({self.proc.returncode}) before step {at_least}:\n{self.output()}")
      steps = _steps(self.workdir)
      if steps and steps[-1] >= at_least:
        return steps[-1]
      time.sleep(0.01)
    self.proc.kill()
    pytest.fail(f"no checkpoint >= {at_least} within {timeout}s:\n{self.output()}")

  def wait(self, timeout: float = 240) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f"still running after {timeout}s:\n{self.output()}")


@requires_weights
def test_cli_preempt_kill9_and_resume_is_bit_exact(tmp_path):
  rng = random.Random()
  run = tmp_path / "run"
  # SIGINT in epoch 1: checkpoint at the current step, exit 75, the resume command printed.
  r = Run(tmp_path, run, "sigint", resume=False)
  seen = r.wait_for_step(4)
  r.proc.send_signal(signal.SIGINT)
  assert r.wait() == 75, r.output()
  out = r.output()
  stopped = int(out.split("stopped at step ")[1].split(";")[0])
  assert stopped >= seen and _steps(run)[-1] == stopped, out
  assert "--resume" in out and "--config.checkpoint_every_steps=3" in out.split("Resume with")[1]
  # SIGTERM in epoch 2 of the resumed run.
  r = Run(tmp_path, run, "sigterm", resume=True)
  seen = r.wait_for_step(max(stopped + 2, STEPS_PER_EPOCH + 4))  # a new save: training runs
  r.proc.send_signal(signal.SIGTERM)
  assert r.wait() == 75, r.output()
  out = r.output()
  assert f"resumed from step {stopped} " in out
  stopped = int(out.split("stopped at step ")[1].split(";")[0])
  assert stopped >= seen and _steps(run)[-1] == stopped, out
  # kill -9 at a random moment: mid-step, mid-save or between.
  r = Run(tmp_path, run, "kill9", resume=True)
  target = rng.randint(stopped + 3, max(stopped + 3, 2 * STEPS_PER_EPOCH + 10))
  r.wait_for_step(target)
  time.sleep(rng.uniform(0, 0.3))
  r.proc.kill()
  r.wait()
  kept = _steps(run)[-1]
  assert kept >= target, (kept, target)
  # A half-written save of a later step (what orbax leaves when killed mid-save) is never read.
  partial = run / "checkpoints" / f"{kept + 50}.orbax-checkpoint-tmp"
  shutil.copytree(run / "checkpoints" / str(kept), partial)
  shutil.rmtree(partial / "default")
  r = Run(tmp_path, run, "resume", resume=True)
  assert r.wait() == 0, r.output()
  assert f"resumed from step {kept} " in r.output(), (target, r.output())
  assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
  # The uninterrupted run, in process: same config, same bits.
  config = _config(tmp_path, **IMAGE_RUN)
  config.cache_dir = ""
  train.train_and_evaluate(config, tmp_path / "ref", log_fn=lambda *a: None)
  _assert_same_params(tmp_path / "ref", run)
  assert _records(run) == _records(tmp_path / "ref"), (target, kept)
  results = json.loads((run / "results.json").read_text())
  assert results["num_skipped"] == 0 and results["best_step"] in _steps(run)
