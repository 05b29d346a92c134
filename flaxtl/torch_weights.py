"""torchvision's VGG16 tensors -> flaxtl's layout: OIHW convs to HWIO, (out, in) Linear to (in, out),
and fc1's rows from torch's NCHW flatten order to NHWC. Read by `flaxtl.weights.load`."""
from __future__ import annotations

import numpy as np

from flaxtl.models.vgg import CONV_LAYERS
from flaxtl.weights import EXPECTED, TOP, WeightsError, _fits, _fmt

# Index in torchvision's `vgg16().features` of each conv (ReLUs and pools sit in between), and of the
# Linear layers in `classifier` (ReLU, Dropout in between).
TORCH_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TORCH_CLASSIFIER = (0, 3, 6)


def fc1_from_torch(kernel: np.ndarray, channels: int) -> np.ndarray:
  """fc1 kernel rows in torch's NCHW flatten order (C, H, W) -> flaxtl's NHWC order (H, W, C)."""
  n, units = kernel.shape
  side = int(round((n // channels) ** 0.5))
  return kernel.reshape(channels, side, side, units).transpose(1, 2, 0, 3).reshape(n, units)


def convert(sd: dict, file) -> dict:
  """torchvision VGG16 state dict -> flaxtl params; the classifier is optional (notop)."""
  prefixes = {f"features.{i}": n for i, n in zip(TORCH_FEATURES, CONV_LAYERS)}
  if any(k.startswith("classifier.") for k in sd):
    prefixes.update({f"classifier.{i}": n for i, n in zip(TORCH_CLASSIFIER, TOP)})
  for key in sd:
    prefix, _, kind = key.rpartition(".")
    if prefix not in prefixes or kind not in ("weight", "bias"):
      raise WeightsError(f"{file}: unexpected tensor {key!r}: not in torchvision's VGG16 (convs "
                         f"features.{{{','.join(map(str, TORCH_FEATURES))}}}, Linear "
                         "classifier.{0,3,6}); is this file for another architecture (vgg16_bn?)")
  params = {}
  for prefix, layer in prefixes.items():
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    if w is None or b is None:
      missing = f"{prefix}.{'weight' if w is None else 'bias'}"
      raise WeightsError(f"{file}: missing layer {layer!r}: no tensor {missing!r}")
    want = EXPECTED[layer]
    torch_want = (want[3], want[2], want[0], want[1]) if len(want) == 4 else want[::-1]
    if not _fits(w.shape, torch_want):
      raise WeightsError(f"{file}: layer {layer!r} ({prefix}.weight): shape {_fmt(w.shape)}, "
                         f"torchvision's VGG16 has {_fmt(torch_want)}")
    w = np.asarray(w, np.float32)
    k = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # OIHW -> HWIO; (out, in) -> (in, out)
    if layer == "fc1":
      k = fc1_from_torch(k, EXPECTED[CONV_LAYERS[-1]][-1])
    params[layer] = {"kernel": np.ascontiguousarray(k), "bias": np.asarray(b, np.float32)}
  return params


def read(src, file) -> dict:
  try:
    import torch
  except ImportError:
    raise WeightsError(f"{file}: a PyTorch checkpoint (.pth); reading it needs `torch` (pip install "
                       "torch), or convert it to .safetensors elsewhere") from None
  try:
    sd = torch.load(src, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightsError(f"{file}: cannot read the PyTorch checkpoint ({e})") from e
  if not isinstance(sd, dict):
    raise WeightsError(f"{file}: expected a state dict, found {type(sd).__name__}")
  return {k: v.detach().float().numpy() for k, v in sd.items()}
