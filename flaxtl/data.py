"""Datasets: where a dataset's files and labels are, in each layout, and the mistakes in them
caught before any compute.

Layouts (config.data.layout):
  'split_folders'  root/{train,valid,test}/<class>/<image>  (Keras' flow_from_directory layout)
  'class_folders'  root/<class>/<image>, split by flaxtl (`flaxtl.splitting`: seeded, stratified,
                   by fractions, written to a manifest in the workdir that every later command
                   reuses).
  'csv'            a CSV file (data.csv) with columns path,label[,split], the paths relative to
                   its folder (Kaggle's form); without a split column flaxtl splits it as
                   class_folders; 'tfds' is a tensorflow-datasets builder's prepared data.
The splits a config describes come from `flaxtl.splitting.load_splits`; decoding and batching are
`flaxtl.input_pipeline`'s. A named dataset's root is `$FLAXTL_DATA_DIR/<name>` (default
~/.cache/flaxtl/datasets/<name>), or config.data.root.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from flaxtl.errors import FlaxtlError

log = logging.getLogger("flaxtl")

# TensorFlow decodes JPEG, PNG, BMP and GIF; the others go through Pillow (input_pipeline).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
SPLITS = ("train", "valid", "test")
LAYOUTS = ("split_folders", "class_folders", "csv", "tfds")
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}  # what a CSV's split column may say


class DataError(FlaxtlError, ValueError):
  """A dataset mistake found before any compute (named file, folder or class)."""


@dataclasses.dataclass
class Split:
  """Files and integer labels of one split; labels index `class_names`.

  `images` is set when the source delivers decoded images (tfds): `paths` then only name them.
  """
  paths: list[str]
  labels: np.ndarray
  class_names: list[str]
  images: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.paths)

  def subset(self, keep: Sequence[int]) -> "Split":
    keep = list(keep)
    return Split([self.paths[i] for i in keep], self.labels[keep], self.class_names,
                 None if self.images is None else self.images[keep])


def data_dir() -> Path:
  """Where named datasets live: $FLAXTL_DATA_DIR, else ~/.cache/flaxtl/datasets."""
  return Path(os.path.expanduser(os.environ.get("FLAXTL_DATA_DIR")
                                 or "~/.cache/flaxtl/datasets"))


def resolve_root(data_cfg) -> Path:
  """config.data.root, else data_dir()/<data.name>[/<data.subdir>]."""
  if data_cfg.root:
    root = Path(os.path.expanduser(data_cfg.root))
  elif data_cfg.name:
    root = data_dir() / data_cfg.name
    if not root.exists():  # a dataset flaxtl knows by name: fetched (verified) on first use
      from flaxtl import datasets
      datasets.ensure(data_cfg.name, data_dir())
    if data_cfg.get("subdir"):
      root = root / data_cfg.subdir
  else:
    raise DataError("no data given: set --config.data.root=DIR (your image folders) or "
                    "--config.data.name=NAME (a dataset under $FLAXTL_DATA_DIR)")
  if root.is_file():
    raise DataError(f"data root {root} is a file; it must be a folder of images")
  if not root.is_dir():
    where = "config.data.root" if data_cfg.root else f"$FLAXTL_DATA_DIR ({data_dir()})"
    from flaxtl.datasets import DATASETS
    raise DataError(f"data root {root} not found (from {where}); set --config.data.root=DIR or "
                    f"FLAXTL_DATA_DIR (flaxtl fetches {', '.join(sorted(DATASETS))} by name)")
  return root.resolve()


def is_image_name(path: Path) -> bool:
  """Image extensions in any letter case, and extension-less files (some exports drop them)."""
  return not path.name.startswith(".") and (path.suffix.lower() in IMAGE_EXTENSIONS
                                            or path.suffix == "")


def image_files(folder: Path) -> list[str]:
  """Sorted image files under `folder`, sub-folders included; hidden files and folders skipped."""
  return sorted(str(p) for p in folder.rglob("*")
                if p.is_file() and is_image_name(p)
                and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def list_classes(root: Path, exclude: Sequence[str] = ()) -> dict[str, list[str]]:
  """{class name: sorted image paths} for the class folders under `root`; images in sub-folders
  of a class folder belong to that class (as `predict` reads folders: recursively)."""
  if not root.is_dir():
    raise DataError(f"{root}: not a directory")
  present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  for name in exclude:
    if name not in present:
      log.warning("data.exclude names %r, which is not a class folder in %s: ignored", name, root)
  classes, nested = {}, 0
  for name in present:
    if name in exclude:
      continue
    files = image_files(root / name)
    if not files:
      raise DataError(f"class folder {root / name} holds no images")
    nested += sum(Path(f).parent != root / name for f in files)
    classes[name] = files
  if not classes:
    raise DataError(f"{root}: no class folders found")
  if nested:
    log.info("%s: %d image(s) in sub-folders of class folders, read as their class's images",
             root, nested)
  return classes


def to_split(classes: dict[str, list[str]], class_names: list[str]) -> Split:
  """{class: files} -> one Split, labels indexing `class_names` (shared by every split)."""
  paths, labels = [], []
  for name, files in classes.items():
    paths += files
    labels += [class_names.index(name)] * len(files)
  return Split(paths, np.asarray(labels, np.int32), class_names)


def split_folders(root: Path) -> dict[str, Split]:
  """root/{train,valid,test}/<class>/*: class names must agree across splits."""
  found = {s: list_classes(root / s) for s in SPLITS if (root / s).is_dir()}
  if "train" not in found or "valid" not in found:
    raise DataError(f"{root}: expected split folders train/ and valid/ (and test/), found: "
                    f"{', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}")
  class_names = sorted(found["train"])
  for s, classes in found.items():
    if sorted(classes) != class_names:
      missing = sorted(set(class_names) - set(classes))
      extra = sorted(set(classes) - set(class_names))
      raise DataError(f"{root / s}: class folders differ from train/ (missing: {missing or '-'}, "
                      f"not in train: {extra or '-'})")
  return {s: to_split(classes, class_names) for s, classes in found.items()}


def csv_path(data_cfg) -> Path:
  """data.csv: absolute, or relative to the data root (data.root or the named dataset's folder)."""
  path = Path(os.path.expanduser(data_cfg.get("csv") or "labels.csv"))
  return path if path.is_absolute() else resolve_root(data_cfg) / path


def read_csv(path: Path, exclude: Sequence[str] = ()) -> tuple[dict[str, list[str]],
                                                              dict[str, str] | None]:
  """A labels CSV -> ({label: sorted absolute paths}, {path: split} or None without a split column).

  Every mistake names the file and line: a missing header column, an empty path or label, an
  unknown split, a file listed twice, files that are not there."""
  import csv
  if not path.is_file():
    raise DataError(f"labels CSV {path} not found (data.csv, relative to the data root)")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      lines = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: not a readable CSV file ({e})") from None
  header = [h.strip().lower() for h in lines[0]] if lines else []
  if "path" not in header or "label" not in header:
    raise DataError(f"{path}: line 1 must be a header naming the columns path,label[,split]; "
                    f"got {','.join(lines[0]) if lines else 'an empty file'}")
  col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
  folder = path.parent
  classes: dict[str, list[str]] = {}
  splits: dict[str, str] | None = {} if "split" in col else None
  seen, missing = {}, []
  for n, row in enumerate(lines[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue  # blank line
    if len(row) != len(header):
      raise DataError(f"{path}, line {n}: {len(row)} field(s), the header has {len(header)}")
    rel, label = row[col["path"]].strip(), row[col["label"]].strip()
    if not rel or not label:
      raise DataError(f"{path}, line {n}: empty {'path' if not rel else 'label'}")
    file = os.path.normpath(folder / rel)
    if file in seen:
      raise DataError(f"{path}, line {n}: {rel} is listed again (first on line {seen[file]}); "
                      "each image must appear once, with one label and one split")
    seen[file] = n
    if label in exclude:
      continue
    if splits is not None:
      split = SPLIT_NAMES.get(row[col["split"]].strip().lower())
      if split is None:
        raise DataError(f"{path}, line {n}: split {row[col['split']]!r}; use train, valid or test")
      splits[file] = split
    if not os.path.isfile(file):
      missing.append(f"line {n}: {rel}")
    classes.setdefault(label, []).append(file)
  if missing:
    raise DataError(f"{path}: {len(missing)} listed file(s) not found (paths are relative to "
                    f"{folder}): {'; '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
  if not classes:
    raise DataError(f"{path}: no rows (after data.exclude)")
  return {name: sorted(files) for name, files in sorted(classes.items())}, splits


def csv_splits(path: Path, classes: dict[str, list[str]], splits: dict[str, str]
               ) -> dict[str, Split]:
  """The CSV's own split column; every label must have train rows."""
  per_split = {s: {name: [f for f in files if splits[f] == s] for name, files in classes.items()}
               for s in SPLITS}
  no_train = [name for name, files in per_split["train"].items() if not files]
  if no_train:
    raise DataError(f"{path}: label(s) {', '.join(no_train)} have no train rows (only valid/test): "
                    "a model cannot learn a class it never sees in training")
  class_names = sorted(classes)
  out = {s: to_split({n: f for n, f in per_split[s].items() if f}, class_names) for s in SPLITS}
  if not len(out["valid"]):
    raise DataError(f"{path}: no valid rows; the split column must name train and valid rows")
  return {s: sp for s, sp in out.items() if len(sp) or s != "test"}


def split_by_flaxtl(data_cfg) -> bool:
  """True where flaxtl makes the split (and keeps it in the workdir's split.json)."""
  if data_cfg.layout == "csv":
    import csv
    path = csv_path(data_cfg)
    try:
      with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    except OSError:
      return False
    return "split" not in [h.strip().lower() for h in header]
  return data_cfg.layout == "class_folders"


def check_splits(splits: dict[str, Split], config) -> None:
  """Dataset mistakes that would waste a run, caught before any compute."""
  train = splits["train"]
  if len(train.class_names) < 2:
    where = (config.data.tfds_name if config.data.layout == "tfds" else
             csv_path(config.data) if config.data.layout == "csv" else resolve_root(config.data))
    raise DataError(f"{where}: {len(train.class_names)} class ({', '.join(train.class_names)}); "
                    "a classifier needs at least 2 classes (one folder per class)")
  if len(train) < config.batch_size:
    raise DataError(f"train split has {len(train)} usable images, fewer than "
                    f"batch_size={config.batch_size}")
  n_classes = len(train.class_names)
  for name, split in splits.items():
    counts = np.bincount(split.labels, minlength=n_classes)
    empty = [train.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty and len(split):
      raise DataError(f"split {name!r} has no usable images of class(es) {', '.join(empty)}")
  skew = class_skew(train)
  if skew:
    log.warning("%s", skew)
  if "test" in splits and train.images is None:
    train_hashes = {_content_hash(p): p for p in train.paths}
    leaks = [(p, train_hashes[h]) for p in splits["test"].paths
             if (h := _content_hash(p)) in train_hashes]
    if leaks:
      shown = "\n  ".join(f"{a} == {b}" for a, b in leaks[:10])
      raise DataError(f"{len(leaks)} test image(s) are byte-identical to training images "
                      f"(test would leak into training):\n  {shown}")


def class_skew(train: Split, ratio: float = 5.0) -> str | None:
  """A warning when the train split's largest class has more than `ratio` times the images of its
  smallest, naming the smallest classes: accuracy then mostly measures the big ones."""
  counts = np.bincount(train.labels, minlength=len(train.class_names))
  if counts.min() == 0 or counts.max() <= ratio * counts.min():
    return None
  order = np.argsort(counts, kind="stable")
  small = [f"{train.class_names[i]} ({counts[i]})" for i in order[:5]
           if counts[i] * ratio < counts.max()]
  big = train.class_names[int(order[-1])]
  return (f"imbalanced classes: train has {counts.max()} images of {big!r} but only "
          f"{counts.min()} of the smallest ({counts.max() / counts.min():.0f}x): "
          f"{', '.join(small)}. Accuracy will mostly reflect the large classes; "
          "look at per-class recall (flaxtl.evaluate's confusion matrix), and if valid and test "
          "are less skewed, try --config.class_weight=balanced (benchmarks/RESULTS.md: +5.6 "
          "points on a skewed Caltech-97) and select_best_by=macro_f1")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """config.class_weight='balanced': n / (k * count_c) per class (sklearn's 'balanced'), from the
  train split's counts. The weights average 1 over train's examples, so a weighted mean loss keeps
  the unweighted one's scale (and the probe's L2 grid its meaning)."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
  return (len(labels) / (num_classes * np.maximum(counts, 1.0))).astype(np.float32)


def _content_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def tfds_splits(data_cfg) -> dict[str, Split]:
  """A tensorflow-datasets builder's prepared data (never downloaded here), decoded and resized.

  data.tfds_name names a registered builder (its data under data.tfds_data_dir), or is
  'image_folder' for tfds.folder_dataset.ImageFolder over data.root (root/<split>/<class>/*).
  data.tfds_splits maps our train/valid/test to the builder's split names or slices.
  """
  import tensorflow_datasets as tfds
  from flaxtl.input_pipeline import _tf, resize
  tf = _tf()
  name = data_cfg.tfds_name
  if name == "image_folder":
    builder = tfds.folder_dataset.ImageFolder(str(resolve_root(data_cfg)))
  else:
    builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
    if not builder.is_prepared():
      raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}: build it where "
                      f"a network is available (`tfds build {name}`) and copy it there, or set "
                      "--config.data.tfds_data_dir")
  class_names = list(builder.info.features["label"].names)
  size = data_cfg.image_size

  def prepare(image, label):
    image = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                    lambda: image[..., :3])  # grayscale -> RGB, RGBA -> RGB
    return resize(image, size), label

  out = {}
  for ours, theirs in data_cfg.tfds_splits.items():
    ds = builder.as_dataset(split=theirs, as_supervised=True, shuffle_files=False)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    parts = list(ds.as_numpy_iterator())
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size, 3), np.uint8)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32) if parts else np.zeros(0, np.int32)
    out[ours] = Split([f"tfds:{name}/{theirs}/{i}" for i in range(len(labels))], labels,
                      class_names, images)
  if "train" not in out or "valid" not in out:
    raise DataError(f"data.tfds_splits must map 'train' and 'valid', got {dict(data_cfg.tfds_splits)}")
  return out


# ---------------------------------------------------------------------------------------------
# python -m flaxtl.data fetch NAME [--archive FILE] | list

def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("archive", None, "With `fetch NAME`: the archive, downloaded by hand "
                      "elsewhere; it is verified and laid out as a download would be.")


def main(argv):
  """`fetch NAME`: the named dataset into $FLAXTL_DATA_DIR/NAME (nothing done if it is there);
  `list`: the datasets flaxtl fetches, their pinned URLs and whether they are in place."""
  from absl import flags
  from flaxtl import datasets, runtime
  runtime.setup_logging()
  args = argv[1:]
  if args == ["list"]:
    for name, ds in sorted(datasets.DATASETS.items()):
      where = data_dir() / name
      print(f"{name:22s} {'present' if where.is_dir() else 'not fetched'}  {where}\n"
            f"{'':22s} {datasets.url(ds)}")
    return
  if len(args) != 2 or args[0] != "fetch":
    raise FlaxtlError("usage: python -m flaxtl.data fetch NAME [--archive FILE] | list "
                      f"(names: {', '.join(sorted(datasets.DATASETS))})")
  dest = data_dir() / args[1]
  existed = dest.is_dir()
  path = datasets.fetch(args[1], data_dir(), archive=flags.FLAGS.archive)
  print(f"{args[1]}: {'already in place, used as it is' if existed else 'ready'}: {path}")


if __name__ == "__main__":
  from flaxtl import cli
  cli.main("data")
