"""flaxtl beside Keras 3 (TensorFlow) on this machine's CPU: train-step throughput, input pipeline,
end to end, peak memory, and the matmul ceiling. Results to stdout (markdown) and JSON.

  python -m benchmarks.run --quick [--out benchmarks/results.json]   # 112 px; feature pass +224
  python -m benchmarks.run --full  [--out ...]                       # 112 and 224 px, ~25 minutes
  options: --no-ynnpack (skip the XLA-default-convolutions column), --no-real-run, --rounds N

How (details in common.py, jax_side.py, keras_side.py): each framework is a worker process kept
alive for the whole run; every configuration is timed in interleaved rounds (flaxtl, flaxtl YNNPACK,
Keras jit_compile=False, Keras jit_compile=True, and a 2048^3 matmul as the moment's ceiling), so
ratios come from measurements seconds apart, which is what survives a shared, loaded machine.
Per variant: a first call (compile + one step, reported), one warm step to size the rounds, then
`rounds` x k timed steps (k so a round takes ~target_s); images/s is the median over rounds, a
ratio the median over rounds of the per-round ratio. os.getloadavg() is recorded with each.

"flaxtl" runs as users get it: the worker calls `flaxtl.configure_cpu()` (what every verb does) for XLA's own (Eigen) CPU convolutions
(flaxtl/runtime.py). "flaxtl YNNPACK" = the same code under XLA's default YNNPACK convolutions
(FLAXTL_XLA_DEFAULTS=1), whose kernel gradients are slow on this CPU (benchmarks/tune.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
YNN_ENV = {"FLAXTL_XLA_DEFAULTS": "1"}  # XLA's default CPU convolutions (YNNPACK)
PLANS = {  # rounds per image size; quick times Keras' jit_compile=True only where it is cheap
    "quick": dict(sizes=(112,), rounds={112: 1}, target_s=2.0, max_k=3, matmul_n=4096,
                  e2e_size=112, keras_jit_all=(False,), boundaries=("block4_pool",),
                  feature_sizes=(112, 224),
                  memory=False, real_run=False, bf16=False),
    "full": dict(sizes=(112, 224), rounds={112: 3, 224: 2}, target_s=4.0, max_k=5, matmul_n=4096,
                 e2e_size=224, keras_jit_all=(False, True), boundaries=("block4_pool", "avg_pool"),
                 memory=True, real_run=True, bf16=True),  # 'all' @ 224: one round
    "smoke": dict(sizes=(32,), rounds={32: 1}, target_s=0.5, max_k=2, matmul_n=1024,
                  e2e_size=32, keras_jit_all=(False, True), boundaries=("block4_pool", "avg_pool"),
                  memory=True, real_run=True, bf16=True),  # development: every code path, fast
}
TRAINABLES = ("head", "block5", "all")
SPLIT_SIZES = {"train": 1712, "valid": 300, "test": 50}
RECIPE = dict(epochs=20, batch=10)  # the reference sign_digits recipe (Elgendy ch. 6)
DEFAULT_EPOCHS = 8                  # configs/sign_digits.py


def log(*a) -> None:
  print(*a, flush=True)


def machine() -> dict:
  info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "python": platform.python_version(), "cpus": os.cpu_count()}
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in lscpu.splitlines():
      k, _, v = line.partition(":")
      if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                       "Hypervisor vendor"):
        info[k.strip()] = v.strip()
    info["amx_bf16"] = "amx_bf16" in lscpu
    info["avx512f"] = "avx512f" in lscpu
  except OSError:
    pass
  import psutil
  info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
  return info


class Bench:
  def __init__(self, plan: dict, tuned: bool):
    self.plan, self.tuned = plan, tuned
    self.jax = common.Worker("jax_side", log=log)
    self.jaxt = common.Worker("jax_side", env=YNN_ENV, log=log) if tuned else None
    self.keras = common.Worker("keras_side", log=log)
    self.doc = {"machine": machine(), "plan": plan, "workers": {
        "jax": self.jax.info, "jax_ynnpack": self.jaxt.info if tuned else None,
        "keras": self.keras.info}, "load_start": common.load()}

  def close(self) -> None:
    for w in (self.jax, self.jaxt, self.keras):
      if w is not None:
        w.close()

  # -------------------------------------------------------------------------------------------
  def ceiling(self) -> dict:
    """float32 (and bf16) matmul GFLOP/s: XLA's jnp.dot, numpy's BLAS, TF's kernel; interleaved."""
    n, got = self.plan["matmul_n"], {}
    for _ in range(2):
      for w in (self.jax, self.keras):
        r = w("matmul", n=n, steps=3, warmup=1)
        for k, v in r.items():
          if isinstance(v, dict) and "gflops" in v:
            got.setdefault(k, []).append((v["gflops"], v["load_after"]))
    out = {k: {"gflops": statistics.median(g for g, _ in v), "rounds": [g for g, _ in v],
               "load": [l for _, l in v]} for k, v in got.items()}
    out["ceiling_f32"] = max(v["gflops"] for k, v in out.items() if k.endswith("f32"))
    out["n"] = n
    log(f"\n## matmul ceiling ({n}^3)")
    for k, v in out.items():
      if isinstance(v, dict):
        log(f"  {k:<10s} {v['gflops']:7.1f} GFLOP/s  rounds {[round(x) for x in v['rounds']]}"
            f"  load {v['load']}")
    return out

  # -------------------------------------------------------------------------------------------
  def variants(self, trainable: str, size: int, batch: int, keras_jit=(False, True),
               bf16: bool = False) -> dict:
    """label -> (worker, op kwargs) for one configuration; `bf16` adds both frameworks' bf16
    steps (flaxtl model.dtype='bfloat16'; Keras mixed_bfloat16, jit_compile=False)."""
    v = {}
    base = {"trainable": trainable, "size": size, "batch": batch}
    for tag, w in (("flaxtl", self.jax), ("flaxtl YNNPACK", self.jaxt)):
      if w is None:
        continue
      if trainable == "all":
        v[f"{tag}"] = (w, {**base, "cached": False})
      else:
        v[f"{tag} as run (cached)"] = (w, {**base, "cached": True})
        v[f"{tag} from images"] = (w, {**base, "cached": False})
    for jc in keras_jit:
      v[f"keras jit={jc}"] = (self.keras, {**base, "jit_compile": jc})
    if bf16:
      if trainable == "all":
        v["flaxtl bf16"] = (self.jax, {**base, "cached": False, "dtype": "bfloat16"})
      else:
        v["flaxtl bf16 as run (cached)"] = (self.jax, {**base, "cached": True, "dtype": "bfloat16"})
        v["flaxtl bf16 from images"] = (self.jax, {**base, "cached": False, "dtype": "bfloat16"})
      v["keras mixed_bfloat16 jit=False"] = (self.keras, {**base, "jit_compile": False,
                                                          "dtype": "bfloat16"})
    return v

  def interleaved(self, variants: dict, rounds: int) -> dict:
    """First call (compile + a step, then one timed step that sizes k) per variant, then `rounds`
    rounds over all variants."""
    res = {}
    for label, (w, kw) in variants.items():
      first = w("step", **kw, steps=1, warmup=0)
      if "error" in first:
        log(f"  {label}: {first['error']}")
        continue
      k = max(1, min(self.plan["max_k"], math.ceil(self.plan["target_s"] / first["median_s"])))
      if first["median_s"] < 0.05:  # tiny steps (head from cached features): more of them
        k = 50
      res[label] = {"first": first, "k": k, "rounds": [], "ceiling": []}
    for _ in range(rounds):
      ceiling = self._moment_ceiling()
      for label, (w, kw) in variants.items():
        if label not in res:
          continue
        r = w("step", **kw, steps=res[label]["k"], warmup=0)
        res[label]["rounds"].append(r)
        res[label]["ceiling"].append(ceiling)
    return res

  def _moment_ceiling(self) -> float:
    """The best float32 n^3 matmul (jnp.dot, numpy, TF) right now, for '% of ceiling'."""
    r = self.jax("matmul", n=self.plan["matmul_n"], steps=1, warmup=0,
                 which=("jax_f32", "numpy_f32"))
    t = self.keras("matmul", n=self.plan["matmul_n"], steps=1, warmup=0)
    return max(r["jax_f32"]["gflops"], r["numpy_f32"]["gflops"], t["tf_f32"]["gflops"])

  def steps(self) -> list[dict]:
    rows, jit_winner = [], {}
    for size in self.plan["sizes"]:
      for trainable in TRAINABLES:
        jits = self.plan["keras_jit_all"] if trainable == "all" else (False, True)
        if size > 112 and trainable == "all" and (trainable, 112) in jit_winner:
          jits = (jit_winner[(trainable, 112)],)  # the slowest row: only Keras' best at 112
        log(f"\n## step: {trainable} @ {size} px, batch 32 (load {common.load()})")
        t = time.perf_counter()
        bf16 = self.plan["bf16"] and size == min(self.plan["sizes"]) and trainable != "head"
        rounds = self.plan["rounds"][size] if size <= 112 or trainable != "all" else 1
        res = self.interleaved(self.variants(trainable, size, 32, jits, bf16), rounds)
        rows += self._rows(res, trainable, size, 32)
        log(f"  ({time.perf_counter() - t:.0f}s)")
        keras = [r for r in rows if r["size"] == size and r["trainable"] == trainable
                 and r["variant"].startswith("keras jit=")]
        if keras:
          jit_winner[(trainable, size)] = max(keras, key=lambda r: r["images_per_s"])["jit_compile"]
    return rows

  def _rows(self, res: dict, trainable: str, size: int, batch: int) -> list[dict]:
    rows = []
    keras_labels = [l for l in res if l.startswith("keras jit=")]  # float32 Keras: the baseline
    n_rounds = min(len(v["rounds"]) for v in res.values()) if res else 0
    keras_best = [max(res[l]["rounds"][i]["images_per_s"] for l in keras_labels)
                  for i in range(n_rounds)] if keras_labels else []
    for label, v in res.items():
      ips = [r["images_per_s"] for r in v["rounds"]]
      gf = [r["gflops"] for r in v["rounds"]]
      row = {"trainable": trainable, "size": size, "batch": batch, "variant": label,
             "framework": "keras" if label.startswith("keras") else "flaxtl",
             "cached": "cached" in label, "jit_compile": ("jit=True" in label) or None,
             "dtype": "bfloat16" if "bf" in label else "float32",
             "images_per_s": statistics.median(ips), "rounds_images_per_s": ips,
             "gflop_per_image": v["rounds"][0]["gflop_per_image"],
             "gflops": statistics.median(gf),
             "pct_of_moment_ceiling": statistics.median(
                 100 * g / c for g, c in zip(gf, v["ceiling"])),
             "moment_ceiling_gflops": v["ceiling"],
             "compile_s": v["first"].get("compile_s"), "first_call_s": v["first"].get("first_call_s"),
             "steps_per_round": v["k"],
             "load": [v["first"].get("load_before")] + [r["load_after"] for r in v["rounds"]],
             "rss_mb": v["rounds"][-1].get("rss_mb"), "worker_peak_rss_mb": v["rounds"][-1].get(
                 "peak_rss_mb")}
      if row["framework"] == "keras":
        row["jit_compile"] = "jit=True" in label
      if keras_best:
        row["ratio_vs_keras_best"] = statistics.median(a / b for a, b in zip(ips, keras_best))
      rows.append(row)
      ratio = f" x{row['ratio_vs_keras_best']:.2f} vs Keras best" if keras_best else ""
      log(f"  {label:<30s} {row['images_per_s']:9.2f} img/s {row['gflops']:6.1f} GFLOP/s "
          f"({row['pct_of_moment_ceiling']:3.0f}% of ceiling) compile {row['compile_s'] or 0:5.1f}s"
          f"{ratio}  rounds {[round(x, 2) for x in ips]} load {row['load']}")
    return rows

  # -------------------------------------------------------------------------------------------
  def feature_pass(self) -> list[dict]:
    """The one-time frozen-trunk pass per boundary and size, interleaved rounds: flaxtl by each
    feature engine (XLA, XLA under YNNPACK, XLA with Winograd convolutions, TensorFlow's oneDNN
    float32 and bf16, and 'auto': what flaxtl's probe picks here), beside Keras' own forward in
    float32 and mixed_bfloat16. GFLOP/s counts a direct convolution's work (Winograd's is less)."""
    out = []
    sizes = self.plan.get("feature_sizes", self.plan["sizes"])
    for size in sizes:
      for boundary in self.plan["boundaries"] if size <= 112 else ("block4_pool",):
        log(f"\n## feature pass to {boundary} @ {size} px, batch 32 (load {common.load()})")
        calls = {}
        for tag, w, engine in (("flaxtl", self.jax, "xla"), ("flaxtl YNNPACK", self.jaxt, "xla"),
                               ("flaxtl winograd", self.jax, "winograd"),
                               ("flaxtl tf", self.jax, "tf"),
                               ("flaxtl tf_bf16", self.jax, "tf_bf16"),
                               ("flaxtl auto", self.jax, "auto")):
          if w is not None:
            calls[tag] = (w, "feature_pass", {"engine": engine})
        if boundary == "block4_pool":  # Keras' own forward, f32 and bf16: the bar
          for dtype in ("float32", "bfloat16"):
            calls[f"keras forward {dtype}"] = (self.keras, "forward", {"dtype": dtype})
        got = {tag: [] for tag in calls}
        rounds = self.plan["rounds"]
        for _ in range(max(2, rounds if isinstance(rounds, int) else rounds.get(size, 1))):
          for tag, (w, op, kw) in calls.items():
            r = (w(op, size=size, boundary=boundary, batch=32, steps=1, warmup=1, **kw)
                 if op == "feature_pass" else
                 w(op, size=size, upto=boundary, batch=32, steps=1, warmup=1, **kw))
            if "error" in r:
              log(f"  {tag}: {r['error']}")
            else:
              got[tag].append(r)
        got = {t: rs for t, rs in got.items() if rs}
        n = min(len(rs) for rs in got.values())
        keras_best = [max(got[t][i]["images_per_s"] for t in got if t.startswith("keras"))
                      for i in range(n)] if any(t.startswith("keras") for t in got) else []
        for tag, rs in got.items():
          ips = statistics.median(r["images_per_s"] for r in rs)
          engine = rs[-1].get("engine") or ("oneDNN" if tag.startswith("keras") else "")
          rec = {"size": size, "boundary": boundary, "variant": tag, "engine": engine,
                 "images_per_s": ips, "rounds_images_per_s": [r["images_per_s"] for r in rs],
                 "gflops": statistics.median(r["gflops"] for r in rs),
                 "sign_digits_train_pass_s": common.SIGN_DIGITS_TRAIN / ips,
                 "load": [r["load_after"] for r in rs]}
          if rs[-1].get("probe"):
            rec["probe"] = rs[-1]["probe"]
          if keras_best:
            rec["ratio_vs_keras_best"] = statistics.median(
                r["images_per_s"] / k for r, k in zip(rs, keras_best))
          out.append(rec)
          ratio = f" x{rec['ratio_vs_keras_best']:.2f} vs Keras best" if keras_best else ""
          log(f"  {tag:<24s} [{engine:<7s}] {ips:8.2f} img/s, {rec['gflops']:6.1f} GFLOP/s{ratio};"
              f" sign_digits train split {rec['sign_digits_train_pass_s']:.0f}s; rounds "
              f"{[round(r['images_per_s'], 1) for r in rs]} load {rec['load']}")
    return out

  # -------------------------------------------------------------------------------------------
  def end_to_end(self, steps_rows: list[dict], fpass: list[dict], pipe: list[dict]) -> dict:
    """The reference recipe (block5, Adam 1e-4, 20 epochs, batch 10) from measured pieces."""
    size, batch, epochs = self.plan["e2e_size"], RECIPE["batch"], RECIPE["epochs"]
    log(f"\n## end to end: reference recipe @ {size} px, batch {batch}, {epochs} epochs "
        f"(load {common.load()})")
    kb = [r for r in steps_rows if r["size"] == size and r["trainable"] == "block5"
          and r["variant"].startswith("keras jit=")]
    jit = max(kb, key=lambda r: r["images_per_s"])["jit_compile"] if kb else False
    v = {k: x for k, x in self.variants("block5", size, batch, (jit,)).items()
         if "from images" not in k}
    res = self.interleaved(v, self.plan["rounds"][size])
    rows = self._rows(res, "block5", size, batch)
    evals = {}
    for tag, w in (("flaxtl", self.jax), ("flaxtl YNNPACK", self.jaxt)):
      if w is not None:
        evals[tag] = w("eval", trainable="block5", size=size, batch=64, cached=True)["images_per_s"]
    evals["keras"] = self.keras("eval", size=size, batch=32, jit_compile=jit)["images_per_s"]
    decode = next((p["decode_images_per_s"] for p in pipe if p["size"] == size), None)
    n_all, n_train, n_val = sum(SPLIT_SIZES.values()), SPLIT_SIZES["train"], SPLIT_SIZES["valid"]
    steps_per_epoch = -(-n_train // batch)
    out = {"size": size, "batch": batch, "epochs": epochs, "keras_jit_compile": jit,
           "method": "modelled from per-step times measured in this run (the whole run would take "
                     "hours here): setup + epochs x (steps x step time + validation)",
           "decode_images_per_s": decode, "eval_images_per_s": evals, "runs": {}}
    for r in rows:
      tag = "keras" if r["framework"] == "keras" else r["variant"].split(" as run")[0]
      step_s = batch / r["images_per_s"]
      setup = n_all / decode if decode else 0.0
      if tag != "keras":
        as_run = "flaxtl auto" if tag == "flaxtl" else tag  # the engine flaxtl picks here
        fp = next((f for f in fpass if f["size"] == size and f["boundary"] == "block4_pool"
                   and f["variant"] == as_run), None) or next(
            f for f in fpass if f["size"] == size and f["boundary"] == "block4_pool"
            and f["variant"] == tag)
        setup += n_all / fp["images_per_s"]
      epoch = steps_per_epoch * step_s + n_val / evals[tag]
      compile_s = r["compile_s"] or 0.0
      total = setup + compile_s + epochs * epoch
      out["runs"][tag] = {"step_s": step_s, "epoch_s": epoch, "setup_s": setup,
                          "compile_s": compile_s, "total_s": total, "total_min": total / 60}
    k = out["runs"].get("keras")
    for tag, rr in out["runs"].items():
      if k and tag != "keras":
        rr["epoch_speedup_vs_keras"] = k["epoch_s"] / rr["epoch_s"]
        rr["total_speedup_vs_keras"] = k["total_s"] / rr["total_s"]
    for tag, rr in out["runs"].items():
      extra = (f"  epoch x{rr['epoch_speedup_vs_keras']:.2f}, whole run "
               f"x{rr['total_speedup_vs_keras']:.2f} vs Keras" if "epoch_speedup_vs_keras" in rr
               else "")
      log(f"  {tag:<14s} setup {rr['setup_s']:6.0f}s  epoch {rr['epoch_s']:6.1f}s  "
          f"total {rr['total_min']:6.1f} min{extra}")
    out["step_rows"] = rows
    return out

  # -------------------------------------------------------------------------------------------
  def memory(self) -> dict:
    """Peak RSS in fresh worker processes for the default config's step (block5 @ 112, batch 32)."""
    out = {}
    for tag, module, env, kw in (
        ("flaxtl as run (cached)", "jax_side", {}, {"cached": True}),
        ("flaxtl from images", "jax_side", {}, {"cached": False}),
        ("keras jit=False", "keras_side", {}, {"jit_compile": False})):
      w = common.Worker(module, env=env, log=log)
      try:
        r = w("step", trainable="block5", size=112, batch=32, steps=2, warmup=0, **kw)
        out[tag] = {"peak_rss_mb": r["peak_rss_mb"], "rss_mb": r["rss_mb"]}
        log(f"  peak RSS, fresh process, block5 @ 112 b32, {tag}: {r['peak_rss_mb']:.0f} MB")
      finally:
        w.close()
    return out


def pipeline(sizes) -> list[dict]:
  r = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", *map(str, sizes)],
                     capture_output=True, text=True, cwd=REPO)
  line = next((l for l in r.stdout.splitlines() if l.startswith("@@ ")), None)
  if line is None:
    log(r.stderr[-2000:])
    return []
  res = json.loads(line[3:])
  for p in res:
    log(f"  pipeline @ {p['size']}: decode+resize {p['decode_images_per_s']:.0f} img/s, Feeder "
        f"epoch with preprocessing {p['feeder_images_images_per_s']:.0f} img/s, Feeder over cached "
        f"features {p['feeder_cached_block4_pool_images_per_s']:.0f} img/s (load {p['load_after']})")
  return res


