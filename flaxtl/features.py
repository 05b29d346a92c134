"""Frozen-trunk feature cache: compute the frozen part once, reuse it every epoch and every run.

When nothing random happens before the freezing boundary (no augmentation), the boundary's output
for an image never changes, so training only needs to run the layers after it. The outputs are
stored per split under a key that hashes everything they depend on (weights, image size,
preprocessing, boundary, model dtype, the split's files); any change is a different key.
Files are written atomically and carry a digest: a truncated or corrupt entry is rebuilt.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flaxtl import feature_engine, parallel, preprocessing, progress

log = logging.getLogger("flaxtl")
FORMAT_VERSION = 1
BF16_STORED = "bfloat16 (uint16 bits)"


def default_cache_dir() -> Path:
  from flaxtl.runtime import cache_root
  return cache_root() / "features"


def files_fingerprint(paths: Sequence[str], labels: np.ndarray) -> str:
  """Identity of a split's images: each file's bytes and label, in order; not where the files lie
  nor when they were written, so a copied, moved or re-extracted dataset keeps its features (with
  paths and mtimes in the key, a re-created data folder repeated an hour-long feature pass).
  Hashing reads ~130 MB/s here, once per process (benchmarks/RESULTS.md)."""
  h = hashlib.sha256()
  for p, l in zip(paths, labels):
    st = os.stat(p) if os.path.isfile(p) else None  # tfds examples are names, not files
    ident = _content_digest(p, st.st_size, st.st_mtime_ns) if st else p
    h.update(f"{ident}\0{int(l)}\n".encode())
  return h.hexdigest()


@functools.lru_cache(maxsize=2**20)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
  """A file's blake2b, once per process while its size and mtime stay (the fingerprint is asked
  for per boundary and precision)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "blake2b").hexdigest()


def cache_key(**parts) -> str:
  """sha256 over the sorted, JSON-encoded key parts (weights sha, image size, boundary, ...).
  The weights' path is recorded but not keyed: their sha256 is, so moved weights still hit."""
  if parts.get("weights_sha256"):
    parts = {k: v for k, v in parts.items() if k != "weights_file"}
  doc = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
  return hashlib.sha256(doc.encode()).hexdigest()[:32]


def _digest(array: np.ndarray) -> str:
  return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def load(cache_dir: Path, key: str) -> np.ndarray | None:
  """The cached array for `key`, or None when absent, partial or corrupt (then it is removed).
  bf16 features come back as bf16 (ml_dtypes): the step casts them to the model's dtype.
  Memory-mapped, read-only: the OS pages rows in as batches gather them and can drop them again,
  so a run's stored inputs need not fit in RAM (Caltech's 4 cached views: 8.7 GB of float32 maps;
  benchmarks/RESULTS.md). Entries are replaced by rename, never rewritten, so a mapped file stays
  whole."""
  data, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
  if not meta.exists():
    return None
  try:
    info = json.loads(meta.read_text())
    array = np.load(data, mmap_mode="r")
    if list(array.shape) != info["shape"] or _digest(array) != info["digest"]:
      raise ValueError("shape or digest mismatch")
    return _typed(array, info)
  except Exception as e:  # Any failure to read back means: rebuild. Say so, never crash.
    array = None  # unmapped before the unlink (Windows cannot delete a mapped file)
    log.warning("feature cache entry %s is unreadable (%s): rebuilding it", data, e)
    for f in (meta, data):
      f.unlink(missing_ok=True)
    return None


def store(cache_dir: Path, key: str, array: np.ndarray, description: dict) -> np.ndarray:
  """Writes data then metadata, each via a temp file + rename: readers never see half a file.
  Features computed in bf16 are stored in bf16 (half the disk and RAM; .npy has no bf16, so as
  their uint16 bits), all others as they come. -> the array as `load` will give it back (mapped
  from the file just written), so a run that computes the features trains on what a later run
  reads."""
  cache_dir.mkdir(parents=True, exist_ok=True)
  stored = {}
  if description.get("dtype") == "bfloat16":
    array = np.asarray(array).astype(ml_dtypes.bfloat16).view(np.uint16)
    stored = {"stored": BF16_STORED}
  for suffix, write in ((".npy", lambda f: np.save(f, array)),
                        (".json", lambda f: f.write(json.dumps(
                            {"shape": list(array.shape), "dtype": str(array.dtype),
                             "digest": _digest(array), **description, **stored},
                            indent=1).encode()))):
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}", suffix=suffix + ".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, cache_dir / f"{key}{suffix}")
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise
  return _typed(np.load(cache_dir / f"{key}.npy", mmap_mode="r"), stored)  # the copy's RAM freed


