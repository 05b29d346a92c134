"""Images/s of flaxtl's real train step (VGG16, 224 px) on one accelerator, beside PyTorch.

  python benchmarks/gpu_step.py [--out DIR] [--batches 64,128] [--dtypes float32,bfloat16]
  python benchmarks/gpu_step.py --tiny          # CPU smoke run: 64 px, batch 8, 2 steps

What is timed: `flaxtl.step.jit_train_step(mesh)` (jit over the ('data',) mesh, donated state,
Adam, float32 params) on random device-resident batches, no tf.data. 'block5' runs from images
with stop_gradient at block4_pool (the step used when the cache is off, e.g. with augmentation),
'all' trains every layer. Compile time = first call (compile + one step), then warm-up steps,
then the median of individually synchronised steps. PyTorch: torchvision vgg16 features + global
average pool + Linear(10), the same layers frozen via requires_grad=False, fused Adam, channels_last,
cudnn.benchmark, bf16 through autocast (float32 params). The matmul part measures the ceiling.

FLOP accounting (stated, simple): forward = 2 x MACs of the 13 convs (15.35 GMACs per 224 px
image, the usual 15.5 less the FC layers; pools, GAP, head ignored); backward = 2 x forward for
every trainable conv except the first trainable one, which only needs its weight gradient (1 x);
frozen convs run forward only. block5: 35.3 GFLOP/image, all: 91.9 GFLOP/image. Each part runs in its own process (the two
frameworks must not share the GPU's memory pool); results are JSON lines, then a table.

Imports only jax, flax, optax, orbax (+ torch, torchvision for that part): ml_collections is
replaced by a stand-in module when absent (flaxtl.step does not import it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import common  # noqa: E402  (stdlib only: FLOP accounting, timing)

# Datasheet dense peaks (TFLOP/s) by device name fragment: (bf16, tf32, fp32 non-tensor).
PEAKS = {"H100 80GB HBM3": (989.0, 494.0, 67.0), "H100": (989.0, 494.0, 67.0),
         "H200": (989.0, 494.0, 67.0), "A100": (312.0, 156.0, 19.5)}


def train_flops(image_size: int, trainable: str) -> float:
  """FLOPs per image of one train step from images (the accounting in benchmarks/common.py)."""
  return common.step_gflop(image_size, trainable, cached=False) * 1e9


# ---------------------------------------------------------------------------------------------
# Parts (each in its own process).

def part_matmul(args, emit) -> None:
  """Ceilings: a big square matmul in bf16, f32 at JAX's default precision, and f32 'highest'."""
  import jax
  import jax.numpy as jnp
  n = args.matmul
  for name, dtype, precision in (("bf16", jnp.bfloat16, None), ("f32 default", jnp.float32, None),
                                 ("f32 highest", jnp.float32, "highest")):
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), dtype) for k in (k1, k2))
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    _, times = common.time_steps(lambda: f(a, b).block_until_ready(), args.steps, args.warmup)
    t = statistics.median(times)
    emit(part="matmul", framework="jax", what=name, n=n, ms=t * 1e3,
         tflops=2 * n ** 3 / t / 1e12)
  try:
    import torch
  except ImportError as e:
    emit(part="matmul", framework="torch", error=f"torch not importable: {e}")
    return
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("f32 (tf32 off)", torch.float32, False),
                            ("f32 (tf32 on)", torch.float32, True)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    _, times = common.time_steps(lambda: (a @ b, sync()), args.steps, args.warmup)
    t = statistics.median(times)
    emit(part="matmul", framework="torch", what=name, n=n, ms=t * 1e3,
         tflops=2 * n ** 3 / t / 1e12)


