"""Issue 14, preemption of a multi-process run: SIGTERM reaching one process of two.

Each process used to decide alone when to save, so the one that got the signal entered orbax's
collective save while the other went on to the next step's all-reduce: both hung for good.
`parallel.agree` makes every process stop at the same step. Two CPU processes on 127.0.0.1 with
gloo collectives (tests/_preempt_worker.py), the small CNN on generated images, 3 steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, free_port, make_class_folders, wait_all

WORKER = REPO / "tests" / "_preempt_worker.py"
TIMEOUT_S = 240  # a deadlock is killed here (SIGTERM is handled, so SIGKILL)


def test_sigterm_on_one_process_stops_both_at_the_same_step_and_resumes_bit_exactly(tmp_path):
  make_class_folders(tmp_path / "data", per_class=8, size=32)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  port, procs = free_port(), []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for i in range(2):
      log = open(tmp_path / f"log{i}.txt", "w")
      cmd = [sys.executable, str(WORKER), "--out", str(tmp_path), "--root", str(tmp_path / "data"),
             "--process-id", str(i), "--port", str(port), "--stop-after", "2"]
      procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  finally:
    wait_all(procs, deadline)  # one failure ends the other at once
  logs = [(tmp_path / f"log{i}.txt").read_text(errors="replace")[-3000:] for i in range(2)]
  assert all(p.returncode == 0 for p, _ in procs), (
      ("timed out (deadlock?)\n" if time.monotonic() >= deadline else "") + "\n---\n".join(logs))
  infos = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
  assert [i["processes"] for i in infos] == [2, 2]
  assert [i["signal"] for i in infos] == [None, 15]  # only process 1 was signalled
  assert [i["stopped_at"] for i in infos] == [2, 2]  # both stopped, at the same step
  assert "signal SIGTERM: saving a checkpoint" in logs[1]
  assert [i["best_step"] for i in infos] == [3, 3]
  for i in range(2):
    with np.load(tmp_path / f"p{i}.npz") as z:
      arrays = dict(z)
    names = [k[len("full"):] for k in arrays if k.startswith("full")]
    assert names
    for name in names:  # the resumed run ends bit-exactly where the uninterrupted one did
      np.testing.assert_array_equal(arrays["resumed" + name], arrays["full" + name], err_msg=name)
