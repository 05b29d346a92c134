"""flaxtl: transfer learning for image classification in JAX/Flax."""
from __future__ import annotations


def load_exported(path, batch_size: int = 64):
  """An exported bundle (python -m flaxtl.export) -> a predictor with `.predict(images)` and
  `.class_names`; imported here lazily so `import flaxtl` stays light."""
  from flaxtl.export import load_exported as load
  return load(path, batch_size)
