"""Caltech-101 (97 classes), the reference's small CNN trained from scratch: the no-transfer baseline.

Four Conv(32, 3x3)+ReLU+MaxPool blocks, dropout, Dense 256, Dense; Adam, batch 128 (~40% test).
"""
from flaxtl.configs import caltech101


def get_config():
  c = caltech101.get_config()
  c.model.name = "small_cnn"
  c.trainable = "all"
  c.feature_cache = False
  c.batch_size = 128
  c.eval_batch_size = 128
  c.epochs = 10
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  return c