def _flaxtl_setup(trainable: str, dtype: str, image_size: int):
  try:
    import ml_collections  # noqa: F401
  except ImportError:  # Not on the GPU image; flaxtl.step does not need it.
    sys.modules["ml_collections"] = types.ModuleType("ml_collections")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flaxtl import freezing, models, prepare, step
  model = models.VGG16(include_top=False, pooling="avg", num_classes=10, dtype=models.DTYPES[dtype])
  params = jax.tree.map(np.asarray, jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"])
  freeze = freezing.plan(trainable, model.layers)
  opt = types.SimpleNamespace(name="adam", learning_rate=1e-4, momentum=0.9, weight_decay=1e-4,
                              schedule="constant", warmup_epochs=0.0, grad_clip=0.0)
  config = types.SimpleNamespace(optimizer=opt, epochs=1, trainable=trainable,
                                 model=types.SimpleNamespace(dtype=dtype))
  network = prepare.Network(model, "torch", start_after=None, stop_gradient_after=freeze.boundary)
  setup = prepare.Setup(config=config, model=model, freeze=freeze, params=params,
                        weights_meta={}, preprocessing="torch",
                        class_names=[str(i) for i in range(10)], feeders={}, network=network,
                        skipped={}, timings={})
  return step, setup


def part_jax(args, emit) -> None:
  import jax
  import numpy as np
  for trainable in args.trainables:
    for dtype in args.dtypes:
      lib, setup = _flaxtl_setup(trainable, dtype, args.image_size)
      from flaxtl import parallel
      mesh = parallel.global_mesh()
      rep = parallel.replicated(mesh)
      for batch_size in args.batches:
        state = lib.create_train_state(setup, 1e-4)  # fresh: steps donate it
        step_fn = lib.jit_train_step(mesh)
        parallel.check_batch_size(batch_size, mesh=mesh)
        rng = np.random.default_rng(0)
        batches = [parallel.put_batch({
            "x": rng.standard_normal((batch_size, args.image_size, args.image_size, 3), np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}, mesh) for _ in range(2)]
        box = {"state": jax.device_put(state, rep),
               "metrics": jax.device_put(lib.zero_metrics(), rep), "i": 0}
        key = jax.random.key(1)

        def step():
          box["i"] += 1
          box["state"], box["metrics"] = step_fn(box["state"], box["metrics"],
                                                 batches[box["i"] % 2], key)
          jax.block_until_ready(box["state"].params)

        first, times = common.time_steps(step, args.steps, args.warmup)
        m = jax.device_get(box["metrics"])
        assert np.isfinite(m["loss"]) and int(m["count"]) == batch_size * (args.steps + args.warmup + 1)
        emit(part="step", framework="jax", trainable=trainable, dtype=dtype, batch=batch_size,
             first_call_s=first, **_stats(times, batch_size, args.image_size, trainable))
        del box, batches


def part_torch(args, emit) -> None:
  try:
    import torch
    import torchvision
  except ImportError as e:
    emit(part="step", framework="torch", error=f"torch/torchvision not importable: {e}")
    return
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  for trainable in args.trainables:
    for dtype in args.dtypes:
      for batch_size in args.batches:
        torch.manual_seed(0)
        features = torchvision.models.vgg16(weights=None).features
        model = torch.nn.Sequential(features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(512, 10))
        convs = [m for m in features if isinstance(m, torch.nn.Conv2d)]
        if trainable != "all":  # block5 = the last 3 convs; everything before them is frozen.
          for conv in convs[:-3]:
            conv.requires_grad_(False)
        model = model.to(dev, memory_format=torch.channels_last)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                               **({"fused": True} if dev == "cuda" else {}))
        xs = [torch.randn(batch_size, 3, args.image_size, args.image_size, device=dev)
              .contiguous(memory_format=torch.channels_last) for _ in range(2)]
        y = torch.randint(0, 10, (batch_size,), device=dev)
        box = {"i": 0}
        amp = dtype == "bfloat16"

        def step():
          box["i"] += 1
          with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(xs[box["i"] % 2]).float(), y)
          loss.backward()
          opt.step()
          opt.zero_grad(set_to_none=True)
          sync()

        first, times = common.time_steps(step, args.steps, args.warmup)
        emit(part="step", framework="torch", trainable=trainable, dtype=dtype, batch=batch_size,
             first_call_s=first, **_stats(times, batch_size, args.image_size, trainable))
        del model, opt, xs
        if dev == "cuda":
          torch.cuda.empty_cache()


def _stats(times, batch_size, image_size, trainable) -> dict:
  t = statistics.median(times)
  return {"median_ms": t * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
          "steps": len(times), "images_per_s": batch_size / t,
          "tflops": train_flops(image_size, trainable) * batch_size / t / 1e12}


