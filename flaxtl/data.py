"""Datasets: find the files, decode them once, and feed batches in a (seed, epoch)-determined order.

Layouts (config.data.layout):
  'split_folders'  root/{train,valid,test}/<class>/<image>  (Keras' flow_from_directory layout)
  'class_folders'  root/<class>/<image>, split by flaxtl: seeded, stratified, by fractions, and
                   written to a manifest in the workdir that every later command reuses.
Images are decoded, converted to RGB and resized once per run with a parallel tf.data pass and
kept in memory as uint8; a file that does not decode is reported, never a crash mid-epoch.
Batches are a pure function of (seed, epoch, step) so a resumed run sees exactly the same data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from flaxtl import preprocessing

log = logging.getLogger("flaxtl")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
SPLITS = ("train", "valid", "test")
REPO_ROOT = Path(__file__).resolve().parents[1]


class DataError(ValueError):
  """A dataset mistake found before any compute (named file, folder or class)."""


@dataclasses.dataclass
class Split:
  """Files and integer labels of one split; labels index `class_names`.

  `images` is set when the source delivers decoded images (tfds): `paths` then only name them.
  """
  paths: list[str]
  labels: np.ndarray
  class_names: list[str]
  images: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.paths)

  def subset(self, keep: Sequence[int]) -> "Split":
    keep = list(keep)
    return Split([self.paths[i] for i in keep], self.labels[keep], self.class_names,
                 None if self.images is None else self.images[keep])


def resolve_root(data_cfg) -> Path:
  """config.data.root, else $FLAXTL_DATA_DIR/<name>, else ../shared/data/<name> next to the repo."""
  candidates = []
  if data_cfg.root:
    candidates.append(Path(os.path.expanduser(data_cfg.root)))
  else:
    if os.environ.get("FLAXTL_DATA_DIR"):
      candidates.append(Path(os.environ["FLAXTL_DATA_DIR"]) / data_cfg.name)
    candidates.append(REPO_ROOT.parent / "shared" / "data" / data_cfg.name)
    if data_cfg.get("subdir"):
      candidates = [c / data_cfg.subdir for c in candidates]
  for c in candidates:
    if c.is_dir():
      return c.resolve()
  raise DataError(f"data root for {data_cfg.name!r} not found (looked in: "
                  f"{', '.join(map(str, candidates))}); set --config.data.root=DIR or "
                  "$FLAXTL_DATA_DIR")


def is_image_name(path: Path) -> bool:
  """Image extensions in any letter case, and extension-less files (some exports drop them)."""
  return not path.name.startswith(".") and (path.suffix.lower() in IMAGE_EXTENSIONS
                                            or path.suffix == "")


def list_classes(root: Path, exclude: Sequence[str] = ()) -> dict[str, list[str]]:
  """{class name: sorted image paths} for the class folders under `root`."""
  if not root.is_dir():
    raise DataError(f"{root}: not a directory")
  present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  for name in exclude:
    if name not in present:
      log.warning("data.exclude names %r, which is not a class folder in %s: ignored", name, root)
  classes = {}
  for name in present:
    if name in exclude:
      continue
    files = sorted(str(p) for p in (root / name).iterdir() if p.is_file() and is_image_name(p))
    if not files:
      raise DataError(f"class folder {root / name} holds no images")
    classes[name] = files
  if not classes:
    raise DataError(f"{root}: no class folders found")
  return classes


def _to_split(classes: dict[str, list[str]], class_names: list[str]) -> Split:
  paths, labels = [], []
  for name, files in classes.items():
    paths += files
    labels += [class_names.index(name)] * len(files)
  return Split(paths, np.asarray(labels, np.int32), class_names)


def split_folders(root: Path) -> dict[str, Split]:
  """root/{train,valid,test}/<class>/*: class names must agree across splits."""
  found = {s: list_classes(root / s) for s in SPLITS if (root / s).is_dir()}
  if "train" not in found or "valid" not in found:
    raise DataError(f"{root}: expected split folders train/ and valid/ (and test/), found: "
                    f"{', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}")
  class_names = sorted(found["train"])
  for s, classes in found.items():
    if sorted(classes) != class_names:
      missing = sorted(set(class_names) - set(classes))
      extra = sorted(set(classes) - set(class_names))
      raise DataError(f"{root / s}: class folders differ from train/ (missing: {missing or '-'}, "
                      f"not in train: {extra or '-'})")
  return {s: _to_split(classes, class_names) for s, classes in found.items()}


def stratified_split(classes: dict[str, list[str]], fractions: Sequence[float],
                     seed: int) -> dict[str, Split]:
  """Seeded per-class shuffle, then cut by fractions (train, valid, test): same seed, same split."""
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
    raise DataError(f"data.split_fractions must be 3 non-negative numbers summing to 1, "
                    f"got {tuple(fractions)}")
  class_names = sorted(classes)
  per_split = {s: {} for s in SPLITS}
  for name in class_names:
    files = list(classes[name])
    rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
    rng.shuffle(files)
    n_valid = int(round(fractions[1] * len(files)))
    n_test = int(round(fractions[2] * len(files)))
    n_train = len(files) - n_valid - n_test
    per_split["train"][name] = sorted(files[:n_train])
    per_split["valid"][name] = sorted(files[n_train:n_train + n_valid])
    per_split["test"][name] = sorted(files[n_train + n_valid:])
  return {s: _to_split(per_split[s], class_names) for s in SPLITS}


def write_manifest(splits: dict[str, Split], path: Path, root: Path) -> None:
  """The split as relative file lists, written atomically: evaluate/predict/resume reuse it."""
  doc = {"root": str(root), "class_names": splits["train"].class_names,
         "splits": {s: [[os.path.relpath(p, root), int(l)] for p, l in zip(sp.paths, sp.labels)]
                    for s, sp in splits.items()}}
  tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: every host of a run writes it
  tmp.write_text(json.dumps(doc))
  os.replace(tmp, path)


def read_manifest(path: Path, root: Path | None = None) -> dict[str, Split]:
  doc = json.loads(path.read_text())
  root = Path(root or doc["root"])
  names = doc["class_names"]
  return {s: Split([str(root / p) for p, _ in rows], np.asarray([l for _, l in rows], np.int32),
                   names) for s, rows in doc["splits"].items()}


def load_splits(data_cfg, seed: int, workdir: Path | None = None) -> dict[str, Split]:
  """The train/valid/test splits the config describes (and the manifest, for class_folders)."""
  root = resolve_root(data_cfg)
  if data_cfg.layout == "split_folders":
    splits = split_folders(root)
  elif data_cfg.layout == "class_folders":
    manifest = workdir / "split.json" if workdir else None
    if manifest is not None and manifest.exists():
      splits = read_manifest(manifest, root)
    else:
      splits = stratified_split(list_classes(root, data_cfg.exclude), data_cfg.split_fractions,
                                data_cfg.split_seed if data_cfg.split_seed >= 0 else seed)
      if manifest is not None:
        write_manifest(splits, manifest, root)
  elif data_cfg.layout == "tfds":
    splits = tfds_splits(data_cfg)
  else:
    raise DataError(f"unknown data.layout {data_cfg.layout!r}: 'split_folders', 'class_folders' "
                    "or 'tfds'")
  if data_cfg.get("max_per_class", 0):
    splits = {s: sp.subset(_first_per_class(sp.labels, data_cfg.max_per_class))
              for s, sp in splits.items()}
  return splits


def check_splits(splits: dict[str, Split], config) -> None:
  """Dataset mistakes that would waste a run, caught before any compute."""
  train = splits["train"]
  if len(train) < config.batch_size:
    raise DataError(f"train split has {len(train)} usable images, fewer than "
                    f"batch_size={config.batch_size}")
  n_classes = len(train.class_names)
  for name, split in splits.items():
    counts = np.bincount(split.labels, minlength=n_classes)
    empty = [train.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty and len(split):
      raise DataError(f"split {name!r} has no usable images of class(es) {', '.join(empty)}")
  if "test" in splits and train.images is None:
    train_hashes = {_content_hash(p): p for p in train.paths}
    leaks = [(p, train_hashes[h]) for p in splits["test"].paths
             if (h := _content_hash(p)) in train_hashes]
    if leaks:
      shown = "\n  ".join(f"{a} == {b}" for a, b in leaks[:10])
      raise DataError(f"{len(leaks)} test image(s) are byte-identical to training images "
                      f"(test would leak into training):\n  {shown}")


def _content_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def tfds_splits(data_cfg) -> dict[str, Split]:
  """A tensorflow-datasets builder's prepared data (never downloaded here), decoded and resized.

  data.tfds_name names a registered builder (its data under data.tfds_data_dir), or is
  'image_folder' for tfds.folder_dataset.ImageFolder over data.root (root/<split>/<class>/*).
  data.tfds_splits maps our train/valid/test to the builder's split names or slices.
  """
  import tensorflow_datasets as tfds
  tf = _tf()
  name = data_cfg.tfds_name
  if name == "image_folder":
    builder = tfds.folder_dataset.ImageFolder(str(resolve_root(data_cfg)))
  else:
    builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
    if not builder.is_prepared():
      raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}: build it where "
                      f"a network is available (`tfds build {name}`) and copy it there, or set "
                      "--config.data.tfds_data_dir")
  class_names = list(builder.info.features["label"].names)
  size = data_cfg.image_size

  def prepare(image, label):
    image = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                    lambda: image[..., :3])  # grayscale -> RGB, RGBA -> RGB
    return resize(image, size), label

  out = {}
  for ours, theirs in data_cfg.tfds_splits.items():
    ds = builder.as_dataset(split=theirs, as_supervised=True, shuffle_files=False)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    parts = list(ds.as_numpy_iterator())
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size, 3), np.uint8)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32) if parts else np.zeros(0, np.int32)
    out[ours] = Split([f"tfds:{name}/{theirs}/{i}" for i in range(len(labels))], labels,
                      class_names, images)
  if "train" not in out or "valid" not in out:
    raise DataError(f"data.tfds_splits must map 'train' and 'valid', got {dict(data_cfg.tfds_splits)}")
  return out


def _first_per_class(labels: np.ndarray, k: int) -> list[int]:
  """Indices of the first k examples of each class (small slices for tests and quick runs)."""
  keep, seen = [], {}
  for i, l in enumerate(labels):
    if seen.get(int(l), 0) < k:
      keep.append(i)
      seen[int(l)] = seen.get(int(l), 0) + 1
  return keep


# ---------------------------------------------------------------------------------------------
# Decoding: one parallel tf.data pass per split, kept in memory as uint8.

def _tf():
  import tensorflow as tf  # Imported lazily: keep TensorFlow off accelerators, JAX owns them.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  return tf


def header_problem(path: str, max_pixels: int) -> str | None:
  """Why a file cannot be an image we decode, from its header alone (cheap), or None."""
  from PIL import Image
  try:
    if os.path.getsize(path) == 0:
      return "empty file"
    with Image.open(path) as im:
      fmt, (w, h) = im.format, im.size
  except Image.DecompressionBombError as e:  # PIL's own cap: 2x Image.MAX_IMAGE_PIXELS
    return f"too large ({e})"
  except Exception as e:  # PIL raises many types for junk; the reason goes into the report.
    return f"not a readable image ({type(e).__name__})"
  if fmt not in ("JPEG", "PNG", "BMP", "GIF", "MPO"):
    return f"unsupported format {fmt}"
  if w * h > max_pixels:
    return f"too large ({w}x{h} > data.max_pixels={max_pixels})"
  return None


def resize(images, image_size: int):
  """RGB (H, W, 3) or (N, H, W, 3), 0-255 -> image_size^2 uint8: the one resize that training,
  evaluation, prediction and exported models share (bilinear, antialiased, rounded)."""
  tf = _tf()
  img = tf.image.resize(tf.cast(images, tf.float32), (image_size, image_size),
                        method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


def decode_images(paths: Sequence[str], image_size: int, *, max_pixels: int = 50_000_000,
                  threads: int | None = None) -> tuple[np.ndarray, dict[str, str]]:
  """Decodes, converts to RGB and resizes every file; returns (uint8 N'xSxSx3, {bad path: why}).

  The returned images are those of the good files, in input order. A header scan runs first (in
  parallel); files that pass it but still fail to decode (e.g. truncated) are caught by tf.data.
  """
  from concurrent.futures import ThreadPoolExecutor
  tf = _tf()
  with ThreadPoolExecutor(threads or min(16, (os.cpu_count() or 2) * 2)) as pool:
    problems = list(pool.map(lambda p: header_problem(p, max_pixels), paths))
  bad = {p: why for p, why in zip(paths, problems) if why}
  candidates = [i for i, why in enumerate(problems) if not why]

  def load(i, path):
    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return i, resize(img, image_size)

  ds = tf.data.Dataset.from_tensor_slices((np.asarray(candidates or [0], np.int64),
                                           [paths[i] for i in candidates] or [""]))
  if not candidates:
    ds = ds.take(0)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors().batch(256)
  good, images = [], []
  for idx, img in ds.as_numpy_iterator():
    good.extend(idx.tolist())
    images.append(img)
  for i in sorted(set(candidates) - set(good)):
    bad[paths[i]] = "failed to decode (truncated or corrupt)"
  out = np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
  return out, bad


# ---------------------------------------------------------------------------------------------
# Batching: (seed, epoch, step) -> the same batch on any number of devices and processes.

def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """(steps, batch_size) example indices, the last batch padded with -1 (masked out)."""
  order = epoch_order(n, seed, epoch, shuffle)
  steps = -(-n // batch_size)
  padded = np.full(steps * batch_size, -1, np.int64)
  padded[:n] = order
  return padded.reshape(steps, batch_size)


class Feeder:
  """Holds one split's stored inputs (uint8 images or cached features) as TF tensors, once.

  `epoch(...)` yields this process's part of each global batch: {'x', 'label', 'mask'}; padded
  rows have mask 0. `transform(x, seeds)` maps stored inputs to network inputs (augment +
  preprocess) with per-example stateless seeds derived from (seed, epoch, example index).
  """

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
    tf = _tf()
    self.n = len(labels)
    self.transform = transform
    self._x, self._y = tf.constant(inputs), tf.constant(labels)

  def steps(self, batch_size: int) -> int:
    return -(-self.n // batch_size)

  def epoch(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool, start_step: int = 0,
            process_index: int = 0, process_count: int = 1,
            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    tf = _tf()
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    idx = batch_indices(self.n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
    local = batch_size // process_count
    idx = idx[start_step:, process_index * local:(process_index + 1) * local]

    def gather(i):
      safe = tf.maximum(i, 0)
      x = tf.gather(self._x, safe)
      if self.transform is not None:
        seeds = tf.stack([tf.fill(tf.shape(i), tf.constant(seed, tf.int64)),
                          tf.cast(epoch, tf.int64) * 1_000_003 + safe], axis=1)
        x = self.transform(x, seeds)
      return {"x": x, "label": tf.gather(self._y, safe), "mask": tf.cast(i >= 0, tf.float32)}

    ds = tf.data.Dataset.from_tensor_slices(idx).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch).as_numpy_iterator()


def image_transform(preprocess_mode: str, augment: Any | None = None) -> Callable:
  """uint8 batch -> preprocessed float32 network input, with optional augmentation (tf ops)."""
  tf = _tf()

  def transform(x, seeds):
    x = tf.cast(x, tf.float32)
    if augment is not None and augment_enabled(augment):
      x = tf.map_fn(lambda a: _augment_one(a[0], a[1], augment), (x, seeds),
                    fn_output_signature=tf.float32)
    return preprocessing.preprocess(x, preprocess_mode)

  return transform


def augment_enabled(augment) -> bool:
  return bool(augment.flip or augment.crop_min_scale < 1 or augment.rotation_deg
              or augment.brightness or augment.contrast)


def _augment_one(img, seed, augment):
  """Random resized crop, horizontal flip, small rotation and colour jitter, all stateless."""
  tf = _tf()
  size = tf.shape(img)[:2]
  s = lambda k: tf.random.experimental.stateless_fold_in(seed, k)  # noqa: E731
  if augment.crop_min_scale < 1:
    scale = tf.random.stateless_uniform([], s(1), augment.crop_min_scale, 1.0)
    side = tf.cast(tf.math.sqrt(scale) * tf.cast(size[0], tf.float32), tf.int32)
    crop = tf.image.stateless_random_crop(img, tf.stack([side, side, 3]), s(2))
    img = tf.image.resize(crop, size, antialias=True)
  if augment.flip:
    img = tf.image.stateless_random_flip_left_right(img, s(3))
  if augment.rotation_deg:
    angle = tf.random.stateless_uniform([], s(4), -1.0, 1.0) * augment.rotation_deg * np.pi / 180
    img = _rotate(img, angle)
  if augment.brightness:
    img = img + tf.random.stateless_uniform([], s(5), -1.0, 1.0) * augment.brightness * 255
  if augment.contrast:
    factor = 1 + tf.random.stateless_uniform([], s(6), -1.0, 1.0) * augment.contrast
    mean = tf.reduce_mean(img, axis=(0, 1), keepdims=True)
    img = (img - mean) * factor + mean
  return tf.clip_by_value(img, 0, 255)


def _rotate(img, angle):
  """Rotation about the centre, bilinear, edges replicated (TF's projective transform op)."""
  tf = _tf()
  h, w = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)
  c, s_ = tf.cos(angle), tf.sin(angle)
  x0 = (w - 1) / 2 - (c * (w - 1) / 2 - s_ * (h - 1) / 2)
  y0 = (h - 1) / 2 - (s_ * (w - 1) / 2 + c * (h - 1) / 2)
  transform = tf.stack([c, -s_, x0, s_, c, y0, 0.0, 0.0])[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=img[None], transforms=transform, output_shape=tf.shape(img)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")
  return out[0]