def time_to_98(extra_runs: list[dict]) -> list[dict]:
  """From real runs' metrics.jsonl under runs/ (and this benchmark's real run)."""
  out = []
  for metrics in sorted((REPO / "runs").glob("*/metrics.jsonl")):
    cfg_path = metrics.parent / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if cfg.get("data", {}).get("name") != "sign_language_digits":
      continue
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    out.append(_t98(str(metrics.relative_to(REPO)), cfg, recs))
  out += extra_runs
  for r in out:
    log(f"  {r['run']}: {r['summary']}")
  return out


def _t98(name: str, cfg: dict, recs: list[dict], setup_s: float | None = None) -> dict:
  hit = next((r for r in recs if r["val_accuracy"] >= 0.98), None)
  secs = sum(r["seconds"] for r in recs[:hit["epoch"] + 1]) if hit else None
  ips = statistics.median(r["images_per_s"] for r in recs) if recs else None
  d = cfg.get("data", {})
  desc = (f"image_size {d.get('image_size')}, trainable {cfg.get('trainable')}, batch "
          f"{cfg.get('batch_size')}, dtype {cfg.get('model', {}).get('dtype')}")
  summary = (f"{desc}: val >= 98% after epoch {hit['epoch'] + 1} ({hit['val_accuracy']:.4f}), "
             f"{secs:.0f}s of training epochs (median {ips:.1f} img/s)" if hit else
             f"{desc}: never reached 98% in {len(recs)} epochs")
  if hit and setup_s is not None:
    summary += f" + {setup_s:.0f}s setup (decode, feature pass, compile) = {secs + setup_s:.0f}s"
  return {"run": name, "config": desc, "epoch_reached": hit and hit["epoch"] + 1,
          "val_accuracy": hit and hit["val_accuracy"], "train_seconds_to_98": secs,
          "setup_s": setup_s, "median_images_per_s": ips, "summary": summary}


