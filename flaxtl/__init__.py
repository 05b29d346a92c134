"""flaxtl: transfer learning for image classification in JAX/Flax.

The Python API (flaxtl/api.py): `config`, `fit`, `load`, `report` (an evaluation), `data_dir`, and `load_exported` for an
exported bundle. `import flaxtl` changes nothing in the process and imports no JAX or TensorFlow:
call `flaxtl.configure_cpu()` first in a notebook or script for XLA's faster CPU convolutions (the
`python -m flaxtl.<verb>` commands do it).
"""
from __future__ import annotations

from flaxtl.api import config, data_dir, fit, load, report
from flaxtl.errors import ConfigError, FlaxtlError
from flaxtl.runtime import configure_cpu

__all__ = ["ConfigError", "FlaxtlError", "config", "configure_cpu", "data_dir", "fit", "load",
           "load_exported", "report"]


def load_exported(path, batch_size: int = 64):
  """An exported bundle (python -m flaxtl.export) -> a predictor with `.predict(images)` and
  `.class_names`; imported here lazily so `import flaxtl` stays light."""
  from flaxtl.export import load_exported as load
  return load(path, batch_size)
