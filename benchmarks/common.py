"""What both framework workers share: FLOP accounting, timing, memory and a JSON-lines protocol.

Each framework runs in its own long-lived worker process (`python -m benchmarks.jax_side`,
`benchmarks.keras_side`): TF and XLA keep their own thread pools, peak RSS is per framework, and
the driver can time the same configuration in both back to back (ratios from adjacent minutes,
which matters on a shared machine). A worker reads one JSON request per line on stdin and answers
with one line starting with `@@ ` on stdout (libraries may print to stdout too).

FLOP accounting (stated once, used everywhere): a 3x3 SAME conv costs H*W*Cin*Cout*9 MACs per
image, 2 FLOPs per MAC. Forward = every conv the step runs (VGG16: 15.47 GMACs = 30.9 GFLOP at 224
px, x (size/224)^2). Backward = 2x the forward of each trainable conv (input and weight gradients),
except the first trainable conv, which needs only its weight gradient (1x). Frozen convs run
forward only (from images) or not at all (from cached features). Pools, GAP, Dense head, loss
and Adam are ignored (< 0.1%).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Callable

VGG_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
SIGN_DIGITS_TRAIN = 1712  # training images of sign_language_digits
BOUNDARY = {"all": None, "block5": "block4_pool", "head": "avg_pool"}


def conv_macs(image_size: int) -> list[tuple[str, float]]:
  """(layer, MACs per image) for VGG16's 13 convs."""
  out, size, cin = [], image_size, 3
  for b, n, cout in VGG_BLOCKS:
    for c in range(1, n + 1):
      out.append((f"block{b}_conv{c}", size * size * cin * cout * 9.0))
      cin = cout
    size //= 2
  return out


def step_gflop(image_size: int, trainable: str, cached: bool) -> float:
  """GFLOP per image of one train step (module docstring); `cached`: frozen convs not run."""
  layers = conv_macs(image_size)
  first = {"all": 0, "block4": 7, "block5": 10, "head": len(layers)}[trainable]
  fwd = sum(m for _, m in (layers[first:] if cached else layers))
  bwd = sum(2 * m for _, m in layers[first:]) - (layers[first][1] if first < len(layers) else 0)
  return 2 * (fwd + bwd) / 1e9


def forward_gflop(image_size: int, upto: int = 13, start: int = 0) -> float:
  """GFLOP per image of convs [start, upto) forward (feature pass: 0..10, eval from cache: 10..13)."""
  return 2 * sum(m for _, m in conv_macs(image_size)[start:upto]) / 1e9


def load() -> float:
  return round(os.getloadavg()[0], 2)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
  import psutil
  return psutil.Process().memory_info().rss / 2 ** 20


def time_steps(step: Callable[[], object], steps: int, warmup: int) -> tuple[float, list[float]]:
  """First call (compile + one step) timed alone, then warm-up, then each step synchronised:
  -> (first call s, [step s])."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return first, times


def timeit(step: Callable[[], object], steps: int, warmup: int) -> dict:
  """time_steps summarised: compile time apart, median/min/max step, load before and after."""
  load0 = load()
  first, times = time_steps(step, steps, warmup)
  med = statistics.median(times)
  return {"first_call_s": first, "compile_s": max(first - med, 0.0), "median_s": med,
          "min_s": min(times), "max_s": max(times), "steps": len(times),
          "load_before": load0, "load_after": load()}


def serve(handlers: dict[str, Callable[..., dict]], env: Callable[[], dict]) -> None:
  """The worker loop: one JSON request per stdin line -> one '@@ {...}' answer on stdout."""
  out = sys.stdout
  sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
  out.write("@@ " + json.dumps({"ready": True, **env()}) + "\n")
  out.flush()
  for line in sys.stdin:
    if not line.strip():
      continue
    req = json.loads(line)
    try:
      res = handlers[req.pop("op")](**req)
    except Exception as e:  # reported to the driver; the worker keeps serving
      import traceback
      traceback.print_exc()
      res = {"error": f"{type(e).__name__}: {e}"}
    res.update(rss_mb=rss_mb(), peak_rss_mb=peak_rss_mb())
    out.write("@@ " + json.dumps(res) + "\n")
    out.flush()


class Worker:
  """Driver side: a `python -m benchmarks.<module>` process answering requests, one at a time."""

  def __init__(self, module: str, env: dict | None = None, log: Callable = print):
    import subprocess
    self.module, self.log = module, log
    self.proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})}, bufsize=1)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@ "):
        return json.loads(line[3:])
    raise RuntimeError(f"worker {self.module} exited (rc {self.proc.wait()})")

  def __call__(self, op: str, **kw) -> dict:
    t = time.perf_counter()
    self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
    self.proc.stdin.flush()
    res = self._read()
    res["wall_s"] = time.perf_counter() - t
    return res

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
