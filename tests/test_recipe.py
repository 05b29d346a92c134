"""The fine-tuning recipe: phase 1 fits the head to the logistic-regression optimum, phase 2 trains
the unfrozen layers from it; per-group learning rates, label smoothing, early stopping, and exact
resume in either phase. Generated data, VGG16 with random weights: nothing from ../shared."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import generated_config, make_class_folders, random_vgg16_file
from flaxtl import checkpointing, freezing, mixing, optim, probe, train
from flaxtl.step import create_train_state, jit_train_step, loss_terms, train_step, zero_metrics
from flaxtl.configs import default
from flaxtl.models import VGG16, vgg
from flaxtl.prepare import prepare

QUIET = dict(log_fn=lambda *a: None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("recipe")
  root = make_class_folders(tmp / "data", per_class=20)
  random_vgg16_file(tmp / "vgg16_random.msgpack")
  return tmp, root


@pytest.fixture(scope="module")
def hard(world):
  """Classes that overlap (faint shapes in strong noise): the probe's L2 choice matters."""
  tmp, _ = world
  return tmp, make_class_folders(tmp / "hard", per_class=40, seed=1, mislabeled=0.3)


def _independent_probe(x, y, xv, yv, k, l2_grid):
  """Multinomial logistic regression with scipy's L-BFGS-B in float64 (not flaxtl's code): the
  same objective on standardised features, L2 chosen by (val accuracy, then val loss)."""
  from scipy.optimize import minimize
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z, zv = (x - mu) / sd, (xv - mu) / sd
  onehot = np.eye(k)[y]
  best = None
  for l2 in l2_grid:
    def f(theta):
      w, b = theta[:-k].reshape(-1, k), theta[-k:]
      logits = z @ w + b
      logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
      p = np.exp(logp)
      loss = -(onehot * logp).sum(1).mean() + 0.5 * l2 * (w ** 2).sum()
      g = (p - onehot) / len(y)
      return loss, np.concatenate([(z.T @ g + l2 * w).ravel(), g.sum(0)])
    theta = minimize(f, np.zeros(z.shape[1] * k + k), jac=True, method="L-BFGS-B",
                     options={"maxiter": 5000, "gtol": 1e-10}).x
    logits = zv @ theta[:-k].reshape(-1, k) + theta[-k:]
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    acc, loss = (logp.argmax(1) == yv).mean(), -logp[np.arange(len(yv)), yv].mean()
    if best is None or (acc, -loss) > (best[0], -best[1]):
      best = (acc, loss, l2)
  return best


def _power_normalize(x, eps=1e-3):
  """sqrt, then L2 to unit RMS, in float64 numpy (independent of flaxtl's model code)."""
  x = np.sign(x) * (np.sqrt(np.abs(x) + eps) - np.sqrt(eps))
  return x * np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("head", ["gap", "gap_norm"])
def test_head_only_run_reaches_the_logistic_regression_probe(hard, head):
  """trainable='head' with the default recipe = phase 1 alone: its validation accuracy equals an
  independent logistic-regression fit on the same features (within 1 point); with 'gap_norm' the
  fit sees the power-normalised GAP features, as the head does."""
  tmp, root = hard
  config = generated_config(tmp, root, trainable="head", **{"model.head": head})
  setup = prepare(config, tmp / head, **QUIET)
  res = train.train_and_evaluate(config, tmp / head, setup=setup, **QUIET)
  assert res["best_step"] == 0  # no minibatch steps: the fitted head is the run's result
  assert setup.freeze.boundary == "avg_pool"  # one GAP cache for both heads
  x, y = setup.feeders["train"].inputs.astype(np.float64), setup.feeders["train"].labels
  xv, yv = setup.feeders["valid"].inputs.astype(np.float64), setup.feeders["valid"].labels
  if head == "gap_norm":
    x, xv = _power_normalize(x), _power_normalize(xv)
  acc, loss, l2 = _independent_probe(x, y, xv, yv, 3, probe.DEFAULT_L2)
  assert abs(res["val_accuracy"] - acc) <= 0.01, (res["val_accuracy"], acc)
  assert setup.head_fit["l2"] == l2
  assert res["val_loss"] == pytest.approx(loss, rel=1e-2)
  assert 0.4 < acc < 1.0 and loss > 0.05  # a problem where the fit matters, not a separable one


