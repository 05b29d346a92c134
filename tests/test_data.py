"""Data: folder layouts, seeded stratified splits, image formats, and the frozen-feature cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import CALTECH, write_labels_csv
from flaxtl.configs import caltech101, default
from flaxtl import data, features, input_pipeline, splitting


def _write(path, mode="RGB", size=(40, 30), fmt="JPEG", color=(200, 30, 30)):
  path.parent.mkdir(parents=True, exist_ok=True)
  c = color if mode in ("RGB", "RGBA") else color[0]
  if mode == "RGBA":
    c = (*color, 128)
  Image.new(mode, size, c).save(path, format=fmt)
  return path


def _class_root(tmp_path, n_classes=4, per_class=20):
  for k in range(n_classes):
    for i in range(per_class + k):  # unequal class sizes
      _write(tmp_path / f"class{k}" / f"img{i}.jpg", color=(k * 50, i, 0))
  return tmp_path


def test_stratified_split_is_deterministic_disjoint_and_stratified(tmp_path):
  classes = data.list_classes(_class_root(tmp_path))
  a = splitting.stratified_split(classes, (0.7, 0.15, 0.15), seed=3)
  b = splitting.stratified_split(classes, (0.7, 0.15, 0.15), seed=3)
  c = splitting.stratified_split(classes, (0.7, 0.15, 0.15), seed=4)
  assert all(a[s].paths == b[s].paths for s in data.SPLITS)
  assert a["train"].paths != c["train"].paths
  sets = [set(a[s].paths) for s in data.SPLITS]
  assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
  assert sum(map(len, sets)) == sum(map(len, classes.values()))
  for k, name in enumerate(sorted(classes)):
    n = len(classes[name])
    assert (a["valid"].labels == k).sum() == round(0.15 * n)
    assert (a["test"].labels == k).sum() == round(0.15 * n)


@pytest.mark.parametrize("layout", ["class_folders", "csv"])
def test_manifest_is_written_and_reused(tmp_path, layout):
  cfg = default.get_config()
  cfg.data.root, cfg.data.layout, cfg.data.exclude = str(_class_root(tmp_path / "d")), layout, ("class1",)
  if layout == "csv":  # the same images, listed in a CSV with no split column: flaxtl splits
    write_labels_csv(tmp_path / "d")
  work = tmp_path / "w"
  work.mkdir()
  first = splitting.load_splits(cfg.data, seed=0, workdir=work)
  doc = json.loads((work / "split.json").read_text())
  assert doc["class_names"] == ["class0", "class2", "class3"]
  cfg.data.split_seed = 99  # a changed seed must not re-split an existing run
  again = splitting.load_splits(cfg.data, seed=0, workdir=work)
  assert again["test"].paths == first["test"].paths
  assert not any("class1" in p for s in first.values() for p in s.paths)


@pytest.mark.skipif(not CALTECH.is_dir(), reason="real Caltech-101 not found")
def test_caltech_config_gives_97_classes_and_6209_images(caplog):
  cfg = caltech101.get_config()
  splits = splitting.load_splits(cfg.data, seed=cfg.seed)
  names = splits["train"].class_names
  assert len(names) == 97 and not set(caltech101.EXCLUDE) & set(names)
  assert sum(len(s) for s in splits.values()) == 6209
  assert "BACKGROUND_Google" in caplog.text  # excluded but absent: a warning, not a failure


def test_split_folders_class_mismatch_is_named(tmp_path):
  for split in ("train", "valid"):
    for k in ("a", "b"):
      _write(tmp_path / split / k / "x.jpg")
  _write(tmp_path / "valid" / "c" / "x.jpg")
  with pytest.raises(data.DataError, match=r"not in train: \['c'\]"):
    data.split_folders(tmp_path)


def test_formats_modes_and_extensionless_files_decode_to_rgb(tmp_path):
  files = [
      _write(tmp_path / "gray.JPG", mode="L"),
      _write(tmp_path / "rgba.png", mode="RGBA", fmt="PNG"),
      _write(tmp_path / "pal.GIF", mode="P", fmt="GIF"),
      _write(tmp_path / "bmp.Bmp", fmt="BMP"),
      _write(tmp_path / "noext", mode="L", fmt="JPEG"),
      _write(tmp_path / "big.jpeg", size=(300, 200)),
  ]
  assert all(data.is_image_name(f) for f in files)
  images, bad = input_pipeline.decode_images([str(f) for f in files], 24)
  assert not bad and images.shape == (6, 24, 24, 3) and images.dtype == np.uint8
  gray = images[0].astype(int)
  assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1  # grayscale replicated to RGB
  assert abs(int(images[5, 12, 12, 0]) - 200) <= 2  # colour survives the resize


def test_feature_cache_hit_miss_and_truncation_recovery(tmp_path):
  key_parts = dict(weights_sha256="w", image_size=112, preprocessing="torch",
                   boundary="block4_pool", dtype="float32", files="f")
  key = features.cache_key(**key_parts)
  for field, other in [("weights_sha256", "w2"), ("image_size", 224), ("preprocessing", "caffe"),
                       ("boundary", "block3_pool"), ("dtype", "bfloat16"), ("files", "g")]:
    assert features.cache_key(**{**key_parts, field: other}) != key, field
  array = np.random.default_rng(0).normal(size=(5, 7, 7, 8)).astype(np.float32)
  assert features.load(tmp_path, key) is None
  features.store(tmp_path, key, array, key_parts)
  np.testing.assert_array_equal(features.load(tmp_path, key), array)
  assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
  npy = tmp_path / f"{key}.npy"
  npy.write_bytes(npy.read_bytes()[:-100])  # truncated
  assert features.load(tmp_path, key) is None and not npy.exists()
  features.store(tmp_path, key, array, key_parts)
  raw = bytearray(npy.read_bytes())
  raw[-1] ^= 0xFF  # one flipped bit in the data: the digest catches it
  npy.write_bytes(bytes(raw))
  assert features.load(tmp_path, key) is None


def _rss_anon_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's RssAnon")
def test_cached_features_are_mapped_from_disk_not_copied_into_memory(tmp_path):
  """4 cached views of Caltech's train maps are 8.7 GB: loaded into RAM they peaked a run at 15 GB.
  Mapped, rows are paged in as batches gather them and stay reclaimable file pages."""
  array = np.random.default_rng(0).normal(size=(512, 64, 1024)).astype(np.float32)  # 128 MB
  features.store(tmp_path, "k", array, {"note": "test"})
  del array
  before = _rss_anon_mb()
  loaded = features.load(tmp_path, "k")
  feeder = input_pipeline.Feeder(loaded, np.zeros(512, np.int32), views=[loaded, loaded])
  rows = feeder.rows(np.arange(0, 512, 16), feeder.version(seed=0, epoch=0))
  grown = _rss_anon_mb() - before
  assert grown < 32, f"loading a 128 MB entry grew anonymous memory by {grown:.0f} MB"
  np.testing.assert_array_equal(rows[0], np.asarray(loaded[0]))
  assert not loaded.flags.writeable  # a stored entry cannot be changed through it


def test_files_fingerprint_follows_the_bytes_and_labels_not_the_copy(tmp_path):
  import shutil
  files = [_write(tmp_path / "data" / f"{c}.jpg", color=(c, 30, 30)) for c in (10, 200)]
  fp = lambda paths, labels=(0, 1): features.files_fingerprint(  # noqa: E731
      [str(p) for p in paths], np.array(labels))
  before = fp(files)
  assert fp(files, (1, 0)) != before and fp(files[::-1]) != before  # labels and order count
  # A copy elsewhere, written later (a re-extracted or moved dataset): the same features.
  shutil.copytree(tmp_path / "data", tmp_path / "copy")
  os.utime(tmp_path / "copy" / "10.jpg", ns=(0, 10**18))
  assert fp([tmp_path / "copy" / p.name for p in files]) == before
  _write(files[0], color=(10, 200, 30))  # new bytes (and, as ever, a later mtime): new features
  os.utime(files[0], ns=(0, os.stat(files[0]).st_mtime_ns + 1))
  assert fp(files) != before


def test_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch():
  labels = np.arange(23, dtype=np.int32)
  feeder = input_pipeline.Feeder(labels[:, None].astype(np.float32), labels)
  one = [b for b in feeder.epoch(8, seed=1, epoch=2, shuffle=True)]
  seen = np.concatenate([b["label"][b["mask"] > 0] for b in one])
  assert sorted(seen) == list(range(23)) and sum(b["mask"].sum() for b in one) == 23
  again = [b["label"] for b in feeder.epoch(8, seed=1, epoch=2, shuffle=True)]
  assert all(np.array_equal(a["label"], b) for a, b in zip(one, again))
  other = [b["label"] for b in feeder.epoch(8, seed=1, epoch=3, shuffle=True)]
  assert not all(np.array_equal(a["label"], b) for a, b in zip(one, other))
  resumed = [b["label"] for b in feeder.epoch(8, seed=1, epoch=2, shuffle=True, start_step=1)]
  assert all(np.array_equal(a["label"], b) for a, b in zip(one[1:], resumed))
  halves = [list(feeder.epoch(8, seed=1, epoch=2, shuffle=True, process_index=i,
                              process_count=2)) for i in (0, 1)]
  for step, full in enumerate(one):
    joined = np.concatenate([halves[0][step]["label"], halves[1][step]["label"]])
    assert np.array_equal(joined, full["label"])


def test_tfds_image_folder_layout_behind_the_same_interface(tmp_path):
  for split, n in (("train", 6), ("valid", 2), ("test", 2)):
    for k, cls in enumerate(("cat", "dog")):
      for i in range(n):
        _write(tmp_path / split / cls / f"{i}.jpg", mode="L" if i % 2 else "RGB",
               size=(30 + i, 20), color=(40 + 150 * k, 0, 0))
  cfg = default.get_config()
  cfg.data.root, cfg.data.layout, cfg.data.tfds_name = str(tmp_path), "tfds", "image_folder"
  cfg.data.image_size = 16
  cfg.data.tfds_splits = {"train": "train", "valid": "valid", "test": "test"}
  splits = splitting.load_splits(cfg.data, seed=0)
  assert splits["train"].class_names == ["cat", "dog"]
  assert splits["train"].images.shape == (12, 16, 16, 3) and len(splits["test"]) == 4
  red = splits["train"].images[:, 8, 8, 0].astype(int)
  assert set(np.unique(splits["train"].labels)) == {0, 1}
  assert np.all(np.abs(red - np.where(splits["train"].labels == 0, 40, 190)) <= 20)
  cfg.data.tfds_name = "mnist"
  cfg.data.tfds_data_dir = str(tmp_path / "nothing_here")
  with pytest.raises(data.DataError, match="not prepared"):
    splitting.load_splits(cfg.data, seed=0)


# --- labels from a CSV --------------------------------------------------------------------------

def _csv_root(tmp_path):
  """Images in one flat folder and a sub-folder (a CSV needs no class folders): 3 labels x 6."""
  for k, name in enumerate(("cat", "dog", "fox")):
    for i in range(6):
      _write(tmp_path / ("imgs" if i % 2 else "imgs/more") / f"{name}{i}.png", fmt="PNG",
             color=(60 * k, 10 * i, 90))
  return tmp_path


def _csv_config(root, text: str, name: str = "train.csv"):
  (root / name).write_text(text)
  cfg = default.get_config()
  cfg.data.root, cfg.data.layout, cfg.data.csv = str(root), "csv", name
  return cfg


def _rows(split_of=lambda i: "train" if i < 4 else ("val" if i == 4 else "test"), extra=True):
  lines = ["id,path,label,split,notes" if extra else "path,label,split"]
  for k, name in enumerate(("cat", "dog", "fox")):
    for i in range(6):
      path = f"{'imgs' if i % 2 else 'imgs/more'}/{name}{i}.png"
      lines.append(f"{k * 6 + i},{path},{name},{split_of(i)},x" if extra
                   else f"{path},{name},{split_of(i)}")
  return lines


def test_csv_with_a_split_column_gives_its_splits(tmp_path):
  root = _csv_root(tmp_path)
  cfg = _csv_config(root, "\n".join(_rows()) + "\n\n")  # extra columns and a blank line: fine
  splits = splitting.load_splits(cfg.data, seed=0, workdir=tmp_path / "w")
  assert splits["train"].class_names == ["cat", "dog", "fox"]
  assert [len(splits[s]) for s in data.SPLITS] == [12, 3, 3]
  assert splits["valid"].paths == [str(root / "imgs/more/cat4.png"), str(root / "imgs/more/dog4.png"),
                                   str(root / "imgs/more/fox4.png")]
  assert splits["valid"].labels.tolist() == [0, 1, 2]
  assert not (tmp_path / "w" / "split.json").exists()  # the CSV is the record
  assert not data.split_by_flaxtl(cfg.data)
  images, bad = input_pipeline.decode_images(splits["test"].paths, 16)
  assert not bad and images.shape == (3, 16, 16, 3)
  # A test image that is byte-identical to a training one: refused as a leak, naming both.
  import shutil
  shutil.copyfile(root / "imgs/more/dog0.png", root / "imgs/dog5.png")
  cfg.batch_size = 4
  with pytest.raises(data.DataError, match="byte-identical") as e:
    data.check_splits(splitting.load_splits(cfg.data, seed=0), cfg)
  assert "imgs/dog5.png == " in str(e.value) and "imgs/more/dog0.png" in str(e.value)


@pytest.mark.parametrize("edit,words", [
    (lambda rows: ["file,label,split"] + rows[1:], r"line 1 must be a header naming the columns "
     r"path,label\[,split\]; got file,label,split"),
    (lambda rows: rows[:3] + ["imgs/cat1.png,,train"] + rows[3:], r"line 4: empty label"),
    (lambda rows: rows[:3] + ["imgs/cat1.png,cat"] + rows[3:], r"line 4: 2 field\(s\), the header has 3"),
    (lambda rows: rows[:5] + ["imgs/more/cat2.png,dog,test"] + rows[5:],
     r"line 6: imgs/more/cat2.png is listed again \(first on line 4\)"),
    (lambda rows: rows[:2] + ["imgs/cat1.png,cat,dev"] + rows[3:], r"line 3: split 'dev'; use train, valid or test"),
    (lambda rows: rows + ["imgs/gone.png,cat,train", "nowhere/x.jpg,dog,train"],
     r"2 listed file\(s\) not found \(paths are relative to .*\): line 20: imgs/gone.png; "
     r"line 21: nowhere/x.jpg"),
    (lambda rows: [r.replace(",fox,train", ",fox,test") for r in rows],
     r"label\(s\) fox have no train rows"),
], ids=["header", "empty_label", "short_row", "duplicate", "unknown_split", "missing_files",
        "label_not_in_train"])
def test_csv_mistakes_name_the_file_and_line(tmp_path, edit, words):
  root = _csv_root(tmp_path)
  cfg = _csv_config(root, "\n".join(edit(_rows(extra=False))) + "\n")
  with pytest.raises(data.DataError, match=words) as e:
    splitting.load_splits(cfg.data, seed=0)
  assert str(root / "train.csv") in str(e.value)


def test_csv_path_may_be_absolute_and_rows_outside_its_folder(tmp_path):
  root = _csv_root(tmp_path / "data")
  lists = tmp_path / "lists"
  lists.mkdir()
  rows = _rows(extra=False)
  text = "\n".join([rows[0]] + [f"../data/{r}" for r in rows[1:]])
  cfg = _csv_config(lists, text, "labels.csv")
  cfg.data.root, cfg.data.csv = "", str(lists / "labels.csv")
  splits = splitting.load_splits(cfg.data, seed=0)
  assert splits["train"].paths[0] == str(root / "imgs/cat1.png")
  cfg.data.csv = str(lists / "missing.csv")
  with pytest.raises(data.DataError, match=r"labels CSV .*missing.csv not found"):
    splitting.load_splits(cfg.data, seed=0)


def test_skewed_classes_are_named_in_a_warning_at_start(tmp_path, caplog):
  """max/min > 5 in train: one warning naming the small class; a balanced set gets none."""
  import logging
  from conftest import make_class_folders
  root = make_class_folders(tmp_path / "d", per_class=30, size=16)
  cfg = default.get_config()
  cfg.data.root, cfg.data.layout, cfg.batch_size = str(root), "class_folders", 4
  with caplog.at_level(logging.WARNING, logger="flaxtl"):
    data.check_splits(splitting.load_splits(cfg.data, 0, None), cfg)
  assert "imbalanced" not in caplog.text
  for p in sorted((root / "circle").iterdir())[4:]:
    p.unlink()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="flaxtl"):
    data.check_splits(splitting.load_splits(cfg.data, 0, None), cfg)
  assert "imbalanced classes" in caplog.text and "circle (" in caplog.text
  assert "square (" not in caplog.text and "stripes (" not in caplog.text
