"""Input pipeline alone: decode + resize (input_pipeline.decode_images), then one Feeder epoch of
stored uint8 images (preprocessing runs in the jitted step), on the sign_language_digits training
JPEGs (under $FLAXTL_DATA_DIR).

Run as its own process (`python -m benchmarks.pipeline SIZE [SIZE ...]`): tf.data's threads must
not compete with a train step, and the numbers must not include JAX. Prints one '@@ {json}' line.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common


def measure(size: int, batch: int = 32) -> dict:
  from flaxtl import data, input_pipeline
  split = data.split_folders(data.data_dir() / "sign_language_digits")["train"]
  load0 = common.load()
  t = time.perf_counter()
  images, bad = input_pipeline.decode_images(split.paths, size)
  decode_s = time.perf_counter() - t
  out = {"size": size, "images": len(images), "bad": len(bad), "decode_s": decode_s,
         "decode_images_per_s": len(images) / decode_s}
  for name, feeder in (("feeder_images", input_pipeline.Feeder(images, split.labels)),
                       ("feeder_cached_block4_pool", input_pipeline.Feeder(
                           common_features(len(images), size), split.labels))):
    t, n = time.perf_counter(), 0
    for b in feeder.epoch(batch, seed=0, epoch=0, shuffle=True):
      n += int(b["mask"].sum())
    dt = time.perf_counter() - t
    out[f"{name}_s"], out[f"{name}_images_per_s"] = dt, n / dt
  out.update(load_before=load0, load_after=common.load(), peak_rss_mb=common.peak_rss_mb())
  return out


def common_features(n: int, size: int):
  """Stand-in cached block4_pool features of the right shape (the Feeder only gathers rows)."""
  import numpy as np
  return np.zeros((n, size // 16, size // 16, 512), np.float32)


if __name__ == "__main__":
  res = [measure(int(s)) for s in sys.argv[1:] or ["112"]]
  print("@@ " + json.dumps(res), flush=True)