def _params(workdir):
  mngr = checkpointing.manager(workdir, read_only=True)
  step = mngr.latest_step()
  tree = ocp.StandardCheckpointer().restore(workdir.resolve() / "checkpoints" / f"{step}/default")
  return step, jax.tree.map(np.asarray, tree["params"])


def _stop_at(step: int):
  calls = iter(range(10**6))
  return lambda: next(calls) >= step


def test_two_phase_run_resumes_bit_exactly(world, monkeypatch):
  """Killed in phase 1 (before its checkpoint) and in phase 2 (mid-epoch): the resumed run ends
  with the uninterrupted run's params, bit for bit, and its metrics. With the imbalance options
  on (the balanced sampler draws with replacement from (seed, epoch); the class weights, here
  all 1 on balanced data, go through the weighted loss; the best epoch by val macro-F1), which
  the shuffle path's resume tests (test_reliability) leave out."""
  tmp, root = world
  config = generated_config(tmp, root, epochs=2, checkpoint_every_steps=3,
                            label_smoothing=0.1, mixup_alpha=0.4,
                            optimizer__lr_mults="predictions:3", optimizer__plateau_patience=1,
                            data__sampler="balanced", class_weight="balanced",
                            select_best_by="macro_f1")
  train.train_and_evaluate(config, tmp / "ref", **QUIET)
  real = probe.fit
  monkeypatch.setattr(probe, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
  with pytest.raises(KeyboardInterrupt):  # phase 1 dies: config.json written, no checkpoint
    train.train_and_evaluate(config, tmp / "run", **QUIET)
  monkeypatch.setattr(probe, "fit", real)
  with pytest.raises(train.Preempted) as e:  # phase 2 dies mid-epoch 1 (6 steps an epoch)
    train.train_and_evaluate(config, tmp / "run", resume=True, stop_requested=_stop_at(4),
                             **QUIET)
  assert e.value.step == 4
  train.train_and_evaluate(config, tmp / "run", resume=True, **QUIET)
  (sa, pa), (sb, pb) = _params(tmp / "ref"), _params(tmp / "run")
  assert sa == sb
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("seconds",  # noqa: E731
                      "images_per_s")} for l in (p / "metrics.jsonl").read_text().splitlines()]
  assert strip(tmp / "run") == strip(tmp / "ref")
  assert strip(tmp / "ref")[0]["phase"] == 1


