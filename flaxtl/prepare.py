"""Everything a run derives from its config before the first step: checked config, data, model,
pretrained weights, freezing, and the inputs each split feeds (`split_inputs`: images, or the
frozen trunk's cached output when nothing random happens before the frozen boundary).

Order matters for the user: every config value is checked, then the dataset's mistakes, before
weights are read, images decoded or the trunk run.

`resplit` re-cuts a prepared Setup's stored inputs to other splits of the same files (k-fold
cross-validation): the images are decoded and the trunk run once for every fold.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxtl import (config_check, data, feature_engine, features, freezing, input_pipeline,
                    models, preprocessing, probe, split_inputs, splitting, weights)
from flaxtl.errors import ConfigError

log = logging.getLogger("flaxtl")


@dataclasses.dataclass(frozen=True)
class Network:
  """(variables, stored inputs) -> logits, from cached boundary features or from 0-255 images.

  From images, the preprocessing runs here (inside the jitted step, as for features and
  inference) and gradients stop at the frozen boundary. Frozen, so it can key compile caches.
  """
  model: Any
  mode: str | None
  start_after: str | None
  stop_gradient_after: str | None
  # Trunk layers the training step (train=True) runs in TF's oneDNN, bf16
  # (feature_engine.for_trained_layers); evaluation always runs the model as it is.
  trained_in_tf: tuple[str, ...] = ()

  def __call__(self, variables, x, *, train: bool = False, rngs=None, mutable=False):
    if self.start_after is None and self.mode is not None:  # None: inputs are network inputs
      x = preprocessing.preprocess(x.astype(jnp.float32), self.mode)
    start, stop_gradient = self.start_after, self.stop_gradient_after
    if train and self.trained_in_tf:
      from flaxtl import tf_trunk
      if start is None and stop_gradient is not None:  # from images: the frozen layers first
        x = jax.lax.stop_gradient(self.model.apply(variables, x, stop_at=stop_gradient,
                                                   stop_gradient_after=stop_gradient))
      p = variables["params"]
      x = tf_trunk.trained_layers(self.trained_in_tf)(
          x, [(p[n]["kernel"], p[n]["bias"]) for n in self.trained_in_tf if "_conv" in n])
      start, stop_gradient = self.trained_in_tf[-1], None
    return self.model.apply(variables, x, start_after=start, stop_gradient_after=stop_gradient,
                            train=train, rngs=rngs, mutable=mutable)

  def logits(self, variables, x):
    """(variables, inputs) -> float32 logits, inference mode: what every evaluation runs."""
    return self(variables, x).astype(jnp.float32)


@dataclasses.dataclass
class Setup:
  config: Any
  model: Any
  freeze: freezing.FreezePlan
  params: Any                       # initial params (pretrained where available)
  weights_meta: dict
  preprocessing: str
  class_names: list[str]
  feeders: dict[str, input_pipeline.Feeder]  # per split: stored inputs (images or features)
  network: Network
  skipped: dict[str, str]           # bad files left out: {path: reason}
  timings: dict[str, float]
  head_fit: dict | None = None      # phase 1: the probe that initialised the head, if any
  probe: dict | None = None         # the closed-form probe on the GAP features: the bar to beat
  splits: dict[str, data.Split] = dataclasses.field(default_factory=dict)  # the files as fed
  probe_features: dict[str, np.ndarray] | None = None  # per split: the GAP features it fits on
  probe_at: str | None = None       # the layer those features come from
  feature_engine: dict | None = None  # what computed (or would compute) the cached features
  batch_stats: Any = dataclasses.field(default_factory=dict)  # batch norms' running statistics

  @property
  def cached(self) -> bool:
    return self.network.start_after is not None

  @property
  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats=None) -> dict:
  """What `model.apply` takes: params, and batch norms' statistics when the model has any."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


@functools.lru_cache(maxsize=8)
def _jit_init(model):
  """One compiled init per model (a sweep and the tests prepare the same model many times)."""
  return jax.jit(model.init)


def load_weights(config, model) -> tuple[dict | None, dict, str]:
  """(pretrained variables or None, metadata, preprocessing mode) for `config.model`."""
  name = config.model.name
  if name == "small_cnn":
    return None, {"source": "none (trained from scratch)"}, "unit"
  desc = models.description(name)
  if config.model.weights == "none":
    return None, {"source": "none (random init)"}, desc.preprocessing
  if name == "vgg16":
    params, meta = weights.for_config(config.model)
    return {"params": params}, meta, meta["preprocessing"]
  if name in models.TORCHVISION:
    from flaxtl.models import torchvision_weights
    variables, meta = torchvision_weights.for_config(config.model, model)
    return variables, meta, meta["preprocessing"]
  from flaxtl.models import keras_weights
  variables, meta = keras_weights.for_config(config.model, model, desc)
  return variables, meta, meta["preprocessing"]


