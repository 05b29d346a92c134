"""Downloads that are never half-trusted: stream to a temp file, check the checksum, rename.

Weights and datasets are fetched into a cache on first use; offline, the error says which URL to
fetch elsewhere and where to put the file. A connection that breaks mid-body is retried from the
start (a short file is never passed on: its length is checked against Content-Length).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from flaxtl.errors import FlaxtlError

RETRIES = 3          # attempts per download when the connection breaks mid-body (or HTTP 5xx)
RETRY_WAIT_S = 1.0   # seconds before the 2nd attempt, doubled before each later one


def file_digest(path, algorithm: str = "sha256") -> str:
  """Hex digest of a file, read in chunks (weights and archives are hundreds of MB)."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


class _Broken(Exception):
  """The transfer broke after it started: worth another try."""


def _attempt(url: str, out, digests: dict, timeout: float, desc: str) -> None:
  from tqdm.auto import tqdm
  out.seek(0)
  out.truncate()
  try:
    resp = urllib.request.urlopen(url, timeout=timeout)
  except (http.client.RemoteDisconnected, ConnectionResetError) as e:  # closed before a response
    raise _Broken(f"the server closed the connection ({e})") from e
  with resp:
    total = int(resp.headers.get("Content-Length") or 0) or None
    got = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=None, leave=False) as bar:
      try:
        while chunk := resp.read(1 << 20):
          out.write(chunk)
          for d in digests.values():
            d.update(chunk)
          got += len(chunk)
          bar.update(len(chunk))
      except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as e:
        raise _Broken(f"the connection broke after {got} of {total or '?'} bytes ({e})") from e
    if total is not None and got != total:  # http.client returns short reads silently
      raise _Broken(f"the connection closed after {got} of {total} bytes")


def fetch(url: str, dest, md5: str | None = None, *, sha256: str | None = None,
          timeout: float = 60.0, error: type = FlaxtlError, offline_hint: str = "",
          retries: int = RETRIES) -> Path:
  """Streams `url` to a temporary file next to `dest`, checks its md5/sha256 (each one given),
  then renames it to `dest`: a failed, short or corrupt download never leaves a file that a later
  run would trust. A broken transfer or an HTTP 5xx is tried again, up to `retries` times."""
  dest = Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  hint = offline_hint or f"put it at {dest}"
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
  expected = {k: v for k, v in (("md5", md5), ("sha256", sha256)) if v}
  try:
    with os.fdopen(fd, "wb") as out:
      for attempt in range(1, retries + 1):
        digests = {k: hashlib.new(k) for k in expected}
        try:
          _attempt(url, out, digests, timeout, dest.name)
          break
        except urllib.error.HTTPError as e:
          if e.code < 500 or attempt == retries:
            raise error(f"could not download {url} (HTTP {e.code} {e.reason}). Get that file "
                        f"elsewhere and {hint}.") from None
          why = f"HTTP {e.code}"
        except _Broken as e:
          if attempt == retries:
            raise error(f"could not download {url}: {e}, {retries} tries. Try again later, or "
                        f"get that file elsewhere and {hint}.") from None
          why = str(e)
        except (urllib.error.URLError, OSError) as e:  # offline, refused, DNS, timeout
          raise error(f"could not download {url} ({getattr(e, 'reason', None) or e}). Without "
                      f"network access, get that file elsewhere (from {url}) and {hint}.") from None
        wait = RETRY_WAIT_S * 2 ** (attempt - 1)
        print(f"{url}: {why}; trying again in {wait:g}s ({attempt + 1}/{retries})", flush=True)
        time.sleep(wait)
      out.flush()
      os.fsync(out.fileno())
    for name, want in expected.items():
      got = digests[name].hexdigest()
      if got != want:
        raise error(f"{url}: checksum mismatch ({name} {got}, expected {want}): the download is "
                    f"corrupt or not the expected file; nothing was saved to {dest}. Get that "
                    f"file elsewhere and {hint}.")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return dest
