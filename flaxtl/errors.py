"""One base class for every mistake a user can make: the verbs print it plainly, exit 1.

Anything that is not a `FlaxtlError` is a bug and keeps its traceback.
"""
from __future__ import annotations


class FlaxtlError(Exception):
  """A user's mistake or an unusable input; the message names the file, field or layer."""


class ConfigError(FlaxtlError, ValueError):
  """A config value that cannot work, found before any data is decoded or weights loaded."""