def _typed(array: np.ndarray, info: dict) -> np.ndarray:
  """A stored array as the step takes it: bf16 entries are kept as their uint16 bits."""
  return array.view(ml_dtypes.bfloat16) if info.get("stored") == BF16_STORED else array


# ---------------------------------------------------------------------------------------------
# The frozen trunk and the per-split cache lookups a run makes.

@dataclasses.dataclass(frozen=True)
class Trunk:
  """uint8 images -> {boundary: output}: preprocessing and the frozen layers up to `stop_at`.

  Frozen (hashable), so equal trunks share one compile in `parallel.map_batches`; the uint8
  images cross to the device as they are and the preprocessing fuses into the first convolution.
  """
  model: Any
  mode: str
  stop_at: str
  capture: tuple[str, ...]

  def __call__(self, variables, images_uint8):
    x = preprocessing.preprocess(images_uint8.astype(jnp.float32), self.mode)
    return self.model.apply(variables, x, stop_at=self.stop_at, capture=self.capture)[1]


def describe(config, weights_meta: dict, mode: str, split, boundary: str,
             precision: str | None = None) -> dict:
  """What one split's features at `boundary` depend on; the cache key is a hash of it.

  `dtype` is the precision the trunk computed in (feature_engine.precision; default the model's
  dtype, the key entries written before engines existed), not the engine: the float32 engines
  (XLA, TensorFlow's oneDNN) agree to ~1e-6 relative (tests/test_feature_engine.py), and bf16
  ones, whichever, differ from float32 by bf16 rounding, so they share the 'bfloat16' key."""
  random_init = {} if weights_meta.get("sha256") else {"init_seed": config.seed}  # no file: seed
  return dict(weights_sha256=weights_meta.get("sha256"), weights_file=weights_meta.get("file"),
              image_size=config.data.image_size, preprocessing=mode, boundary=boundary,
              dtype=precision or config.model.dtype, model=config.model.name,
              files=files_fingerprint(split.paths, split.labels), **random_init)


def lookup(cache_dir: Path, descriptions: dict[str, dict]) -> dict[str, np.ndarray]:
  """The boundaries whose features are cached (each file read once)."""
  found = {b: load(cache_dir, cache_key(**d)) for b, d in descriptions.items()}
  return {b: a for b, a in found.items() if a is not None}


@dataclasses.dataclass(frozen=True)
class Continuation:
  """Cached `start_after` features -> {layer: output} for `capture`: the layers in between run on
  the stored activations (frozen, so equal continuations share one compile)."""
  model: Any
  start_after: str
  stop_at: str
  capture: tuple[str, ...]

  def __call__(self, variables, x):
    return self.model.apply(variables, x.astype(jnp.float32), start_after=self.start_after,
                            stop_at=self.stop_at, capture=self.capture)[1]


def derive(model, variables, cache_dir: Path, descriptions: dict[str, dict],
           found: dict[str, np.ndarray], split_name: str, log_fn: Callable = print
           ) -> dict[str, np.ndarray]:
  """`found` plus the boundaries of `descriptions` it lacks, computed from the deepest cached
  boundary before all of them (a user who trained block 5 then tries the head pays for block 5
  over the stored block4_pool maps, seconds, not a trunk pass over the images) and stored as
  from images. Unchanged when no such boundary is cached (one image pass then computes them all).
  Computed by XLA in float32 from the source's stored values, under the source's precision key."""
  missing = [b for b in descriptions if b not in found]
  if not missing:
    return found
  layers = list(model.layers)
  first, last = (f(missing, key=layers.index) for f in (min, max))
  template = descriptions[missing[0]]
  for source in reversed(layers[:layers.index(first)]):
    key = cache_key(**{**template, "boundary": source})
    if not (cache_dir / f"{key}.json").exists():
      continue
    array = load(cache_dir, key)
    if array is None:
      continue
    t = time.perf_counter()
    with progress.Progress(len(array), f"from cached {source}, {split_name}", log_fn) as bar:
      computed = parallel.map_batches(Continuation(model, source, last, tuple(missing)),
                                      variables, array, 64, bar.update)
    log_fn(f"features {split_name}: {', '.join(missing)} from the cached {source} features "
           f"({len(array)} rows in {time.perf_counter() - t:.1f}s, no image pass)")
    out = dict(found)
    for b in missing:
      out[b] = store(cache_dir, cache_key(**descriptions[b]), computed[b], descriptions[b])
    return out
  return found


