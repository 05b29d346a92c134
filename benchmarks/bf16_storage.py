"""python -m benchmarks.bf16_storage CACHE_DIR WEIGHTS (with FLAXTL_DATA_DIR holding caltech101)

Issue 17: the Caltech-97 head (phase 1, the L-BFGS probe) on `tf_bf16` features as the cache now
stores them (bf16), against the same features widened to float32 (how they were stored before):
val and test accuracy, and the bytes of the train features. CACHE_DIR may already hold the
features; else the pass runs (~5 min at 224 px on the project's Xeon with `tf_bf16`).
"""
import dataclasses
import json
import sys

import ml_dtypes
import numpy as np

from flaxtl import prepare
from flaxtl.configs import caltech101


def main(cache_dir: str, weights: str) -> dict:
  c = caltech101.get_config()
  c.model.weights, c.cache_dir, c.feature_engine, c.probe_shots = weights, cache_dir, "tf_bf16", ()
  s = prepare.prepare(c, None, fit=False)
  out = {}
  for how, dtype in (("float32 storage", np.float32), ("bf16 storage", ml_dtypes.bfloat16)):
    f = {k: np.asarray(v).astype(dtype) for k, v in s.probe_features.items()}
    t = prepare.fit_probe(dataclasses.replace(s, probe_features=f), log_fn=print)
    x = np.asarray(prepare.head_input(s.model, np.asarray(f["test"], np.float32), s.probe_at))
    head = t.params["predictions"]
    pred = np.argmax(x @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), -1)
    out[how] = {"val_accuracy": t.probe["val_accuracy"], "l2": t.probe["l2"],
                "test_accuracy": float(np.mean(pred == s.splits["test"].labels)),
                "train_bytes": int(f["train"].nbytes)}
    print(how, out[how], flush=True)
  return out


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], sys.argv[2]), indent=1))
