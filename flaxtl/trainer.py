"""Fine-tuning: setup from a config, a jitted data-parallel train step, evaluation, checkpoints.

The shape follows Flax's examples/imagenet: `create_train_state`, `train_step`, `eval_step`,
`train_and_evaluate(config, workdir)`. Data parallelism is `jax.jit` over a 1-D ('data',) mesh of
every device of every process: the global batch is sharded, params are replicated, XLA inserts the
gradient all-reduce. When the frozen trunk's output is cached, the step starts at the boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxtl import checkpointing, data, features, freezing, models, preprocessing, weights

log = logging.getLogger("flaxtl")


class TrainState(train_state.TrainState):
  """step, params, opt_state (+ apply_fn, tx as static fields)."""


class RunError(RuntimeError):
  """A run that cannot start or go on (bad workdir, non-finite loss, ...), with the reason."""


# ---------------------------------------------------------------------------------------------
# Setup: everything derived from the config before the first step.

@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  model: Any
  layers: tuple[str, ...]
  freeze: freezing.FreezePlan
  params: Any                       # initial params (pretrained where available)
  weights_meta: dict
  preprocessing: str
  class_names: list[str]
  feeders: dict[str, data.Feeder]   # per split: stored inputs (images or cached features)
  start_after: str | None           # the step starts after this layer (cached features)
  stop_gradient_after: str | None   # or runs from images and stops gradients here
  skipped: dict[str, str]           # bad files left out: {path: reason}
  timings: dict[str, float]


def pretrained_path(config) -> str | None:
  """config.model.weights, else the shared torchvision file next to the repo, else None."""
  if config.model.weights:
    return os.path.expanduser(config.model.weights)
  shared = data.REPO_ROOT.parent / "shared" / "weights" / "vgg16_tv_in1k_features.safetensors"
  return str(shared) if shared.exists() else None


def load_weights(config) -> tuple[dict, dict]:
  path = pretrained_path(config)
  return weights.load(weights.resolve(path))


def init_params(model, config, image_size: int, pretrained: dict | None) -> Any:
  """Random init for the whole model, then the pretrained layers copied in (not the new head)."""
  params = jax.jit(model.init)(jax.random.key(config.seed),
                               jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
  params = jax.tree.map(np.asarray, params)
  if pretrained is None:
    return params
  params = dict(params)
  for name in params:
    if name == models.vgg.HEAD:
      continue  # a new classifier for the new classes
    if name not in pretrained:
      raise weights.WeightsError(f"layer {name!r} is needed by model.head={config.model.head!r} "
                                 f"but the weights file has only: {', '.join(pretrained)}")
    for leaf, value in params[name].items():
      if pretrained[name][leaf].shape != value.shape:
        raise weights.WeightsError(f"layer {name}/{leaf}: weights have shape "
                                   f"{pretrained[name][leaf].shape}, model needs {value.shape}")
    params[name] = {k: np.asarray(v, np.float32) for k, v in pretrained[name].items()}
  return params


def prepare(config, workdir: Path | None = None, *, log_fn: Callable = functools.partial(print, flush=True),
            also_cache: tuple[str, ...] = ()) -> Setup:
  """Data, weights, model, freezing and (when possible) the frozen-trunk feature cache.

  `also_cache` names more boundaries to cache in the same forward pass (a freeze-level sweep
  computes every level's features at once).
  """
  t0 = time.perf_counter()
  timings = {}
  splits = data.load_splits(config.data, config.seed, workdir)
  data.check_splits(splits, config)  # dataset mistakes: before weights, init or decoding
  class_names = splits["train"].class_names
  if config.model.name == "vgg16":
    pretrained, meta = load_weights(config)
    mode = meta["preprocessing"]
  else:
    pretrained, meta, mode = None, {"source": "none (trained from scratch)"}, "unit"
  model = models.create(config, num_classes=len(class_names))
  layers = model.layers
  freeze = freezing.plan(config.trainable, layers)
  params = init_params(model, config, config.data.image_size, pretrained)

  augment = data.augment_enabled(config.data.augment)
  use_cache = bool(config.feature_cache and freeze.boundary and not augment)
  cache_dir = Path(config.cache_dir) if config.cache_dir else features.default_cache_dir()
  wanted = [freeze.boundary] + [b for b in also_cache if b != freeze.boundary]
  # A split whose features are all cached is never decoded: its files' sizes and mtimes are part
  # of the key, so a hit means the same images (and, with no skipped files, no bad ones).
  hits = {}
  if use_cache:
    for name, split in splits.items():
      found = _load_features(config, meta, mode, split, wanted, cache_dir)
      if found is not None:
        hits[name] = found
        for b in wanted:
          log_fn(f"features {name}: {found[b].shape} at {b} (from cache)")

  # Decode the other splits once (the fast scan for bad files happens here).
  images, skipped = {}, {}
  for name, split in splits.items():
    if name in hits:
      continue
    if split.images is not None:  # decoded by the source (tfds)
      pixels, bad = split.images, {}
    else:
      pixels, bad = data.decode_images(split.paths, config.data.image_size,
                                       max_pixels=config.data.max_pixels)
    skipped.update(bad)
    images[name] = pixels
    if bad:
      splits[name] = split.subset([i for i, p in enumerate(split.paths) if p not in bad])
  if skipped:
    listing = "\n  ".join(f"{p}: {why}" for p, why in sorted(skipped.items()))
    if config.data.on_bad_image == "error":
      raise data.DataError(f"{len(skipped)} unusable image file(s) (data.on_bad_image='error'):"
                           f"\n  {listing}")
    log.warning("skipping %d unusable image file(s):\n  %s", len(skipped), listing)
    data.check_splits(splits, config)  # again: skipping may have emptied a class
  timings["decode_s"] = time.perf_counter() - t0

  feeders = {}
  if use_cache:
    t1 = time.perf_counter()
    for name, split in splits.items():
      feats = hits.get(name) or _cached_features(config, model, params, meta, mode, split,
                                                 images[name], name, wanted, cache_dir, log_fn)
      feeders[name] = data.Feeder(feats[freeze.boundary], split.labels)
    timings["features_s"] = time.perf_counter() - t1
  else:
    transform = data.image_transform(mode, config.data.augment if augment else None)
    for name, split in splits.items():
      feeders[name] = data.Feeder(images[name], split.labels, transform)
  timings["prepare_s"] = time.perf_counter() - t0
  return Setup(config, model, layers, freeze, params, meta, mode, class_names, feeders,
               start_after=freeze.boundary if use_cache else None,
               stop_gradient_after=None if use_cache else freeze.boundary,
               skipped=skipped, timings=timings)


def _cached_features(config, model, params, meta, mode, split, images, split_name, boundaries,
                     cache_dir, log_fn) -> dict[str, np.ndarray]:
  """{boundary: features} for one split: cached ones loaded, the others from one forward pass."""
  describe = _feature_descriptions(config, meta, mode, split, boundaries)
  keys = {b: features.cache_key(**d) for b, d in describe.items()}
  out = {b: features.load(cache_dir, keys[b]) for b in boundaries}
  missing = [b for b in boundaries if out[b] is None]
  if missing:
    last = max(missing, key=model.layers.index)
    trunk = _trunk(model, mode, last, tuple(missing))
    computed = _feature_pass(trunk, params, images, split_name, log_fn)
    for b in missing:
      features.store(cache_dir, keys[b], computed[b], describe[b])
      out[b] = computed[b]
  for b in boundaries:
    log_fn(f"features {split_name}: {out[b].shape} at {b} ("
           f"{'computed and cached' if b in missing else 'from cache'}: {cache_dir / keys[b]}.npy)")
  return out


def _feature_descriptions(config, meta, mode, split, boundaries) -> dict[str, dict]:
  """What each boundary's features depend on; the cache key is a hash of it."""
  files = features.files_fingerprint(split.paths, split.labels)
  return {b: dict(weights_sha256=meta.get("sha256"), weights_file=meta.get("file"),
                  image_size=config.data.image_size, preprocessing=mode, boundary=b,
                  dtype=config.model.dtype, model=config.model.name, files=files)
          for b in boundaries}


def _load_features(config, meta, mode, split, boundaries, cache_dir) -> dict | None:
  """Every boundary's cached features for `split`, or None if any is missing."""
  out = {}
  for b, d in _feature_descriptions(config, meta, mode, split, boundaries).items():
    if not (cache_dir / f"{features.cache_key(**d)}.json").exists():
      return None
    out[b] = features.load(cache_dir, features.cache_key(**d))
    if out[b] is None:
      return None
  return out


@functools.lru_cache(maxsize=16)
def _trunk(model, mode: str, stop_at: str, capture: tuple[str, ...]) -> Callable:
  """One function object per trunk, so features.compute compiles it once for all splits."""
  return functools.partial(_apply_trunk, model=model, mode=mode, stop_at=stop_at, capture=capture)


def _apply_trunk(params, images_uint8, *, model, mode, stop_at, capture):
  x = preprocessing.preprocess(images_uint8.astype(jnp.float32), mode)
  return model.apply({"params": params}, x, stop_at=stop_at, capture=capture)[1]


def _feature_pass(trunk, params, images, split_name, log_fn) -> np.ndarray:
  from tqdm import tqdm
  t = time.perf_counter()
  with tqdm(total=len(images), desc=f"frozen trunk, {split_name}", unit="img",
            disable=not sys.stderr.isatty(), leave=False) as bar:
    out = features.compute(trunk, params, images, progress=bar.update)
  dt = time.perf_counter() - t
  log_fn(f"feature pass {split_name}: {len(images)} images in {dt:.1f}s "
         f"({len(images) / max(dt, 1e-9):.1f} img/s)")
  return out


# ---------------------------------------------------------------------------------------------
# Optimizer, state, steps.

def learning_rate(opt, steps_per_epoch: int, epochs: int):
  total = max(1, steps_per_epoch * epochs)
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  if opt.schedule == "constant":
    if not warmup:
      return opt.learning_rate
    return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup),
                                 optax.constant_schedule(opt.learning_rate)], [warmup])
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, total)
  raise ValueError(f"optimizer.schedule={opt.schedule!r}: 'constant' or 'cosine'")


