"""One training process for tests/test_parallel.py: N host devices, optionally one of P processes.

Run as a script so the device count is fixed before JAX starts (it cannot change in a live
process). Writes, per process, `p{i}.npz` (params: init + final of the run, and of a few steps from
images) and `p{i}.json` (eval counts, device/process counts) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def flat(tree, prefix: str) -> dict:
  import jax
  import numpy as np
  return {prefix + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--cache-dir", required=True)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--per-class", type=int, default=5)
  ap.add_argument("--image-size", type=int, default=64)
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--optimizer", default="sgd", help="sgd: rounding stays rounding (see test)")
  ap.add_argument("--lr", type=float, default=0.003, help="0.01 is unstable (see test)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=2, help="steps of the from-images run (0: none)")
  args = ap.parse_args()

  import flaxtl
  flaxtl.configure_cpu()  # as the verbs do, before jax starts its backend
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  if args.num_processes > 1:
    # CPU collectives across processes go through gloo (jax_cpu_collectives_implementation).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)
  import numpy as np
  from conftest import tiny_sign_digits_config
  from flaxtl import evaluate, optim, parallel, train
  from flaxtl.step import create_train_state, jit_train_step, zero_metrics
  from flaxtl.prepare import prepare

  assert jax.local_device_count() == args.devices, jax.local_devices()
  assert jax.process_count() == args.num_processes
  config = tiny_sign_digits_config(Path(args.cache_dir), per_class=args.per_class,
                                   image_size=args.image_size)
  config.cache_dir = args.cache_dir
  config.epochs = args.epochs
  config.model.dtype = args.dtype
  # XLA on every device count: 'auto' trains in oneDNN bf16 on one AMX CPU device, XLA on more.
  config.train_engine = "xla"
  config.optimizer.name, config.optimizer.learning_rate = args.optimizer, args.lr
  workdir = Path(args.workdir)
  quiet = lambda *a, **k: None  # noqa: E731
  setup = prepare(config, workdir, log_fn=quiet)
  res = train.train_and_evaluate(config, workdir, log_fn=quiet, setup=setup)
  state = res.pop("state")
  val = evaluate.evaluate_split(setup.network.logits, state.eval_variables, setup.feeders["valid"],
                                config.eval_batch_size)
  arrays = {**flat(setup.params, "init/"), **flat(state.params, "final/"),
            "val_logits": val.pop("logits")}
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": jax.device_count(), "train_n": setup.feeders["train"].n,
          "val": val, "test": {k: res[k] for k in ("test_correct", "test_count")},
          "best_step": res["best_step"], "wall_s": res["wall_seconds"], "steps_per_epoch":
          setup.feeders["train"].steps(config.batch_size),
          "param_dtypes": sorted({str(v.dtype) for v in jax.tree.leaves(state.params)}),
          "opt_dtypes": sorted({str(v.dtype) for v in jax.tree.leaves(state.opt_state)
                                if hasattr(v, "dtype") and v.ndim})}

  if args.steps:
    # The step from images: no cache, gradients stop at the boundary, augmentation on (its
    # randomness is per example, so it must not depend on how the batch is split).
    t0 = time.perf_counter()
    config.feature_cache = False
    config.data.augment.flip = True
    setup = prepare(config, workdir, log_fn=quiet)
    assert setup.network.start_after is None and setup.network.stop_gradient_after == "block4_pool"
    mesh = parallel.global_mesh()
    lr = optim.learning_rate(config.optimizer, args.steps, args.steps)
    state = jax.device_put(create_train_state(setup, lr), parallel.replicated(mesh))
    metrics = jax.device_put(zero_metrics(), parallel.replicated(mesh))
    step_fn = jit_train_step(mesh)
    rng = jax.random.key(1)
    batches = setup.feeders["train"].epoch(
        config.batch_size, seed=3, epoch=0, shuffle=True, process_index=jax.process_index(),
        process_count=jax.process_count())
    for _, batch in zip(range(args.steps), batches):
      state, metrics = step_fn(state, metrics, parallel.put_batch(batch, mesh), rng)
    arrays.update(flat(state.params, "steps/"))
    info["steps_wall_s"] = time.perf_counter() - t0
    info["steps_metrics"] = {k: float(v) for k, v in jax.device_get(metrics).items()}

  out = Path(args.out)
  np.savez(out / f"p{args.process_id}.npz", **arrays)
  (out / f"p{args.process_id}.json").write_text(json.dumps(info))
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
