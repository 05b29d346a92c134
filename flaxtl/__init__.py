"""flaxtl: transfer learning for image classification in JAX/Flax."""
from __future__ import annotations

import os

# XLA:CPU's default YNNPACK convolutions make VGG16 steps 1.3-2.4x slower
# than XLA's own Eigen ones on this project's AVX-512 CPU (benchmarks/RESULTS.md). An empty YNN
# fusion list selects Eigen; it must be in XLA_FLAGS before jax creates its CPU backend, and is
# left alone when the user chose ynn_fusion_type or set FLAXTL_XLA_DEFAULTS=1, and where a GPU/TPU
# plugin is installed (unless JAX_PLATFORMS=cpu).
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _accelerator_plugin_installed() -> bool:
  """A GPU/TPU PJRT plugin (jax_plugins.*) or libtpu: jax computes there, and its XLA build may
  not know a CPU flag (an unknown XLA flag aborts the process)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def _prefer_eigen_convolutions() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("FLAXTL_XLA_DEFAULTS") == "1" or "ynn_fusion_type" in flags:
    return
  if os.environ.get("JAX_PLATFORMS", "").lower() != "cpu" and _accelerator_plugin_installed():
    return
  os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_prefer_eigen_convolutions()


def load_exported(path, batch_size: int = 64):
  """An exported bundle (python -m flaxtl.export) -> a predictor with `.predict(images)` and
  `.class_names`; imported here lazily so `import flaxtl` stays light."""
  from flaxtl.export import load_exported as load
  return load(path, batch_size)