def test_mixup_mixes_rows_with_their_partners_and_the_loss_mixes_targets():
  """The mixed rows are lam x + (1 - lam) x[perm]; a row whose partner is padding stays as it
  was; the same (rng) gives the same mix; the loss is the cross-entropy against mixed targets."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3, 3, 2)).astype(np.float32)
  labels, mask = np.array([0, 1, 2, 3, 0, 1]), np.array([1, 1, 1, 1, 1, 0], np.float32)
  key = jax.random.key(7)
  mixed, (partner, lam) = mixing.mixup(key, jnp.asarray(x), jnp.asarray(labels), mask, 0.4)
  again, _ = mixing.mixup(key, jnp.asarray(x), jnp.asarray(labels), mask, 0.4)
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(again))
  k1, k2 = jax.random.split(key)
  perm = np.asarray(jax.random.permutation(k2, 6))
  l0 = float(jax.random.beta(k1, 0.4, 0.4))
  lam_row = np.where(mask[perm] > 0, l0, 1.0)
  np.testing.assert_allclose(np.asarray(lam), lam_row, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(partner), labels[perm])
  want = lam_row[:, None, None, None] * x + (1 - lam_row[:, None, None, None]) * x[perm]
  np.testing.assert_allclose(np.asarray(mixed), want, rtol=1e-5, atol=1e-6)
  assert 0 < l0 < 1 and (lam_row < 1).any()
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  total, _, count = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask, 0.0,
                                     (jnp.asarray(labels[perm]), jnp.asarray(lam_row)))
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  per_row = [-(lam_row[i] * logp[i, labels[i]] + (1 - lam_row[i]) * logp[i, labels[perm][i]])
             for i in range(5)]
  assert float(count) == 5 and float(total) == pytest.approx(sum(per_row), rel=1e-5)


def test_power_normalize_is_its_closed_form_with_finite_gradients():
  x = np.abs(np.random.default_rng(0).normal(size=(4, 16))).astype(np.float32)
  x[0, :5] = 0.0  # GAP channels that are exactly 0 (dead ReLUs): the gradient must stay finite
  np.testing.assert_allclose(np.asarray(vgg.power_normalize(jnp.asarray(x))),
                             _power_normalize(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda v: jnp.sum(vgg.power_normalize(v) * jnp.arange(16.0)))(jnp.asarray(x))
  assert np.isfinite(np.asarray(g)).all()


def test_lr_mults_scale_each_groups_update():
  """SGD without momentum: update = -lr x mult x grad, per group; frozen leaves stay put."""
  model = VGG16(include_top=False, pooling="avg", num_classes=3)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
  c = default.get_config()
  c.optimizer.name, c.optimizer.momentum = "sgd", 0.0
  c.optimizer.lr_mults = "^predictions:10,block5_conv3/bias:0"
  plan = freezing.plan("block5", model.layers)
  tx = optim.create(c, params, plan, 0.01)
  grads = jax.tree.map(lambda p: np.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expect = {"predictions": -0.1, "block5_conv1": -0.01, "block5_conv3": -0.01, "block4_conv3": 0.0}
  for layer, value in expect.items():
    np.testing.assert_allclose(updates[layer]["kernel"], value, rtol=1e-6)
  np.testing.assert_array_equal(updates["block5_conv3"]["bias"], 0.0)
  np.testing.assert_allclose(updates["predictions"]["bias"], -0.1, rtol=1e-6)
  with pytest.raises(Exception, match="lr_mults"):
    c.optimizer.lr_mults = "predictions"
    optim.check(c)


def test_label_smoothing_loss_equals_its_closed_form():
  rng = np.random.default_rng(0)
  logits, labels, a, k = rng.normal(size=(5, 4)).astype(np.float32), np.array([0, 3, 1, 1, 2]), 0.2, 4
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  total, correct, count = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask, a)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  on, off = 1 - a + a / k, a / k
  per_row = [-(on * logp[i, labels[i]] + off * (logp[i].sum() - logp[i, labels[i]]))
             for i in range(5)]
  assert float(total) == pytest.approx(sum(per_row[:4]), rel=1e-6)
  assert float(count) == 4 and float(correct) == sum(logp[i].argmax() == labels[i] for i in range(4))
  plain, _, _ = loss_terms(jnp.asarray(logits), jnp.asarray(labels), mask, 0.0)
  assert float(plain) == pytest.approx(-sum(logp[i, labels[i]] for i in range(4)), rel=1e-6)


def test_early_stopping_stops_and_keeps_the_best_step(world):
  """A learning rate that wrecks the fitted head: no epoch beats phase 1, so the run stops after
  `patience` epochs, and the best step (phase 1's) is the one evaluated."""
  tmp, root = world
  config = generated_config(tmp, root, epochs=20, early_stopping_patience=2,
                            optimizer__learning_rate=0.5, optimizer__name="sgd")
  res = train.train_and_evaluate(config, tmp / "early", **QUIET)
  history = [json.loads(l) for l in (tmp / "early" / "metrics.jsonl").read_text().splitlines()]
  best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
  assert len(history) < 21 and history[-1]["epoch"] - best["epoch"] == 2
  assert res["best_step"] == best["step"] and res["val_accuracy"] == best["val_accuracy"]


def test_reduce_on_plateau_follows_the_val_loss_and_scales_the_updates(world):
  """The LR scale each epoch ran with equals Keras' ReduceLROnPlateau rule replayed here on the
  recorded val losses; a scaled state's update is the scale times the unscaled one."""
  tmp, root = world
  config = generated_config(tmp, root, epochs=5, optimizer__learning_rate=0.5,
                            optimizer__name="sgd", optimizer__plateau_patience=1,
                            optimizer__plateau_factor=0.5)
  res = train.train_and_evaluate(config, tmp / "plateau", **QUIET)
  history = [json.loads(l) for l in (tmp / "plateau" / "metrics.jsonl").read_text().splitlines()]
  epochs = [r for r in history if r.get("phase") != 1]
  scale, best, waited, want = 1.0, np.inf, 0, []
  for r in epochs:
    want.append(scale)
    if r["val_loss"] < (1 - 1e-4) * best:
      best, waited = r["val_loss"], 0
    else:
      waited += 1
      if waited == 1:
        scale, waited = scale * 0.5, 0
  assert [r["lr_scale"] for r in epochs] == pytest.approx(want)
  assert min(want) < 1.0  # the rule fired: this run had an epoch without a better val loss
  state = res["state"]
  x = np.random.default_rng(0).random((2, 2, 2, 512), np.float32)  # block4_pool at 32 px
  batch = {"x": jnp.asarray(x), "label": jnp.asarray([0, 1]), "mask": jnp.ones(2)}
  half = state.replace(plateau=state.plateau._replace(scale=jnp.asarray(0.25, jnp.float32)))
  one = state.replace(plateau=state.plateau._replace(scale=jnp.asarray(1.0, jnp.float32)))
  step = lambda s: train_step(s, zero_metrics(), batch, jax.random.key(0))[0]  # noqa: E731
  for a, b, p in zip(jax.tree.leaves(step(half).params), jax.tree.leaves(step(one).params),
                     jax.tree.leaves(state.params)):
    full = np.asarray(b) - np.asarray(p)  # differences of float32 params: cancellation ~1e-7
    np.testing.assert_allclose(np.asarray(a) - np.asarray(p), 0.25 * full, rtol=1e-3,
                               atol=1e-6 + 1e-4 * np.abs(full).max())


def test_ema_equals_an_independent_computation_and_is_what_is_evaluated(world):
  """The EMA kept in the train state equals one computed here from the params after each step;
  the run evaluates, checkpoints and exports the EMA weights."""
  from flaxtl import evaluate, inference, parallel
  tmp, root = world
  config = generated_config(tmp, root, epochs=1, ema_decay=0.9, optimizer__name="sgd",
                            optimizer__learning_rate=0.05)
  setup = prepare(config, tmp / "ema_steps", **QUIET)
  mesh = parallel.global_mesh()
  rep = parallel.replicated(mesh)
  state = jax.device_put(create_train_state(setup, 0.05), rep)
  metrics, fn = jax.device_put(zero_metrics(), rep), jit_train_step(mesh, 0.0, 0.9)
  ema = jax.tree.map(np.asarray, setup.params)
  batches = setup.feeders["train"].epoch(8, seed=0, epoch=0, shuffle=True)
  for t, batch in zip(range(4), batches):
    state, metrics = fn(state, metrics, parallel.put_batch(batch, mesh), jax.random.key(0))
    d = min(0.9, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.ema_params), ema)
  assert not np.allclose(state.ema_params["predictions"]["kernel"],
                         state.params["predictions"]["kernel"])
  res = train.train_and_evaluate(config, tmp / "ema_run", **QUIET)
  pred = inference.load(tmp / "ema_run")
  _, tree = _params_item(tmp / "ema_run", res["best_step"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), pred.params,
               tree["ema_params"])
  doc = evaluate.evaluate(tmp / "ema_run", "test", write=False)
  assert doc["correct"] == res["test_correct"]


