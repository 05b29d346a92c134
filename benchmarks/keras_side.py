"""Keras 3 on TensorFlow: the textbook recipe, as a worker process (see benchmarks/common.py).

`keras.applications.VGG16(weights=None, include_top=False, pooling='avg')` + Dense(10) logits,
freezing by `layer.trainable = False`, Adam 1e-4, sparse categorical cross-entropy from logits,
compiled with the given `jit_compile` (False: TF graph + oneDNN kernels; True: TF's XLA) and
steps_per_execution=1. Timed with `model.train_on_batch(x, y)` on one in-memory batch held as TF
tensors (it returns the loss as a Python float, so every call is synchronised); `model.fit` runs
the same compiled train function. Frozen layers get no gradient, so the tape's backward pass stops
at the first trainable layer: the same work as flaxtl's stop_gradient step.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import common


def env() -> dict:
  import keras
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  return {"framework": "keras", "tensorflow": tf.__version__, "keras": keras.__version__,
          "backend": keras.backend.backend(),
          "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
          "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86)"),
          "pid": os.getpid()}


def matmul(n: int = 4096, steps: int = 5, warmup: int = 1) -> dict:
  """TF's f32 matmul (its oneDNN/Eigen kernel), eager and in a tf.function."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  a, b = (tf.constant(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  f = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)[0, :1]))  # tiny fetch, full product
  r = common.timeit(lambda: f(a, b).numpy(), steps, warmup)
  return {"n": n, "tf_f32": {"gflops": 2 * n ** 3 / r["median_s"] / 1e9, **r}}


def build(trainable: str, size: int):
  import keras
  keras.utils.set_random_seed(0)
  base = keras.applications.VGG16(weights=None, include_top=False, pooling="avg",
                                  input_shape=(size, size, 3))
  if trainable == "head":
    base.trainable = False
  elif trainable == "block5":
    for layer in base.layers:
      layer.trainable = layer.name.startswith("block5")
  elif trainable != "all":
    raise ValueError(trainable)
  model = keras.Model(base.input, keras.layers.Dense(10, name="predictions")(base.output))
  return model


_STEP: dict = {}


def _built_step(trainable: str, size: int, batch: int, jit_compile: bool, dtype: str):
  """(one synchronised train_on_batch, fresh?), built once per configuration (two kept).
  dtype 'bfloat16': Keras' mixed_bfloat16 policy (bf16 compute, float32 variables)."""
  import keras
  import tensorflow as tf
  key = (trainable, size, batch, jit_compile, dtype)
  if key in _STEP:
    return _STEP[key], False
  while len(_STEP) >= 2:
    _STEP.pop(next(iter(_STEP)))
    keras.backend.clear_session()
  keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
  try:
    model = build(trainable, size)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  model.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile, steps_per_execution=1)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((batch, size, size, 3), np.float32))
  y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
  losses = []

  def one():
    losses.append(model.train_on_batch(x, y))

  one.losses, one.model = losses, model
  _STEP[key] = one
  return one, True


def step(trainable: str, size: int, batch: int, jit_compile: bool, dtype: str = "float32",
         steps: int = 5, warmup: int = 2) -> dict:
  """Images/s of `train_on_batch` (module docstring); a repeated call reuses the model."""
  one, fresh = _built_step(trainable, size, batch, jit_compile, dtype)
  r = common.timeit(one, steps, warmup)
  if not fresh:
    r.pop("compile_s")
    r.pop("first_call_s")
  assert np.isfinite(one.losses[-1]), "non-finite loss"
  del one.losses[:-1]
  n_trainable = int(sum(np.prod(v.shape) for v in one.model.trainable_weights))
  gflop = common.step_gflop(size, trainable, cached=False)
  return {"images_per_s": batch / r["median_s"], "gflop_per_image": gflop,
          "gflops": gflop * batch / r["median_s"], "trainable_params": n_trainable, **r}


def eval_rate(size: int, batch: int = 64, jit_compile: bool = False, steps: int = 3,
              warmup: int = 1) -> dict:
  """Images/s of `test_on_batch` (the validation pass each epoch of `fit`): the full forward."""
  import keras
  import tensorflow as tf
  model = build("block5", size)
  model.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"], jit_compile=jit_compile)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((batch, size, size, 3), np.float32))
  y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
  r = common.timeit(lambda: model.test_on_batch(x, y), steps, warmup)
  del model
  keras.backend.clear_session()
  return {"images_per_s": batch / r["median_s"], **r}


_FORWARD: dict = {}


def forward(size: int, upto: str, batch: int = 32, dtype: str = "float32", steps: int = 2,
            warmup: int = 1) -> dict:
  """Images/s of Keras' VGG16 forward up to `upto` (predict_on_batch): what a oneDNN feature pass
  would cost; dtype 'bfloat16' sets Keras' mixed_bfloat16 policy (oneDNN uses AMX where present).
  The model is built once per configuration (two kept), so rounds time the forward only."""
  import keras
  import tensorflow as tf
  key = (size, upto, dtype)
  if key not in _FORWARD:
    while len(_FORWARD) >= 2:
      _FORWARD.pop(next(iter(_FORWARD)))
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    try:
      base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
      _FORWARD[key] = keras.Model(base.input, base.get_layer(upto).output)
    finally:
      keras.mixed_precision.set_global_policy("float32")
  model = _FORWARD[key]
  x = tf.constant(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32))
  r = common.timeit(lambda: model.predict_on_batch(x), steps, warmup)
  upto_i = 10 if upto == "block4_pool" else 13
  gflop = common.forward_gflop(size, upto_i)
  return {"images_per_s": batch / r["median_s"], "gflops": gflop * batch / r["median_s"], **r}


_CONV: dict = {}


def conv(batch: int, hw: int, cin: int, cout: int, dtype: str = "float32", steps: int = 3,
         warmup: int = 1) -> dict:
  """GFLOP/s of one 3x3 SAME conv as TF runs it (oneDNN unless TF_ENABLE_ONEDNN_OPTS=0)."""
  import tensorflow as tf
  key = (batch, hw, cin, cout, dtype)
  if key not in _CONV:
    _CONV.clear()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, hw, hw, cin)), dtype)
    w = tf.constant(rng.standard_normal((3, 3, cin, cout)) * 0.01, dtype)
    dy = tf.constant(rng.standard_normal((batch, hw, hw, cout)), dtype)
    s = [1, 1, 1, 1]
    small = lambda t: tf.reduce_sum(tf.reshape(t, [-1])[:1])  # noqa: E731  (tiny fetch)
    _CONV[key] = {
        "fwd": tf.function(lambda: small(tf.nn.conv2d(x, w, s, "SAME"))),
        "dgrad": tf.function(lambda: small(tf.compat.v1.nn.conv2d_backprop_input(
            tf.shape(x), w, dy, s, "SAME"))),
        "wgrad": tf.function(lambda: small(tf.compat.v1.nn.conv2d_backprop_filter(
            x, tf.shape(w), dy, s, "SAME")))}
  gflop = 2 * batch * hw * hw * cin * cout * 9 / 1e9
  out = {}
  for name, fn in _CONV[key].items():
    r = common.timeit(lambda: fn().numpy(), steps, warmup)
    out[name] = gflop / r["median_s"]
  return {"gflops": out, "gflop": gflop, "load": common.load()}


if __name__ == "__main__":
  common.serve({"matmul": matmul, "step": step, "eval": eval_rate, "conv": conv,
                "forward": forward}, env)
