"""ResNet50, MobileNetV2, EfficientNetB0 and flaxtl.models.keras_weights: exact to Keras, float32.

Each Keras model is built once (weights=None, 64 px, fixed seed), every weight randomised with a
seeded numpy RNG (batch norm statistics included: Keras' 0/1 would hide mixed-up mean/variance or
epsilon), saved in the layouts Keras writes and in the official layout, read back with
`keras_weights.load` and run on the same batch. Error: max|flax - keras| / max|keras| (max norm).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import freezing
from flaxtl.models import efficientnet, keras_weights, mobilenet_v2, resnet
from flaxtl.preprocessing import preprocess
from flaxtl.weights import WeightsError

pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore::UserWarning")
SIZE, BATCH, CLASSES, TOL = 64, 2, 10, 1e-5
SPECS = {  # keras constructor, module, model class, flax-only options, level trained in test_train
    "resnet50": ("ResNet50", resnet, resnet.ResNet50, {}, "conv5"),
    "mobilenet_v2": ("MobileNetV2", mobilenet_v2, mobilenet_v2.MobileNetV2, {}, "block_13"),
    "efficientnet_b0": ("EfficientNetB0", efficientnet, efficientnet.EfficientNetB0,
                        {"stddev_rescaling": False, "dropout_rate": 0.0, "drop_connect_rate": 0.0},
                        "block6a"),
}
STEM_BN = {"resnet50": ("conv1_conv", "conv1_bn"), "mobilenet_v2": ("Conv1", "bn_Conv1"),
           "efficientnet_b0": ("stem_conv", "stem_bn")}
# Keras 2 weight names, as in the published files: DepthwiseConv2D's kernel was 'depthwise_kernel'.
KERAS2_NAMES = {"DepthwiseConv2D": ("depthwise_kernel",)}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def write_official(path, kmodel, include_top=True) -> Path:
  """The published files' layout: root attrs `layer_names` (every layer, in model order),
  `backend`, `keras_version`; per layer `weight_names` ('conv1_bn/gamma:0', ...) and datasets."""
  layers = [l for l in kmodel.layers if include_top or l.name != "predictions"]
  with h5py.File(path, "w") as f:
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
    f.attrs["layer_names"] = np.array([l.name.encode() for l in layers])
    for l in layers:
      g = f.create_group(l.name)
      kinds = KERAS2_NAMES.get(type(l).__name__) or [w.path.rsplit("/", 1)[-1] for w in l.weights]
      names = [f"{l.name}/{k}:0" for k in kinds]
      g.attrs["weight_names"] = np.array([n.encode() for n in names])
      for n, w in zip(names, l.get_weights()):
        g.create_dataset(n, data=w)
  return Path(path)


def randomize(kmodel, seed: int) -> None:
  """Every weight random (Keras' zero biases and 0/1 BN statistics would hide mix-ups)."""
  rng = np.random.default_rng(seed)
  for layer in kmodel.layers:
    ws = layer.get_weights()
    cls = type(layer).__name__
    if not ws:
      continue
    if cls == "BatchNormalization":
      c = ws[0].shape
      ws = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
            rng.uniform(0.5, 1.5, c)]
    elif cls == "Normalization":
      ws = [rng.uniform(0.3, 0.6, ws[0].shape), rng.uniform(0.05, 0.3, ws[1].shape), ws[2]]
    else:  # kernels keep Keras' random init; biases (zeros) get random values
      ws = ws[:1] + [rng.normal(0, 0.1, w.shape) for w in ws[1:]]
    layer.set_weights([np.asarray(w, np.float32) for w in ws])
    if cls == "Normalization":  # it computes with copies made at build: Keras' own loaders
      layer.finalize_state()      # refresh them, set_weights does not


def keras_layer(kmodel, name: str):
  """MobileNetV2's global average pooling is unnamed in Keras; flaxtl calls it avg_pool."""
  if name == "avg_pool" and "avg_pool" not in [l.name for l in kmodel.layers]:
    return next(l for l in kmodel.layers if type(l).__name__ == "GlobalAveragePooling2D")
  return kmodel.get_layer(name)


def bn_stats(kmodel) -> dict:
  """{BN layer: [moving_mean, moving_variance]}."""
  return {l.name: [np.array(w) for w in l.get_weights()[2:]] for l in kmodel.layers
          if type(l).__name__ == "BatchNormalization"}


