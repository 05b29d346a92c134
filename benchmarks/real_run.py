"""`python -m flaxtl.train ...` as users run it, plus its peak RSS printed at exit ('@@ {json}').

  python -m benchmarks.real_run --config sign_digits --workdir DIR [--config.FIELD=VALUE ...]
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys

from benchmarks import common


@atexit.register
def _report() -> None:
  print("@@ " + json.dumps({"peak_rss_mb": common.peak_rss_mb(), "load": common.load()}),
        flush=True)


if __name__ == "__main__":
  sys.argv = ["flaxtl.train", *sys.argv[1:]]
  runpy.run_module("flaxtl.train", run_name="__main__", alter_sys=True)
