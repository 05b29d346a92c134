"""The training step in XLA float32 against TF's oneDNN bf16 (`config.train_engine`), side by side.

  python -m benchmarks.train_engine [--sizes 112 224] [--trainable block5 block4] [--rounds 3]

flaxtl's own step (`benchmarks.jax_side.step`: jit_train_step on a Setup as `prepare` builds it,
random weights, batch 32, cached boundary features), the two engines interleaved round by round
in one process; images/s is each engine's median step, the ratio is per round. Run it alone.
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks import jax_side


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
  ap.add_argument("--trainable", nargs="+", default=["block5", "block4"])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--batch", type=int, default=32)
  args = ap.parse_args()
  from flaxtl import feature_engine
  cpu = feature_engine.cpu()
  print(f"CPU: {cpu['model']}, bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'}; "
        f"{jax_side.env()}", flush=True)
  print("| trainable | px | xla float32 img/s | tf_bf16 img/s | tf_bf16 / xla (per round) |")
  print("| --- | ---: | ---: | ---: | --- |")
  for trainable in args.trainable:
    for size in args.sizes:
      rates = {"xla": [], "tf_bf16": []}
      for _ in range(args.rounds):
        for engine in rates:
          r = jax_side.step(trainable, size, args.batch, cached=True, train_engine=engine)
          rates[engine].append(r["images_per_s"])
      ratios = [t / x for x, t in zip(rates["xla"], rates["tf_bf16"])]
      print(f"| {trainable} | {size} | {statistics.median(rates['xla']):.1f} | "
            f"{statistics.median(rates['tf_bf16']):.1f} | "
            f"{statistics.median(ratios):.2f}x ({', '.join(f'{v:.2f}' for v in ratios)}) |",
            flush=True)


if __name__ == "__main__":
  main()