def make_optimizer(opt, lr) -> optax.GradientTransformation:
  if opt.name == "adam":
    tx = optax.adam(lr)
  elif opt.name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt.weight_decay)
  elif opt.name == "sgd":
    tx = optax.sgd(lr, momentum=opt.momentum or None, nesterov=False)
  else:
    raise ValueError(f"optimizer.name={opt.name!r}: 'adam', 'adamw' or 'sgd'")
  if opt.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx


def create_train_state(setup: Setup, steps_per_epoch: int, lr=None) -> TrainState:
  cfg = setup.config
  lr = learning_rate(cfg.optimizer, steps_per_epoch, cfg.epochs) if lr is None else lr
  tx = freezing.optimizer(make_optimizer(cfg.optimizer, lr), setup.params, setup.freeze)
  apply_fn = functools.partial(setup.model.apply, start_after=setup.start_after,
                               stop_gradient_after=setup.stop_gradient_after)
  return TrainState.create(apply_fn=apply_fn, params=setup.params, tx=tx)


def _loss_terms(logits, labels, mask):
  """Sums (not means) of the loss and correct predictions over unmasked rows, in float32."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)


def zero_metrics():
  return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.float32), "nonfinite_step": jnp.full((), -1, jnp.int32)}


def train_step(state: TrainState, metrics: dict, batch: dict, rng) -> tuple[TrainState, dict]:
  """One optimizer step on the global batch; metrics are accumulated on device (no host sync)."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
    loss_sum, correct, count = _loss_terms(logits, batch["label"], batch["mask"])
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, correct, count)

  grads, (loss_sum, correct, count) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  finite = jnp.isfinite(loss_sum)
  metrics = {"loss": metrics["loss"] + loss_sum, "correct": metrics["correct"] + correct,
             "count": metrics["count"] + count,
             "nonfinite_step": jnp.where((metrics["nonfinite_step"] < 0) & ~finite,
                                         state.step.astype(jnp.int32), metrics["nonfinite_step"])}
  return new_state, metrics


