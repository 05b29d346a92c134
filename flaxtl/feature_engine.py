"""Which engine computes the frozen trunk's one-time feature pass: XLA, XLA with Winograd
convolutions (flaxtl/winograd.py), or TensorFlow's oneDNN in float32 or bf16 (flaxtl/tf_trunk.py),
chosen by `config.feature_engine`.

'auto' measures instead of guessing: machines change from day to day, and the best engine differs
by CPU (oneDNN's bf16 ran ~8x XLA's float32 on an AMX Xeon, 2x on an AMD EPYC without AMX;
Winograd 2x on an AVX2 EPYC, where oneDNN gained nothing). A short
probe times each eligible engine on a few batches of random images at the run's image size,
interleaved, checks each against XLA's float32 output on the same batch, and picks the fastest.
Its result is stored under the feature cache dir, keyed by the CPU model, image size, boundary
and library versions: measured once per machine. Small passes skip it (the probe would cost more
than it saves) and use XLA.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("flaxtl")
ENGINES = ("auto", "xla", "winograd", "tf", "tf_bf16")
# Features from bf16 arithmetic differ from float32 ones: the cache keys on the precision.
PRECISION = {"tf": "float32", "tf_bf16": "bfloat16"}  # xla, winograd: the model's dtype
# Probe check against XLA float32 on the same batch: ||a - b|| / ||b||. float32 engines agree to
# ~1e-6 (Winograd ~3e-6); bf16 rounding (8 bits of mantissa) through 10-13 convolutions gives ~1e-2.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# tf_bf16 is eligible for 'auto' because its features were shown to cost no accuracy (the bar:
# within 0.5 point): Caltech-97's closed-form head on bf16 GAP features val 0.9132 / test 0.8982
# against float32's 0.9143 / 0.8960, features 0.67% apart (benchmarks/RESULTS.md, issue 17).
BF16_IN_AUTO = True
AUTO_MIN_IMAGES = 1000  # fewer images to compute: XLA, no probe (it costs 9 batches of 32)
PROBE_BATCH, PROBE_ROUNDS = 32, 2  # batch at <= 112 px; fewer images above (probe_batch)


def cpu() -> dict:
  """The CPU's model name and its bf16 flags (/proc/cpuinfo; empty elsewhere)."""
  name, flags = platform.processor() or platform.machine(), set()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      k, _, v = line.partition(":")
      if k.strip() == "model name":
        name = v.strip()
      elif k.strip() == "flags":
        flags = set(v.split())
        break
  except OSError:
    pass
  return {"model": name, "bf16_flags": sorted(flags & {"amx_bf16", "avx512_bf16"})}


def precision(engine: str, model_dtype: str) -> str:
  return PRECISION.get(engine, model_dtype)


def tf_usable(model) -> bool:
  from flaxtl import tf_trunk  # no TensorFlow import: it only knows the model class
  return tf_trunk.supports(model) and importlib.util.find_spec("tensorflow") is not None


def winograd_usable(model) -> bool:
  from flaxtl.models import vgg
  return isinstance(model, vgg.VGG16) and np.dtype(model.dtype) == np.float32


def candidates(model) -> list[str]:
  """The engines 'auto' may choose among on this machine, for this model."""
  import jax
  out = ["xla"]
  if jax.default_backend() != "cpu" or jax.process_count() > 1:
    return out  # an accelerator is the fast path (cuDNN picks Winograd itself); processes agree
  if winograd_usable(model):
    out.append("winograd")
  if not tf_usable(model):
    return out
  out.append("tf")
  if BF16_IN_AUTO and cpu()["bf16_flags"]:
    out.append("tf_bf16")
  return out


def runner(engine: str, model, variables, mode: str, stop_at: str, capture: tuple[str, ...]
           ) -> Callable[..., dict]:
  """(images, progress=None) -> {layer: float32 array} for `capture`, computed by `engine`."""
  from flaxtl import features, parallel, winograd
  if engine in ("xla", "winograd"):
    if engine == "winograd":
      model = model.clone(conv_general_dilated=winograd.conv_general_dilated)
    trunk = features.Trunk(model, mode, stop_at, capture)
    return lambda images, progress=None: parallel.map_batches(trunk, variables, images, 32,
                                                              progress)
  from flaxtl import tf_trunk
  t = tf_trunk.TFTrunk(model, variables["params"], mode, stop_at, capture, bf16=engine == "tf_bf16")
  return t.map


