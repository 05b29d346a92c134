"""flaxtl's side of the benchmark: a worker process (see benchmarks/common.py) timing the real code.

What is timed is the library's own step, `flaxtl.step.jit_train_step(mesh)` (jit, donated state,
on-device metrics, Adam through `freezing.optimizer`), built by `flaxtl.step.create_train_state` from a
`prepare.Setup` like `prepare` makes, with random weights and one in-memory batch:
  cached=True   the step as users run it: it starts after the boundary (block4_pool for block5,
                avg_pool for head) on cached features;
  cached=False  from preprocessed images, stop_gradient at the boundary (equal work to Keras).
The feature pass is flaxtl's frozen trunk (uint8 in, preprocessing included) up to the boundary,
by each feature engine (flaxtl/feature_engine.py).
"""
from __future__ import annotations

import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flaxtl

flaxtl.configure_cpu()  # before jax starts its backend, as the verbs do
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

_POOL = os.environ.get("FLAXTL_BENCH_POOL")  # experiment: 2x2 max pool without reduce_window
if _POOL in ("reshape", "slices"):
  from flaxtl.models import vgg as _vgg
  _layer = _vgg.VGG16._layer

  def _pool_layer(self, name, x):
    if name.endswith("_pool") and name.startswith("block"):
      n, h, w, c = x.shape
      x = x[:, :h // 2 * 2, :w // 2 * 2]
      if _POOL == "reshape":  # reshape + max: its gradient counts ties with a window sum
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
      # max of the four strided views: elementwise, forward and backward fuse with the ReLU
      return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                         jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))
    return _layer(self, name, x)

  _vgg.VGG16._layer = _pool_layer

_SETUPS: dict = {}


def env() -> dict:
  import flax
  import optax
  return {"framework": "jax", "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "pid": os.getpid()}


_MM = jax.jit(jnp.dot)


def matmul(n: int = 4096, steps: int = 5, warmup: int = 1,
           which=("jax_f32", "jax_bf16", "numpy_f32")) -> dict:
  """Ceilings: jnp.dot f32 and bf16 (XLA), numpy f32 (its BLAS), n x n x n."""
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
  out = {}
  for name, dt in (("jax_f32", jnp.float32), ("jax_bf16", jnp.bfloat16)):
    if name in which:
      x, y = jnp.asarray(a, dt), jnp.asarray(b, dt)
      r = common.timeit(lambda: _MM(x, y).block_until_ready(), steps, warmup)
      out[name] = {"gflops": 2 * n ** 3 / r["median_s"] / 1e9, **r}
  if "numpy_f32" in which:
    r = common.timeit(lambda: a @ b, steps, warmup)
    out["numpy_f32"] = {"gflops": 2 * n ** 3 / r["median_s"] / 1e9, **r}
  return {"n": n, **out}


def _setup(trainable: str, size: int, cached: bool, dtype: str, train_engine: str = "xla"):
  """prepare.Setup as `prepare` builds it (random weights), cached per configuration.
  `train_engine` as config.train_engine ('xla': the step these benchmarks always timed)."""
  key = (trainable, size, cached, dtype, train_engine)
  if key not in _SETUPS:
    from flaxtl import feature_engine, freezing, models, prepare
    from flaxtl.configs import default
    config = default.get_config()
    config.model.dtype, config.trainable, config.data.image_size = dtype, trainable, size
    model = models.create(config, num_classes=10)
    params, _, _ = prepare.init_variables(model, config, None, {})
    freeze = freezing.plan(trainable, model.layers)
    boundary = freeze.boundary
    while len(_SETUPS) >= 2:
      _SETUPS.pop(next(iter(_SETUPS)))
    network = prepare.Network(  # from images, the frozen layers as prepare runs them
        model if cached else feature_engine.for_frozen_layers(config.feature_engine, model),
        "torch", start_after=boundary if cached else None,
        stop_gradient_after=None if cached else boundary,
        trained_in_tf=feature_engine.for_trained_layers(train_engine, model, boundary))
    _SETUPS[key] = prepare.Setup(config, model, freeze, params, {}, "torch",
                                 [str(i) for i in range(10)], {}, network, {}, {})
  return _SETUPS[key]


def _inputs(setup, size: int, batch: int, rng) -> np.ndarray:
  start = setup.network.start_after or ""
  if start.startswith("block") and start.endswith("_pool"):  # block{b}_pool: (size / 2^b)^2 maps
    from flaxtl.models import vgg
    b = int(start[len("block")])
    shape = (batch, size >> b, size >> b, vgg.conv_filters(f"block{b}_conv1"))
    return np.maximum(rng.standard_normal(shape, np.float32), 0)
  if setup.network.start_after == "avg_pool":
    return np.abs(rng.standard_normal((batch, 512), np.float32))
  return rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)  # stored images


