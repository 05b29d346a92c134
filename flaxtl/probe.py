"""A linear classifier fitted to convergence on cached features: L2-regularised multinomial logistic
regression, full batch, L-BFGS (optax), the L2 strength chosen on the validation split.

Why: the head on frozen GAP features is a convex problem. Minibatch Adam at a fine-tuning LR
stops far from its optimum (the default head ended 10-16 points under this fit on unseen
datasets); L-BFGS reaches it in a second or two, deterministically. It is phase 1 of the recipe
(`trainable=head` is this fit alone) and the start of phase 2.

Features are standardised for the fit (good conditioning); the scaling is folded back into the
Dense kernel and bias, so the head stays a plain Dense on the raw features.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2 = (10.0, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)  # strong to weak: each starts at the last


@dataclasses.dataclass
class Probe:
  kernel: np.ndarray   # (features, classes), for the raw (unstandardised) features
  bias: np.ndarray
  l2: float
  val_accuracy: float
  val_loss: float
  table: list[dict]    # per L2: val accuracy and loss, train loss, iterations

  def logits(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) @ self.kernel + self.bias


def _objective(w, x, y, l2, num_classes):
  logits = x @ w["kernel"] + w["bias"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * l2 * jnp.sum(w["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _lbfgs(w, x, y, l2, *, num_classes: int, max_iter: int, tol: float = 1e-6):
  """Minimises the objective from `w`; stops at `max_iter` or when the gradient norm < tol."""
  fun = functools.partial(_objective, x=x, y=y, l2=l2, num_classes=num_classes)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    w, state, i, _ = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(w, updates), state, i + 1, optax.tree.norm(grad)

  def keep_going(carry):
    return (carry[2] < max_iter) & (carry[3] > tol)

  w, _, iters, _ = jax.lax.while_loop(keep_going, step, (w, opt.init(w), 0, jnp.inf))
  return w, iters, fun(w)


def _scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  return float((logp.argmax(1) == y).mean()), float(-logp[np.arange(len(y)), y].mean())


def fit(x_train, y_train, x_val, y_val, num_classes: int, l2_grid=DEFAULT_L2,
        max_iter: int = 300) -> Probe:
  """The fit for every L2 in `l2_grid` (warm-started); the best by validation (accuracy, then
  loss: the rule checkpoints use). Features are (N, D) float arrays."""
  x_train = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
  x_val = np.asarray(x_val, np.float64).reshape(len(x_val), -1)
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  z = jnp.asarray((x_train - mu) / sd, jnp.float32)
  zv = ((x_val - mu) / sd).astype(np.float32)
  y = jnp.asarray(y_train, jnp.int32)
  y_val = np.asarray(y_val)
  w = {"kernel": jnp.zeros((z.shape[1], num_classes), jnp.float32),
       "bias": jnp.zeros((num_classes,), jnp.float32)}
  table, best = [], None
  for l2 in l2_grid:
    w, iters, train_obj = _lbfgs(w, z, y, jnp.float32(l2), num_classes=num_classes,
                                 max_iter=max_iter)
    kernel, bias = np.asarray(w["kernel"]), np.asarray(w["bias"])
    acc, loss = _scores(zv @ kernel + bias, y_val)
    table.append({"l2": l2, "val_accuracy": acc, "val_loss": loss,
                  "train_objective": float(train_obj), "iterations": int(iters)})
    if best is None or (acc, -loss) > (best[0], -best[1]) and math.isfinite(loss):
      best = (acc, loss, l2, kernel, bias)
  acc, loss, l2, kernel, bias = best
  raw_kernel = (kernel / sd[:, None]).astype(np.float32)
  raw_bias = (bias - (mu / sd) @ kernel).astype(np.float32)
  return Probe(raw_kernel, raw_bias, l2, acc, loss, table)