def eval_step(apply_fn, params, batch) -> tuple[dict, jax.Array]:
  logits = apply_fn({"params": params}, batch["x"])
  loss_sum, correct, count = _loss_terms(logits, batch["label"], batch["mask"])
  return {"loss": loss_sum, "correct": correct, "count": count}, logits.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The data-parallel runner: one mesh over all devices of all processes.

class Parallel:
  """Jitted train/eval steps over a 1-D ('data',) mesh; batches become global sharded arrays."""

  def __init__(self, state: TrainState, devices=None):
    self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
    self.n_devices = self.mesh.size
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P("data"))
    self.train_step = jax.jit(train_step, donate_argnums=(0, 1),
                              in_shardings=(self.replicated, self.replicated, self.sharded,
                                            self.replicated),
                              out_shardings=(self.replicated, self.replicated))
    self.eval_step = jax.jit(functools.partial(eval_step, state.apply_fn),
                             in_shardings=(self.replicated, self.sharded),
                             out_shardings=(self.replicated, self.sharded))

  def check_batch_size(self, batch_size: int, what: str = "batch_size") -> None:
    if batch_size % self.n_devices:
      raise ValueError(f"config.{what}={batch_size} must be a multiple of the "
                       f"{self.n_devices} devices")

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def put_batch(self, batch: dict) -> dict:
    """This process's rows -> one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

  def evaluate(self, params, feeder: data.Feeder, batch_size: int,
               return_logits: bool = False) -> dict:
    """Loss/accuracy over a split; the padded last batch is masked, each example counts once."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    sums, all_logits = [], []
    for batch in feeder.epoch(batch_size, seed=0, epoch=0, shuffle=False,
                              process_index=jax.process_index(),
                              process_count=jax.process_count()):
      m, logits = self.eval_step(params, self.put_batch(batch))
      sums.append(m)
      if return_logits:
        all_logits.append(logits)
    for m in jax.device_get(sums):
      for k in totals:
        totals[k] += float(m[k])
    out = {"loss": totals["loss"] / max(totals["count"], 1.0),
           "accuracy": totals["correct"] / max(totals["count"], 1.0),
           "count": int(totals["count"]), "correct": int(totals["correct"])}
    if return_logits:
      gathered = [np.asarray(multihost_utils.process_allgather(l, tiled=True))
                  if jax.process_count() > 1 else np.asarray(l) for l in all_logits]
      out["logits"] = np.concatenate(gathered)[:feeder.n]
    return out


