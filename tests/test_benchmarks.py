"""The benchmark workers that RESULTS.md's figures come from still run (a rename in flaxtl or a
slip in a worker shows up here, not in the middle of a benchmark): tiny sizes, rates only."""
import pytest

from benchmarks import jax_side


@pytest.mark.parametrize("train_engine", ["xla", "tf_bf16"])
def test_step_and_eval_workers_time_flaxtl_on_a_tiny_batch(train_engine):
  step = jax_side.step("block5", 32, 4, cached=True, steps=1, warmup=1, train_engine=train_engine)
  ev = jax_side.eval_rate("block5", 32, batch=4, steps=1, warmup=1)
  assert step["images_per_s"] > 0 and step["steps"] == 1, step
  assert ev["images_per_s"] > 0 and ev["steps"] == 1, ev
