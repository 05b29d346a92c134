"""The frozen feature pass by each engine beside Keras' own forward, in ONE process (issue 17).

  python -m benchmarks.feature_engines [--sizes 112 224] [--rounds 5] [--boundary block4_pool]

Per size: flaxtl's feature pass by XLA (float32), XLA with Winograd convolutions (float32),
TensorFlow's oneDNN in float32 and in bf16
(flaxtl/feature_engine.py runners: uint8 images in, preprocessing included, float32 out), and
Keras' VGG16 forward (predict_on_batch, float32 inputs, no preprocessing) in float32 and in
mixed_bfloat16; random weights, batch 32, and bf16 again at the TF engines' own pass batch
(tf_trunk.batch_size) for both; one warm call each, then `rounds` interleaved rounds of one batch
each, the order rotated every round. "Keras best" is the fastest Keras row of the round, whatever
its batch. A ratio is the median over rounds of the per-round ratio: measurements seconds
apart, what survives a loaded machine. Also what flaxtl's 'auto' probe picks at each size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flaxtl

flaxtl.configure_cpu()
import jax  # noqa: E402
import numpy as np  # noqa: E402

ENGINES = ("xla", "winograd", "tf", "tf_bf16")


def cpu_line() -> str:
  from flaxtl import feature_engine
  c = feature_engine.cpu()
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  n = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("CPU(s):")), "?")
  return f"{c['model']}, {n} CPUs, bf16 flags: {' '.join(c['bf16_flags']) or 'none'}"


def variants(size: int, boundary: str, batch: int) -> dict:
  import keras
  import tensorflow as tf
  from flaxtl import feature_engine
  from flaxtl.models import VGG16
  model = VGG16(include_top=False, pooling="avg", num_classes=10)
  params = jax.tree.map(np.asarray, jax.jit(model.init)(
      jax.random.key(0), np.zeros((1, size, size, 3), np.float32))["params"])
  from flaxtl import tf_trunk
  big = tf_trunk.batch_size(size)  # the TF engines' own pass batch
  x = np.random.default_rng(0).integers(0, 256, (max(batch, big), size, size, 3), dtype=np.uint8)
  out = {}  # label -> (one call, images it computes)
  for e in ENGINES:
    run = feature_engine.runner(e, model, {"params": params}, "torch", boundary, (boundary,))
    out[f"flaxtl {e}"] = (lambda run=run: run(x[:batch]), batch)
    if e == "tf_bf16" and big != batch:
      out[f"flaxtl {e}, batch {big} (as run)"] = (lambda run=run: run(x[:big]), big)
  for dtype in ("float32", "bfloat16"):
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    try:
      base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
      m = keras.Model(base.input, base.get_layer(boundary).output)
    finally:
      keras.mixed_precision.set_global_policy("float32")
    for n in (batch, big) if dtype == "bfloat16" and big != batch else (batch,):
      xk = tf.constant(x[:n].astype(np.float32))
      out[f"keras {dtype}" + (f", batch {n}" if n != batch else "")] = (
          lambda m=m, xk=xk: m.predict_on_batch(xk), n)
  with tempfile.TemporaryDirectory() as tmp:
    choice = feature_engine.choose("auto", model, {"params": params}, "torch", size, boundary, "float32",
                                   10 ** 9, tmp, log_fn=lambda *a: None)
  return out, choice


def measure(size: int, boundary: str, batch: int, rounds: int) -> dict:
  fns, choice = variants(size, boundary, batch)
  for f, _ in fns.values():  # compile / trace / oneDNN primitive creation
    f()
  ips = {k: [] for k in fns}
  loads = []
  order = list(fns)
  for r in range(rounds):
    for k in order[r % len(order):] + order[:r % len(order)]:  # rotated: no variant always
      f, n = fns[k]                                             # follows the same one
      t = time.perf_counter()
      f()
      ips[k].append(n / (time.perf_counter() - t))
    loads.append(round(os.getloadavg()[0], 2))
  keras_best = [max(v[i] for k, v in ips.items() if k.startswith("keras")) for i in range(rounds)]
  rows = {}
  for k, v in ips.items():
    same = "keras bfloat16" + ("" if fns[k][1] == batch else f", batch {fns[k][1]}")
    rows[k] = {"images_per_s": statistics.median(v), "batch": fns[k][1],
               "x_xla": statistics.median(a / b for a, b in zip(v, ips["flaxtl xla"])),
               "x_keras_best": statistics.median(a / b for a, b in zip(v, keras_best)),
               "x_keras_bf16_same_batch": statistics.median(a / b for a, b in zip(
                   v, ips[same])) if "tf_bf16" in k else None}
  return {"rows": rows, "loads": loads, "auto": choice.engine,
          "probe": choice.probe["images_per_s"],
          "probe_rel_error": choice.probe["rel_error_vs_xla"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--boundary", default="block4_pool")
  args = ap.parse_args()
  import tensorflow as tf
  print(f"CPU: {cpu_line()}; jax {jax.__version__}, TensorFlow {tf.__version__}; "
        f"load average {os.getloadavg()[0]:.2f} at start; {time.strftime('%Y-%m-%d %H:%M')}")
  for size in args.sizes:
    r = measure(size, args.boundary, args.batch, args.rounds)
    print(f"\n{size} px, to {args.boundary}, batch {args.batch}, {args.rounds} rounds, load "
          f"{min(r['loads'])}-{max(r['loads'])}; auto picks {r['auto']} (probe img/s "
          + ", ".join(f"{e} {v:.1f}" for e, v in r["probe"].items()) + "; rel. error vs xla "
          + ", ".join(f"{e} {v:.1g}" for e, v in r["probe_rel_error"].items()) + ")\n")
    print("| variant | images/s (median) | x flaxtl xla | x Keras best | "
          "x Keras bf16, same batch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, v in r["rows"].items():
      same = v["x_keras_bf16_same_batch"]
      print(f"| {k} | {v['images_per_s']:.1f} | {v['x_xla']:.2f} | {v['x_keras_best']:.2f} | "
            f"{'' if same is None else f'{same:.2f}'} |")


if __name__ == "__main__":
  main()