def _params_item(workdir, step):
  tree = ocp.StandardCheckpointer().restore(workdir.resolve() / "checkpoints" / f"{step}/default")
  return step, jax.tree.map(np.asarray, tree)


def _mix(start, end, a):
  """WiSE-FT's mix in float64 numpy, independent of flaxtl's code."""
  return jax.tree.map(lambda s, e: (1 - a) * np.asarray(s, np.float64) + a * np.asarray(e, np.float64),
                      start, end)


def test_wise_ft_evaluates_each_mix_and_keeps_one_only_when_it_beats_every_epoch(world):
  """After phase 2, each config.wise_alphas mix of phase 1 and phase 2's end is evaluated on
  valid; the figures equal an independent evaluation of the mix computed here, frozen layers stay
  bit-identical, and the run's best step follows the rule: the mix's checkpoint (what the verbs
  load) when it ranks above every epoch, else the best epoch's, with no extra checkpoint."""
  from flaxtl import evaluate, inference, wise_ft
  from flaxtl.workdir import rank
  tmp, root = world
  config = generated_config(tmp, root, epochs=2, wise_alphas=(0.25, 0.5, 0.75))
  setup = prepare(config, tmp / "wise", **QUIET)
  start = jax.tree.map(np.asarray, setup.variables)
  res = train.train_and_evaluate(config, tmp / "wise", setup=setup, **QUIET)
  end = jax.tree.map(np.asarray, res["state"].eval_variables)
  total = int(res["state"].step)
  for row in res["wise_ft"]["path"]:
    mixed = wise_ft.mix(setup.variables, res["state"].eval_variables, row["alpha"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), mixed,
                 _mix(start, end, row["alpha"]))
    np.testing.assert_array_equal(mixed["params"]["block1_conv1"]["kernel"],
                                  start["params"]["block1_conv1"]["kernel"])
    val = evaluate.evaluate_split(setup.network.logits, _mix(start, end, row["alpha"]),
                                  setup.feeders["valid"], 16)
    assert row["val_accuracy"] == pytest.approx(val["accuracy"])
    assert row["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
  history = [json.loads(l) for l in (tmp / "wise" / "metrics.jsonl").read_text().splitlines()]
  top = max(res["wise_ft"]["path"], key=rank)
  steps = sorted(checkpointing.manager(tmp / "wise", read_only=True).all_steps())
  if rank(top) > rank(max(history, key=rank)):
    assert res["wise_ft"]["alpha"] == top["alpha"] and res["best_step"] == total + 1
    assert res["val_accuracy"] == top["val_accuracy"] and total + 1 in steps
    pred = inference.load(tmp / "wise")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.tree.map(np.asarray, pred.params), _mix(start, end, top["alpha"])["params"])
  else:
    assert res["wise_ft"]["alpha"] is None and total + 1 not in steps
    assert res["best_step"] == max(history, key=rank)["step"]
  print("wise branch:", res["wise_ft"]["alpha"], [r["val_accuracy"] for r in history])


