"""One 1-D ('data',) mesh and the pad/shard/unpad helpers every jitted function here runs through.

Training shards the global batch over every device of every process (`global_mesh`); inference
(features, evaluation, prediction) maps a function over host arrays on this process's devices
(`local_mesh`), padding the last batch and dropping the pad rows, as big_vision's pad_shard_unpad.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
  return Mesh(np.asarray(devices), ("data",))


def global_mesh() -> Mesh:
  return _mesh(tuple(jax.devices()))


def local_mesh() -> Mesh:
  return _mesh(tuple(jax.local_devices()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, what: str = "batch_size", mesh: Mesh | None = None) -> None:
  from flaxtl.errors import ConfigError
  n = (mesh or global_mesh()).size
  if batch_size < 1 or batch_size % n:
    raise ConfigError(f"config.{what}={batch_size} must be a positive multiple of the {n} "
                      "device(s)")


def agree(flag: bool) -> bool:
  """True on every process if `flag` is True on any: a decision all processes must take at the same
  step (e.g. to save on a stop request only one of them received). A collective: every process
  must call it, at the same point."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
  return bool(np.any(flags))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's rows -> one global array per key, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharded(mesh), v) for k, v in batch.items()}


def to_local(tree: Any) -> Any:
  """A replicated (possibly multi-process) tree -> arrays on this process's devices."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: a if not isinstance(a, jax.Array) or a.is_fully_addressable
                      else np.asarray(a.addressable_data(0)), tree)


@functools.lru_cache(maxsize=32)
def _compiled(fn: Callable, mesh: Mesh) -> Callable:
  """Jitted once per (function, mesh): every split and every call reuses the compile."""
  return jax.jit(fn, in_shardings=(replicated(mesh), sharded(mesh)), out_shardings=sharded(mesh))


def batch_size_for(n: int, batch_size: int, mesh: Mesh) -> int:
  """A multiple of the device count; small inputs get a smaller power-of-two batch (few compiles)."""
  d = mesh.size
  per_device = min(-(-batch_size // d), 2 ** max(0, int(np.ceil(np.log2(max(1, -(-n // d)))))))
  return per_device * d


def map_batches(fn: Callable, params: Any, inputs: np.ndarray, batch_size: int = 64,
                progress: Callable[[int], Any] | None = None) -> Any:
  """`fn(params, batch)` over all rows of `inputs` on this process's devices -> float32 numpy.

  `fn` must be a stable function object (it keys the compile cache). Its output may be a pytree.
  """
  mesh = local_mesh()
  size = batch_size_for(len(inputs), batch_size, mesh)
  run = _compiled(fn, mesh)
  params = jax.device_put(to_local(params), replicated(mesh))
  to_host = lambda out, n: jax.tree.map(lambda o: np.asarray(o[:n], np.float32), out)  # noqa: E731
  done, pending = [], []
  for start in range(0, len(inputs), size):
    chunk = np.asarray(inputs[start:start + size])
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    pending.append((run(params, jax.device_put(chunk, sharded(mesh))), size - pad))
    if len(pending) > 2:  # to host one batch behind: overlap kept, device buffers freed
      done.append(to_host(*pending.pop(0)))
    if progress:
      progress(size - pad)
  done += [to_host(*p) for p in pending]
  if not done:
    out = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((size, *inputs.shape[1:]), inputs.dtype))
    return jax.tree.map(lambda o: np.zeros((0, *o.shape[1:]), np.float32), out)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *done)
