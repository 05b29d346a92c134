"""Process-wide settings, applied by the verbs' entry point (`flaxtl.cli`), never by `import flaxtl`.

Python users call `flaxtl.configure_cpu()` themselves, before the first JAX computation.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

# XLA:CPU's default YNNPACK convolutions make VGG16 steps 1.3-2.4x slower than XLA's own Eigen ones
# on this project's AVX-512 CPUs (benchmarks/RESULTS.md). An empty YNN fusion list selects Eigen.
# (Its column reductions are slow, so batch norm sums as matmuls: models.backbone.BatchNorm.)
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _accelerator_plugin_installed() -> bool:
  """A GPU/TPU PJRT plugin (jax_plugins.*) or libtpu: its XLA build may not know a CPU flag, and an
  unknown XLA flag aborts the process."""
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def configure_cpu() -> bool:
  """Selects XLA's own CPU convolutions (XLA_FLAGS); True if the flag was added.

  Must run before jax creates its CPU backend. Left alone when the user chose ynn_fusion_type, set
  FLAXTL_XLA_DEFAULTS=1, or a GPU/TPU plugin is installed (unless JAX_PLATFORMS=cpu).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("FLAXTL_XLA_DEFAULTS") == "1" or "ynn_fusion_type" in flags:
    return False
  if os.environ.get("JAX_PLATFORMS", "").lower() != "cpu" and _accelerator_plugin_installed():
    return False
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      logging.getLogger("flaxtl").warning(
          "flaxtl.configure_cpu(): JAX's backend already started; call it before any JAX "
          "computation for XLA's faster CPU convolutions")
      return False
  os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
  return True


def cache_root() -> Path:
  """flaxtl's own cache: $FLAXTL_CACHE_DIR, else ~/.cache/flaxtl (features/, jax/)."""
  return Path(os.environ.get("FLAXTL_CACHE_DIR") or Path.home() / ".cache" / "flaxtl")


def configure_compilation_cache() -> str | None:
  """JAX's persistent compilation cache in cache_root()/jax; the folder, or None if left alone.

  A verb run again (predict on new images, evaluate, the same config retrained, a sweep resumed)
  then loads its compiled programs instead of compiling them again (benchmarks/RESULTS.md). A hit
  is the same executable: the key covers the program, XLA_FLAGS, the devices and JAX's version.
  Left alone when the user chose a folder (JAX_COMPILATION_CACHE_DIR) or set
  FLAXTL_COMPILATION_CACHE=0. JAX's default keeps only programs that took >= 1 s to compile.
  """
  if os.environ.get("FLAXTL_COMPILATION_CACHE") == "0" or os.environ.get(
      "JAX_COMPILATION_CACHE_DIR"):
    return None
  folder = cache_root() / "jax"
  try:  # else JAX would warn at every program it compiles
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
      raise PermissionError(f"{folder} is not writable")
  except OSError as e:
    logging.getLogger("flaxtl").warning("no compilation cache (programs are compiled every run): "
                                        "%s; set FLAXTL_CACHE_DIR to a writable folder", e)
    return None
  folder = str(folder)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder  # read when jax is imported; children too
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_compilation_cache_dir", folder)
  return folder


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "tensorflow", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """jax.distributed.initialize() when asked (flags or JAX_COORDINATOR_ADDRESS) or on a TPU VM."""
  import jax
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  on_tpu_vm = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_NAME"))
  if coordinator:
    kwargs = {"coordinator_address": coordinator}
    if num_processes:
      kwargs["num_processes"] = num_processes
    if process_id >= 0:
      kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
  elif on_tpu_vm:
    jax.distributed.initialize()