def _device_batch(mesh, setup, size: int, batch: int):
  """A fixed random batch (inputs at the step's start, labels, full mask) on the step's devices."""
  from flaxtl import parallel
  rng = np.random.default_rng(0)
  return parallel.put_batch({"x": _inputs(setup, size, batch, rng),
                        "label": rng.integers(0, 10, batch).astype(np.int32),
                        "mask": np.ones(batch, np.float32)}, mesh)


_STEP: dict = {}


def _built_step(trainable: str, size: int, batch: int, cached: bool, dtype: str,
                train_engine: str = "xla"):
  """(one synchronised step, fresh?) for a configuration; built once, reused by later rounds."""
  from flaxtl import parallel
  from flaxtl.step import create_train_state, jit_train_step, zero_metrics
  key = (trainable, size, batch, cached, dtype, train_engine)
  if key in _STEP:
    return _STEP[key], False
  while len(_STEP) >= 2:  # the driver alternates cached/from-images: keep both, no more
    _STEP.pop(next(iter(_STEP)))
  setup = _setup(trainable, size, cached, dtype, train_engine)
  mesh = parallel.global_mesh()
  rep = parallel.replicated(mesh)
  step_fn = jit_train_step(mesh)
  b = _device_batch(mesh, setup, size, batch)
  box = {"state": jax.device_put(create_train_state(setup, 1e-4), rep),
         "metrics": jax.device_put(zero_metrics(), rep)}
  rng_key = jax.random.key(1)

  def one():
    box["state"], box["metrics"] = step_fn(box["state"], box["metrics"], b, rng_key)
    jax.block_until_ready(box["metrics"])

  one.step_fn, one.box, one.batch, one.key = step_fn, box, b, rng_key
  _STEP[key] = one
  return one, True


def step(trainable: str, size: int, batch: int, cached: bool, dtype: str = "float32",
         steps: int = 5, warmup: int = 2, train_engine: str = "xla") -> dict:
  """Images/s of flaxtl's train step (module docstring). A repeated call reuses the compiled
  step: its first timed call is then a plain step, and compile_s is left out."""
  cached = cached and trainable != "all"
  one, fresh = _built_step(trainable, size, batch, cached, dtype, train_engine)
  r = common.timeit(one, steps, warmup)
  if not fresh:
    r.pop("compile_s")
    r.pop("first_call_s")
  assert np.isfinite(jax.device_get(one.box["metrics"])["loss"]), "non-finite loss"
  gflop = common.step_gflop(size, trainable, cached)
  return {"images_per_s": batch / r["median_s"], "gflop_per_image": gflop,
          "gflops": gflop * batch / r["median_s"], **r}


_RUNNERS: dict = {}
_CHOICES: dict = {}


