"""Named datasets fetched on first use (flaxtl.datasets): a local HTTP server on 127.0.0.1 serves
small generated archives in the real archives' layouts, through $FLAXTL_DATASETS_URL. Success,
a checksum mismatch, a refused connection and a download broken mid-body; every failure leaves
nothing in the data dir. With ../shared present, the real images in the original repository's
layout are checked against the pinned content digest and the shipped split list."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import (SIGN_DIGITS, free_port, http_server, make_class_folders,
                      requires_sign_digits)
from flaxtl import data, datasets, download, splitting
from flaxtl.configs import caltech101, sign_digits

SD = datasets.DATASETS["sign_language_digits"]
CT = datasets.DATASETS["caltech101"]
TOP = "Sign-Language-Digits-Dataset-4b09433ef9d5c60602e8805bb54b8aa2428527f8"


def sha256sum_digest(files: dict[str, bytes]) -> str:
  """What `sha256sum Dataset/*/* | sha256` gives: one line per file, sorted by path."""
  lines = sorted(f"{hashlib.sha256(b).hexdigest()}  {p}\n" for p, b in files.items())
  lines.sort(key=lambda line: line.split("  ", 1)[1])
  return hashlib.sha256("".join(lines).encode()).hexdigest()


def fake_sign_digits(tmp: Path, per_class: int = 10) -> tuple[Path, dict, Path]:
  """A small archive in the original repository's layout (3 digit classes of generated shapes as
  JPEGs), its split list (6/2/2 per class) -> (archive, {(split, class, name): bytes}, list)."""
  src = make_class_folders(tmp / "shapes", per_class=per_class, size=32)
  files, lines = {}, ["# generated"]
  for digit, shape in enumerate(("circle", "square", "stripes")):
    for i, path in enumerate(sorted((src / shape).iterdir())):
      buf = io.BytesIO()
      Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
      split = "train" if i < per_class - 4 else ("valid" if i < per_class - 2 else "test")
      name = f"IMG_{digit}{i:03d}.JPG"
      files[(split, str(digit), name)] = buf.getvalue()
      lines.append(f"{split}/{digit}/{name}")
  split_list = tmp / "split.txt"
  split_list.write_text("\n".join(lines) + "\n")
  (tmp / "srv").mkdir(exist_ok=True)
  archive = tmp / "srv" / SD.archive
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr(f"{TOP}/LICENSE", "Apache License 2.0 (generated)")
    z.writestr(f"{TOP}/Examples/example_0.JPG", b"not part of the dataset")
    for (_, digit, name), blob in files.items():
      z.writestr(f"{TOP}/Dataset/{digit}/{name}", blob)
  return archive, files, split_list


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """The generated archive served by a local server; the registry's entry points at its split
  list and content digest; a fresh, empty data dir; retries without waiting."""
  archive, files, split_list = fake_sign_digits(tmp_path)
  digest = sha256sum_digest({f"Dataset/{c}/{n}": b for (_, c, n), b in files.items()})
  monkeypatch.setitem(datasets.DATASETS, SD.name, dataclasses.replace(
      SD, split_list=split_list, content_sha256=digest))
  monkeypatch.setattr(download, "RETRY_WAIT_S", 0.01)
  data_dir = tmp_path / "datasets"
  monkeypatch.setenv("FLAXTL_DATA_DIR", str(data_dir))
  return dataclasses.make_dataclass("Fake", ["archive", "files", "data_dir", "tmp"])(
      archive, files, data_dir, tmp_path)


def tree(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_first_use_downloads_verifies_lays_out_then_uses_it_as_is(fake, monkeypatch, capsys):
  with http_server(fake.archive.parent) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    splits = splitting.load_splits(sign_digits.get_config().data, seed=0)
  assert [len(splits[s]) for s in data.SPLITS] == [18, 6, 6]
  assert splits["train"].class_names == ["0", "1", "2"]
  assert os.listdir(fake.data_dir) == ["sign_language_digits"]  # no archive, no temp folder left
  laid_out = tree(fake.data_dir / "sign_language_digits")
  assert laid_out.pop("LICENSE") == b"Apache License 2.0 (generated)"
  assert laid_out == {f"{s}/{c}/{n}": b for (s, c, n), b in fake.files.items()}
  assert f"{url}/{SD.archive}" in capsys.readouterr().out

  # In place: used as it is, with no network (the mirror now refuses connections).
  monkeypatch.setenv(datasets.URL_ENV, f"http://127.0.0.1:{free_port()}")
  again = splitting.load_splits(sign_digits.get_config().data, seed=0)
  assert again["test"].paths == splits["test"].paths


def test_an_archive_placed_by_hand_is_verified_and_laid_out(fake, monkeypatch):
  monkeypatch.setenv(datasets.URL_ENV, f"http://127.0.0.1:{free_port()}")  # offline
  fake.data_dir.mkdir()
  placed = fake.data_dir / SD.archive
  placed.write_bytes(fake.archive.read_bytes())
  path = datasets.fetch(SD.name, fake.data_dir, log_fn=lambda *a: None)
  assert len(list(path.rglob("*.JPG"))) == 30
  assert sorted(os.listdir(fake.data_dir)) == sorted([SD.archive, SD.name])  # the user's file stays


def test_content_checksum_mismatch_names_url_hashes_and_folder_and_leaves_nothing(fake, monkeypatch):
  with zipfile.ZipFile(fake.archive) as z:
    members = {i.filename: z.read(i) for i in z.infolist()}
  victim = next(k for k in members if k.endswith(".JPG") and "/Dataset/1/" in k)
  members[victim] = members[victim][:-1] + bytes([members[victim][-1] ^ 1])  # one bit
  with zipfile.ZipFile(fake.archive, "w") as z:
    for k, v in members.items():
      z.writestr(k, v)
  with http_server(fake.archive.parent) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    with pytest.raises(datasets.FetchError) as e:
      splitting.load_splits(sign_digits.get_config().data, seed=0)
  msg = str(e.value)
  expected = datasets.DATASETS[SD.name].content_sha256
  assert "checksum mismatch" in msg and f"expected {expected}" in msg
  assert f"{url}/{SD.archive}" in msg and str(fake.data_dir / "sign_language_digits") in msg
  assert os.listdir(fake.data_dir) == []


def caltech_archive(folder: Path) -> Path:
  """caltech-101.zip's layout: caltech-101/101_ObjectCategories.tar.gz holding class folders."""
  cats = make_class_folders(folder / "cats" / "101_ObjectCategories", per_class=6, size=32)
  (cats / "BACKGROUND_Google").mkdir()
  (cats / "BACKGROUND_Google" / "image_0001.jpg").write_bytes((cats / "circle" / "circle_00.jpg")
                                                              .read_bytes())
  tgz = folder / "101_ObjectCategories.tar.gz"
  with tarfile.open(tgz, "w:gz") as t:
    t.add(cats, arcname="101_ObjectCategories")
  (folder / "srv").mkdir()
  archive = folder / "srv" / CT.archive
  with zipfile.ZipFile(archive, "w") as z:
    z.write(tgz, "caltech-101/101_ObjectCategories.tar.gz")
    z.writestr("caltech-101/show_annotation.m", "% not used")
  return archive


