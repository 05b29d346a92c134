"""torchvision's ResNet-50 (v1.5) from its tensors (issue 19): a random state dict in torchvision's
layout, with random batch norm running statistics (torch starts them at 0 and 1, which would hide
mistakes), converted and run against torchvision's arithmetic: an independent NCHW float64 numpy
reference of it here (torch's padding, strides, -inf max-pool padding, epsilon 1e-5), and torch's
own modules where torch is installed (the reference is checked against those too).

Tolerance: every stage output and the logits within 1e-5 relative (Frobenius) of the reference.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import generated_config, make_class_folders
from flaxtl import config_check, prepare, train
from flaxtl.errors import ConfigError
from flaxtl.models import create, resnet, torchvision_weights
from flaxtl.weights import WeightsError
from ml_collections import ConfigDict

TOL = 1e-5
STACKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # torchvision's layer1-4
STAGES = ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
          "conv5_block3_out")


def state_dict(num_classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
  """torchvision's resnet50().state_dict() keys and shapes, random values (He-scaled convs)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(key, o, i, k):
    sd[f"{key}.weight"] = (rng.standard_normal((o, i, k, k)) * np.sqrt(2 / (i * k * k))
                           ).astype(np.float32)

  def bn(key, c):
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{key}.running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{key}.num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  cin = 64
  for s, (width, blocks, _) in enumerate(STACKS, start=1):
    for b in range(blocks):
      p = f"layer{s}.{b}"
      conv(f"{p}.conv1", width, cin, 1)
      bn(f"{p}.bn1", width)
      conv(f"{p}.conv2", width, width, 3)
      bn(f"{p}.bn2", width)
      conv(f"{p}.conv3", 4 * width, width, 1)
      bn(f"{p}.bn3", 4 * width)
      if b == 0:
        conv(f"{p}.downsample.0", 4 * width, cin, 1)
        bn(f"{p}.downsample.1", 4 * width)
      cin = 4 * width
  sd["fc.weight"] = (rng.standard_normal((num_classes, 2048)) * 0.02).astype(np.float32)
  sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return sd


# --- torchvision's arithmetic in numpy (NCHW, float64) --------------------------------------------

