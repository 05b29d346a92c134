"""Input preprocessing conventions of pretrained weights.

The convention is a property of the weights (stored in their metadata by `flaxtl.weights`), never a
user setting: feeding one set of weights the other's preprocessing costs accuracy silently.
The functions take RGB pixels in [0, 255] and work on numpy, jax and TensorFlow tensors alike
(only indexing and broadcasting arithmetic), so tf.data and exported models share one definition.
"""
from __future__ import annotations

import numpy as np

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)  # Keras vgg16.preprocess_input
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
MODES = ("caffe", "torch", "unit", "tf", "none")


def preprocess(rgb, mode: str):
  """RGB in [0, 255] (float) -> the network's input for `mode`.

  caffe: RGB->BGR, subtract the ImageNet BGR means (Keras' VGG16 files).
  torch: scale to [0, 1], subtract the mean, divide by the std (torchvision's weights).
  unit: scale to [0, 1] (models trained from scratch).
  tf: scale to [-1, 1] (Keras' MobileNetV2 files).
  none: the pixels as they are (Keras' EfficientNet rescales inside the model).
  """
  if mode == "unit":
    return rgb / 255.0
  if mode == "tf":
    return rgb / 127.5 - 1.0
  if mode == "none":
    return rgb
  if mode == "caffe":
    return rgb[..., ::-1] - CAFFE_MEAN_BGR
  if mode == "torch":
    return (rgb / 255.0 - TORCH_MEAN) / TORCH_STD
  raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")


def unpreprocess(x, mode: str):
  """Inverse of `preprocess`: network input -> RGB in [0, 255] (for plots of images)."""
  if mode == "unit":
    return x * 255.0
  if mode == "tf":
    return (x + 1.0) * 127.5
  if mode == "none":
    return x
  if mode == "caffe":
    return (x + CAFFE_MEAN_BGR)[..., ::-1]
  if mode == "torch":
    return (x * TORCH_STD + TORCH_MEAN) * 255.0
  raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