def for_split(model, variables, mode: str, images: np.ndarray, descriptions: dict[str, dict],
              cache_dir: Path, split_name: str, log_fn: Callable = print,
              found: dict | None = None, engine: str = "xla") -> dict[str, np.ndarray]:
  """{boundary: features} for one split: `found` (already loaded) kept, the rest from ONE forward
  pass over `images` by `engine` (feature_engine.ENGINES, not 'auto'), then stored."""
  keys = {b: cache_key(**d) for b, d in descriptions.items()}
  out = dict(found or {})
  missing = [b for b in keys if b not in out]
  if missing:
    run = feature_engine.runner(engine, model, variables, mode,
                                max(missing, key=model.layers.index), tuple(missing))
    t = time.perf_counter()
    with progress.Progress(len(images), f"frozen trunk, {split_name}", log_fn) as bar:
      computed = run(images, progress=bar.update)
    dt = time.perf_counter() - t
    log_fn(f"feature pass {split_name}: {len(images)} images in {dt:.1f}s "
           f"({len(images) / max(dt, 1e-9):.1f} img/s, engine {engine})")
    for b in missing:
      out[b] = store(cache_dir, keys[b], computed[b], descriptions[b])
  for b in keys:
    log_fn(f"features {split_name}: {out[b].shape} at {b} ("
           f"{'computed and cached' if b in missing else 'from cache'}: {cache_dir / keys[b]}.npy)")
  return out


def view_description(description: dict, augment: dict, view: int) -> dict:
  """Augmented view `view` (1, 2, ...) of a split's features: the policy is part of the key."""
  augment = {k: v for k, v in augment.items() if k != "policy" or v}  # keys from before policies
  return {**description, "augment": dict(sorted(augment.items())), "view": view}


def for_views(model, variables, mode: str, images: np.ndarray | None, augment_fn: Callable,
              boundary: str, descriptions: Sequence[dict], cache_dir: Path, split_name: str,
              log_fn: Callable = print, chunk: int = 256, engine: str = "xla") -> list[np.ndarray]:
  """The boundary's output for each augmented view of `images`, from the cache or from one
  trunk pass per missing view. View v augments image i with the stateless seed (v, i), so a
  view is the same on any machine and run; chunks bound the augmented images held at once."""
  out, run = [], None
  for v, d in enumerate(descriptions, start=1):
    key = cache_key(**d)
    array = load(cache_dir, key)
    if array is None:
      if images is None:
        raise RuntimeError(f"view {v} of {split_name} is not cached and no images were decoded")
      t = time.perf_counter()
      with progress.Progress(len(images), f"frozen trunk, {split_name} view {v}", log_fn) as bar:
        for s in range(0, len(images), chunk):
          idx = np.arange(s, min(s + chunk, len(images)))
          seeds = np.stack([np.full(len(idx), v), idx], axis=1).astype(np.int64)
          x = np.asarray(augment_fn(images[idx], seeds), np.float32)
          run = run or feature_engine.runner(engine, model, variables, mode, boundary, (boundary,))
          part = run(x, progress=bar.update)[boundary]
          if array is None:
            array = np.empty((len(images), *part.shape[1:]), part.dtype)
          array[idx] = part
      dt = time.perf_counter() - t
      log_fn(f"feature pass {split_name} view {v}: {len(images)} images in {dt:.1f}s "
             f"({len(images) / max(dt, 1e-9):.1f} img/s, engine {engine})")
      array = store(cache_dir, key, array, d)
      log_fn(f"features {split_name} view {v}: {array.shape} at {boundary} (computed and cached: "
             f"{cache_dir / key}.npy)")
    else:
      log_fn(f"features {split_name} view {v}: {array.shape} at {boundary} (from cache)")
    out.append(array)
  return out