def real_run(env: dict | None = None, tag: str = "flaxtl", epochs: int = 2) -> dict:
  """The default sign_digits config for a few epochs as users run it, fresh feature cache (the
  first run's cost), peak RSS; its epochs feed the time-to-98% line."""
  work = Path(tempfile.mkdtemp(prefix="flaxtl_bench_run_"))
  cmd = [sys.executable, "-m", "benchmarks.real_run", "--config", "sign_digits",
         "--workdir", str(work / "run"), f"--config.epochs={epochs}", f"--config.cache_dir={work / 'cache'}"]
  t = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
  wall = time.perf_counter() - t
  line = next((l for l in r.stdout.splitlines() if l.startswith("@@ ")), None)
  res_path = work / "run" / "results.json"
  if r.returncode or not res_path.exists():
    log(f"  real run failed (rc {r.returncode}): {r.stderr[-1500:]}")
    return {"error": r.stderr[-1500:]}
  res = json.loads(res_path.read_text())
  recs = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines()]
  out = {"variant": tag, "command": " ".join(cmd[1:]), "wall_s": wall,
         "peak_rss_mb": json.loads(line[3:])["peak_rss_mb"] if line else None,
         **{k: res.get(k) for k in ("decode_s", "features_s", "prepare_s", "train_seconds",
                                    "wall_seconds", "val_accuracy", "test_accuracy")},
         "epochs": recs, "config": json.loads((work / "run" / "config.json").read_text()),
         "load": common.load()}
  rates = ", ".join(f"{e['images_per_s']:.1f}" for e in recs)
  log(f"  real run ({tag}): wall {wall:.0f}s: prepare {out['prepare_s']:.0f}s (decode "
      f"{out['decode_s']:.0f}s, feature pass {out['features_s']:.0f}s), 2 epochs "
      f"{out['train_seconds']:.0f}s ({rates} img/s), "
      f"peak RSS {out['peak_rss_mb']:.0f} MB, load {out['load']}")
  return out