def test_caltech_archive_checksum_then_layout(tmp_path, monkeypatch):
  archive = caltech_archive(tmp_path)
  data_dir = tmp_path / "datasets"
  monkeypatch.setenv("FLAXTL_DATA_DIR", str(data_dir))
  cfg = caltech101.get_config()
  with http_server(archive.parent) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    with pytest.raises(datasets.FetchError) as e:  # the real pinned sha256: not this archive
      splitting.load_splits(cfg.data, seed=0)
    msg = str(e.value)
    assert f"expected {CT.sha256}" in msg and download.file_digest(archive) in msg
    assert f"{url}/{CT.archive}" in msg and str(data_dir / CT.archive) in msg
    assert os.listdir(data_dir) == []
    monkeypatch.setitem(datasets.DATASETS, CT.name,
                        dataclasses.replace(CT, sha256=download.file_digest(archive)))
    splits = splitting.load_splits(cfg.data, seed=0)
  assert splits["train"].class_names == ["circle", "square", "stripes"]  # BACKGROUND excluded
  assert sum(len(s) for s in splits.values()) == 18
  assert os.listdir(data_dir) == ["caltech101"]


def test_refused_connection_is_a_plain_error_naming_url_and_folder(tmp_path):
  data_dir = tmp_path / "datasets"
  url = f"http://127.0.0.1:{free_port()}"
  env = {**os.environ, "FLAXTL_DATA_DIR": str(data_dir), datasets.URL_ENV: url,
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  r = subprocess.run([sys.executable, "-m", "flaxtl.data", "fetch", "caltech101"], env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: could not download {url}/{CT.archive}"), line
  assert str(data_dir / CT.archive) in line and str(data_dir / "caltech101") in line
  assert os.listdir(data_dir) == []


def test_a_download_broken_mid_body_is_retried(fake, monkeypatch, capsys):
  with http_server(fake.archive.parent, cut_first=1) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    path = datasets.fetch(SD.name, fake.data_dir)
  assert "connection closed after" in capsys.readouterr().out  # said, then tried again
  assert len(list(path.rglob("*.JPG"))) == 30 and os.listdir(fake.data_dir) == [SD.name]

  # Broken every time: an error after the last try, nothing kept (the short file is not taken).
  with http_server(fake.archive.parent, cut_first=download.RETRIES) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    with pytest.raises(datasets.FetchError, match=rf"closed after \d+ of \d+ bytes, "
                       rf"{download.RETRIES} tries") as e:
      datasets.fetch("sign_language_digits", fake.tmp / "other")
  assert str(fake.tmp / "other" / SD.archive) in str(e.value)
  assert os.listdir(fake.tmp / "other") == []


@requires_sign_digits
def test_the_real_images_match_the_pinned_digest_and_split(tmp_path):
  """The real 2,062 images, zipped in the original repository's layout (Dataset/<digit>/*.JPG,
  as ardamavi/Sign-Language-Digits-Dataset@4b09433e has them) and fetched through the CLI, hash to
  the pinned digest and land in exactly the reference folders."""
  reference = {p.relative_to(SIGN_DIGITS): p for p in SIGN_DIGITS.glob("*/*/*.JPG")}
  assert len(reference) == 2062
  (tmp_path / "srv").mkdir()
  with zipfile.ZipFile(tmp_path / "srv" / SD.archive, "w") as z:
    for rel, path in sorted(reference.items(), key=lambda kv: kv[0].name):
      z.write(path, f"{TOP}/Dataset/{rel.parts[1]}/{rel.name}")
  data_dir = tmp_path / "datasets"
  with http_server(tmp_path / "srv") as url:
    env = {**os.environ, "FLAXTL_DATA_DIR": str(data_dir), datasets.URL_ENV: url,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-m", "flaxtl.data", "fetch", "sign_language_digits"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  got = {p.relative_to(data_dir / SD.name): p for p in (data_dir / SD.name).glob("*/*/*.JPG")}
  assert sorted(got) == sorted(reference)
  assert all(got[k].stat().st_size == reference[k].stat().st_size for k in got)
  assert [len(list((data_dir / SD.name / s).glob("*/*"))) for s in data.SPLITS] == [1712, 300, 50]