def environment(part: str) -> dict:
  env = {"python": sys.version.split()[0], "date": datetime.date.today().isoformat()}
  if part in ("jax", "matmul"):
    import flax
    import jax
    import optax
    env.update(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
               backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               devices=jax.device_count())
  if part in ("torch", "matmul"):
    try:
      import torch
      import torchvision
      env.update(torch=torch.__version__, torchvision=torchvision.__version__,
                 cudnn=torch.backends.cudnn.version(),
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except ImportError:
      pass
  return env


# ---------------------------------------------------------------------------------------------
# Driver: one process per part, then the tables.

def run_part(args) -> None:
  out = open(args.jsonl, "a")

  def emit(**rec):
    rec.update(image_size=args.image_size)
    out.write(json.dumps(rec) + "\n")
    out.flush()
    print(json.dumps(rec), flush=True)

  emit(part="env", which=args.part, **environment(args.part))
  {"matmul": part_matmul, "jax": part_jax, "torch": part_torch}[args.part](args, emit)


def table(records: list[dict]) -> str:
  env = {}
  for r in records:
    if r["part"] == "env":
      env.update({k: v for k, v in r.items() if k not in ("part", "which")})
  device = env.get("torch_device") or env.get("device", "?")
  peak = next((v for k, v in PEAKS.items() if k in device), None)
  mm = {(r["framework"], r["what"]): r["tflops"] for r in records
        if r["part"] == "matmul" and "tflops" in r}
  # The ceiling per dtype: the faster framework's matmul (float32 at each one's default: tf32).
  ceiling = {"bfloat16": max([v for (f, w), v in mm.items() if w == "bf16"], default=None),
             "float32": max([v for (f, w), v in mm.items()
                             if w in ("f32 default", "f32 (tf32 on)")], default=None)}
  lines = [f"Device: {device}; jax {env.get('jax', '-')}, flax {env.get('flax', '-')}, "
           f"torch {env.get('torch', '-')} (cudnn {env.get('cudnn', '-')}), {env.get('date')}", ""]
  if mm:
    lines += ["| matmul | framework | TFLOP/s |", "| --- | --- | ---: |"]
    lines += [f"| {w} | {f} | {v:.1f} |" for (f, w), v in mm.items()]
    lines.append("")
  lines += ["| trainable | dtype | batch | framework | first call s | median ms | images/s | "
            "TFLOP/s | % matmul ceiling | % datasheet | jax / torch |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  steps = [r for r in records if r["part"] == "step" and "median_ms" in r]
  by_key = {(r["trainable"], r["dtype"], r["batch"], r["framework"]): r for r in steps}
  for r in sorted(steps, key=lambda r: (r["trainable"] != "block5", r["dtype"], r["batch"],
                                        r["framework"])):
    c = ceiling.get(r["dtype"])
    p = peak and (peak[0] if r["dtype"] == "bfloat16" else peak[1])
    other = by_key.get((r["trainable"], r["dtype"], r["batch"], "torch"))
    ratio = (f"{r['images_per_s'] / other['images_per_s']:.2f}"
             if r["framework"] == "jax" and other else "")
    of_ceiling = f"{100 * r['tflops'] / c:.0f}%" if c else "-"
    of_peak = f"{100 * r['tflops'] / p:.0f}%" if p else "-"
    lines.append(f"| {r['trainable']} | {r['dtype']} | {r['batch']} | {r['framework']} | "
                 f"{r['first_call_s']:.1f} | {r['median_ms']:.1f} | {r['images_per_s']:.0f} | "
                 f"{r['tflops']:.1f} | {of_ceiling} | {of_peak} | {ratio} |")
  size = next((r["image_size"] for r in records if "image_size" in r), 224)
  lines.append("\nFLOPs per %d px image: block5 %.1f G, all %.1f G (module docstring). %% datasheet: "
               "of dense bf16 / tf32 peaks (%s); float32 convolutions run as tf32 in both "
               "frameworks by default (cudnn_allow_tf32=%s; compare the matmul rows)." % (
                   size, train_flops(size, "block5") / 1e9, train_flops(size, "all") / 1e9,
                   "/".join(map(str, peak[:2])) if peak else "unknown device",
                   env.get("cudnn_allow_tf32", "-")))
  errors = [r for r in records if "error" in r]
  lines += [f"\n{r['part']} {r['framework']}: {r['error']}" for r in errors]
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
  ap.add_argument("--parts", default="matmul,torch,jax")
  ap.add_argument("--part", help=argparse.SUPPRESS)
  ap.add_argument("--jsonl", help=argparse.SUPPRESS)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batches", default="64,128")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--trainables", default="block5,all")
  ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--matmul", type=int, default=8192, help="n of the n x n x n matmul")
  ap.add_argument("--part-timeout", type=int, default=420)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke run: 64 px, batch 8, 2 steps")
  ap.add_argument("--merge", nargs="+", help="only print the table of these .jsonl files")
  args = ap.parse_args()
  if args.tiny:
    # float32 only: XLA:CPU emulates bf16 convolutions (minutes per step, nothing to learn).
    args.image_size, args.batches, args.steps, args.warmup, args.matmul = 64, "8", 2, 1, 256
    args.dtypes = "float32"
  args.batches = [int(b) for b in args.batches.split(",")]
  args.dtypes, args.trainables = args.dtypes.split(","), args.trainables.split(",")
  if args.part:
    return run_part(args)
  if args.merge:
    return print(table([json.loads(l) for f in args.merge for l in Path(f).read_text().splitlines()]))

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / "gpu_step.jsonl"
  jsonl.unlink(missing_ok=True)
  passthrough = [f"--image-size={args.image_size}", f"--batches={','.join(map(str, args.batches))}",
                 f"--dtypes={','.join(args.dtypes)}", f"--trainables={','.join(args.trainables)}",
                 f"--steps={args.steps}", f"--warmup={args.warmup}", f"--matmul={args.matmul}"]
  for part in args.parts.split(","):
    cmd = [sys.executable, __file__, *passthrough, "--part", part, "--jsonl", str(jsonl)]
    t = time.perf_counter()
    try:
      rc = subprocess.run(cmd, timeout=args.part_timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    print(f"# part {part}: rc {rc}, {time.perf_counter() - t:.0f}s", flush=True)
  records = [json.loads(l) for l in jsonl.read_text().splitlines()] if jsonl.exists() else []
  md = table(records)
  (out / "gpu_step.md").write_text(md + "\n")
  (out / "gpu_step.json").write_text(json.dumps(records, indent=1))
  print(md)


if __name__ == "__main__":
  main()
