"""Named datasets, fetched on first use into $FLAXTL_DATA_DIR/<name> (`python -m flaxtl.data fetch`).

Each one is a pinned URL and checksum plus a layout step: the archive is downloaded to a temporary
folder inside the data dir, verified, extracted and laid out there, and only then renamed to
<data dir>/<name>. A folder already at that place is used as it is, never fetched again; a failed
fetch leaves nothing behind. $FLAXTL_DATASETS_URL points every fetch at a mirror instead, which
serves the same archive under its file name ($FLAXTL_DATASETS_URL/<archive>).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from flaxtl import download
from flaxtl.errors import FlaxtlError

URL_ENV = "FLAXTL_DATASETS_URL"
HERE = Path(__file__).resolve().parent


class FetchError(FlaxtlError, OSError):
  """A dataset that could not be fetched or verified; names the URL and the folder to fill."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  url: str                  # pinned: a fixed commit or record, never "latest"
  archive: str              # its file name; also its name on a mirror
  sha256: str | None        # of the archive, where known (else content_sha256 is the check)
  layout: Callable          # (dataset, extracted folder, output folder) -> None; verifies content
  holds: str                # what <data dir>/<name> holds, for messages
  split_list: Path | None = None
  content_sha256: str | None = None  # of the files' `sha256sum` lines, sorted by path
  license: str = ""