def for_frozen_layers(requested: str, model):
  """`model` whose frozen layers (up to `stop_gradient_after`) use Winograd convolutions, when
  training from images runs them forward every step: with 'auto' or 'winograd', for VGG16 in
  float32 on a CPU (block 5 from images, 112 px: 1.56x the step with lax's convolutions on an AVX2
  EPYC, benchmarks/RESULTS.md). Otherwise (and 'xla', 'tf', 'tf_bf16'): `model` as it is."""
  import jax
  from flaxtl import winograd
  if (requested in ("auto", "winograd") and winograd_usable(model)
          and jax.default_backend() == "cpu"):
    return model.clone(frozen_conv_general_dilated=winograd.conv_general_dilated)
  return model


TRAIN_ENGINES = ("auto", "xla", "tf_bf16")


def for_trained_layers(requested: str, model, boundary: str | None) -> tuple[str, ...]:
  """The trunk layers after `boundary` that the training step runs through TensorFlow's oneDNN in
  bf16 (`tf_trunk.trained_layers`), or () for XLA. config.train_engine: 'xla'; 'tf_bf16'; 'auto':
  'tf_bf16' on a CPU with AMX-BF16, one device and process, VGG16 in float32 with TF installed.

  Why: block 5's step at 224 px ran 3.1x XLA's float32 one on an AMX Xeon, and 5-fold CV on
  sign_digits found no difference (2 of 2,012 images, p = 0.5; benchmarks/RESULTS.md). Not
  measured on CPUs without AMX (oneDNN's bf16 gained 1.0-2x there in the feature pass): 'auto'
  keeps XLA. Evaluation, export and inference always run XLA in the model's dtype."""
  import jax
  from flaxtl.models import vgg
  trunk = vgg.trunk_layer_names()
  layers = trunk[trunk.index(boundary) + 1:] if boundary in trunk else (
      trunk if boundary is None else ())
  if (requested == "xla" or not any("_conv" in n for n in layers)
          or not winograd_usable(model)):  # VGG16, float32
    return ()
  if requested == "auto" and not (
      "amx_bf16" in cpu()["bf16_flags"] and jax.default_backend() == "cpu"
      and jax.device_count() == 1 and jax.process_count() == 1 and tf_usable(model)):
    return ()
  return tuple(layers)


@dataclasses.dataclass
class Choice:
  engine: str
  precision: str
  how: str                      # 'asked', 'probe', 'probe from <file>', 'small pass', 'cache'
  probe: dict | None = None

  def info(self, requested: str) -> dict:
    return {"requested": requested, "engine": self.engine, "precision": self.precision,
            "how": self.how, **({"probe": self.probe} if self.probe else {})}


def probe_key(model, image_size: int, boundary: str, engines: list[str], model_dtype: str) -> dict:
  import importlib.metadata
  import jax
  tf_version = None  # read without importing TensorFlow (seconds), which XLA's choice never needs
  for dist in ("tensorflow", "tensorflow-cpu"):
    try:
      tf_version = tf_version or importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {"cpu": cpu()["model"], "image_size": image_size, "boundary": boundary,
          "engines": engines, "model_dtype": model_dtype, "model": type(model).__name__,
          "jax": jax.__version__, "tensorflow": tf_version}


def probe_batch(image_size: int) -> int:
  """PROBE_BATCH images up to 112 px, as many pixels above (at least 4): at 224 px the probe of
  four engines on 32 images took ~50 s of a 5-minute first run; 8 images rank them the same."""
  return min(PROBE_BATCH, max(4, round(PROBE_BATCH * (112 / image_size) ** 2)))


def probe(model, variables, mode: str, image_size: int, stop_at: str, engines: list[str],
          model_dtype: str = "float32", log_fn: Callable = print) -> dict:
  """Each engine on the same random batch: one call (compile/trace), then PROBE_ROUNDS timed
  rounds, interleaved; each compared with XLA's float32 output. -> {'choice', 'images_per_s',
  'rel_error', 'rejected', ...}. An engine's rate is its fastest round: another process can only
  slow a round down, and the choice is kept for every later run on this machine."""
  batch = probe_batch(image_size)
  x = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), np.uint8)
  run = {e: runner(e, model, variables, mode, stop_at, (stop_at,)) for e in engines}
  ref, first, rel, times = None, {}, {}, {e: [] for e in engines}
  for e in engines:
    t = time.perf_counter()
    out = run[e](x)[stop_at]
    first[e] = time.perf_counter() - t
    if e == "xla":
      ref = out
    rel[e] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
  for _ in range(PROBE_ROUNDS):
    for e in engines:
      t = time.perf_counter()
      run[e](x)
      times[e].append(time.perf_counter() - t)
  ips = {e: batch / min(v) for e, v in times.items()}
  rejected = {e: f"rel error {rel[e]:.2g} > {TOLERANCE[precision(e, model_dtype)]:g}"
              for e in engines if rel[e] > TOLERANCE[precision(e, model_dtype)]}
  choice = max((e for e in engines if e not in rejected), key=ips.get)
  doc = {"choice": choice, "images_per_s": ips, "rel_error_vs_xla": rel, "rejected": rejected,
         "first_call_s": first, "batch": batch, "rounds": PROBE_ROUNDS,
         "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  log_fn("feature engine probe: " + ", ".join(f"{e} {ips[e]:.1f} img/s" for e in engines)
         + f" -> {choice}" + (f" (rejected: {rejected})" if rejected else ""))
  return doc


