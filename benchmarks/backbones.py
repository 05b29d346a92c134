"""The four backbones at 224 px beside Keras, in ONE process (issue 19): params, GMACs, the feature
pass and the fine-tune step of the last stage.

  python -m benchmarks.backbones [--rounds 5] [--size 224] [--batch 32]
      [--backbones vgg16 resnet50 mobilenet_v2 efficientnet_b0] [--out benchmarks/backbones.json]

Per backbone, random weights (speed does not depend on their values), one in-memory batch of 32
random 224x224x3 float32 images (no preprocessing on either side; EfficientNetB0 rescales and
normalises inside both models):
  params     flaxtl: every leaf of the notop model's variables (params + batch_stats); Keras:
             `count_params()` of `keras.applications.<Model>(weights=None, include_top=False,
             pooling='avg')` (EfficientNetB0: +1, its Normalization layer's `count`).
  GMACs      per image, convolutions and Dense layers only, counted from the shapes of every
             conv_general_dilated / dot_general in the jaxpr of flaxtl's forward (MACs = output
             elements x kernel elements per output; depthwise: kernel H x W); batch norm,
             activations, pools, squeeze-excite products and adds are not counted. Beside it,
             XLA's own cost analysis of the compiled batch-32 pass, flops / 2 / 32, which counts
             every elementwise op too.
  feature    the frozen forward of the whole trunk to the global average pool, float32: flaxtl
             `jax.jit(model.apply)` (train=False) vs Keras `model(x, training=False)` in a
             `tf.function(jit_compile=False)` (Keras' default predict path on a CPU), and Keras
             again under the `mixed_bfloat16` policy (oneDNN on the AMX tiles).
  fine-tune  one Adam (1e-4) step of the deepest level below 'head' (vgg16 block5, resnet50 conv5,
             mobilenet_v2 block_13, efficientnet_b0 block6a) with a new Dense(10) head, from the
             cached boundary activations (the level's frozen boundary output, computed once):
             flaxtl `model.apply(..., start_after=boundary, train=True, mutable=['batch_stats'])`
             + optax.adam on the trainable subtree, jitted (state donated, chained step to step);
             Keras a `keras.Model(boundary_layer.output, Dense(10)(base.output))` (the frozen part
             is not in it), compiled with jit_compile=False (Keras' 'auto' on a CPU), timed by
             `train_on_batch`. Batch norm in training mode after the boundary, drop-connect on
             (EfficientNetB0, Keras' rates) on both sides.
How: everything is built and run once (compile/trace, reported), then `rounds` rounds in which
every variant runs k calls (k sized from its warm call to ~--target seconds, the same k in
every round), the order rotated each round. images/s is the median over rounds [min-max]; a
ratio (flaxtl / Keras) is the median [min-max] of the per-round ratios: measurements seconds
apart, what survives a loaded machine. The load average is printed at start, per backbone and at
the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flaxtl

flaxtl.configure_cpu()  # before jax starts its backend, as the verbs do
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

BACKBONES = ("vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0")
KERAS_NAMES = {"vgg16": "VGG16", "resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2",
               "efficientnet_b0": "EfficientNetB0"}
CLASSES, LR = 10, 1e-4
VARIANTS = ("flaxtl feature", "keras feature", "keras bf16 feature", "flaxtl step", "keras step")


def flax_model(name: str, num_classes: int | None):
  """The flaxtl backbone, notop + global average pool (+ a new Dense head with num_classes)."""
  kw = dict(include_top=False, pooling="avg", num_classes=num_classes)
  if name == "vgg16":
    from flaxtl.models.vgg import VGG16
    return VGG16(**kw)
  if name == "resnet50":
    from flaxtl.models.resnet import ResNet50
    return ResNet50(**kw)
  if name == "mobilenet_v2":
    from flaxtl.models.mobilenet_v2 import MobileNetV2
    return MobileNetV2(**kw)
  from flaxtl.models.efficientnet import EfficientNetB0
  return EfficientNetB0(stddev_rescaling=False, **kw)  # = Keras' weights=None graph


def level(name: str) -> tuple[str, str]:
  """(the deepest level below 'head', its frozen boundary)."""
  if name == "vgg16":  # VGG16 has no describe(); benchmarks/common.py names its boundaries
    return "block5", common.BOUNDARY["block5"]
  from flaxtl.models import efficientnet, mobilenet_v2, resnet
  d = {"resnet50": resnet, "mobilenet_v2": mobilenet_v2,
       "efficientnet_b0": efficientnet}[name].describe()
  lv = d.stages[1]
  return lv, d.level_boundaries[lv]


def count_macs(fn, *args) -> float:
  """Multiply-accumulates of every conv and dot in fn's jaxpr (sub-jaxprs included)."""
  def walk(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      prim = eqn.primitive.name
      if prim == "conv_general_dilated":
        rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
        total += out.size * rhs.size / rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
      elif prim == "dot_general":
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        (contract, _), _ = eqn.params["dimension_numbers"]
        total += out.size * float(np.prod([lhs.shape[d] for d in contract]))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += walk(inner)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def n_params(tree) -> int:
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops")


def timed_first(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def build(name: str, size: int, batch: int) -> tuple[dict, dict]:
  """{variant: one synchronised call} and what the table says about the model."""
  import keras
  import optax
  import tensorflow as tf
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, CLASSES, batch).astype(np.int32)
  lv, boundary = level(name)
  info = {"level": lv, "boundary": boundary, "first_call_s": {}}
  fns = {}

  # flaxtl: the feature pass (notop, avg pool, inference mode)
  trunk = flax_model(name, None)
  variables = jax.jit(trunk.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  info["params_flaxtl"] = n_params(variables)
  info["gmacs"] = count_macs(lambda v, a: trunk.apply(v, a), variables, x[:1]) / 1e9
  if name == "vgg16":  # the hand count benchmarks/common.py uses everywhere
    info["gmacs_hand"] = sum(m for _, m in common.conv_macs(size)) / 1e9
  xj = jax.device_put(x)
  t = time.perf_counter()
  feature = jax.jit(lambda v, a: trunk.apply(v, a, train=False)).lower(variables, xj).compile()
  info["first_call_s"]["flaxtl feature (compile)"] = time.perf_counter() - t
  flops = xla_flops(feature)
  info["xla_gmacs"] = flops / 2 / batch / 1e9 if flops else None
  fns["flaxtl feature"] = lambda: feature(variables, xj).block_until_ready()

  # flaxtl: the fine-tune step from the cached boundary activations
  model = flax_model(name, CLASSES)
  full = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, size, size, 3)))
  feats = jax.jit(lambda v, a: model.apply(v, a, stop_at=boundary))(full, xj)
  feats.block_until_ready()
  later = model.layers[model.layers.index(boundary) + 1:]
  stage_layers = stage_parameter_layers(name, later)
  trainable = {k: v for k, v in full["params"].items() if k in stage_layers}
  frozen = {k: v for k, v in full["params"].items() if k not in stage_layers}
  info["trainable_params_flaxtl"] = n_params(trainable)
  info["stage_gmacs"] = count_macs(lambda v, f: model.apply(v, f, start_after=boundary),
                                   full, feats[:1]) / 1e9
  tx = optax.adam(LR)

  def loss_fn(params, frozen, stats, f, y, key):
    v = {"params": {**frozen, **params}, **({"batch_stats": stats} if stats else {})}
    logits, upd = model.apply(v, f, start_after=boundary, train=True, mutable=["batch_stats"],
                              rngs={"dropout": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, upd.get("batch_stats", stats)

  def step(state, frozen, f, y):
    params, opt_state, stats, key = state
    key, sub = jax.random.split(key)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, stats, f, y,
                                                                     sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, stats, key), loss

  step = jax.jit(step, donate_argnums=0)  # the state is chained from step to step
  state = [(trainable, tx.init(trainable), full.get("batch_stats", {}), jax.random.key(2))]
  yj = jax.device_put(labels)

  def flax_step():
    state[0], loss = step(state[0], frozen, feats, yj)
    loss.block_until_ready()
  fns["flaxtl step"] = flax_step

  # Keras: the same models
  keras.utils.set_random_seed(0)
  ctor = getattr(keras.applications, KERAS_NAMES[name])
  kw = dict(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
  base = ctor(**kw)
  info["params_keras"] = base.count_params()
  xt = tf.constant(x)
  fwd = tf.function(lambda a: base(a, training=False), jit_compile=False)
  fns["keras feature"] = lambda: fwd(xt).numpy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    base16 = ctor(**kw)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  fwd16 = tf.function(lambda a: base16(a, training=False), jit_compile=False)
  fns["keras bf16 feature"] = lambda: fwd16(xt).numpy()
  cut = base.get_layer(boundary).output
  kfeats = tf.constant(keras.Model(base.input, cut).predict_on_batch(xt))
  head = keras.Model(cut, keras.layers.Dense(CLASSES, name="predictions")(base.output))
  head.compile(optimizer=keras.optimizers.Adam(LR),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               jit_compile=False)
  info["trainable_params_keras"] = int(sum(np.prod(w.shape) for w in head.trainable_weights))
  yt = tf.constant(labels)
  fns["keras step"] = lambda: head.train_on_batch(kfeats, yt)
  for k, f in fns.items():
    info["first_call_s"][k] = timed_first(f)
  return fns, info


def stage_parameter_layers(name: str, stages) -> set[str]:
  """The Keras layers with weights in `stages` (flaxtl params are keyed by them)."""
  if name == "vgg16":
    from flaxtl.models import vgg
    return set(vgg.parameter_layers(stages))
  from flaxtl.models import efficientnet, mobilenet_v2, resnet
  module = {"resnet50": resnet, "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet}[name]
  return {n for s in stages for n, _ in module.stage_keras_layers(s)}


def measure(name: str, size: int, batch: int, rounds: int, target_s: float) -> dict:
  fns, info = build(name, size, batch)
  reps = {}
  for k, f in fns.items():  # a warm call sizes k: calls per measurement
    reps[k] = max(1, min(20, round(target_s / timed_first(f))))
  ips = {k: [] for k in fns}
  loads = [common.load()]
  order = list(fns)
  for r in range(rounds):
    for k in order[r % len(order):] + order[:r % len(order)]:
      f, n = fns[k], reps[k]
      t = time.perf_counter()
      for _ in range(n):
        f()
      ips[k].append(n * batch / (time.perf_counter() - t))
    loads.append(common.load())

  def summary(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}
  info.update(
      images_per_s={k: {**summary(v), "rounds": v, "calls_per_round": reps[k]}
                    for k, v in ips.items()},
      ratio_feature=summary([a / b for a, b in zip(ips["flaxtl feature"], ips["keras feature"])]),
      ratio_feature_bf16=summary([a / b for a, b in zip(ips["flaxtl feature"],
                                                        ips["keras bf16 feature"])]),
      ratio_step=summary([a / b for a, b in zip(ips["flaxtl step"], ips["keras step"])]),
      loads=loads)
  return info


def environment(size: int, batch: int, rounds: int) -> dict:
  import flax
  import keras
  import optax
  import tensorflow as tf
  from flaxtl import feature_engine
  c = feature_engine.cpu()
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "cpu": c["model"], "bf16_flags": c["bf16_flags"], "cpus": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "tensorflow": tf.__version__, "keras": keras.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
          "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
          "size": size, "batch": batch, "rounds": rounds}


def fmt(s: dict, digits: int = 1) -> str:
  return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(results: dict) -> str:
  rows = ["| backbone | params flaxtl / Keras | GMACs (convs+dense; XLA flops/2) | "
          "feature img/s flaxtl f32 | Keras f32 | **flaxtl / Keras f32** | Keras bf16 | "
          "fine-tuned level (from; trainable params; GMACs) | step img/s flaxtl | Keras | "
          "**flaxtl / Keras** |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
  for name, r in results.items():
    i = r["images_per_s"]
    rows.append(
        f"| {name} | {r['params_flaxtl'] / 1e6:.2f}M / {r['params_keras'] / 1e6:.2f}M | "
        f"{r['gmacs']:.2f} ({r['xla_gmacs']:.2f}) | {fmt(i['flaxtl feature'])} | "
        f"{fmt(i['keras feature'])} | **{fmt(r['ratio_feature'], 2)}** | "
        f"{fmt(i['keras bf16 feature'])} | {r['level']} (`{r['boundary']}`; "
        f"{r['trainable_params_flaxtl'] / 1e6:.2f}M; {r['stage_gmacs']:.2f}) | "
        f"{fmt(i['flaxtl step'])} | {fmt(i['keras step'])} | **{fmt(r['ratio_step'], 2)}** |")
  return "\n".join(rows)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--target", type=float, default=1.5,
                  help="seconds per measurement (k calls of the variant)")
  ap.add_argument("--out", default=str(Path(__file__).with_name("backbones.json")))
  args = ap.parse_args()
  t0 = time.perf_counter()
  env = environment(args.size, args.batch, args.rounds)
  env["load_start"] = os.getloadavg()
  print(f"CPU: {env['cpu']}, {env['cpus']} CPUs ({env['affinity']} usable), bf16 flags: "
        f"{' '.join(env['bf16_flags']) or 'none'}; jax {env['jax']}, flax {env['flax']}, "
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}; XLA_FLAGS={env['xla_flags']!r}; "
        f"TF intra/inter-op threads {env['tf_intra_op_threads']}/{env['tf_inter_op_threads']} "
        f"(0: one per core); {env['date']}; load average at start "
        + " ".join(f"{v:.2f}" for v in env["load_start"]), flush=True)
  results = {}
  for name in args.backbones:
    t = time.perf_counter()
    r = results[name] = measure(name, args.size, args.batch, args.rounds, args.target)
    r["seconds"] = time.perf_counter() - t
    i = r["images_per_s"]
    print(f"{name}: {r['seconds']:.0f} s, load {min(r['loads'])}-{max(r['loads'])}; "
          + ", ".join(f"{k} {v['median']:.1f} img/s (x{v['calls_per_round']})"
                      for k, v in i.items())
          + "; first calls " + ", ".join(f"{k} {v:.1f}s" for k, v in r["first_call_s"].items()),
          flush=True)
    import keras
    keras.backend.clear_session()
  env["load_end"] = os.getloadavg()
  env["wall_s"] = time.perf_counter() - t0
  Path(args.out).write_text(json.dumps({"environment": env, "backbones": results}, indent=1))
  print(f"\n{args.size} px, batch {args.batch}, {args.rounds} rounds; load average at end "
        + " ".join(f"{v:.2f}" for v in env["load_end"]) + f"; {env['wall_s'] / 60:.1f} min; "
        f"wrote {args.out}\n")
  print(table(results))


if __name__ == "__main__":
  main()
