"""Freezing specs resolve to the right layers, counts and boundary; frozen leaves get no state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from flaxtl import freezing
from flaxtl.models import VGG16, layer_names

GAP = layer_names(include_top=False, pooling="avg", num_classes=10)
TOP = layer_names(include_top=True, num_classes=10)


@pytest.fixture(scope="module")
def gap_params():
  model = VGG16(include_top=False, pooling="avg", num_classes=10)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.mark.parametrize("spec,first,boundary", [
    ("block5", "block5_conv1", "block4_pool"),
    ("block5_conv1", "block5_conv1", "block4_pool"),
    ("frozen_blocks:4", "block5_conv1", "block4_pool"),
    ("block3_conv2", "block3_conv2", "block3_conv1"),
    ("head", "predictions", "avg_pool"),
    ("frozen_blocks:5", "predictions", "avg_pool"),
    ("all", "block1_conv1", None),
    ("frozen_blocks:0", "block1_conv1", None),
])
def test_plan_boundary(spec, first, boundary):
  p = freezing.plan(spec, GAP)
  assert p.trainable[0] == first
  assert p.boundary == boundary
  assert set(p.trainable) | set(p.frozen) == {n for n in GAP if "_conv" in n or n == "predictions"}


def test_keras_counts_for_block5(gap_params):
  """Keras' summary for the reference recipe: 7,079,424 block5 + 5,130 head trainable."""
  counts = freezing.count(gap_params, freezing.plan("block5", GAP))
  assert counts == {"trainable": 7_079_424 + 5_130, "frozen": 14_714_688 - 7_079_424}


def test_head_with_keras_top_trains_fc_layers():
  p = freezing.plan("head", TOP)
  assert p.trainable == ("fc1", "fc2", "predictions") and p.boundary == "flatten"


def test_regex_spec_and_noncontiguous_boundary():
  p = freezing.plan("regex:^(block2|block5)", GAP)
  assert p.trainable[:2] == ("block2_conv1", "block2_conv2")
  assert "block3_conv1" in p.frozen and "predictions" in p.frozen
  assert p.boundary == "block1_pool"


@pytest.mark.parametrize("spec", ["block9", "regex:nomatch", "frozen_blocks:7", "bogus"])
def test_bad_specs_are_errors(spec):
  with pytest.raises(ValueError, match="config.trainable"):
    freezing.plan(spec, GAP)


def test_frozen_leaves_have_no_optimizer_state(gap_params):
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), gap_params)
  tx = freezing.optimizer(optax.adam(1e-3), params, freezing.plan("block5", GAP))
  state = tx.init(params)
  state_size = sum(x.size for x in jax.tree.leaves(state))
  trainable = 7_079_424 + 5_130
  assert state_size == 2 * trainable + 1  # Adam's mu and nu for trainable leaves, plus a count
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates["block1_conv1"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["block5_conv1"]["kernel"]).min()) > 0.0
