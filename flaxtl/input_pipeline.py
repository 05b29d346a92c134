"""Images in, batches out: decode once (parallel tf.data), keep uint8 in memory, feed batches.

Batches are a pure function of (seed, epoch, step) so a resumed run sees exactly the same data, on
any number of devices and processes. Augmentation (if any) runs here, per example, with stateless
seeds; preprocessing for the network runs inside the jitted function (one place for it).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Decoding: one parallel tf.data pass per split, kept in memory as uint8.

def _tf():
  import tensorflow as tf  # Imported lazily: keep TensorFlow off accelerators, JAX owns them.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  return tf


# Formats TensorFlow's own decoder reads (by their magic bytes); every other format Pillow opens
# (WebP, TIFF, PPM, TGA, ...) is decoded by Pillow inside the same tf.data pass.
_TF_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def header_problem(path: str, max_pixels: int) -> str | None:
  """Why a file cannot be an image we decode, from its header alone (cheap), or None.

  Any format Pillow opens is accepted; the pixels are only read when decoding."""
  from PIL import Image
  try:
    if os.path.getsize(path) == 0:
      return "empty file"
    with Image.open(path) as im:
      w, h = im.size
  except Image.DecompressionBombError as e:  # PIL's own cap: 2x Image.MAX_IMAGE_PIXELS
    return f"too large ({e})"
  except Exception as e:  # PIL raises many types for junk; the reason goes into the report.
    return f"not a readable image ({type(e).__name__})"
  if w * h > max_pixels:
    return f"too large ({w}x{h} > data.max_pixels={max_pixels})"
  return None


def scan_headers(paths: Sequence[str], max_pixels: int,
                 threads: int | None = None) -> dict[str, str]:
  """{path: why} for the files whose header alone rules them out (scanned in parallel)."""
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(threads or min(16, (os.cpu_count() or 2) * 2)) as pool:
    problems = list(pool.map(lambda p: header_problem(p, max_pixels), paths))
  return {p: why for p, why in zip(paths, problems) if why}


def tf_decodable(path: str) -> bool:
  """True if TensorFlow's decoder reads the file (JPEG, PNG, GIF, BMP, from the magic bytes)."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return True  # tf.data reports the failure like any other
  return head.startswith(_TF_MAGIC)