# ---------------------------------------------------------------------------------------------
# The table.

def markdown(doc: dict) -> str:
  m = doc["machine"]
  lines = [f"Machine: {m.get('Model name')}, {m.get('CPU(s)')} CPUs, {m.get('memory_gib')} GiB; "
           f"{doc['workers']['jax'].get('jax')} jax / {doc['workers']['keras'].get('keras')} keras "
           f"on TF {doc['workers']['keras'].get('tensorflow')}; {m['date']}; load average "
           f"{doc['load_start']} at start, {doc.get('load_end')} at end.", ""]
  c = doc.get("ceiling", {})
  if c:
    lines += [f"Matmul ceiling ({c['n']}^3, float32, GFLOP/s): " + ", ".join(
        f"{k} {v['gflops']:.0f}" for k, v in c.items() if isinstance(v, dict)), ""]
  lines += ["| px | trainable | variant | images/s | x Keras best | GFLOP/img | GFLOP/s | "
            "% ceiling | compile s | load |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in doc.get("steps", []):
    ratio = f"{r['ratio_vs_keras_best']:.2f}" if "ratio_vs_keras_best" in r else ""
    loads = [x for x in r["load"] if x is not None]
    lines.append(f"| {r['size']} | {r['trainable']} | {r['variant']} | {r['images_per_s']:.2f} | "
                 f"{ratio} | {r['gflop_per_image']:.2f} | {r['gflops']:.1f} | "
                 f"{r['pct_of_moment_ceiling']:.0f}% | {r['compile_s'] or 0:.1f} | "
                 f"{min(loads):.1f}-{max(loads):.1f} |")
  fp = doc.get("feature_pass", [])
  if fp:
    lines += ["", "| px | feature pass to | variant | engine | images/s | x Keras best | GFLOP/s | "
              "sign_digits train split s | as-run block5/head img/s amortised over 1 / 8 epochs |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for f in fp:
      trainable = "block5" if f["boundary"] == "block4_pool" else "head"
      step = next((r for r in doc["steps"] if r["size"] == f["size"] and r["trainable"] == trainable
                   and r["cached"] and r["variant"].startswith(f["variant"] + " as run")), None)
      amort = ""
      if step:
        amort = " / ".join(f"{1 / (1 / step['images_per_s'] + 1 / (e * f['images_per_s'])):.1f}"
                           for e in (1, DEFAULT_EPOCHS))
      ratio = f"{f['ratio_vs_keras_best']:.2f}" if "ratio_vs_keras_best" in f else ""
      lines.append(f"| {f['size']} | {f['boundary']} | {f['variant']} | {f.get('engine', '')} | "
                   f"{f['images_per_s']:.2f} | {ratio} | {f['gflops']:.1f} | "
                   f"{f['sign_digits_train_pass_s']:.0f} | {amort} |")
  e = doc.get("end_to_end")
  if e:
    lines += ["", f"End to end, reference recipe @ {e['size']} px, batch {e['batch']}, {e['epochs']} "
              f"epochs ({e['method']}; Keras jit_compile={e['keras_jit_compile']}):", "",
              "| | setup s | compile s | epoch s | whole run min | epoch x Keras | run x Keras |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for tag, rr in e["runs"].items():
      lines.append(f"| {tag} | {rr['setup_s']:.0f} | {rr['compile_s']:.0f} | {rr['epoch_s']:.1f} | "
                   f"{rr['total_min']:.1f} | {rr.get('epoch_speedup_vs_keras', 1):.2f} | "
                   f"{rr.get('total_speedup_vs_keras', 1):.2f} |")
  for p in doc.get("pipeline", []):
    lines.append(f"\nInput pipeline @ {p['size']} px: decode+resize {p['decode_images_per_s']:.0f} "
                 f"img/s; Feeder epoch with preprocessing {p['feeder_images_images_per_s']:.0f} img/s;"
                 f" Feeder over cached features {p['feeder_cached_block4_pool_images_per_s']:.0f} "
                 f"img/s (load {p['load_after']}).")
  mem = doc.get("memory", {})
  if mem:
    lines.append("\nPeak RSS (fresh process, block5 @ 112, batch 32): " + ", ".join(
        f"{k} {v['peak_rss_mb']:.0f} MB" for k, v in mem.items()))
  for t in doc.get("time_to_98", []):
    lines.append(f"\nTime to 98% val, {t['run']}: {t['summary']}")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = ap.add_mutually_exclusive_group(required=True)
  mode.add_argument("--quick", action="store_true")
  mode.add_argument("--full", action="store_true")
  mode.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
  ap.add_argument("--rounds", type=int)
  ap.add_argument("--no-ynnpack", action="store_true")
  ap.add_argument("--no-real-run", action="store_true")
  args = ap.parse_args()
  plan = dict(PLANS["full" if args.full else "smoke" if args.smoke else "quick"])
  if args.rounds:
    plan["rounds"] = args.rounds
  if args.no_real_run:
    plan["real_run"] = False
  t0 = time.perf_counter()
  b = Bench(plan, tuned=not args.no_ynnpack)
  doc = b.doc
  log(json.dumps(doc["machine"]))
  try:
    doc["ceiling"] = b.ceiling()
    log("\n## input pipeline")
    doc["pipeline"] = pipeline(plan["sizes"])
    doc["steps"] = b.steps()
    log("\n## feature pass")
    doc["feature_pass"] = b.feature_pass()
    doc["end_to_end"] = b.end_to_end(doc["steps"], doc["feature_pass"], doc["pipeline"])
  finally:
    b.close()
  if plan["memory"]:
    log("\n## memory")
    doc["memory"] = b.memory()
  extra = []
  if plan["real_run"]:
    log("\n## real run: default sign_digits config, 2 epochs, fresh feature cache")
    doc["real_runs"] = [real_run(epochs=1 if args.smoke else 2)]
    for rr in doc["real_runs"]:
      if "epochs" in rr:
        extra.append(_t98(f"this benchmark's real run ({rr['variant']}, 2 epochs)",
                          rr["config"], rr["epochs"], rr["prepare_s"]))  # as the run saved it
  log("\n## time to 98% validation accuracy")
  doc["time_to_98"] = time_to_98(extra)
  doc["load_end"] = common.load()
  doc["elapsed_s"] = time.perf_counter() - t0
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
  log("\n" + markdown(doc))
  log(f"\n(elapsed {doc['elapsed_s'] / 60:.1f} min; JSON: {args.out})")


if __name__ == "__main__":
  main()
