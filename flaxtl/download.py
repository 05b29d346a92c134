"""Downloads that are never half-trusted: stream to a temp file, check the checksum, rename.

Weights (and datasets) are fetched into a cache on first use; offline, the error says which URL to
fetch elsewhere and where to put the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from flaxtl.errors import FlaxtlError


def fetch(url: str, dest, md5: str, *, timeout: float = 60.0, error: type = FlaxtlError,
          offline_hint: str = "") -> Path:
  """Streams `url` to a temporary file next to `dest`, checks its md5, then renames it to `dest`:
  a failed or corrupt download never leaves a file that a later run would trust."""
  from tqdm.auto import tqdm

  dest = Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
  digest = hashlib.md5()
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, \
             tqdm(total=int(resp.headers.get("Content-Length") or 0) or None, unit="B",
                  unit_scale=True, unit_divisor=1024, desc=dest.name, disable=None) as bar:
          while chunk := resp.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
      except (urllib.error.URLError, OSError) as e:  # offline, refused, DNS, HTTP error, timeout
        raise error(
            f"could not download {url} ({getattr(e, 'reason', None) or e}). Without network "
            f"access, get that file elsewhere (from {url}) and {offline_hint or f'put it at {dest}'}."
        ) from e
      out.flush()
      os.fsync(out.fileno())
    if digest.hexdigest() != md5:
      raise error(f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {md5}): the "
                  f"download is corrupt or not the expected file; nothing was saved to {dest}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return dest
