"""Sign Language Digits: VGG16 (ImageNet), block 5 fine-tuned on cached block4_pool features.

The reference recipe (Elgendy, ch. 6): last conv block trainable, GAP, Dense(10), Adam 1e-4, ~98%.
"""
from flaxtl.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "sign_language_digits"
  c.data.image_size = 112  # the images are 100x100: 224 only upsamples, at 4x the compute
  c.trainable = "block5"
  c.batch_size = 32
  c.epochs = 8
  return c
