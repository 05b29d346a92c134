"""Shared fixtures: the real data and weights in ../shared (when present), tiny run configs.

The library never looks next to the repo: FLAXTL_DATA_DIR points at ../shared/data here, and the
tiny configs name the weights file, as a user would."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SIGN_DIGITS = SHARED / "data" / "sign_language_digits"
CALTECH = SHARED / "data" / "caltech101" / "101_ObjectCategories"
TV_WEIGHTS = SHARED / "weights" / "vgg16_tv_in1k_features.safetensors"
sys.path.insert(0, str(REPO))  # benchmarks/, for the tests that import them
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import flaxtl  # noqa: E402

flaxtl.configure_cpu()  # as the verbs do: in-process runs compute exactly like the CLI's
if (SHARED / "data").is_dir():
  os.environ.setdefault("FLAXTL_DATA_DIR", str(SHARED / "data"))


def pytest_xdist_auto_num_workers(config) -> int:
  """Workers for `-n auto` (pyproject's addopts). A test's XLA compilation and Python run on one
  core while its steps use them all, so a second worker fills those gaps: the suite took 31 min
  with 2 workers against 51-59 serially on a 2-core AMD EPYC (benchmarks/RESULTS.md). Each
  worker's XLA uses every core and can hold ~6 GB, hence at most 4, and one per 6 GiB of RAM."""
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
  ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return max(1, min(4, os.cpu_count() or 1, int(ram_gib // 6)))


requires_sign_digits = pytest.mark.skipif(not SIGN_DIGITS.is_dir(),
                                          reason=f"real data not found at {SIGN_DIGITS}")
requires_weights = pytest.mark.skipif(not TV_WEIGHTS.is_file(),
                                      reason=f"real weights not found at {TV_WEIGHTS}")


def tiny_sign_digits_config(tmp_path: Path, per_class: int = 8, image_size: int = 64):
  """The real sign_digits recipe on a slice: 10 classes x `per_class` images, small images.

  64 px, not 32: at 32 px block 5 sees 2x2 maps, where XLA:CPU's convolutions run 13-34x
  slower than on 4x4 maps despite 4x less work."""
  from flaxtl.configs import sign_digits
  c = sign_digits.get_config()
  c.data.max_per_class = per_class
  c.data.image_size = image_size
  c.batch_size = 8
  c.eval_batch_size = 16
  c.epochs = 2
  c.log_every_steps = 5
  c.cache_dir = str(tmp_path / "feature_cache")
  c.model.weights = str(TV_WEIGHTS)
  return c


@pytest.fixture
def tiny_config(tmp_path):
  return tiny_sign_digits_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# Generated data and weights: the tests that need nothing from ../shared.

CLASSES = ("circle", "square", "stripes")


def make_class_folders(root: Path, per_class: int = 12, size: int = 40, seed: int = 0,
                       noise: int = 80, contrast: int = 255, mislabeled: float = 0.0) -> Path:
  """root/<class>/*.png|jpg: a class-specific shape on a random background; easy to learn, unless
  a low `contrast` over a high `noise`, or a `mislabeled` fraction drawn with another class's
  shape, makes the classes overlap."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  for name in CLASSES:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      img = rng.integers(0, noise, (size, size, 3))
      cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
      shape = CLASSES[rng.integers(len(CLASSES))] if rng.random() < mislabeled else name
      if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
      elif shape == "square":
        mask = (abs(yy - cy) < size // 5) & (abs(xx - cx) < size // 5)
      else:
        mask = (xx // 4) % 2 == 0
      level = 40 * CLASSES.index(shape)  # the shape, not the folder, sets it
      img[mask] = img[mask] + contrast - level if contrast < 255 else 255 - level
      ext = "png" if i % 2 else "jpg"
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}.{ext}")
  return root


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache, one for the whole run: every run in the suite jits its
  init, step and evaluation anew, and most compile programs another test already compiled. Shared
  by the xdist workers and, through JAX_COMPILATION_CACHE_DIR, by the processes tests start. The
  key covers the program, XLA_FLAGS and the devices, and a hit is the same executable, so results
  are unchanged (a half-written entry read by another worker is only recompiled, with a warning)."""
  import jax
  root = tmp_path_factory.getbasetemp()
  folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax_cache"
  folder.mkdir(exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)  # for the processes tests start
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:  # a program compiled at collection started the cache without a folder
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except ImportError:  # JAX moved it: only slower
    pass
  return folder


def write_labels_csv(root: Path, name: str = "labels.csv", split_of=None) -> Path:
  """The class folders under `root` as a labels CSV in `root` (path,label[,split] rows, paths
  relative to root, sorted): the same dataset in the CSV layout. `split_of(relative path)` gives
  a split column."""
  import csv
  rows = sorted((p.relative_to(root).as_posix(), p.relative_to(root).parts[0])
                for p in root.rglob("*") if p.is_file() and p.name != name
                and not any(part.startswith(".") for part in p.relative_to(root).parts))
  rows = [r for r in rows if len(Path(r[0]).parts) > 1]  # files in class folders only
  with open(root / name, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label"] + (["split"] if split_of else []))
    for rel, label in rows:
      w.writerow([rel, label] + ([split_of(rel)] if split_of else []))
  return root / name


def random_vgg16_file(path: Path) -> Path:
  """VGG16's convolutions with random values, saved as a flaxtl weights file ('caffe' inputs)."""
  import jax
  import jax.numpy as jnp
  from flaxtl import weights
  from flaxtl.models import VGG16
  model = VGG16(include_top=False, num_classes=None)
  params = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]  # eager: 2.5x slower
  return weights.save(jax.tree.map(np.asarray, params), {"preprocessing": "caffe",
                                                         "source": "random (test)"}, path)


def generated_config(tmp: Path, root: Path, model: str = "vgg16", **over):
  """A tiny run on generated class folders (32 px, batch 8, 2 epochs)."""
  from flaxtl.configs import default
  c = default.get_config()
  c.data.root, c.data.layout = str(root), "class_folders"
  c.data.image_size = 32
  c.model.name = model
  c.model.weights = str(tmp / "vgg16_random.msgpack") if model == "vgg16" else ""
  c.trainable = "block5" if model == "vgg16" else "all"
  c.feature_cache = model == "vgg16"
  c.batch_size, c.eval_batch_size, c.epochs, c.log_every_steps = 8, 16, 2, 100
  c.optimizer.learning_rate = 1e-3
  c.cache_dir = str(tmp / "cache")
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in over.items()})  # a__b = a.b
  return c




# ---------------------------------------------------------------------------------------------
# Several worker processes at once (multi-process tests).

def free_port() -> int:
  """A port nothing listens on (also: a host that refuses connections)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def http_server(folder: Path, cut_first: int = 0):
  """Serves `folder` on 127.0.0.1 (a stand-in for a download host) -> its base URL. The first
  `cut_first` responses announce the whole file but send half of it and close (a download that
  breaks mid-body)."""
  cuts = [cut_first]

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def copyfile(self, source, outputfile):
      if cuts[0] > 0:
        cuts[0] -= 1
        body = source.read()
        outputfile.write(body[:len(body) // 2])
        self.close_connection = True
        return
      super().copyfile(source, outputfile)

  httpd = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def wait_all(procs, deadline: float) -> None:
  """(Popen, log file) pairs: waits until all end, one fails or the deadline passes (bounded),
  then kills what still runs and closes the logs."""
  try:
    while (any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline
           and not any(p.poll() for p, _ in procs)):
      time.sleep(0.5)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
