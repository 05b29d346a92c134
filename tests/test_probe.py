"""The closed-form probe reaches the logistic-regression optimum that an independent fit (scipy's
L-BFGS-B on an objective written here, not flaxtl's code) finds on the same features, with the
L2 chosen on valid the same way: on generated features always, and on the real Caltech-97 GAP
features (seed-0 split) when their cache is there. Few-shot ridge: the closed form it claims."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CALTECH
from flaxtl import data, features, probe, splitting


def independent_logreg(x, y, xv, yv, k, l2_grid=probe.DEFAULT_L2):
  """Multinomial logistic regression on standardised features, + 0.5 l2 |W|^2, by scipy's
  L-BFGS-B (warm-started along the grid); the L2 with the best (val accuracy, -val loss)."""
  from scipy.optimize import minimize
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z, zv = jnp.asarray((x - mu) / sd, jnp.float32), (xv - mu) / sd
  onehot = jax.nn.one_hot(y, k)

  @jax.jit
  def value_and_grad(theta, l2):
    def f(theta):
      w, b = theta[:-k].reshape(-1, k), theta[-k:]
      logp = jax.nn.log_softmax(z @ w + b)
      return -(onehot * logp).sum(1).mean() + 0.5 * l2 * (w ** 2).sum()
    return jax.value_and_grad(f)(theta)

  theta, best = np.zeros(z.shape[1] * k + k), None
  for l2 in l2_grid:
    fn = lambda t: tuple(np.asarray(v, np.float64) for v in  # noqa: E731
                         value_and_grad(jnp.asarray(t, jnp.float32), l2))
    theta = minimize(fn, theta, jac=True, method="L-BFGS-B",
                     options={"maxiter": 3000, "gtol": 1e-6, "ftol": 1e-12}).x
    logits = zv @ theta[:-k].reshape(-1, k) + theta[-k:]
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    acc, loss = float((logp.argmax(1) == yv).mean()), float(-logp[np.arange(len(yv)), yv].mean())
    if best is None or (acc, -loss) > (best[0], -best[1]):
      best = (acc, loss, l2)
  return best


def test_probe_matches_an_independent_fit_on_generated_features():
  rng = np.random.default_rng(0)
  k, d = 6, 48
  centres = rng.normal(size=(k, d)) * 0.6
  y, yv = rng.integers(0, k, 600), rng.integers(0, k, 200)
  x = centres[y] + rng.normal(size=(600, d)) * 1.5 + 3.0  # overlapping, off-centre, scaled
  xv = centres[yv] + rng.normal(size=(200, d)) * 1.5 + 3.0
  fit = probe.fit(x, y, xv, yv, k)
  acc, loss, l2 = independent_logreg(x, y, xv, yv, k)
  assert 0.4 < acc < 0.95  # a problem where the fit (and the L2) matters
  assert abs(fit.val_accuracy - acc) <= 0.005 and fit.l2 == l2
  assert fit.val_loss == pytest.approx(loss, rel=5e-3)


def _caltech_features():
  """Caltech-97's seed-0 GAP features in the feature cache ($FLAXTL_CACHE_DIR, as a run of the
  caltech101 config leaves them), found by the split's file fingerprint, or None."""
  cache = features.default_cache_dir()
  metas = {m: json.loads(m.read_text()) for m in cache.glob("*.json")} if cache.is_dir() else {}
  metas = {m: d for m, d in metas.items()
           if d.get("boundary") == "avg_pool" and d.get("image_size") == 224}
  if not metas or not CALTECH.is_dir():
    return None
  from flaxtl.configs import caltech101
  config = caltech101.get_config()
  classes = data.list_classes(CALTECH, config.data.exclude)
  splits, _ = splitting.split_class_folders(classes, config.data, config.data.split_seed)
  prints = {features.files_fingerprint(s.paths, s.labels): name for name, s in splits.items()}
  out = {prints[d["files"]]: (np.load(m.with_suffix(".npy")), splits[prints[d["files"]]].labels)
         for m, d in metas.items() if d.get("files") in prints}  # np.load: the cache is read only
  return out if {"train", "valid"} <= out.keys() else None


def test_probe_on_caltech97_reaches_the_independent_logistic_regression():
  """On the real features the independent fit covers flaxtl's chosen L2 and its two neighbours on
  the grid (the full grid independently: the same choice, 1e-3, and 0.8917; benchmarks/RESULTS.md),
  which keeps it to ~500 L-BFGS-B iterations."""
  found = _caltech_features()
  if found is None:
    pytest.skip("Caltech-97 GAP features not in $FLAXTL_CACHE_DIR (run the caltech101 config)")
  (x, y), (xv, yv) = found["train"], found["valid"]
  assert x.shape == (4343, 512) and xv.shape == (933, 512)
  fit = probe.fit(x, y, xv, yv, 97)
  i = probe.DEFAULT_L2.index(fit.l2)
  grid = probe.DEFAULT_L2[max(0, i - 1):i + 2]
  acc, loss, l2 = independent_logreg(x.astype(np.float64), y, xv.astype(np.float64), yv, 97, grid)
  assert l2 == fit.l2 and len(grid) == 3  # an optimum inside the grid, chosen alike
  assert abs(fit.val_accuracy - acc) <= 0.005, (fit.val_accuracy, acc)
  assert fit.val_loss == pytest.approx(loss, rel=0.01)


def test_ridge_is_the_closed_form_and_few_shot_draws_k_per_class():
  rng = np.random.default_rng(1)
  for n, d in ((60, 20), (12, 20)):  # primal and dual forms
    x, y = rng.normal(size=(n, d)) + 5, rng.integers(0, 3, n)
    xv, yv = rng.normal(size=(40, d)) + 5, rng.integers(0, 3, 40)
    t = 2 * np.eye(3)[y] - 1
    mu = x.mean(0)
    scale = np.sqrt(((x - mu) ** 2).mean())
    for l2 in (1e-3, 0.3):
      xc = (x - mu) / scale
      w = np.linalg.solve(xc.T @ xc + n * l2 * np.eye(d), xc.T @ (t - t.mean(0)))
      expect = ((((xv - mu) / scale) @ w + t.mean(0)).argmax(1) == yv).mean()
      assert probe.ridge_accuracies(x, y, xv, yv, 3, (l2,))[0] == pytest.approx(expect)
  centres = rng.normal(size=(4, 16)) * 3
  y, yv = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 10)
  x, xv = centres[y] + rng.normal(size=(120, 16)), centres[yv] + rng.normal(size=(40, 16))
  seen = []
  real = probe.ridge_accuracies
  probe.ridge_accuracies = lambda a, b, *r, **k: seen.append(np.bincount(b)) or real(a, b, *r, **k)
  try:
    doc = probe.few_shot(x, y, xv, yv, 4, shots=(1, 5), seed=0, draws=2)
  finally:
    probe.ridge_accuracies = real
  assert [list(c) for c in seen] == [[1] * 4] * 2 + [[5] * 4] * 2
  assert doc == probe.few_shot(x, y, xv, yv, 4, shots=(1, 5), seed=0, draws=2)  # seeded
  assert doc["5"]["mean"] >= 0.9 and len(doc["1"]["draws"]) == 2
