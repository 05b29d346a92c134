"""Frozen-trunk feature cache: compute the frozen part once, reuse it every epoch and every run.

When nothing random happens before the freezing boundary (no augmentation), the boundary's output
for an image never changes, so training only needs to run the layers after it. The outputs are
stored per split under a key that hashes everything they depend on (weights, image size,
preprocessing, boundary, model dtype, the split's files); any change is a different key.
Files are written atomically and carry a digest: a truncated or corrupt entry is rebuilt.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("flaxtl")
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
  return Path(os.environ.get("FLAXTL_CACHE_DIR", Path.home() / ".cache" / "flaxtl")) / "features"


def files_fingerprint(paths: Sequence[str], labels: np.ndarray) -> str:
  """Identity of a split's files: paths, labels, sizes and modification times."""
  h = hashlib.sha256()
  for p, l in zip(paths, labels):
    st = os.stat(p) if os.path.exists(p) else None  # tfds examples are names, not files
    h.update(f"{p}\0{int(l)}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def cache_key(**parts) -> str:
  """sha256 over the sorted, JSON-encoded key parts (weights sha, image size, boundary, ...)."""
  doc = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
  return hashlib.sha256(doc.encode()).hexdigest()[:32]


def _digest(array: np.ndarray) -> str:
  return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def load(cache_dir: Path, key: str) -> np.ndarray | None:
  """The cached array for `key`, or None when absent, partial or corrupt (then it is removed)."""
  data, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
  if not meta.exists():
    return None
  try:
    info = json.loads(meta.read_text())
    array = np.load(data)
    if list(array.shape) != info["shape"] or _digest(array) != info["digest"]:
      raise ValueError("shape or digest mismatch")
    return array
  except Exception as e:  # Any failure to read back means: rebuild. Say so, never crash.
    log.warning("feature cache entry %s is unreadable (%s): rebuilding it", data, e)
    for f in (meta, data):
      f.unlink(missing_ok=True)
    return None


def store(cache_dir: Path, key: str, array: np.ndarray, description: dict) -> None:
  """Writes data then metadata, each via a temp file + rename: readers never see half a file."""
  cache_dir.mkdir(parents=True, exist_ok=True)
  for suffix, write in ((".npy", lambda f: np.save(f, array)),
                        (".json", lambda f: f.write(json.dumps(
                            {"shape": list(array.shape), "dtype": str(array.dtype),
                             "digest": _digest(array), **description}, indent=1).encode()))):
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


@functools.lru_cache(maxsize=16)
def _jit(apply_fn: Callable, mesh: Mesh) -> Callable:
  """Jitted once per (function, mesh): every split of a run reuses the compiled trunk."""
  data_sharding = NamedSharding(mesh, P("data"))
  return jax.jit(apply_fn, in_shardings=(NamedSharding(mesh, P()), data_sharding),
                 out_shardings=data_sharding)


def compute(apply_fn: Callable, params, images: np.ndarray, batch_size: int = 32,
            progress: Callable | None = None) -> np.ndarray:
  """Runs `apply_fn(params, images)` over all stored images in batches on the local devices.

  `apply_fn` may return a pytree (e.g. {boundary: output}); the result has the same structure.

  `apply_fn` takes the stored uint8 images and preprocesses them itself: a quarter of the bytes
  cross to the device, and the preprocessing is fused into the first convolution.
  """
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("data",))
  batch_size = -(-batch_size // len(devices)) * len(devices)
  data_sharding = NamedSharding(mesh, P("data"))
  fn = _jit(apply_fn, mesh)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  done, pending = [], []
  to_host = lambda out, n: jax.tree.map(lambda o: np.asarray(o[:n], np.float32), out)  # noqa: E731
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    # device_put first: with several processes, jit refuses sharded numpy inputs.
    pending.append((fn(params, jax.device_put(x, data_sharding)), len(chunk)))
    if len(pending) > 2:  # to host one batch behind: overlap kept, device buffers freed
      done.append(to_host(*pending.pop(0)))
    if progress:
      progress(len(chunk))
  done += [to_host(*p) for p in pending]
  return jax.tree.map(lambda *parts: np.concatenate(parts), *done)
