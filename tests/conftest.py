"""Shared fixtures: the real data and weights in ../shared (when present), tiny run configs.

The library never looks next to the repo: FLAXTL_DATA_DIR points at ../shared/data here, and the
tiny configs name the weights file, as a user would."""
from __future__ import annotations

import os
import sys
from pathlib import Path

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
