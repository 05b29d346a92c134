"""What each split feeds the step: the frozen trunk's output at the boundary, from the feature
cache (computed once by the fastest engine, or from a cached shallower boundary), or the decoded
images when something random (augmentation without cached views) precedes the boundary; plus the
GAP features the probe fits on. A split whose features are all cached is never decoded.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flaxtl import data, feature_engine, features, input_pipeline

log = logging.getLogger("flaxtl")


@dataclasses.dataclass
class Inputs:
  feeders: dict[str, input_pipeline.Feeder]   # per split: stored inputs (images or features)
  features: dict[str, dict[str, np.ndarray]]  # per split: {boundary: features} computed or read
  engine: feature_engine.Choice | None        # what computed (or would compute) them
  requested: str                              # config.feature_engine
  skipped: dict[str, str]                     # bad files left out: {path: reason}
  decoded_at: float                           # perf_counter() when the images were decoded
  features_s: float | None                    # seconds the features took (None: none wanted)


def build(config, splits: dict[str, data.Split], model, variables: dict, mode: str, meta: dict,
          boundary: str | None, *, use_cache: bool, n_views: int, extra: tuple[str, ...] = (),
          log_fn: Callable = print) -> Inputs:
  """The feeders of every split; `extra` boundaries (the probe's, a sweep's) are computed in the
  same pass. `use_cache`: the step starts at `boundary` from cached features (+ `n_views`
  augmented views of train); else it gets images."""
  cache_dir = Path(config.cache_dir) if config.cache_dir else features.default_cache_dir()
  wanted = [b for b in dict.fromkeys([boundary, *extra]) if use_cache or b != boundary]
  describe = lambda split, prec: {b: features.describe(  # noqa: E731
      config, meta, mode, split, b, prec) for b in wanted}
  describe_views = lambda split, prec: [features.view_description(  # noqa: E731
      features.describe(config, meta, mode, split, boundary, prec),
      config.data.augment.to_dict(), v) for v in range(1, n_views + 1)] if use_cache else []
  views_cached = lambda prec: all(  # noqa: E731
      (cache_dir / f"{features.cache_key(**d)}.json").exists()
      for d in describe_views(splits["train"], prec))
  # The cache keys on the features' precision, so the engine is chosen before the lookup. 'auto'
  # takes what is cached at any precision it could compute (float32 first); else it chooses.
  requested, engine = config.get("feature_engine", "auto"), None
  precisions = [feature_engine.precision(requested, config.model.dtype)]
  if requested == "auto" and wanted:
    precisions = sorted({feature_engine.precision(e, config.model.dtype)
                         for e in feature_engine.candidates(model)}, key=lambda p: p != "float32")
  def cached(split, name, prec):  # what is cached, or computable from a shallower cached boundary
    d = describe(split, prec)
    return features.derive(model, variables, cache_dir, d, features.lookup(cache_dir, d), name,
                           log_fn)

  todo = []  # per precision tried: the images a pass would compute
  for prec in precisions:
    # A split whose features are all cached is never decoded: its files' bytes are part of the
    # key, so a hit means the same images (and, with no skipped files, no bad ones).
    found = {name: cached(split, name, prec) if wanted else {} for name, split in splits.items()}
    hits = {name: f for name, f in found.items() if wanted and len(f) == len(wanted)}
    todo.append(sum(len(sp) for n, sp in splits.items() if n not in hits)
                + (0 if views_cached(prec) else n_views * len(splits["train"])))
    if wanted and not todo[-1]:
      engine = feature_engine.Choice(None, prec, f"all features cached ({prec})")
      break
  if engine is None and wanted:
    engine = feature_engine.choose(
        requested, model, variables, mode, config.data.image_size,
        max(wanted, key=model.layers.index), config.model.dtype, min(todo), cache_dir, log_fn)
    if engine.precision != prec:
      found = {name: cached(split, name, engine.precision) for name, split in splits.items()}
      hits = {name: f for name, f in found.items() if len(f) == len(wanted)}
  prec = engine.precision if engine else config.model.dtype
  if engine and engine.engine:
    log_fn(f"feature pass engine: {engine.engine} ({engine.precision}; {engine.how})")
  for name, f in hits.items():
    for b in wanted:
      log_fn(f"features {name}: {f[b].shape} at {b} (from cache)")

  skip = dict(hits) if use_cache else {}
  if not views_cached(prec):
    skip.pop("train", None)  # a view to compute: train's images are needed
  n_listed = {name: len(split) for name, split in splits.items()}
  images, skipped = decode(config, splits, skip=skip, log_fn=log_fn)
  decoded_at = time.perf_counter()

  feeders, feats = {}, {}
  t1 = time.perf_counter()
  for name, split in splits.items():
    if wanted:  # the frozen trunk's outputs: the step's input, and/or the probe's features
      feats[name] = hits.get(name) or features.for_split(
          model, variables, mode, images[name], describe(split, prec), cache_dir, name, log_fn,
          found=found[name] if len(split) == n_listed[name] else None,  # lost bad files: new keys
          engine=engine.engine or "xla")
    if use_cache:
      views = features.for_views(
          model, variables, mode, images.get(name),
          input_pipeline.augmentation(config.data.augment), boundary,
          describe_views(split, prec), cache_dir, name, log_fn,
          engine=engine.engine or "xla") if name == "train" else []
      feeders[name] = input_pipeline.Feeder(feats[name][boundary], split.labels,
                                            views=views)
    else:
      transform = input_pipeline.augmentation(config.data.augment) if name == "train" else None
      feeders[name] = input_pipeline.Feeder(images[name], split.labels, transform)
  return Inputs(feeders, feats, engine, requested, skipped, decoded_at,
                time.perf_counter() - t1 if wanted else None)


def decode(config, splits: dict, skip: dict, log_fn: Callable) -> tuple[dict, dict]:
  """Decodes every split not in `skip`; bad files are listed once, then skipped or an error.
  `splits` loses the skipped files in place."""
  images, skipped = {}, {}
  todo = [n for n in splits if n not in skip]
  if todo:
    log_fn(f"decoding {sum(len(splits[n]) for n in todo)} images at "
           f"{config.data.image_size} px ...")
  for name in todo:
    split = splits[name]
    if split.images is not None:  # decoded by the source (tfds)
      pixels, bad = split.images, {}
    else:
      pixels, bad = input_pipeline.decode_images(split.paths, config.data.image_size,
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
  return images, skipped