@pytest.fixture(scope="module")
def keras(tmp_path_factory):
  """Keras imported with KERAS_HOME in a temp dir: importing it writes keras.json there."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    import keras
  return keras


def _reference(keras, tmp_path_factory, key: str) -> SimpleNamespace:
  """Keras model, its outputs (inference, and training above the test level's boundary), files."""
  kname, module, cls, options, level = SPECS[key]
  keras.utils.set_random_seed(0)
  kmodel = getattr(keras.applications, kname)(weights=None, input_shape=(SIZE, SIZE, 3),
                                              classes=CLASSES, classifier_activation=None)
  randomize(kmodel, seed=1)
  rgb = np.random.default_rng(2).uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
  x = {"caffe": lambda: preprocess(rgb, "caffe"), "tf": lambda: rgb / 127.5 - 1.0,
       "none": lambda: rgb}[module.describe().preprocessing]()
  model = cls(include_top=True, num_classes=CLASSES, **options)
  stages = [n for n in model.layers if n not in ("top_dropout", "predictions")]
  probe = keras.Model(kmodel.inputs, [keras_layer(kmodel, n).output for n in stages] +
                      [kmodel.output])
  outs = [keras.ops.convert_to_numpy(o) for o in probe(x, training=False)]
  tmp = tmp_path_factory.mktemp(key)
  files = {"official": write_official(tmp / "official.h5", kmodel),
           "notop": write_official(tmp / "official_notop.h5", kmodel, include_top=False),
           "keras3": tmp / "keras3.weights.h5"}
  kmodel.save_weights(files["keras3"])
  bn_config = {(l.epsilon, l.momentum) for l in kmodel.layers
               if type(l).__name__ == "BatchNormalization"}
  weighted = [l.name for l in kmodel.layers if l.weights]
  # Training with the stages up to the level's boundary frozen: Keras' BN in a layer with
  # trainable=False runs in inference mode; dropout off on both sides (it is random).
  boundary = module.describe().level_boundaries[level]
  before = bn_stats(kmodel)
  names = [l.name for l in kmodel.layers]
  for l in kmodel.layers[:names.index(boundary) + 1]:
    l.trainable = False
  for l in kmodel.layers:
    if type(l).__name__ == "Dropout":
      l.rate = 0.0
  train_out = keras.ops.convert_to_numpy(kmodel(x, training=True))
  return SimpleNamespace(
      key=key, module=module, model=model, kmodel_params=kmodel.count_params(), x=x,
      stages=stages, outs=dict(zip(stages, outs[:-1])), logits=outs[-1], files=files,
      bn_config=bn_config, weighted=weighted, boundary=boundary, stats_before=before,
      stats_after=bn_stats(kmodel), train_logits=train_out,
      variables=keras_weights.load(files["official"], model)[0])


FIXTURES = {"resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2_ref",
            "efficientnet_b0": "efficientnet_b0"}


def _fixture(key: str):
  @pytest.fixture(scope="module", name=FIXTURES[key])
  def reference(keras, tmp_path_factory):
    ref = _reference(keras, tmp_path_factory, key)
    yield ref
    shutil.rmtree(ref.files["official"].parent, ignore_errors=True)  # ResNet50's are 300 MB
  return reference


resnet50 = _fixture("resnet50")
mobilenet_v2_ref = _fixture("mobilenet_v2")
efficientnet_b0 = _fixture("efficientnet_b0")


def _ref(request, key):
  return request.getfixturevalue(FIXTURES[key])


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  return ([p for p, _ in la] == [p for p, _ in lb] and
          all(np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb)))


@pytest.mark.parametrize("key", SPECS)
def test_layouts_agree(request, key):
  """The official layout, Keras 3 `.weights.h5` with and without layer names, and the notop file
  all give the same variables; the notop file into a notop model, the same minus `predictions`."""
  ref = _ref(request, key)
  full = ref.variables
  assert set(full["params"]) | set(full["batch_stats"]) == set(ref.weighted)
  named, meta = keras_weights.load(ref.files["keras3"], ref.model)
  assert meta["source"] == "keras3_weights_h5" and meta["include_top"]
  assert _same(named, full)
  with h5py.File(ref.files["keras3"], "r+") as f:  # older Keras 3: only per-class object names
    for g in f["layers"].values():
      if "vars" in g:
        g["vars"].attrs.pop("name", None)
  assert _same(keras_weights.load(ref.files["keras3"], ref.model)[0], full)
  notop_model = ref.model.clone(include_top=False, num_classes=None)
  notop, meta = keras_weights.load(ref.files["notop"], notop_model)
  assert meta["source"] == "keras_h5" and not meta["include_top"]
  assert "predictions" not in notop["params"]
  assert _same(notop, {c: {k: v for k, v in t.items() if k != "predictions"}
                       for c, t in full.items()})
  # the full file into a model with a new head of another size: everything but `predictions`
  new_head = ref.model.clone(include_top=False, pooling="avg", num_classes=CLASSES + 1)
  assert _same(keras_weights.load(ref.files["official"], new_head)[0], notop)