def init_variables(model, config, loaded: dict | None, meta: dict) -> tuple[Any, Any, dict]:
  """Random init of the whole model, then every pretrained layer but the new head merged in ->
  (params, batch_stats, report of what was loaded, kept random and left unused)."""
  s = config.data.image_size
  init = jax.tree.map(np.asarray, dict(_jit_init(model)(jax.random.key(config.seed),
                                                        jnp.zeros((1, s, s, 3), jnp.float32))))
  params, stats = init["params"], init.get("batch_stats", {})
  if loaded is None:
    return params, stats, {"loaded": [], "random": list(params), "unused": []}
  if not loaded.get("batch_stats") and not stats:  # VGG16: params only
    params, report = weights.merge_pretrained(loaded["params"], params,
                                              file=meta.get("file", "the weights file"))
    return params, stats, report
  from flaxtl.models import keras_weights  # the file was checked against the model on reading
  merged = jax.tree.map(np.asarray, keras_weights.merge(init, loaded))
  report = {"loaded": [k for k in params if k in loaded["params"]],
            "random": [k for k in params if k not in loaded["params"]], "unused": []}
  return merged["params"], merged.get("batch_stats", {}), report


def prepare(config, workdir: Path | None = None, *,
            log_fn: Callable = functools.partial(print, flush=True),
            also_cache: tuple[str, ...] = (), fit: bool = True) -> Setup:
  """Data, weights, model, freezing and (when possible) the frozen trunk's cached features.

  `also_cache` names more boundaries to cache in the same forward pass (a freeze-level sweep
  computes every level's features at once). `fit=False` leaves the probe (and phase 1) to a
  later `fit_probe`, e.g. on each fold of a `resplit`.
  """
  t0 = time.perf_counter()
  config_check.check_config(config)
  log_fn(f"reading the dataset ({config.data.root or config.data.name}) ...")
  splits = splitting.load_splits(config.data, config.seed, workdir)
  data.check_splits(splits, config)  # dataset mistakes: before weights, init or decoding
  class_names = splits["train"].class_names
  model = models.create(config, num_classes=len(class_names))
  loaded, meta, mode = load_weights(config, model)
  freeze = freezing.plan(config.trainable, model, config.model.train_bn)
  params, batch_stats, report = init_variables(model, config, loaded, meta)
  meta = {**meta, "merge": report}
  variables = model_variables(params, batch_stats)

  augment = input_pipeline.augment_enabled(config.data.augment)
  n_views = config.data.augment_views if augment else 0
  use_cache = bool(config.feature_cache and freeze.boundary and (not augment or n_views))
  if config.cutmix_alpha and use_cache:  # before the feature pass: minutes of compute
    s = config.data.image_size
    out = jax.eval_shape(features.Trunk(model, mode, freeze.boundary, (freeze.boundary,)),
                         variables, jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8))[freeze.boundary]
    if len(out.shape) != 4:
      raise ConfigError(f"config.cutmix_alpha={config.cutmix_alpha}: CutMix cuts a box out of "
                        f"spatial inputs, and trainable={config.trainable!r} trains on cached "
                        f"{freeze.boundary} features of shape {tuple(out.shape[1:])}; use "
                        "mixup_alpha there")
  probe_at = probe_boundary(model, loaded)
  if not (config.head_init == "probe" or config.report_probe):
    probe_at = None  # neither phase 1 nor the bar asked for: no GAP features needed
  fed = split_inputs.build(config, splits, model, variables, mode, meta, freeze.boundary,
                           use_cache=use_cache, n_views=n_views,
                           extra=(*also_cache, *([probe_at] if probe_at else [])), log_fn=log_fn)
  timings = {"decode_s": fed.decoded_at - t0,
             **({"features_s": fed.features_s} if fed.features_s is not None else {})}
  feeders, feats, engine, skipped = fed.feeders, fed.features, fed.engine, fed.skipped
  network = Network(model if use_cache else feature_engine.for_frozen_layers(
                        config.get("feature_engine", "auto"), model),
                    mode, start_after=freeze.boundary if use_cache else None,
                    stop_gradient_after=None if use_cache else freeze.boundary,
                    trained_in_tf=feature_engine.for_trained_layers(
                        config.get("train_engine", "auto"), model, freeze.boundary))
  setup = Setup(config, model, freeze, params, meta, mode, class_names, feeders, network,
                skipped=skipped, timings=timings, splits=splits,
                probe_features={n: f[probe_at] for n, f in feats.items()} if probe_at else None,
                probe_at=probe_at, feature_engine=engine.info(fed.requested) if engine else None,
                batch_stats=batch_stats)
  setup = fit_probe(setup, log_fn) if fit else setup
  setup.timings["prepare_s"] = time.perf_counter() - t0
  return setup