# ---------------------------------------------------------------------------------------------
# The loop.

def check_workdir(workdir: Path, resume: bool) -> None:
  """Fail at start, not after an hour: the workdir must be writable and not hold another run."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_bytes(b"\0" * (1 << 20))
    probe.unlink()
  except OSError as e:
    raise RunError(f"workdir {workdir} is not writable ({e.strerror or e})") from e
  ckpt = workdir / "checkpoints"
  if not resume and ckpt.exists() and any(ckpt.iterdir()):
    raise RunError(f"{workdir} already holds checkpoints of a run: pass --resume to continue it, "
                   "or choose another --workdir")
  free = shutil.disk_usage(workdir).free
  if free < 200 << 20:
    raise RunError(f"workdir {workdir}: only {free >> 20} MiB free on its disk")


class Recorder:
  """metrics.jsonl, TensorBoard events and results.json; only process 0 writes."""

  def __init__(self, workdir: Path, resume_epoch: int | None):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.history: list[dict] = []
    if self.path.exists() and resume_epoch is not None:
      self.history = [r for r in map(json.loads, self.path.read_text().splitlines())
                      if r["epoch"] < resume_epoch]
    self._writer = None
    if self.active:
      self._rewrite()
      import tensorflow as tf
      self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))

  def _rewrite(self):
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
    os.replace(tmp, self.path)

  def epoch(self, record: dict) -> None:
    self.history.append(record)
    if not self.active:
      return
    self._rewrite()  # atomic: a kill never leaves half a line for the resume to choke on
    import tensorflow as tf
    with self._writer.as_default(step=record["epoch"] + 1):
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "epoch":
          tf.summary.scalar(k, v)
    self._writer.flush()

  def write_json(self, name: str, doc: dict) -> None:
    if self.active:
      tmp = self.workdir / f".{name}.tmp"
      tmp.write_text(json.dumps(doc, indent=2, default=str))
      os.replace(tmp, self.workdir / name)


def describe_params(setup: Setup) -> str:
  counts = freezing.count(setup.params, setup.freeze)
  total = counts["trainable"] + counts["frozen"]
  lines = [f"Model: {setup.config.model.name}, head={setup.config.model.head}, "
           f"{len(setup.class_names)} classes, trainable={setup.config.trainable!r}",
           f"Total params: {total:,}",
           f"Trainable params: {counts['trainable']:,} ({', '.join(setup.freeze.trainable)})",
           f"Non-trainable params: {counts['frozen']:,}"]
  if setup.freeze.boundary:
    how = ("cached features, step starts there" if setup.start_after
           else "gradients stop there")
    lines.append(f"Frozen boundary: {setup.freeze.boundary} ({how})")
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str | Path, *, resume: bool = False,
                       log_fn: Callable = functools.partial(print, flush=True), stop_flag: Callable[[], bool] | None = None,
                       evaluate_test: bool = True, setup: Setup | None = None) -> dict:
  """Trains, keeps the best and latest checkpoints, evaluates the best state on test."""
  t_start = time.perf_counter()
  workdir = Path(workdir)
  check_workdir(workdir, resume)
  setup = setup or prepare(config, workdir, log_fn=log_fn)
  log_fn(describe_params(setup))
  train_feed = setup.feeders["train"]
  steps_per_epoch = train_feed.steps(config.batch_size)
  state = create_train_state(setup, steps_per_epoch)
  par = Parallel(state)
  par.check_batch_size(config.batch_size)
  par.check_batch_size(config.eval_batch_size, "eval_batch_size")
  mngr = checkpointing.manager(workdir)

  start_epoch, start_step, resumed_sums = 0, 0, {}
  if resume and mngr.latest_step() is not None:
    step = mngr.latest_step()
    state = checkpointing.restore(mngr, step, state)
    start_epoch, start_step = divmod(int(step), steps_per_epoch)
    # A mid-epoch checkpoint carries the epoch's metric sums so far: its record stays whole.
    resumed_sums = checkpointing.custom(mngr, step).get("train_sums", {}) if start_step else {}
    log_fn(f"resumed from step {step} (epoch {start_epoch + 1}, step {start_step} of "
           f"{steps_per_epoch})")
  recorder = Recorder(workdir, start_epoch)
  run_info = {"class_names": setup.class_names, "preprocessing": setup.preprocessing,
              "image_size": config.data.image_size, "weights": setup.weights_meta,
              "boundary": setup.freeze.boundary, "trainable": list(setup.freeze.trainable),
              "model": config.model.to_dict(), "num_classes": len(setup.class_names)}
  recorder.write_json("run.json", run_info)
  recorder.write_json("config.json", config.to_dict())
  state = par.put_state(state)
  rng = jax.random.key(config.seed + 1)
  images_seen, train_time = 0, 0.0

  from tqdm import tqdm
  if stop_flag is not None:
    stop_flag()  # From here on a stop request is honoured with a checkpoint.
  for epoch in range(start_epoch, config.epochs):
    t_epoch = time.perf_counter()
    sums = resumed_sums if epoch == start_epoch else {}
    metrics = jax.device_put({**zero_metrics(), **{k: jnp.float32(v) for k, v in sums.items()}},
                             par.replicated)
    first = start_step if epoch == start_epoch else 0
    bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", leave=False, disable=not sys.stderr.isatty())
    batches = train_feed.epoch(config.batch_size, seed=config.seed, epoch=epoch, shuffle=True,
                               start_step=first, process_index=jax.process_index(),
                               process_count=jax.process_count())
    n_images = 0
    for i, batch in enumerate(batches, start=first):
      state, metrics = par.train_step(state, metrics, par.put_batch(batch), rng)
      n_images += config.batch_size
      bar.update(1)
      last = i + 1 == steps_per_epoch
      if (i + 1) % config.log_every_steps == 0 or last:
        m = jax.device_get(metrics)
        _check_finite(m, mngr)
        bar.set_postfix(loss=f"{m['loss'] / max(m['count'], 1):.4f}",
                        acc=f"{m['correct'] / max(m['count'], 1):.3f}",
                        img_s=f"{n_images / (time.perf_counter() - t_epoch):.1f}")
      every = config.checkpoint_every_steps
      stop = stop_flag is not None and stop_flag() and not last  # at `last`: after the epoch's save
      if not last and (stop or (every and (i + 1) % every == 0)):
        m = jax.device_get(metrics)
        _check_finite(m, mngr, state)  # never checkpoint params a non-finite loss has touched
        so_far = {k: float(m[k]) for k in ("loss", "correct", "count")}
        checkpointing.save(mngr, int(state.step), state, custom={"train_sums": so_far})
      if stop:
        mngr.wait_until_finished()
        bar.close()
        raise Preempted(int(state.step))
    bar.close()
    m = jax.device_get(metrics)
    _check_finite(m, mngr, state)
    seconds = time.perf_counter() - t_epoch
    train_time += seconds
    images_seen += int(m["count"])
    val = par.evaluate(state.params, setup.feeders["valid"], config.eval_batch_size)
    record = {"epoch": epoch, "step": int(state.step),
              "train_loss": float(m["loss"] / max(m["count"], 1)),
              "train_accuracy": float(m["correct"] / max(m["count"], 1)),
              "val_loss": val["loss"], "val_accuracy": val["accuracy"],
              "images_per_s": (float(m["count"]) - sums.get("count", 0.0)) / seconds,
              "seconds": seconds}
    recorder.epoch(record)
    checkpointing.save(mngr, int(state.step), state,
                       {"val_accuracy": val["accuracy"], "val_loss": val["loss"]})
    log_fn(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {record['train_loss']:.4f} "
           f"acc {record['train_accuracy']:.4f}  val loss {val['loss']:.4f} "
           f"acc {val['accuracy']:.4f}  {record['images_per_s']:.1f} img/s  {seconds:.1f}s")
    if stop_flag is not None and stop_flag() and epoch + 1 < config.epochs:
      mngr.wait_until_finished()
      raise Preempted(int(state.step))
  mngr.wait_until_finished()

  best = checkpointing.best_step(mngr)
  best_record = next((r for r in recorder.history if r["step"] == best), None)
  results = {"best_step": best, "best_epoch": best_record["epoch"] + 1 if best_record else None,
             "val_accuracy": best_record["val_accuracy"] if best_record else None,
             "val_loss": best_record["val_loss"] if best_record else None,
             "train_seconds": train_time, **setup.timings,
             "skipped_files": setup.skipped, "num_skipped": len(setup.skipped),
             "devices": jax.device_count(), "processes": jax.process_count(),
             "config": config.to_dict()}
  if evaluate_test and "test" in setup.feeders and best is not None:
    best_state = checkpointing.restore(mngr, best, state)
    test = par.evaluate(best_state.params, setup.feeders["test"], config.eval_batch_size)
    results.update(test_accuracy=test["accuracy"], test_loss=test["loss"],
                   test_correct=test["correct"], test_count=test["count"])
    log_fn(f"best epoch {results['best_epoch']}: val acc {results['val_accuracy']:.4f}, "
           f"test acc {test['accuracy']:.4f} ({test['correct']}/{test['count']})")
  results["wall_seconds"] = time.perf_counter() - t_start
  recorder.write_json("results.json", results)
  mngr.close()
  results["state"] = state
  return results


class Preempted(Exception):
  """Training stopped on request (SIGTERM/SIGINT) after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step}; checkpoint saved")
    self.step = step


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_finite(m: dict, mngr, state=None) -> None:
  """Raises on a non-finite loss; with `state` (before a save), also on non-finite params: an
  overflowing update can follow a finite loss, and a checkpoint must never hold inf/nan."""
  what, step = "loss", int(m["nonfinite_step"])
  if step < 0 and state is not None and not bool(_all_finite(state.params)):
    what, step = "params", int(state.step) - 1
  if step >= 0:
    mngr.wait_until_finished()
    raise RunError(f"non-finite {what} at step {step}: stopping; the last "
                   f"good checkpoint (step {mngr.latest_step()}) is kept. Lower the learning "
                   "rate or check the inputs.")