def _conv(x, w, stride=1, pad=0):
  """torch.nn.functional.conv2d: cross-correlation, `pad` zeros on every side."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  o, _, kh, kw = w.shape
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], o, oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
  return out


def _bn(x, sd, key):
  f = lambda n: sd[f"{key}.{n}"].astype(np.float64)[None, :, None, None]  # noqa: E731
  return (x - f("running_mean")) / np.sqrt(f("running_var") + 1e-5) * f("weight") + f("bias")


def _max_pool(x):
  """nn.MaxPool2d(3, stride=2, padding=1): the padding is -inf."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max([x[:, :, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def numpy_reference(sd, images_nchw) -> dict[str, np.ndarray]:
  """{stage: NHWC output} and 'logits', computed as torchvision's ResNet.forward does."""
  relu = functools.partial(np.maximum, 0)
  out = {}
  x = relu(_bn(_conv(images_nchw.astype(np.float64), sd["conv1.weight"], 2, 3), sd, "bn1"))
  x = _max_pool(x)
  out["pool1_pool"] = x
  for s, (_, blocks, stride) in enumerate(STACKS, start=1):
    for b in range(blocks):
      p, st = f"layer{s}.{b}", stride if b == 0 else 1
      y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
      y = relu(_bn(_conv(y, sd[f"{p}.conv2.weight"], st, 1), sd, f"{p}.bn2"))  # v1.5: stride here
      y = _bn(_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
      short = (_bn(_conv(x, sd[f"{p}.downsample.0.weight"], st), sd, f"{p}.downsample.1")
               if b == 0 else x)
      x = relu(y + short)
    out[STAGES[s]] = x
  out["logits"] = x.mean(axis=(2, 3)) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
  return {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for k, v in out.items()}


def rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def flax_outputs(variables, images_nhwc) -> dict[str, np.ndarray]:
  model = resnet.ResNet50TV(include_top=True, num_classes=1000)
  logits, captured = model.apply(variables, images_nhwc, capture=STAGES)
  return {**{k: np.asarray(v) for k, v in captured.items()}, "logits": np.asarray(logits)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from safetensors.numpy import save_file
  tmp = tmp_path_factory.mktemp("tv_resnet")
  sd = state_dict()
  path = tmp / "resnet50_random.safetensors"
  save_file(sd, str(path))
  model = create(ConfigDict(dict(model=dict(name="resnet50_torchvision", head="gap", dtype="float32"))),
                 num_classes=1000)
  variables, meta = torchvision_weights.load(path, resnet.ResNet50TV(include_top=True,
                                                                     num_classes=1000))
  images = np.random.default_rng(1).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
  return sd, path, variables, meta, images, model


def test_converted_tensors_match_torchvision_arithmetic(converted):
  sd, path, variables, meta, images, _ = converted
  assert meta["source"] == "torchvision_safetensors" and meta["include_top"]
  assert meta["preprocessing"] == "torch"
  want = numpy_reference(sd, images)
  got = flax_outputs(variables, images.transpose(0, 2, 3, 1))
  for k in (*STAGES, "logits"):
    assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
    assert rel(got[k], want[k]) < TOL, (k, rel(got[k], want[k]))
  # Keras' ResNet50 (v1) on the same tensors is another network: the variant matters
  v1 = resnet.ResNet50(include_top=True, num_classes=1000)
  with pytest.raises(Exception):
    v1.apply(variables, images.transpose(0, 2, 3, 1))  # convs without bias: not v1's params


def test_torch_itself_agrees(converted, tmp_path):
  """With torch installed: torch's own modules (torchvision's ResNet-50 structure and module
  names, loaded strictly from the same state dict) give the reference's outputs, and a .pth
  written by torch.save converts like the .safetensors."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  sd, _, variables, _, images, _ = converted

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride, down):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(4 * width)
      self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
                                      nn.BatchNorm2d(4 * width)) if down else None

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

  class ResNet50(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for s, (width, blocks, stride) in enumerate(STACKS, start=1):
        mods = []
        for b in range(blocks):
          mods.append(Bottleneck(cin, width, stride if b == 0 else 1, b == 0))
          cin = 4 * width
        setattr(self, f"layer{s}", nn.Sequential(*mods))
      self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
      out = {}
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      out["pool1_pool"] = x
      for s in range(1, 5):
        x = getattr(self, f"layer{s}")(x)
        out[STAGES[s]] = x
      out["logits"] = self.fc(x.mean(dim=(2, 3)))
      return out

  net = ResNet50().double().eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in net(torch.from_numpy(images.astype(np.float64))).items()}
  ref = {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for k, v in ref.items()}
  mine = numpy_reference(sd, images)
  got = flax_outputs(variables, images.transpose(0, 2, 3, 1))
  for k in (*STAGES, "logits"):
    assert rel(mine[k], ref[k]) < 1e-12, k   # the numpy reference is torch's arithmetic
    assert rel(got[k], ref[k]) < TOL, (k, rel(got[k], ref[k]))
  pth = tmp_path / "resnet50_random.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  again, meta = torchvision_weights.load(pth, resnet.ResNet50TV(include_top=True,
                                                                num_classes=1000))
  assert meta["source"] == "torchvision_pth"
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_mistakes_name_the_file_and_what_to_do(converted, tmp_path):
  from safetensors.numpy import save_file
  sd, path, *_ = converted
  model = resnet.ResNet50TV(include_top=False, pooling="avg", num_classes=None)
  bad = {**sd, "layer5.0.conv1.weight": sd["conv1.weight"]}
  save_file(bad, str(tmp_path / "extra.safetensors"))
  with pytest.raises(WeightsError, match=r"extra\.safetensors.*'layer5\.0\.conv1\.weight'"):
    torchvision_weights.load(tmp_path / "extra.safetensors", model)
  short = {k: v for k, v in sd.items() if not k.startswith("layer3.2.bn2")}
  save_file(short, str(tmp_path / "short.safetensors"))
  with pytest.raises(WeightsError, match=r"short\.safetensors.*conv4_block3_2_bn"):
    torchvision_weights.load(tmp_path / "short.safetensors", model)
  # torchvision's file given to Keras' ResNet50, and the other way round
  keras_v1 = resnet.ResNet50(include_top=False, pooling="avg", num_classes=None)
  from flaxtl.models import keras_weights
  with pytest.raises(WeightsError, match="resnet50_torchvision"):
    keras_weights.load(path, keras_v1)
  h5 = tmp_path / "keras.h5"
  import h5py
  with h5py.File(h5, "w") as f:
    f.attrs["layer_names"] = [b"conv1_conv"]
  with pytest.raises(WeightsError, match="model.name='resnet50'"):
    torchvision_weights.load(h5, model)


def test_runs_through_the_product(converted, tmp_path):
  """config.model.name='resnet50_torchvision' with the file: trains conv5 on cached conv4
  features from torchvision's preprocessing, evaluates; without a file, a config error first."""
  from safetensors.numpy import save_file
  sd, *_ = converted
  notop = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  save_file(notop, str(tmp_path / "notop.safetensors"))
  root = make_class_folders(tmp_path / "data", per_class=8)
  config = generated_config(tmp_path, root, model="resnet50_torchvision", trainable="conv5",
                            feature_cache=True, epochs=1, head_init="random",
                            model__weights=str(tmp_path / "notop.safetensors"))
  setup = prepare.prepare(config, None, log_fn=lambda *a: None)
  assert setup.preprocessing == "torch" and setup.cached
  assert setup.freeze.boundary == "conv4_block6_out"
  assert setup.weights_meta["source"] == "torchvision_safetensors"
  res = train.train_and_evaluate(config, tmp_path / "run", setup=setup, log_fn=lambda *a: None)
  assert np.isfinite(res["val_loss"]) and 0 <= res["test_accuracy"] <= 1
  config.model.weights = ""
  with pytest.raises(ConfigError, match="torchvision's tensors"):
    config_check.check_config(config)