def fit_probe(setup: Setup, log_fn: Callable = print) -> Setup:
  """The closed-form probe on the cached GAP features (train; L2 chosen on valid) and few-shot
  numbers from the same features: the bar a fine-tune must beat, reported at the start of every
  run. With head_init='probe' the fit is also phase 1: it becomes the head."""
  if setup.probe_features is None:
    return setup
  config, b = setup.config, setup.probe_at
  x = {n: head_input(setup.model, v, b) for n, v in setup.probe_features.items()}  # head sees
  y, yv, k = setup.splits["train"].labels, setup.splits["valid"].labels, len(setup.class_names)
  t = time.perf_counter()
  weights = data.class_weights(y, k) if config.class_weight == "balanced" else None
  fit = probe.fit(x["train"], y, x["valid"], yv, k, class_weight=weights,
                  select_by=config.select_best_by)
  from flaxtl.evaluate import scores  # the fit's train figures, from its own features
  train_scores = scores(y, fit.logits(x["train"]))
  doc = {"method": "L-BFGS logistic regression", "features": b, "l2": fit.l2,
         "class_weight": config.class_weight, "select_by": config.select_best_by,
         "train_loss": train_scores["loss"], "train_accuracy": train_scores["accuracy"],
         "val_accuracy": fit.val_accuracy, "val_loss": fit.val_loss,
         "val_macro_f1": fit.val_macro_f1, "table": fit.table,
         "seconds": time.perf_counter() - t}
  timings = {**setup.timings, "probe_s": doc["seconds"]}
  if config.probe_shots:
    t = time.perf_counter()
    doc["few_shot"] = probe.few_shot(x["train"], y, x["valid"], yv, k, config.probe_shots,
                                     seed=config.seed, draws=3)
    doc["few_shot_method"] = ("ridge regression (closed form) on k train images per class, L2 "
                              "chosen on valid; mean and std over 3 seeded draws")
    timings["few_shot_s"] = time.perf_counter() - t
  params, head_fit = setup.params, None
  if config.head_init == "probe":  # phase 1: the head to convergence on the GAP features
    params = {**params, models.HEAD: {"kernel": fit.kernel, "bias": fit.bias}}
    head_fit = doc
    timings["head_fit_s"] = doc["seconds"]
    log_fn(f"phase 1: head fitted on cached {b} features (L-BFGS, L2={fit.l2:g} chosen on valid): "
           f"val acc {fit.val_accuracy:.4f}, val loss {fit.val_loss:.4f}, {doc['seconds']:.1f}s")
  else:
    log_fn(f"the bar: closed-form probe on cached {b} features (L-BFGS logistic regression, "
           f"L2={fit.l2:g} chosen on valid): val acc {fit.val_accuracy:.4f}, val loss "
           f"{fit.val_loss:.4f}, {doc['seconds']:.1f}s")
  if "few_shot" in doc:
    log_fn(f"few-shot on the same features (ridge, closed form): "
           f"{probe.format_few_shot(doc['few_shot'])}")
  return dataclasses.replace(setup, params=params, head_fit=head_fit, probe=doc, timings=timings)