@pytest.mark.parametrize("key", SPECS)
def test_parity(request, key):
  """Every stage output, the pooled features and the logits agree with Keras to < 1e-5."""
  ref = _ref(request, key)
  out, captured = jax.jit(lambda v, x: ref.model.apply(v, x, capture=ref.stages))(
      ref.variables, ref.x)
  errors = {}
  for name in ref.stages:
    want = ref.outs[name]
    assert captured[name].shape == want.shape, name
    assert np.isfinite(want).all() and np.abs(want).max() > 0, name
    errors[name] = rel(captured[name], want)
  errors["logits"] = rel(out, ref.logits)
  worst = max(errors, key=errors.get)
  print(f"\n{key}: max relative error {errors[worst]:.2e} (worst: {worst})")
  assert all(e < TOL for e in errors.values()), {k: e for k, e in errors.items() if e >= TOL}
  # The feature cache: starting after a boundary from its output gives the same logits.
  tail = jax.jit(lambda v, f: ref.model.apply(v, f, start_after=ref.boundary))
  assert rel(tail(ref.variables, captured[ref.boundary]), out) < 1e-6


@pytest.mark.parametrize("key", SPECS)
def test_train_mode_freezes_bn_up_to_the_boundary(request, key):
  """train=True, stop_gradient_after=boundary: BN stats of frozen stages are bit-identical, later
  ones change (as Keras' moving averages with those layers trainable=False, training=True); the
  logits match Keras'; frozen params get zero gradient."""
  ref = _ref(request, key)
  model, boundary = ref.model, ref.boundary

  @jax.jit
  def step(variables, x):
    def loss(params):
      out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             train=True, stop_gradient_after=boundary, mutable=["batch_stats"])
      return jnp.mean(out ** 2), (out, upd["batch_stats"])
    (_, (out, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return out, stats, grads

  out, stats, grads = step(ref.variables, ref.x)
  print(f"\n{key}: train-mode logits max relative error {rel(out, ref.train_logits):.2e}")
  # Batch statistics over 8 values per channel (2 images x 2x2 maps) are ill-conditioned: here
  # float32 itself (Keras' or ours) is up to ~5e-3 from float64. A wrong BN mode costs O(1).
  assert rel(out, ref.train_logits) < 1e-2
  layers = model.layers
  frozen = {n for s in layers[:layers.index(boundary) + 1]
            for n in ref.module.describe().parameter_layers.get(s, ())}
  assert frozen and set(ref.stats_before) - frozen
  for name in ref.stats_before:
    new, old = stats[name], ref.variables["batch_stats"][name]
    if name in frozen:
      assert np.array_equal(new["mean"], old["mean"]) and np.array_equal(new["var"], old["var"])
    else:
      assert not np.array_equal(new["mean"], old["mean"]), name
      k_mean, k_var = ref.stats_after[name]
      assert rel(new["mean"], k_mean) < 1e-5 and rel(new["var"], k_var) < 1e-5, name
  for name, g in grads.items():
    assert any(np.any(a) for a in jax.tree.leaves(g)) == (name not in frozen), name
  # From cached features (start_after): the same step, the same statistics.
  feats = jax.jit(lambda v, x: model.apply(v, x, stop_at=boundary))(ref.variables, ref.x)
  out2, upd = jax.jit(lambda v, f: model.apply(v, f, start_after=boundary, train=True,
                                               mutable=["batch_stats"]))(ref.variables, feats)
  assert rel(out2, out) < 1e-6
  assert all(rel(a, b) < 1e-6 for a, b in zip(jax.tree.leaves(upd["batch_stats"]),
                                               jax.tree.leaves(stats)))


@pytest.mark.parametrize("key", SPECS)
def test_batch_norm_formulas(request, key):
  """The first BN: eval = (x - moving_mean) / sqrt(moving_var + eps) * gamma + beta; train = the
  same with the batch's (biased) moments, and moving = momentum * moving + (1 - momentum) * batch;
  epsilon and momentum are those of every Keras BN layer."""
  ref = _ref(request, key)
  eps, momentum = ref.module.EPSILON, ref.module.MOMENTUM
  assert ref.bn_config == {(eps, momentum)}
  assert ref.module.describe().batch_norm == {"epsilon": eps, "momentum": momentum}
  conv, bn = STEM_BN[key]
  stem = ref.model.layers[0]
  p, s = ref.variables["params"][bn], ref.variables["batch_stats"][bn]
  for train in (False, True):
    _, upd = ref.model.apply(ref.variables, ref.x, stop_at=stem, train=train,
                             capture_intermediates=lambda m, _: m.name in (conv, bn),
                             mutable=["intermediates", "batch_stats"])
    x = np.asarray(upd["intermediates"][conv]["__call__"][0], np.float64)
    y = upd["intermediates"][bn]["__call__"][0]
    mean, var = (x.mean((0, 1, 2)), x.var((0, 1, 2))) if train else (s["mean"], s["var"])
    want = (x - mean) / np.sqrt(np.asarray(var, np.float64) + eps) * p["scale"] + p["bias"]
    assert rel(y, want) < 1e-5
    new = upd["batch_stats"][bn]
    if train:
      assert rel(new["mean"], momentum * s["mean"] + (1 - momentum) * mean) < 1e-5
      assert rel(new["var"], momentum * s["var"] + (1 - momentum) * var) < 1e-5
    else:
      assert np.array_equal(new["mean"], s["mean"])


@pytest.mark.parametrize("key", SPECS)
def test_description(request, key, monkeypatch):
  """describe(): Keras' published files and hashes, levels that freezing.plan resolves to the
  stated boundaries, parameter layers = Keras' layers with weights, parameter count = Keras'."""
  ref = _ref(request, key)
  d = ref.module.describe()
  from keras.src.applications import efficientnet as k_eff, mobilenet_v2 as k_mob, resnet as k_res
  if key == "resnet50":
    base, hashes = k_res.BASE_WEIGHTS_PATH, k_res.WEIGHTS_HASHES["resnet50"]
  elif key == "efficientnet_b0":
    base, hashes = k_eff.BASE_WEIGHTS_PATH, k_eff.WEIGHTS_HASHES["b0"]
  else:
    base, hashes = k_mob.BASE_WEIGHT_PATH, (None, None)
  for which, h in zip(("full", "notop"), hashes):
    w = d.keras_weights[which]
    assert w["url"] == base + w["file"] and w["hash"] == h
    assert w["hash_algorithm"] == (None if h is None else "md5")
  assert set(d.parameter_layers) == set(ref.module.parameter_layers(ref.model.layers))
  assert [n for s in ref.model.layers for n in d.parameter_layers.get(s, ())] == \
      [n for n, _ in ref.model.keras_layers()]
  assert [n for names in d.parameter_layers.values() for n in names] == ref.weighted  # same order
  count = sum(a.size for a in jax.tree.leaves(ref.variables))
  assert count == ref.kmodel_params - (key == "efficientnet_b0")  # Normalization's `count`
  monkeypatch.setattr(freezing, "parameter_layers", ref.module.parameter_layers)
  layers = ref.module.layer_names(include_top=False, pooling="avg", num_classes=CLASSES)
  assert d.layers == layers[:len(d.layers)] and set(d.cache_boundaries) <= set(d.layers)
  for level in d.stages[1:]:
    assert freezing.plan(level, layers).boundary == d.level_boundaries[level], level


def test_efficientnet_imagenet_quirk(keras, efficientnet_b0, monkeypatch):
  """Keras' weights='imagenet' model (with the extra `rescaling_1` by 1/sqrt(ImageNet std)), fed
  our official-layout notop file through Keras' own loader, equals stddev_rescaling=True."""
  from keras.src.applications import efficientnet as k_eff
  ref = efficientnet_b0
  monkeypatch.setattr(k_eff.file_utils, "get_file", lambda *a, **k: str(ref.files["notop"]))
  kmodel = keras.applications.EfficientNetB0(weights="imagenet", include_top=False,
                                             input_shape=(SIZE, SIZE, 3))
  assert "rescaling_1" in [l.name for l in kmodel.layers]
  want = keras.ops.convert_to_numpy(kmodel(ref.x, training=False))
  model = efficientnet.EfficientNetB0(include_top=False, num_classes=None)
  variables, _ = keras_weights.load(ref.files["notop"], model)
  got, stem = jax.jit(lambda v, x: model.apply(v, x, capture=["stem_activation"]))(variables, ref.x)
  assert rel(got, want) < TOL
  assert rel(stem["stem_activation"], ref.outs["stem_activation"]) > 0.1  # the rescaling matters


def test_errors_name_the_file_and_layer(mobilenet_v2_ref, resnet50, tmp_path):
  """Missing layer, missing weight, wrong shape, another architecture, a truncated file."""
  ref, model = mobilenet_v2_ref, mobilenet_v2_ref.model
  src = ref.files["notop"]

  def broken(name, edit) -> Path:
    path = tmp_path / name
    shutil.copy(src, path)
    with h5py.File(path, "r+") as f:
      edit(f)
    return path

  def drop_layer(f):
    f.attrs["layer_names"] = np.array([n for n in f.attrs["layer_names"]
                                       if n != b"block_3_project_BN"])
  path = broken("drop_layer.h5", drop_layer)
  with pytest.raises(WeightsError, match=rf"{path}: missing layer 'block_3_project_BN'"):
    keras_weights.load(path, model)

  def drop_weight(f):
    del f["block_3_project_BN/block_3_project_BN/moving_variance:0"]
  path = broken("drop_weight.h5", drop_weight)
  with pytest.raises(WeightsError, match=rf"{path}: layer 'block_3_project_BN': weight "
                                         r"'block_3_project_BN/moving_variance:0' is missing"):
    keras_weights.load(path, model)

  def bad_shape(f):
    key = "block_5_depthwise/block_5_depthwise/depthwise_kernel:0"
    data = f[key][()]
    del f[key]
    f[key] = data[:, :, :-8]
  path = broken("bad_shape.h5", bad_shape)
  with pytest.raises(WeightsError, match=rf"{path}: layer 'block_5_depthwise': 'kernel' has shape "
                                         r"\(3, 3, 184, 1\), MobileNetV2 needs \(3, 3, 192, 1\)"):
    keras_weights.load(path, model)
  with pytest.raises(WeightsError, match=r"unexpected layer 'conv1_conv'.*another architecture"):
    keras_weights.load(resnet50.files["notop"], model)
  path = tmp_path / "truncated.h5"
  path.write_bytes(src.read_bytes()[:4096])
  with pytest.raises(WeightsError, match=rf"{path}: cannot read the file"):
    keras_weights.load(path, model)
  with pytest.raises(WeightsError, match="no such file"):
    keras_weights.load(tmp_path / "absent.h5", model)


def test_official_file_is_fetched_into_keras_cache_then_reused(mobilenet_v2_ref, resnet50, tmp_path,
                                                               monkeypatch):
  """model.weights='' on a fresh machine: Keras' notop file is downloaded (here from 127.0.0.1)
  into Keras' cache, then read from there; the run's trunk equals Keras. A file whose hash is not
  Keras' published one (ResNet50's md5) is refused, naming the URL, and nothing is kept."""
  import ml_collections
  from conftest import http_server
  from flaxtl import models, prepare, weights
  served = tmp_path / "served"
  served.mkdir()
  for ref, name in ((mobilenet_v2_ref, "mobilenet_v2"), (resnet50, "resnet50")):
    official = models.description(name).keras_weights["notop"]["file"]
    shutil.copy(ref.files["notop"], served / official)
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

  def config(name):
    return ml_collections.ConfigDict({"model": {"name": name, "weights": "", "head": "gap",
                                                "dtype": "float32"}})
  model = models.create(config("mobilenet_v2"), CLASSES)
  with http_server(served) as url:
    monkeypatch.setenv(weights.BASE_URL_ENV, url)
    loaded, meta, mode = prepare.load_weights(config("mobilenet_v2"), model)
    with pytest.raises(WeightsError, match=rf"{url}/resnet50_weights.*notop\.h5"):
      prepare.load_weights(config("resnet50"), models.create(config("resnet50"), CLASSES))
  cache = tmp_path / "keras_home" / "models"
  assert [p.name for p in cache.iterdir()] == [
      models.description("mobilenet_v2").keras_weights["notop"]["file"]]
  assert mode == "tf" and meta["file"] == str(next(cache.iterdir()))
  again, meta2, _ = prepare.load_weights(config("mobilenet_v2"), model)  # no server now
  assert meta2["sha256"] == meta["sha256"] and _same(again, loaded)
  init = jax.tree.map(np.asarray, dict(model.init(jax.random.key(0), mobilenet_v2_ref.x)))
  variables = keras_weights.merge(init, loaded)  # the new head stays random
  got = model.apply(variables, mobilenet_v2_ref.x, stop_at="out_relu")
  assert rel(got, mobilenet_v2_ref.outs["out_relu"]) < TOL
