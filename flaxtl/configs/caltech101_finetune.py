"""Caltech-101 (97 classes), block 5 fine-tuned on cached block4_pool features, GAP + Dense head.

The reference's suggested exercise: "try out both, and compare" with the frozen feature extractor.
"""
from flaxtl.configs import caltech101


def get_config():
  c = caltech101.get_config()
  c.trainable = "block5"
  c.batch_size = 32
  c.eval_batch_size = 64
  c.epochs = 3  # each epoch runs block 5 on 14x14 maps for 4,346 images: minutes on a CPU
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  return c