def resplit(base: Setup, config, splits: dict[str, data.Split],
            log_fn: Callable = functools.partial(print, flush=True)) -> Setup:
  """`base`'s stored inputs (cached features or decoded images) re-cut to `splits`, other splits
  of the same files (a k-fold's folds): nothing is decoded and the trunk does not run again. The
  probe (and phase 1) is fitted on the new train/valid; `config` may differ from base's in its
  seed and data.cv_* fields only, and a new seed re-draws the layers that start random."""
  where = {p: (name, i) for name, sp in base.splits.items() for i, p in enumerate(sp.paths)}
  feeders, fed, probe_x = {}, {}, {}
  for name, sp in splits.items():
    sp = sp.subset([j for j, p in enumerate(sp.paths) if p in where])  # base skipped the rest
    rows = [where[p] for p in sp.paths]
    fed[name] = sp
    x = _gather({n: f.inputs for n, f in base.feeders.items()}, rows)
    transform = (input_pipeline.augmentation(config.data.augment)
                 if name == "train" and not base.cached else None)
    n_views = max(len(f.views) for f in base.feeders.values()) if name == "train" else 0
    views = [_gather({n: f.views[v] if f.views else f.inputs for n, f in base.feeders.items()},
                     rows) for v in range(n_views)]  # rows from valid have no views: plain
    feeders[name] = input_pipeline.Feeder(x, sp.labels, transform, views=views)
    if base.probe_features is not None:
      probe_x[name] = _gather(base.probe_features, rows)
  params = base.params
  if config.seed != base.config.seed:
    fresh = _jit_init(base.model)(jax.random.key(config.seed), jnp.zeros(
        (1, config.data.image_size, config.data.image_size, 3), jnp.float32))["params"]
    params = {**params, **{layer: jax.tree.map(np.asarray, fresh[layer])
                           for layer in base.weights_meta["merge"]["random"]}}
  setup = dataclasses.replace(base, config=config, params=params, feeders=feeders, splits=fed,
                              probe_features=probe_x or None, head_fit=None, probe=None,
                              timings={})
  return fit_probe(setup, log_fn)


def _gather(arrays: dict[str, np.ndarray], rows: list[tuple[str, int]]) -> np.ndarray:
  """The rows (split, index) of per-split arrays, in order: one fancy index per run of a split."""
  if not rows:
    first = next(iter(arrays.values()))
    return first[:0]
  parts = [arrays[name][[i for _, i in group]]
           for name, group in itertools.groupby(rows, key=lambda r: r[0])]
  return parts[0] if len(parts) == 1 else np.concatenate(parts)


def probe_boundary(model, loaded) -> str | None:
  """The GAP layer before a Dense head (with only parameter-free layers between), on a pretrained
  trunk: the cached features phase 1 fits on; else None."""
  layers = model.layers
  if loaded is None or "avg_pool" not in layers or layers[-1] != models.HEAD:
    return None
  between = layers[layers.index("avg_pool") + 1:-1]
  return "avg_pool" if all(n == models.FEATURE_NORM for n in between) else None


def head_input(model, x, boundary: str):
  """What the head sees, from the cached `boundary` features: the parameter-free layers between
  them (e.g. `feature_norm`) run here, so phase 1 fits exactly the model's head."""
  stop = model.layers[-2]
  if stop == boundary:
    return x
  return np.asarray(jax.jit(functools.partial(model.apply, start_after=boundary, stop_at=stop))(
      {"params": {}}, x))


def summary(setup: Setup) -> str:
  """Keras-style parameter counts and where the frozen boundary sits."""
  counts = freezing.count(setup.params, setup.freeze)
  total = counts["trainable"] + counts["frozen"]
  merge = setup.weights_meta.get("merge", {})
  lines = [f"Model: {setup.config.model.name}, head={setup.config.model.head}, "
           f"{len(setup.class_names)} classes, trainable={setup.config.trainable!r}",
           f"Weights: {setup.weights_meta.get('file') or setup.weights_meta.get('source')}"
           + (f" ({len(merge['loaded'])} layers loaded; new: {', '.join(merge['random'])})"
              if merge.get("loaded") else ""),
           f"Total params: {total:,}",
           f"Trainable params: {counts['trainable']:,} ({', '.join(setup.freeze.trainable)})",
           f"Non-trainable params: {counts['frozen']:,}"]
  if setup.freeze.boundary:
    how = "cached features, step starts there" if setup.cached else "gradients stop there"
    lines.append(f"Frozen boundary: {setup.freeze.boundary} ({how})")
  if setup.network.trained_in_tf:
    tf_layers = setup.network.trained_in_tf
    lines.append(f"Training step: {tf_layers[0]}..{tf_layers[-1]} in TensorFlow's oneDNN, bf16 "
                 f"(config.train_engine={setup.config.get('train_engine', 'auto')!r}; "
                 "evaluation in XLA float32)")
  if setup.probe:
    lines.append(f"The bar (closed-form probe on {setup.probe['features']}): val acc "
                 f"{setup.probe['val_accuracy']:.4f}, val loss {setup.probe['val_loss']:.4f}"
                 + (f"; few-shot {probe.format_few_shot(setup.probe['few_shot'])}"
                    if "few_shot" in setup.probe else ""))
  return "\n".join(lines)
