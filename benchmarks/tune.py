"""Speed experiments, A/B on a shared machine: variants of flaxtl's step (XLA flags, dtype, batch)
timed in interleaved rounds, each variant in its own worker process; a variant's speed-up is the
median over rounds of its images/s over the baseline's measured in the same round.

  python -m benchmarks.tune [--size 112] [--rounds 3] [--configs block5:cached,block5,all]
        [--variants default,eigen,bf16,eigen_bf16,batch64] [--convs] [--profile] [--out FILE.json]

`--profile` prints, per config and variant, where one step's time goes (benchmarks/profiles.py).
`--convs` first times single convolutions (forward, input grad, kernel grad) at three VGG16 shapes
in XLA's default YNNPACK path, XLA with YNNPACK off (Eigen), and TF with and without oneDNN.
"""
from __future__ import annotations

import argparse
import json
import statistics

from benchmarks import common

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # empty list: XLA's own (Eigen) conv/dot
YNN = "FLAXTL_XLA_DEFAULTS"  # =1: keep XLA's default YNNPACK convolutions (flaxtl picks Eigen)
VARIANTS = {  # name: (worker env, step kwargs)
    "default": ({YNN: "1"}, {}),
    "eigen": ({"XLA_FLAGS": NO_YNN}, {}),
    "bf16": ({YNN: "1"}, {"dtype": "bfloat16"}),
    "eigen_bf16": ({"XLA_FLAGS": NO_YNN}, {"dtype": "bfloat16"}),
    "reshape_pool": ({YNN: "1", "FLAXTL_BENCH_POOL": "reshape"}, {}),
    "eigen_reshape_pool": ({"XLA_FLAGS": NO_YNN, "FLAXTL_BENCH_POOL": "reshape"}, {}),
    "slice_pool": ({YNN: "1", "FLAXTL_BENCH_POOL": "slices"}, {}),
    "eigen_slice_pool": ({"XLA_FLAGS": NO_YNN, "FLAXTL_BENCH_POOL": "slices"}, {}),
    "fast_math": ({YNN: "1", "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}, {}),
    "batch64": ({YNN: "1"}, {"batch": 64}),
    "eigen_batch64": ({"XLA_FLAGS": NO_YNN}, {"batch": 64}),
}
CONV_SHAPES = ((32, 7, 512, 512), (32, 28, 256, 256), (32, 112, 64, 64))  # at 112 px: block5, 3, 1


def _config(spec: str, size: int) -> dict:
  trainable, _, how = spec.partition(":")
  return {"trainable": trainable, "size": size, "batch": 32, "cached": how == "cached"}


def ab_steps(configs: list[str], variants: list[str], size: int, rounds: int, log=print) -> list[dict]:
  workers = {}
  envs = {}
  for v in variants:  # variants with the same env share a worker
    env = VARIANTS[v][0]
    key = json.dumps(env, sort_keys=True)
    if key not in envs:
      envs[key] = common.Worker("jax_side", env=env)
    workers[v] = envs[key]
  out = []
  try:
    for spec in configs:
      base = _config(spec, size)
      runs = {v: {**base, **VARIANTS[v][1]} for v in variants}
      first = {v: workers[v]("step", **kw, steps=1, warmup=0) for v, kw in runs.items()}
      per_round = {v: [] for v in variants}
      loads = []
      for r in range(rounds):
        for v, kw in runs.items():
          res = workers[v]("step", **kw, steps=2, warmup=0)
          per_round[v].append(res.get("images_per_s", float("nan")))
          loads.append(res.get("load_after"))
      b = per_round[variants[0]]
      for v in variants:
        rec = {"config": spec, "size": size, "variant": v, **VARIANTS[v][1],
               "xla_flags": VARIANTS[v][0].get("XLA_FLAGS", ""),
               "images_per_s": statistics.median(per_round[v]),
               "rounds": per_round[v], "compile_s": first[v].get("compile_s"),
               "speedup_vs_first": statistics.median(x / y for x, y in zip(per_round[v], b)),
               "load": [min(loads), max(loads)], "peak_rss_mb": first[v].get("peak_rss_mb")}
        out.append(rec)
        log(f"  {spec:<14s} {v:<14s} {rec['images_per_s']:8.2f} img/s  x{rec['speedup_vs_first']:.2f}"
            f" vs {variants[0]}  rounds {[round(x, 2) for x in per_round[v]]}  load {rec['load']}")
  finally:
    for w in set(envs.values()):
      w.close()
  return out


def ab_convs(rounds: int, dtypes=("float32",), log=print) -> list[dict]:
  workers = {"xla_ynn": common.Worker("jax_side", env={YNN: "1"}),
             "xla_eigen": common.Worker("jax_side", env={"XLA_FLAGS": NO_YNN}),
             "tf_onednn": common.Worker("keras_side"),
             "tf_eigen": common.Worker("keras_side", env={"TF_ENABLE_ONEDNN_OPTS": "0"})}
  out = []
  try:
    for b, hw, cin, cout in CONV_SHAPES:
      for dtype in dtypes:
        got = {k: [] for k in workers}
        for _ in range(rounds):
          for k, w in workers.items():
            got[k].append(w("conv", batch=b, hw=hw, cin=cin, cout=cout, dtype=dtype, steps=2,
                            warmup=1))
        for k, rs in got.items():
          med = {p: statistics.median(r["gflops"][p] for r in rs) for p in ("fwd", "dgrad", "wgrad")}
          out.append({"shape": [b, hw, hw, cin, cout], "dtype": dtype, "impl": k, "gflops": med,
                      "load": [r["load"] for r in rs]})
          log(f"  conv b{b} {hw}x{hw} {cin}->{cout} {dtype:<8s} {k:<10s} " +
              "  ".join(f"{p} {v:7.1f}" for p, v in med.items()) + " GFLOP/s")
  finally:
    for w in workers.values():
      w.close()
  return out


def profile_steps(configs: list[str], variants: list[str], size: int, log=print) -> list[dict]:
  from benchmarks import profiles
  out = []
  for v in variants:
    env, extra = VARIANTS[v]
    w = common.Worker("jax_side", env=env)
    try:
      for spec in configs:
        kw = {**_config(spec, size), **extra}
        r = w("profile", **kw, steps=1)
        out.append({"config": spec, "variant": v, **kw, **r})
        log(f"\n  profile {spec} @ {size} ({v}):")
        log(profiles.format_summary(r) if "error" not in r else r["error"])
    finally:
      w.close()
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=112)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--configs", default="block5:cached,block5,all")
  ap.add_argument("--variants", default="default,eigen,bf16,eigen_bf16,batch64")
  ap.add_argument("--convs", action="store_true")
  ap.add_argument("--profile", action="store_true")
  ap.add_argument("--conv-dtypes", default="float32")
  ap.add_argument("--out")
  args = ap.parse_args()
  doc = {"load_start": common.load()}
  if args.convs:
    doc["convs"] = ab_convs(args.rounds, args.conv_dtypes.split(","))
  if args.profile:
    doc["profiles"] = profile_steps(args.configs.split(","), args.variants.split(","), args.size)
  else:
    doc["steps"] = ab_steps(args.configs.split(","), args.variants.split(","), args.size,
                            args.rounds)
  doc["load_end"] = common.load()
  if args.out:
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=1)


if __name__ == "__main__":
  main()