def choose(requested: str, model, variables, mode: str, image_size: int, stop_at: str,
           model_dtype: str, n_images: int, cache_dir: Path, log_fn: Callable = print) -> Choice:
  """The engine for a pass of `n_images` up to `stop_at`: the one asked for, or for 'auto' the
  probe's choice (measured once per machine, kept in cache_dir/engine/)."""
  if requested != "auto":
    here = cpu()
    if requested == "tf_bf16" and not here["bf16_flags"]:
      log.warning("config.feature_engine='tf_bf16': this CPU (%s) has no bf16 units (avx512_bf16, "
                  "amx_bf16): oneDNN gains nothing from bf16 here (on an AVX2 EPYC it ran at "
                  "0.8-1.05x 'tf', float32) and the features lose precision; 'auto' measures and "
                  "picks", here["model"])
    return Choice(requested, precision(requested, model_dtype), "asked")
  engines = candidates(model)
  if len(engines) == 1 or n_images < AUTO_MIN_IMAGES:
    how = "small pass" if len(engines) > 1 else "only engine here"
    return Choice("xla", precision("xla", model_dtype), how)
  key = probe_key(model, image_size, stop_at, engines, model_dtype)
  path = Path(cache_dir) / "engine" / (hashlib.sha256(json.dumps(
      key, sort_keys=True).encode()).hexdigest()[:32] + ".json")
  doc = None
  if path.exists():
    try:
      doc = json.loads(path.read_text())
      how = f"probe from {path}"
    except ValueError:
      doc = None
  if doc is None or doc.get("choice") not in engines:
    doc = {**probe(model, variables, mode, image_size, stop_at, engines, model_dtype, log_fn),
           "key": key}
    how = "probe"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
  return Choice(doc["choice"], precision(doc["choice"], model_dtype), how, doc)


def check(config) -> str | None:
  """The config's feature_engine and train_engine, or a message naming the field."""
  t = config.get("train_engine", "auto")
  if t not in TRAIN_ENGINES:
    return f"config.train_engine={t!r}: one of {', '.join(TRAIN_ENGINES)}"
  if t == "tf_bf16":
    import jax
    if config.model.name != "vgg16" or config.model.dtype != "float32":
      return (f"config.train_engine='tf_bf16': VGG16 in float32 only (model.name="
              f"{config.model.name!r}, model.dtype={config.model.dtype!r}); use 'xla' or 'auto'")
    if jax.default_backend() != "cpu" or jax.device_count() > 1 or jax.process_count() > 1:
      return (f"config.train_engine='tf_bf16': one CPU device only (this run has "
              f"{jax.device_count()} {jax.default_backend()} device(s)); use 'xla' or 'auto'")
    if importlib.util.find_spec("tensorflow") is None:
      return "config.train_engine='tf_bf16': needs TensorFlow (pip install tensorflow)"
  e = config.get("feature_engine", "auto")
  if e not in ENGINES:
    return f"config.feature_engine={e!r}: one of {', '.join(ENGINES)}"
  if e in PRECISION and config.model.name != "vgg16":
    return (f"config.feature_engine={e!r}: the TensorFlow trunk knows VGG16 only "
            f"(model.name={config.model.name!r}); use 'xla' or 'auto'")
  if e == "winograd" and (config.model.name != "vgg16" or config.model.dtype != "float32"):
    return (f"config.feature_engine='winograd': VGG16 in float32 only (model.name="
            f"{config.model.name!r}, model.dtype={config.model.dtype!r}); use 'xla' or 'auto'")
  return None


def summary(info: dict | None) -> str:
  if not info:
    return ""
  return f"engine {info['engine']} ({info['precision']}, {info['how']})"