def _sign_language_digits(ds: Dataset, extracted: Path, out: Path) -> None:
  """The original repository's Dataset/<digit>/*.JPG -> out/{train,valid,test}/<digit>/*.JPG, by
  the shipped split list; the 2,062 files' content must hash to the pinned digest."""
  found = sorted(extracted.glob("Dataset")) + sorted(extracted.glob("*/Dataset"))
  if not found:
    raise FetchError(f"{ds.archive}: no Dataset/ folder in the archive (expected "
                     "<top>/Dataset/<digit>/IMG_xxxx.JPG, the original repository's layout)")
  src = found[0]
  rows = [line.split("/") for line in ds.split_list.read_text().splitlines()
          if line.strip() and not line.startswith("#")]
  missing = [f"Dataset/{c}/{n}" for _, c, n in rows if not (src / c / n).is_file()]
  if missing:
    raise FetchError(f"{ds.archive}: {len(missing)} of the {len(rows)} files of the split are not "
                     f"in it: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
  sums = []
  for split, cls, name in rows:
    sums.append(f"{download.file_digest(src / cls / name)}  Dataset/{cls}/{name}\n")
    (out / split / cls).mkdir(parents=True, exist_ok=True)
    os.replace(src / cls / name, out / split / cls / name)
  _check_content(ds, sums)
  license_file = next(iter(sorted(extracted.glob("*/LICENSE")) + sorted(extracted.glob("LICENSE"))),
                      None)
  if license_file is not None:
    shutil.copyfile(license_file, out / "LICENSE")


def _caltech101(ds: Dataset, extracted: Path, out: Path) -> None:
  """caltech-101.zip holds caltech-101/101_ObjectCategories.tar.gz: that tarball, extracted, gives
  out/101_ObjectCategories/<class>/image_*.jpg (BACKGROUND_Google included; the configs exclude it)."""
  inner = sorted(extracted.rglob("101_ObjectCategories.tar.gz"))
  if not inner:
    raise FetchError(f"{ds.archive}: no 101_ObjectCategories.tar.gz inside")
  _extract(inner[0], out)
  if not (out / "101_ObjectCategories").is_dir():
    raise FetchError(f"{inner[0].name}: no 101_ObjectCategories/ folder inside")


def _check_content(ds: Dataset, sums: list[str]) -> None:
  if ds.content_sha256 is None:
    return
  sums = sorted(sums, key=lambda line: line.split("  ", 1)[1])
  got = hashlib.sha256("".join(sums).encode()).hexdigest()
  if got != ds.content_sha256:
    raise FetchError(f"checksum mismatch: the images in {ds.archive} hash to {got}, expected "
                     f"{ds.content_sha256} (sha256 of their sorted `sha256sum` lines)")


DATASETS = {
    # GitHub's archive of a pinned commit. GitHub generates these zips on request and does not
    # promise the same bytes forever, and this project could not download it to learn its sha256,
    # so the archive's hash is not pinned (None). The check is the content instead: the 2,062
    # images' sha256 lines (`sha256sum Dataset/*/*`, sorted by path) hash to content_sha256,
    # computed from the files of that commit (git blobs) and from the reference split's folders,
    # which are byte-identical to them.
    "sign_language_digits": Dataset(
        name="sign_language_digits",
        url="https://github.com/ardamavi/Sign-Language-Digits-Dataset/archive/"
            "4b09433ef9d5c60602e8805bb54b8aa2428527f8.zip",
        archive="Sign-Language-Digits-Dataset-4b09433ef9d5c60602e8805bb54b8aa2428527f8.zip",
        sha256=None,
        layout=_sign_language_digits,
        holds="train/, valid/, test/ with one folder per digit 0-9 (1,712 / 300 / 50 images)",
        split_list=HERE / "sign_language_digits.txt",
        content_sha256="dcb2ae4be3d7735fcdd5afd3ac662c8515803a0ab9c5acce989eb085802de6d1",
        license="Apache-2.0"),
    # The Caltech data server's record, the seed's source. URL, size (137,414,764 bytes) and sha256
    # as tensorflow-datasets pins them (datasets/caltech101/checksums.tsv); not downloaded here.
    # Not tfds' builder itself: it makes its own 30-per-class train split and TFRecords, where flaxtl
    # needs the image files for its seeded 70/15/15 class_folders split.
    "caltech101": Dataset(
        name="caltech101",
        url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1",
        archive="caltech-101.zip",
        sha256="331234750fc7f77520e50d9565e8b6907b03565e30320da1401130db08c61f91",
        layout=_caltech101,
        holds="101_ObjectCategories/<class>/*.jpg (102 folders)",
        license="CC BY 4.0"),
}


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise FetchError(f"unknown dataset {name!r}; flaxtl fetches: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def url(ds: Dataset) -> str:
  """The pinned URL, or the archive's place on the mirror named by $FLAXTL_DATASETS_URL."""
  base = os.environ.get(URL_ENV, "").strip()
  return f"{base.rstrip('/')}/{ds.archive}" if base else ds.url


def _extract(archive: Path, into: Path) -> None:
  """zip or tar(.gz), members kept inside `into` (tarfile's 'data' filter, zipfile's own checks)."""
  from tqdm.auto import tqdm
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        for member in tqdm(z.infolist(), desc=f"extracting {archive.name}", unit="file",
                           disable=None, leave=False):
          z.extract(member, into)
    else:
      with tarfile.open(archive) as t:
        for member in tqdm(t, desc=f"extracting {archive.name}", unit="file", disable=None,
                           leave=False):
          t.extract(member, into, filter="data")
  except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as e:
    raise FetchError(f"{archive.name}: cannot extract ({type(e).__name__}: {e}); the archive is "
                     "truncated or not the expected file") from None


def fetch(name: str, data_dir: Path, archive: Path | None = None, log_fn=print) -> Path:
  """<data_dir>/<name>, fetched, verified and laid out if it is not there yet.

  The archive comes from `archive` (a file the user downloaded), else <data_dir>/<archive name>
  when placed there by hand, else the URL (or the mirror). Everything happens in a temporary folder
  inside `data_dir`, renamed into place at the end: an interrupted or failed fetch leaves nothing.
  """
  ds = get(name)
  data_dir = Path(data_dir)
  dest = data_dir / name
  if dest.is_dir():
    return dest
  source = url(ds)
  hint = (f"put it at {data_dir / ds.archive} (flaxtl verifies and lays it out from there), or "
          f"lay the dataset out yourself in {dest}/: {ds.holds}")
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=data_dir))
  except OSError as e:
    raise FetchError(f"cannot create the dataset folder in {data_dir} ({e.strerror or e}); set "
                     "FLAXTL_DATA_DIR to a writable folder") from None
  try:
    given = Path(archive) if archive else data_dir / ds.archive
    if given.is_file():
      log_fn(f"{name}: verifying {given} ...")
      if ds.sha256 and (got := download.file_digest(given)) != ds.sha256:
        raise FetchError(f"{given}: checksum mismatch (sha256 {got}, expected {ds.sha256}): not "
                         f"the archive of {ds.url}; nothing was changed")
      path = given
    elif archive:
      raise FetchError(f"--archive {archive}: no such file")
    else:
      log_fn(f"{name}: downloading {source} into {data_dir} ...")
      path = download.fetch(source, work / ds.archive, sha256=ds.sha256, error=FetchError,
                            offline_hint=hint)
    _extract(path, work / "extracted")
    (work / name).mkdir()
    try:
      ds.layout(ds, work / "extracted", work / name)
    except FetchError as e:
      raise FetchError(f"{e}. From {source if path != given else given}: nothing was saved; "
                       f"get the archive elsewhere and {hint}") from None
    try:
      os.rename(work / name, dest)
    except OSError:
      if not dest.is_dir():  # another process of the same run may have finished first
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  if path != given:
    log_fn(f"{name}: verified and laid out in {dest}")
  return dest


def ensure(name: str, data_dir: Path, log_fn=print) -> Path | None:
  """<data_dir>/<name> for a named dataset flaxtl knows, fetched when missing; None otherwise."""
  if name not in DATASETS:
    return None
  return fetch(name, data_dir, log_fn=log_fn)