def test_wise_ft_mix_that_wins_is_the_runs_model_and_a_resume_keeps_it(world):
  """A phase 2 that wrecked the head (its kernel and bias negated: argmax turned into argmin):
  the 0.25 mix is the fitted head at half scale, so it classifies as phase 1 and beats the epoch.
  It is saved after the end step with its alpha; a --resume of the finished run trains nothing
  and reports the mix, and the predictor loads it."""
  from flaxtl import evaluate, inference, parallel, wise_ft
  from flaxtl.workdir import RANKED, Recorder
  tmp, root = world
  config = generated_config(tmp, root, epochs=1, wise_alphas=(0.25,))
  wd = tmp / "wise_win"
  setup = prepare(config, wd, **QUIET)
  state = jax.device_put(create_train_state(setup, 1e-3),
                         parallel.replicated(parallel.global_mesh()))
  wrecked = state.replace(params={**state.params, "predictions": jax.tree.map(
      lambda x: -x, state.params["predictions"])})
  val = evaluate.evaluate_split(setup.network.logits, wrecked.eval_variables,
                                setup.feeders["valid"], 16)
  spe = setup.feeders["train"].steps(config.batch_size)
  mngr = checkpointing.manager(wd)
  recorder = Recorder(wd, None)
  recorder.epoch({"epoch": 0, "step": spe, **train.val_fields(val, config)})
  checkpointing.save(mngr, spe, wrecked, {k: recorder.history[-1][k] for k in RANKED})
  out = wise_ft.search(setup, wrecked, mngr, recorder, spe, train.val_fields, QUIET["log_fn"])
  phase1 = evaluate.evaluate_split(setup.network.logits, setup.variables, setup.feeders["valid"], 16)
  assert out["alpha"] == 0.25 and out["path"][0]["val_accuracy"] == phase1["accuracy"] > val["accuracy"]
  assert checkpointing.best_step(mngr) == spe + 1
  assert wise_ft.record(mngr, spe + 1)["wise_ft"] == {"alpha": 0.25, "end_step": spe, "epoch": 0}
  mngr.close()
  before = (wd / "metrics.jsonl").read_text()
  res = train.train_and_evaluate(config, wd, resume=True, setup=setup, **QUIET)
  assert res["best_step"] == spe + 1 and "wise_ft" not in res  # nothing searched again
  assert res["val_accuracy"] == out["path"][0]["val_accuracy"]
  assert (wd / "metrics.jsonl").read_text() == before  # nothing trained
  longer = generated_config(tmp, root, epochs=3, wise_alphas=(0.25,))
  with pytest.raises(train.RunError, match="ended with its WiSE-FT mix"):
    train.train_and_evaluate(longer, wd, resume=True, setup=setup, **QUIET)
  half = jax.tree.map(lambda x: 0.5 * np.asarray(x), state.params["predictions"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               jax.tree.map(np.asarray, inference.load(wd).params["predictions"]), half)
  assert wise_ft.check(generated_config(tmp, root, wise_alphas=(0.5, 1.0))) is not None
  assert wise_ft.check(config) is None
