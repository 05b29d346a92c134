"""train/valid/test from a dataset's files: flaxtl's seeded stratified split and its manifest
(split.json, which evaluate, predict and resume reuse), k-fold folds, and the per-class cap.

`load_splits` is the one entry point: the layouts that carry their own split (split folders, a
CSV's split column, tfds) come from `flaxtl.data` as they are; class folders and CSVs without a
split column are split here, once per workdir.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from flaxtl.data import (LAYOUTS, SPLITS, DataError, Split, csv_path, csv_splits, list_classes,
                         read_csv, resolve_root, split_folders, tfds_splits, to_split)

log = logging.getLogger("flaxtl")


def load_splits(data_cfg, seed: int, workdir: Path | None = None) -> dict[str, Split]:
  """The train/valid/test splits the config describes (and the manifest, where flaxtl splits).

  Other layouts: data.max_per_class caps each split. Then, with data.cv_folds, train/valid
  become the fold data.cv_fold (`fold_splits`).
  """
  cap = data_cfg.get("max_per_class", 0)
  classes, splits = None, None
  if data_cfg.layout == "csv":
    path = csv_path(data_cfg)
    root = path.parent
    classes, csv_split = read_csv(path, data_cfg.exclude)
    if csv_split is not None:  # the CSV's split column, as split_folders' folders
      splits = csv_splits(path, classes, csv_split)
  elif data_cfg.layout == "split_folders":
    splits = split_folders(resolve_root(data_cfg))
  elif data_cfg.layout == "class_folders":
    root = resolve_root(data_cfg)
    classes = list_classes(root, data_cfg.exclude)
  elif data_cfg.layout == "tfds":
    splits = tfds_splits(data_cfg)
  else:
    raise DataError(f"unknown data.layout {data_cfg.layout!r}: one of {', '.join(LAYOUTS)}")
  if splits is None:  # class_folders, or a CSV without a split column: flaxtl splits
    if cap:  # before the split
      classes = {name: files[:cap] for name, files in classes.items()}
    splits = _split_once(classes, data_cfg, seed, root, workdir)
  elif cap:
    splits = {s: sp.subset(_first_per_class(sp.labels, cap)) for s, sp in splits.items()}
  if data_cfg.get("cv_folds", 0):
    splits = fold_splits(splits, data_cfg.cv_folds, data_cfg.cv_fold,
                         data_cfg.split_seed if data_cfg.split_seed >= 0 else seed,
                         data_cfg.get("cv_include_test", False))
  return splits


def _split_once(classes: dict[str, list[str]], data_cfg, seed: int, root: Path,
                workdir: Path | None) -> dict[str, Split]:
  """The workdir's split.json when it still matches `classes`; else a new seeded split, written
  there. A manifest that no longer matches is re-split when the workdir holds no checkpoints
  (nothing was trained on it), else refused."""
  manifest = Path(workdir) / "split.json" if workdir else None
  if manifest is not None and manifest.exists():
    splits = read_manifest(manifest, root)
    doc = json.loads(manifest.read_text())
    unreadable = [str(root / p) for p, _ in doc.get("unreadable", [])]
    problems = stale_split(splits, classes, root, unreadable)
    if not problems:
      return splits
    from flaxtl.workdir import has_checkpoints
    if has_checkpoints(Path(workdir)):
      raise DataError(f"{manifest}: this run's split no longer matches {root}: "
                      f"{'; '.join(problems)}. The checkpoints in {workdir} were trained on "
                      "the old split; restore the files, or start a new --workdir")
    log.info("%s: the split no longer matches %s (%s) and nothing was trained on it: "
             "splitting again", manifest, root, "; ".join(problems))
  splits, unreadable = split_class_folders(
      classes, data_cfg, data_cfg.split_seed if data_cfg.split_seed >= 0 else seed)
  if manifest is not None:
    write_manifest(splits, manifest, root, unreadable)
  return splits


def split_class_folders(classes: dict[str, list[str]], data_cfg, seed: int,
                        ) -> tuple[dict[str, Split], dict[str, int]]:
  """The stratified split of the readable files only: a header scan runs first, so a bad file
  never takes a valid or test slot. The bad files are added to train (after the cut), where the
  decode reports them once and skips them (or stops, with on_bad_image='error');
  -> (splits, {bad path: label})."""
  from flaxtl.input_pipeline import scan_headers
  bad = scan_headers([f for files in classes.values() for f in files], data_cfg.max_pixels)
  good = {name: [f for f in files if f not in bad] for name, files in classes.items()}
  splits = stratified_split(good, data_cfg.split_fractions, seed)
  names, labels = splits["train"].class_names, {}
  train = {name: [] for name in names}
  for p, l in zip(splits["train"].paths, splits["train"].labels):
    train[names[l]].append(p)
  for name, files in classes.items():
    for f in files:
      if f in bad:
        train[name].append(f)
        labels[f] = names.index(name)
  splits["train"] = to_split({name: sorted(files) for name, files in train.items()}, names)
  return splits, labels


def stratified_split(classes: dict[str, list[str]], fractions: Sequence[float],
                     seed: int) -> dict[str, Split]:
  """Seeded per-class shuffle, then cut by fractions (train, valid, test): same seed, same split."""
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
    raise DataError(f"data.split_fractions must be 3 non-negative numbers summing to 1, "
                    f"got {tuple(fractions)}")
  class_names = sorted(classes)
  per_split = {s: {} for s in SPLITS}
  for name in class_names:
    files = list(classes[name])
    rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
    rng.shuffle(files)
    n_valid = int(round(fractions[1] * len(files)))
    n_test = int(round(fractions[2] * len(files)))
    n_train = len(files) - n_valid - n_test
    per_split["train"][name] = sorted(files[:n_train])
    per_split["valid"][name] = sorted(files[n_train:n_train + n_valid])
    per_split["test"][name] = sorted(files[n_train + n_valid:])
  return {s: to_split(per_split[s], class_names) for s in SPLITS}


def stale_split(splits: dict[str, Split], classes: dict[str, list[str]], root: Path,
                unreadable: Sequence[str] = ()) -> list[str]:
  """How a manifest's split differs from the class folders now ([] when it does not): files listed
  but gone (or no longer selected), files found but not listed, classes added or removed. An
  unreadable file (never in a split) may go."""
  listed = {p for sp in splits.values() for p in sp.paths}
  found = {f for files in classes.values() for f in files}
  old, new = list(splits["train"].class_names), sorted(classes)
  problems = [f"classes changed ({', '.join(old)} -> {', '.join(new)})"] if old != new else []
  gone = sorted(listed - found)
  missing = [p for p in gone if not os.path.exists(p)]
  other = [p for p in gone if os.path.exists(p)]
  added = sorted(found - listed - set(unreadable))
  for files, what in ((missing, "listed but missing"), (added, "new, not in the split"),
                      (other, "listed but no longer selected (data.exclude/max_per_class)")):
    if files:
      shown = ", ".join(os.path.relpath(p, root) for p in files[:10])
      problems.append(f"{len(files)} file(s) {what}: {shown}{' ...' if len(files) > 10 else ''}")
  return problems


def write_manifest(splits: dict[str, Split], path: Path, root: Path,
                   unreadable: dict[str, int] | None = None) -> None:
  """The split as relative file lists, written atomically: evaluate/predict/resume reuse it.
  `unreadable` ({path: label}) are the files a header scan ruled out before splitting."""
  doc = {"root": str(root), "class_names": splits["train"].class_names,
         "splits": {s: [[os.path.relpath(p, root), int(l)] for p, l in zip(sp.paths, sp.labels)
                        if p not in (unreadable or {})]
                    for s, sp in splits.items()},
         "unreadable": [[os.path.relpath(p, root), int(l)] for p, l in (unreadable or {}).items()]}
  from flaxtl.workdir import atomic_write  # a unique temp file: every host of a run writes it
  atomic_write(path, json.dumps(doc))


def read_manifest(path: Path, root: Path | None = None) -> dict[str, Split]:
  """The manifest's splits; its unreadable files that still exist ride in train, so that the
  decode reports (and skips) them again, as the run that wrote it did."""
  doc = json.loads(path.read_text())
  root = Path(root or doc["root"])
  names = doc["class_names"]
  rows = {s: list(r) for s, r in doc["splits"].items()}
  back = [r for r in doc.get("unreadable", []) if (root / r[0]).exists()]
  if back:  # in the order the split had them: by class, then path
    rows["train"] = sorted(rows.get("train", []) + back, key=lambda r: (r[1], r[0]))
  return {s: Split([str(root / p) for p, _ in r], np.asarray([l for _, l in r], np.int32),
                   names) for s, r in rows.items()}


def fold_splits(splits: dict[str, Split], k: int, fold: int, seed: int,
                include_test: bool = False) -> dict[str, Split]:
  """Train/valid = fold `fold` of a stratified k-fold over train+valid (+test with include_test);
  a test split left out of the folds is returned as it is."""
  if k < 2 or not 0 <= fold < k:
    raise DataError(f"k-fold: fold {fold} of {k} folds (data.cv_folds={k}, data.cv_fold={fold}): "
                    "need at least 2 folds and 0 <= fold < folds")
  names = ["train", "valid"] + (["test"] if include_test and "test" in splits else [])
  union = concat([splits[n] for n in names])
  counts = np.bincount(union.labels, minlength=len(union.class_names))
  few = [f"{union.class_names[c]} ({counts[c]})" for c in np.flatnonzero(counts < k)]
  if few:
    raise DataError(f"{k} folds need at least {k} images of every class in {'+'.join(names)} "
                    f"(each fold's valid holds some of each); too few: {', '.join(few[:10])}"
                    f"{' ...' if len(few) > 10 else ''}. Use fewer folds")
  folds = stratified_folds(union.labels, k, seed)
  out = {"train": union.subset(np.flatnonzero(folds != fold)),
         "valid": union.subset(np.flatnonzero(folds == fold))}
  if "test" in splits and "test" not in names:
    out["test"] = splits["test"]
  return out


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """The fold (0..k-1) of each example: each class's examples in a seeded order, dealt to the
  folds in turn (each class's deal starts where the last one stopped), so a fold holds n/k of every
  class, rounded, and folds differ in size by at most one. Same labels, k and seed: same folds."""
  labels = np.asarray(labels)
  folds = np.empty(len(labels), np.int64)
  start = 0
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
    folds[idx] = (start + np.arange(len(idx))) % k
    start += len(idx)
  return folds


def concat(parts: Sequence[Split]) -> Split:
  """One split holding the files of `parts`, in order (class names must agree)."""
  images = [p.images for p in parts]
  return Split([f for p in parts for f in p.paths], np.concatenate([p.labels for p in parts]),
               parts[0].class_names,
               None if any(i is None for i in images) else np.concatenate(images))


def _first_per_class(labels: np.ndarray, k: int) -> list[int]:
  """Indices of the first k examples of each class (small slices for tests and quick runs)."""
  keep, seen = [], {}
  for i, l in enumerate(labels):
    if seen.get(int(l), 0) < k:
      keep.append(i)
      seen[int(l)] = seen.get(int(l), 0) + 1
  return keep
