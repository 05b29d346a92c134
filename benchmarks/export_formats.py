"""The exported model's two serving files side by side: file size, and CPU images/s of onnxruntime
on model.onnx beside TensorFlow on saved_model/, in one process, on the same batch.

    python -m flaxtl.export --workdir runs/sign_digits --out exported/ --format both
    python -m benchmarks.export_formats exported/ [--batch 32] [--rounds 5] [--steps 5]

Rounds alternate the two runtimes (each round: `steps` timed calls of each), so the ratio compares
measurements seconds apart on a shared machine; images/s is the median over all timed calls. Both
use their default CPU thread pools (all cores). Random uint8 pixels at the bundle's image size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import numpy as np

from benchmarks.common import load, time_steps


def dir_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("bundle")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  a = ap.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import onnxruntime as ort
  import tensorflow as tf
  bundle = Path(a.bundle)
  doc = json.loads((bundle / "bundle.json").read_text())
  s = doc["image_size"]
  images = np.random.default_rng(0).integers(0, 256, (a.batch, s, s, 3)).astype(np.uint8)
  serving = tf.saved_model.load(str(bundle / "saved_model")).signatures["serving_default"]
  sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
  run = {"saved_model (TensorFlow)": lambda: serving(images=tf.constant(images))["probabilities"].numpy(),
         "onnx (onnxruntime)": lambda: sess.run(None, {"images": images})[0]}
  outs = {k: f() for k, f in run.items()}
  diff = float(np.abs(outs["saved_model (TensorFlow)"] - outs["onnx (onnxruntime)"]).max())
  times = {k: [] for k in run}
  first = {}
  load0 = load()
  for r in range(a.rounds):
    for k, f in run.items():
      f0, t = time_steps(f, a.steps, warmup=1 if r == 0 else 0)
      first.setdefault(k, f0)
      times[k] += t
  sizes = {"saved_model (TensorFlow)": dir_bytes(bundle / "saved_model"),
           "onnx (onnxruntime)": (bundle / "model.onnx").stat().st_size}
  print(f"{bundle}: {doc['model']['name']} {doc['model'].get('head')}, {s} px, "
        f"{doc['num_classes']} classes, batch {a.batch}; CPU {cpu_model()}, {os.cpu_count()} "
        f"cores; load {load0} -> {load()}; max |p_tf - p_onnx| = {diff:.2e}")
  print(f"{'format':26s} {'size MB':>8s} {'images/s':>9s} {'min-max':>13s} {'first call s':>12s}")
  for k, t in times.items():
    rate = a.batch / statistics.median(t)
    print(f"{k:26s} {sizes[k] / 1e6:8.1f} {rate:9.1f} {a.batch / max(t):6.1f}-{a.batch / min(t):<6.1f}"
          f" {first[k]:12.2f}")
  ratio = statistics.median(times["saved_model (TensorFlow)"]) / statistics.median(
      times["onnx (onnxruntime)"])
  print(f"onnxruntime / SavedModel images/s: {ratio:.2f}x")


if __name__ == "__main__":
  main()
