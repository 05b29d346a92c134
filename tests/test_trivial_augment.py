"""TrivialAugment Wide (`config.data.augment.policy='trivial'`, issue 16): each op against its
closed form on a generated image, the policy deterministic per (seed, image), the config checked,
and the views' cache keys of runs without a policy unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from flaxtl import features, input_pipeline
from flaxtl.configs import default
from flaxtl.errors import ConfigError
from flaxtl.config_check import check_config

IMG = np.random.default_rng(0).integers(0, 256, (112, 112, 3)).astype(np.float32)


def op(name, m, sign=1.0):
  return input_pipeline.trivial_op(tf.constant(IMG), name, tf.constant(m, tf.float32),
                                   tf.constant(sign, tf.float32)).numpy()


def test_ops_match_their_closed_forms():
  np.testing.assert_array_equal(op("identity", 0.7), IMG)
  for name in ("shear_x", "shear_y", "translate_x", "rotate"):  # magnitude 0: no change
    np.testing.assert_allclose(op(name, 0.0), IMG, atol=1e-3, err_msg=name)
  # translate by 0.5 * 32/224 * 112 = 8 px: columns shift right, the left edge replicated
  out = op("translate_x", 0.5)
  np.testing.assert_allclose(out[:, 8:], IMG[:, :-8], atol=1e-3)
  np.testing.assert_allclose(out[:, :8], np.repeat(IMG[:, :1], 8, axis=1), atol=1e-3)
  out = op("translate_y", 0.5, -1.0)  # up
  np.testing.assert_allclose(out[:-8], IMG[8:], atol=1e-3)
  np.testing.assert_array_equal(op("posterize", 0.5), np.floor(IMG / 8) * 8)  # 5 bits kept
  np.testing.assert_array_equal(op("posterize", 0.0), IMG)
  np.testing.assert_array_equal(op("solarize", 0.5), np.where(IMG >= 127.5, 255 - IMG, IMG))
  np.testing.assert_allclose(op("brightness", 1.0, -1.0), 0.01 * IMG, rtol=1e-5)
  gray = IMG @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(op("color", 1.0, -1.0),
                             gray[..., None] + 0.01 * (IMG - gray[..., None]), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(op("contrast", 1.0, -1.0),
                             gray.mean() + 0.01 * (IMG - gray.mean()), rtol=1e-4, atol=1e-3)
  sharp = op("sharpness", 0.0)  # factor 1: the image itself
  np.testing.assert_allclose(sharp, IMG, atol=1e-3)
  dull = op("sharpness", 1.0, -1.0)  # factor 0.01: ~ PIL's SMOOTH filter inside, borders kept
  np.testing.assert_allclose(dull[0], IMG[0], atol=1e-3)
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
  smooth = sum(k[i, j] * IMG[i:i + 108, j:j + 108] for i in range(3) for j in range(3))
  np.testing.assert_allclose(dull[1:109, 1:109], smooth + 0.01 * (IMG[1:109, 1:109] - smooth),
                             atol=1e-2)
  low = IMG * 0.5 + 20  # autocontrast stretches each channel to 0..255
  out = input_pipeline.trivial_op(tf.constant(low), "autocontrast", 0.3).numpy()
  np.testing.assert_allclose(out.min((0, 1)), 0, atol=1e-3)
  np.testing.assert_allclose(out.max((0, 1)), 255, atol=1e-3)


def test_policy_is_deterministic_per_seed_and_varied():
  config = default.get_config()
  config.data.augment.policy = "trivial"
  aug = input_pipeline.augmentation(config.data.augment)
  images = np.repeat(IMG.astype(np.uint8)[None], 64, axis=0)
  seeds = np.stack([np.full(64, 3), np.arange(64)], axis=1).astype(np.int64)
  a, b = aug(images, seeds).numpy(), aug(images, seeds).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.shape == images.shape and a.min() >= 0 and a.max() <= 255
  changed = [not np.allclose(x, IMG, atol=1e-3) for x in a]
  assert 40 <= sum(changed) < 64  # identity is 1 op in 13 (and magnitude ~0 rarely)
  assert len({x.tobytes() for x in a}) > 50


def test_policy_config_and_cache_keys():
  config = default.get_config()
  config.data.augment.policy = "randaugment"
  with pytest.raises(ConfigError, match=r"config\.data\.augment\.policy='randaugment'"):
    check_config(config)
  d = {"boundary": "block4_pool"}
  plain = default.get_config().data.augment.to_dict()
  old = {k: v for k, v in plain.items() if k != "policy"}  # a view's key from before policies
  assert (features.view_description(d, plain, 1) == features.view_description(d, old, 1))
  trivial = {**plain, "policy": "trivial"}
  assert features.cache_key(**features.view_description(d, trivial, 1)) != features.cache_key(
      **features.view_description(d, plain, 1))
  assert input_pipeline.augment_enabled(default.get_config().data.augment) is False
  config.data.augment.policy = "trivial"
  assert input_pipeline.augment_enabled(config.data.augment)