def feature_pass(size: int, boundary: str, batch: int = 32, dtype: str = "float32",
                 engine: str = "xla", steps: int = 3, warmup: int = 1) -> dict:
  """Images/s of the one-time frozen-trunk pass (uint8 -> boundary) by `engine`, as prepare runs
  it (feature_engine.runner: XLA's features.Trunk through map_batches, or TensorFlow's oneDNN in
  float32 / bf16). 'auto' is what flaxtl chooses here: its probe, run in the worker's first call
  (a fresh probe cache), then the chosen engine timed."""
  import tempfile
  from flaxtl import feature_engine
  setup = _setup("block5" if boundary == "block4_pool" else "head", size, True, dtype)
  chosen, probe = engine, None
  if engine == "auto":
    if (size, boundary, dtype) not in _CHOICES:  # probed once per worker, as once per machine
      with tempfile.TemporaryDirectory() as tmp:
        _CHOICES[size, boundary, dtype] = feature_engine.choose(
            "auto", setup.model, setup.variables, "torch", size, boundary, dtype, 10 ** 9, tmp,
            log_fn=lambda *a: None)
    c = _CHOICES[size, boundary, dtype]
    chosen, probe = c.engine, c.probe
  key = (size, boundary, dtype, chosen)
  if key not in _RUNNERS:
    _RUNNERS[key] = feature_engine.runner(chosen, setup.model, setup.variables, "torch", boundary,
                                          (boundary,))
  run = _RUNNERS[key]
  x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  r = common.timeit(lambda: run(x), steps, warmup)
  upto = 10 if boundary == "block4_pool" else 13
  gflop = common.forward_gflop(size, upto)
  return {"images_per_s": batch / r["median_s"], "gflop_per_image": gflop, "engine": chosen,
          "probe": probe and {k: probe[k] for k in ("images_per_s", "rel_error_vs_xla")},
          "gflops": gflop * batch / r["median_s"], **r}


def eval_rate(trainable: str, size: int, batch: int = 64, cached: bool = True,
              dtype: str = "float32", steps: int = 3, warmup: int = 1) -> dict:
  """Images/s of the evaluation's forward (`Network.logits`, validation each epoch), from cached
  features or images."""
  from flaxtl import parallel
  setup = _setup(trainable, size, cached, dtype)  # evaluation always runs XLA
  mesh = parallel.global_mesh()
  b = _device_batch(mesh, setup, size, batch)["x"]
  params = jax.device_put(setup.variables, parallel.replicated(mesh))
  fn = jax.jit(setup.network.logits)
  r = common.timeit(lambda: jax.block_until_ready(fn(params, b)), steps, warmup)
  return {"images_per_s": batch / r["median_s"], **r}


def profile(trainable: str, size: int, batch: int, cached: bool = False, dtype: str = "float32",
            steps: int = 2, logdir: str = "/tmp/flaxtl_bench_profile") -> dict:
  """Where a step's time goes: a jax.profiler trace, XLA thunk events summed by the layer and
  pass they come from (see benchmarks/profiles.py)."""
  import shutil
  from benchmarks import profiles
  cached = cached and trainable != "all"
  one, fresh = _built_step(trainable, size, batch, cached, dtype)
  one()
  if fresh:
    one()
  hlo = one.step_fn.lower(one.box["state"], one.box["metrics"], one.batch,
                                 one.key).compile().as_text()
  shutil.rmtree(logdir, ignore_errors=True)
  load0, t = common.load(), time.perf_counter()
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      one()
  wall = (time.perf_counter() - t) / steps
  return {"wall_s_per_step": wall, "load_before": load0, "load_after": common.load(),
          **profiles.summarise(logdir, hlo, steps, wall)}


_CONV: dict = {}


def conv(batch: int, hw: int, cin: int, cout: int, dtype: str = "float32", steps: int = 3,
         warmup: int = 1) -> dict:
  """GFLOP/s of one 3x3 SAME conv as XLA runs it: forward, input gradient, kernel gradient."""
  from jax import lax
  key = (batch, hw, cin, cout, dtype)
  if key not in _CONV:
    _CONV.clear()
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), dt)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.01, dt)
    dy = jnp.asarray(rng.standard_normal((batch, hw, hw, cout)), dt)
    f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
    vjp = lambda x, w, dy, i: jax.vjp(f, x, w)[1](dy)[i]  # noqa: E731
    _CONV[key] = {"fwd": (jax.jit(f), (x, w)),
                  "dgrad": (jax.jit(functools.partial(vjp, i=0)), (x, w, dy)),
                  "wgrad": (jax.jit(functools.partial(vjp, i=1)), (x, w, dy))}
  gflop = 2 * batch * hw * hw * cin * cout * 9 / 1e9
  out = {}
  for name, (fn, args) in _CONV[key].items():
    r = common.timeit(lambda: jax.block_until_ready(fn(*args)), steps, warmup)
    out[name] = gflop / r["median_s"]
  return {"gflops": out, "gflop": gflop, "load": common.load()}


if __name__ == "__main__":
  common.serve({"matmul": matmul, "step": step, "feature_pass": feature_pass, "eval": eval_rate,
                "profile": profile, "conv": conv}, env)
