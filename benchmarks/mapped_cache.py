"""python -m benchmarks.mapped_cache [ROWS]

What memory-mapping the feature cache costs a run: one epoch's rows gathered in shuffled batches
of 32 (as `input_pipeline.Feeder` does) from a mapped cache entry and from the same array in RAM,
alternating, best of 3 rounds, in one process. The default entry has the shape of Caltech-97's
block4_pool train maps (4,343 x 14 x 14 x 512 float32, 1.74 GB), written to a temp dir.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flaxtl import features, input_pipeline
from flaxtl.feature_engine import cpu


def main(rows: int = 4343, rounds: int = 3) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    features.store(Path(tmp), "k", rng.standard_normal((rows, 14, 14, 512), np.float32), {})
    mapped = features.load(Path(tmp), "k")
    arrays = {"mapped": mapped, "ram": np.array(mapped)}  # the copy: what load gave before
    times = {k: [] for k in arrays}
    for _ in range(rounds):
      for name, array in arrays.items():
        feeder = input_pipeline.Feeder(array, np.zeros(rows, np.int32))
        order = rng.permutation(rows)
        t = time.perf_counter()
        for s in range(0, rows, 32):
          feeder.rows(np.sort(order[s:s + 32]), None)
        times[name].append(time.perf_counter() - t)
    out = {"cpu": cpu()["model"], "rows": rows, "gb": mapped.nbytes / 1e9,
           **{f"{k}_s": min(v) for k, v in times.items()}}
    print(f"{out['cpu']}: an epoch of {rows} rows ({out['gb']:.2f} GB) gathered in batches of 32, "
          f"best of {rounds}: mapped {out['mapped_s']:.2f} s, in RAM {out['ram_s']:.2f} s")
    return out


if __name__ == "__main__":
  main(*map(int, sys.argv[1:2]))