def pillow_rgb(path) -> np.ndarray:
  """(H, W, 3) uint8 RGB of the first frame, via Pillow (formats TensorFlow does not decode);
  16-bit images are scaled to 8 bits as TensorFlow does (the high byte)."""
  from PIL import Image
  path = path.decode() if isinstance(path, bytes) else str(path)
  with Image.open(path) as im:
    im.seek(0)
    if im.mode.startswith("I;16"):
      arr = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
      return np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr[..., :3]
    return np.asarray(im.convert("RGB"), np.uint8)


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
  JPEG, PNG, GIF and BMP go through TensorFlow's decoder, other formats Pillow reads through Pillow
  (in the same parallel pass).
  """
  tf = _tf()
  bad = scan_headers(paths, max_pixels, threads)
  candidates = [i for i, p in enumerate(paths) if p not in bad]
  by_tf = [tf_decodable(paths[i]) for i in candidates]  # else Pillow decodes it (WebP, TIFF, ...)

  def load(i, path, with_tf):
    def pil():
      img = tf.numpy_function(pillow_rgb, [path], tf.uint8, stateful=False)
      img.set_shape([None, None, 3])
      return img
    img = tf.cond(with_tf, lambda: tf.io.decode_image(tf.io.read_file(path), channels=3,
                                                      expand_animations=False), pil)
    return i, resize(img, image_size)

  ds = tf.data.Dataset.from_tensor_slices((np.asarray(candidates or [0], np.int64),
                                           [paths[i] for i in candidates] or [""],
                                           np.asarray(by_tf or [True], bool)))
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

def epoch_order(n: int, seed: int, epoch: int, shuffle: bool,
                labels: np.ndarray | None = None) -> np.ndarray:
  """The epoch's example indices: a permutation (shuffle), in order, or with `labels` the
  balanced sampler's n draws with replacement, every class equally likely and its examples
  uniform within it (so minority examples repeat). A pure function of (seed, epoch): resume and
  every process see the same order."""
  rng = np.random.default_rng([seed, epoch])
  if labels is not None:
    counts = np.bincount(labels)
    p = 1.0 / (np.count_nonzero(counts) * counts[labels])
    return rng.choice(n, size=n, replace=True, p=p / p.sum())
  return rng.permutation(n) if shuffle else np.arange(n)


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                  labels: np.ndarray | None = None) -> np.ndarray:
  """(steps, batch_size) example indices; the last batch is filled with -1 - j (masked out) for
  the epoch's first examples j, so that batch norm's batch statistics see real, distinct rows
  there, not copies of one (`Feeder.epoch` feeds row j for the index -1 - j)."""
  order = epoch_order(n, seed, epoch, shuffle, labels)
  steps = -(-n // batch_size)
  padded = np.empty(steps * batch_size, np.int64)
  padded[:n] = order
  padded[n:] = -1 - np.resize(order, steps * batch_size - n)
  return padded.reshape(steps, batch_size)


class Feeder:
  """One split's stored inputs (uint8 images or cached features), held once, as numpy.

  `epoch(...)` yields this process's part of each global batch: {'x', 'label', 'mask'}; padded
  rows have mask 0. `transform(x, seeds)` augments stored inputs with per-example stateless seeds
  derived from (seed, epoch, example index). Rows are gathered from the numpy array inside the
  tf.data pass (a TF constant would be a second copy: 2.5 GB for Caltech's block4_pool features).
  """

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
               views: Sequence[np.ndarray] = ()):
    self.n = len(labels)
    self.inputs, self.labels = np.asarray(inputs), np.asarray(labels, np.int32)
    self.transform = transform
    self.views = list(views)  # other stored versions of every row (cached augmented views)

  def version(self, seed: int, epoch: int) -> np.ndarray | None:
    """Which stored version each row uses this epoch (0: `inputs`, v: views[v-1]), a pure
    function of (seed, epoch), or None without views."""
    if not self.views:
      return None
    return np.random.default_rng([seed, epoch, 1]).integers(len(self.views) + 1, size=self.n)

  def rows(self, j: np.ndarray, version: np.ndarray | None) -> np.ndarray:
    x = self.inputs[j]
    if version is not None:
      for v, view in enumerate(self.views, start=1):
        pick = version[j] == v
        if pick.any():
          x[pick] = view[j[pick]]
    return x

  def steps(self, batch_size: int) -> int:
    return -(-self.n // batch_size)

  def epoch(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool, start_step: int = 0,
            process_index: int = 0, process_count: int = 1, prefetch: int = 2,
            balanced: bool = False) -> Iterator[dict[str, np.ndarray]]:
    tf = _tf()
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    idx = batch_indices(self.n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                        labels=self.labels if balanced else None)  # balanced: data.sampler
    local = batch_size // process_count
    idx = idx[start_step:, process_index * local:(process_index + 1) * local]

    x_dtype = tf.as_dtype(self.inputs.dtype)
    version = self.version(seed, epoch)

    def rows(i):
      x = tf.numpy_function(lambda j: self.rows(j, version), [i], x_dtype, stateful=False)
      x.set_shape([None, *self.inputs.shape[1:]])
      return x

    def gather(i):
      safe = tf.where(i >= 0, i, -1 - i)  # a padding row: a real example, masked out
      x = rows(safe)
      if self.transform is not None:
        seeds = tf.stack([tf.fill(tf.shape(i), tf.constant(seed, tf.int64)),
                          tf.cast(epoch, tf.int64) * 1_000_003 + safe], axis=1)
        x = self.transform(x, seeds)
      return {"x": x, "label": tf.gather(tf.constant(self.labels), safe),
              "mask": tf.cast(i >= 0, tf.float32)}

    ds = tf.data.Dataset.from_tensor_slices(idx).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch).as_numpy_iterator()


def augmentation(augment: Any) -> Callable | None:
  """uint8 batch -> augmented float32 0-255 batch (tf ops, per-example stateless seeds), or None
  when nothing is enabled (the stored uint8 images then go to the device as they are)."""
  if augment is None or not augment_enabled(augment):
    return None
  tf = _tf()

  def transform(x, seeds):
    x = tf.cast(x, tf.float32)
    return tf.map_fn(lambda a: _augment_one(a[0], a[1], augment), (x, seeds),
                     fn_output_signature=tf.float32)

  return tf.function(transform)  # eager (the cached views' pass) is ~10x slower


def augment_enabled(augment) -> bool:
  return bool(augment.flip or augment.crop_min_scale < 1 or augment.rotation_deg
              or augment.brightness or augment.contrast or augment.get("policy", ""))


POLICIES = ("", "trivial")
# TrivialAugment Wide (Mueller & Hutter 2021; torchvision's TrivialAugmentWide magnitudes): one op
# per image, drawn uniformly, at a uniform magnitude m in [0, 1] and a random sign where it has one.
# Equalize is left out (a per-image histogram, not a short tf op).
TRIVIAL_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
               "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
               "autocontrast")


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
  if augment.get("policy", "") == "trivial":
    op = tf.random.stateless_uniform([], s(7), 0, len(TRIVIAL_OPS), dtype=tf.int32)
    m = tf.random.stateless_uniform([], s(8), 0.0, 1.0)
    sign = tf.where(tf.random.stateless_uniform([], s(9)) < 0.5, -1.0, 1.0)
    img = tf.switch_case(op, [functools.partial(trivial_op, tf.clip_by_value(img, 0, 255), name,
                                                m, sign) for name in TRIVIAL_OPS])
  return tf.clip_by_value(img, 0, 255)


def trivial_op(img, name: str, m, sign=1.0):
  """TrivialAugment Wide's op `name` on one float 0-255 image at magnitude m in [0, 1]
  (torchvision's ranges: shear 0.99, translate 32/224 of the side, rotate 135 degrees, colour
  factors 1 +- 0.99, posterize 8..2 bits, solarize threshold 255..0); PIL's formulas."""
  tf = _tf()
  h, w = (tf.cast(tf.shape(img)[i], tf.float32) for i in (0, 1))
  gray = lambda x: tf.reduce_sum(x * [0.299, 0.587, 0.114], -1, keepdims=True)  # noqa: E731
  blend = lambda base, x, f: tf.clip_by_value(base + f * (x - base), 0, 255)  # noqa: E731
  factor = 1 + sign * 0.99 * m
  if name == "identity":
    return img
  if name in ("shear_x", "shear_y"):
    k = sign * 0.99 * m
    t = ([1, k, -k * (h - 1) / 2, 0, 1, 0] if name == "shear_x"
         else [1, 0, 0, k, 1, -k * (w - 1) / 2])
    return _transform(img, t)
  if name in ("translate_x", "translate_y"):
    d = sign * m * 32 / 224 * (w if name == "translate_x" else h)
    t = [1, 0, -d, 0, 1, 0] if name == "translate_x" else [1, 0, 0, 0, 1, -d]
    return _transform(img, t)
  if name == "rotate":
    return _rotate(img, sign * m * 135 * np.pi / 180)
  if name == "brightness":
    return blend(tf.zeros_like(img), img, factor)
  if name == "color":
    return blend(gray(img) + tf.zeros_like(img), img, factor)
  if name == "contrast":
    return blend(tf.reduce_mean(gray(img)) + tf.zeros_like(img), img, factor)
  if name == "sharpness":  # PIL's SMOOTH kernel as the degenerate image, borders kept
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
    smooth = tf.nn.depthwise_conv2d(img[None], tf.tile(k[:, :, None, None], [1, 1, 3, 1]),
                                    [1, 1, 1, 1], "SAME")[0]
    inner = tf.pad(tf.ones(tf.shape(img)[:2] - 2), [[1, 1], [1, 1]])[:, :, None]
    return blend(inner * smooth + (1 - inner) * img, img, factor)
  if name == "posterize":
    step = 2.0 ** tf.floor(m * 6.999)  # keep 8 - floor(6.999 m) bits
    return tf.floor(img / step) * step
  if name == "solarize":
    return tf.where(img >= 255 * (1 - m), 255 - img, img)
  if name == "autocontrast":
    lo, hi = tf.reduce_min(img, (0, 1)), tf.reduce_max(img, (0, 1))
    return tf.where(hi > lo, (img - lo) * 255 / tf.maximum(hi - lo, 1e-6), img)
  raise ValueError(f"unknown TrivialAugment op {name!r}")


def _transform(img, affine):
  """TF's projective transform with the 6 affine terms (output pixel -> input pixel), bilinear,
  edges replicated."""
  tf = _tf()
  transform = tf.stack([tf.cast(v, tf.float32) for v in affine] + [0.0, 0.0])
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=img[None], transforms=transform[None], output_shape=tf.shape(img)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]


def _rotate(img, angle):
  """Rotation about the centre, bilinear, edges replicated (TF's projective transform op)."""
  tf = _tf()
  h, w = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)
  c, s_ = tf.cos(angle), tf.sin(angle)
  x0 = (w - 1) / 2 - (c * (w - 1) / 2 - s_ * (h - 1) / 2)
  y0 = (h - 1) / 2 - (s_ * (w - 1) / 2 + c * (h - 1) / 2)
  return _transform(img, [c, -s_, x0, s_, c, y0])
