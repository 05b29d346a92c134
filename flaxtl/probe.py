"""A linear classifier fitted to convergence on cached features: L2-regularised multinomial logistic
regression, full batch, L-BFGS (optax), the L2 strength chosen on the validation split.

Why: the head on frozen GAP features is a convex problem. Minibatch Adam at a fine-tuning LR
stops far from its optimum (the default head ended 10-16 points under this fit on unseen
datasets); L-BFGS reaches it in a second or two, deterministically. It is phase 1 of the recipe
(`trainable=head` is this fit alone) and the start of phase 2.

Features are standardised for the fit (good conditioning); the scaling is folded back into the
Dense kernel and bias, so the head stays a plain Dense on the raw features.

The same fit, run on every training run's cached GAP features whatever its head init, is the bar
a fine-tune must beat (`report`). `few_shot` adds how far k labelled images per class go on the
same features: closed-form ridge regression, as big_vision's few-shot evaluator.
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
  table: list[dict]    # per L2: val accuracy, loss and macro-F1, train objective, iterations
  val_macro_f1: float = 0.0

  def logits(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) @ self.kernel + self.bias


def bias_scale(l2: float, num_classes: int) -> float:
  """The bias is optimised as bias / c (the same optimum): unpenalised, its curvature (~1/classes
  at the start) sits far below the kernel's (l2 + the same), and L-BFGS crawled along it; c
  evens them (Caltech-97: 13 iterations instead of 113 at L2=10, 412 instead of 666 over the
  grid, the same fits)."""
  return math.sqrt(1.0 + l2 * num_classes)


def _objective(w, x, y, l2, num_classes, c=1.0, sw=None):
  """Mean cross-entropy (each example's weighted by `sw`, its class weight) + L2 on the kernel."""
  logits = x @ w["kernel"] + c * w["bias"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  ce = ce.mean() if sw is None else jnp.mean(sw * ce)
  return ce + 0.5 * l2 * jnp.sum(w["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _lbfgs(w, x, y, l2, c, sw=None, *, num_classes: int, max_iter: int, tol: float):
  """Minimises the objective from `w`; stops at `max_iter` or when the gradient norm < tol."""
  fun = functools.partial(_objective, x=x, y=y, l2=l2, num_classes=num_classes, c=c, sw=sw)
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


def _scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  from flaxtl.evaluate import macro_f1
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  pred = logp.argmax(1)
  return (float((pred == y).mean()), float(-logp[np.arange(len(y)), y].mean()),
          macro_f1(y, pred, logits.shape[1]))


def fit(x_train, y_train, x_val, y_val, num_classes: int, l2_grid=DEFAULT_L2,
        max_iter: int = 300, tol: float = 1e-4, class_weight=None,
        select_by: str = "accuracy") -> Probe:
  """The fit for every L2 in `l2_grid` (warm-started); the best by validation (accuracy, or
  macro-F1 with select_by='macro_f1', then loss: the rule checkpoints use; val figures are
  unweighted). Features are (N, D) float arrays. `class_weight` (one per class, e.g.
  data.class_weights) weights each example's loss, as phase 2's loss does.

  `tol` (gradient norm of the mean loss on standardised features): 1e-4 gives the same choice
  and val accuracy as 1e-6 on Caltech-97 in a fifth of the iterations (420 against 1,932, with
  `bias_scale`); 3e-4 already chose another L2."""
  x_train = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
  x_val = np.asarray(x_val, np.float64).reshape(len(x_val), -1)
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  z = jnp.asarray((x_train - mu) / sd, jnp.float32)
  zv = ((x_val - mu) / sd).astype(np.float32)
  y = jnp.asarray(y_train, jnp.int32)
  y_val = np.asarray(y_val)
  sw = None if class_weight is None else jnp.asarray(np.asarray(class_weight)[y_train], jnp.float32)
  w = {"kernel": jnp.zeros((z.shape[1], num_classes), jnp.float32),
       "bias": jnp.zeros((num_classes,), jnp.float32)}
  table, best, c_prev = [], None, 1.0
  for l2 in l2_grid:
    c = bias_scale(l2, num_classes)
    w = {"kernel": w["kernel"], "bias": w["bias"] * (c_prev / c)}  # the same bias, warm
    w, iters, train_obj = _lbfgs(w, z, y, jnp.float32(l2), jnp.float32(c), sw,
                                 num_classes=num_classes, max_iter=max_iter, tol=tol)
    c_prev = c
    kernel, bias = np.asarray(w["kernel"]), np.asarray(w["bias"]) * c
    acc, loss, f1 = _scores(zv @ kernel + bias, y_val)
    table.append({"l2": l2, "val_accuracy": acc, "val_loss": loss, "val_macro_f1": f1,
                  "train_objective": float(train_obj), "iterations": int(iters)})
    key = (f1 if select_by == "macro_f1" else acc, -loss)
    if best is None or key > best[0] and math.isfinite(loss):
      best = (key, acc, loss, f1, l2, kernel, bias)
  _, acc, loss, f1, l2, kernel, bias = best
  raw_kernel = (kernel / sd[:, None]).astype(np.float32)
  raw_bias = (bias - (mu / sd) @ kernel).astype(np.float32)
  return Probe(raw_kernel, raw_bias, l2, acc, loss, table, f1)


# ---------------------------------------------------------------------------------------------
# Few-shot: k images per class, closed-form ridge regression (big_vision's few-shot evaluator).

RIDGE_L2 = tuple(10.0 ** e for e in np.arange(-4.0, 3.01, 0.5))  # per image, unit-RMS features


def ridge_accuracies(x_train, y_train, x_val, y_val, num_classes: int,
                     l2_grid=RIDGE_L2) -> np.ndarray:
  """Val accuracy of ridge regression onto +-1 one-hot targets, for every L2 at once.

  One symmetric eigendecomposition of the smaller Gram matrix (features x features, or images x
  images when there are fewer images: the dual) serves every L2. (Not an SVD: LAPACK's SVD under
  OpenBLAS threads ran 20x slower than `eigh` on a loaded 2-core machine.) Features are centred
  and scaled by one number (their RMS), which keeps their geometry and is stable on a handful of
  images; the bias is the targets' mean."""
  x = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
  xv = np.asarray(x_val, np.float64).reshape(len(x_val), -1)
  mu = x.mean(0)
  scale = np.sqrt(np.mean((x - mu) ** 2)) + 1e-12
  xc, xvc = (x - mu) / scale, (xv - mu) / scale
  t = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
  t_mean = t.mean(0)
  n, d = xc.shape
  if n >= d:  # W = V diag(1 / (e + n l2)) V^T X^T T, with X^T X = V diag(e) V^T
    e, v = np.linalg.eigh(xc.T @ xc)
    a, b = xvc @ v, v.T @ (xc.T @ (t - t_mean))
  else:       # W = X^T U diag(1 / (e + n l2)) U^T T, with X X^T = U diag(e) U^T
    e, u = np.linalg.eigh(xc @ xc.T)
    a, b = (xvc @ xc.T) @ u, u.T @ (t - t_mean)
  e = np.maximum(e, 0.0)
  y_val = np.asarray(y_val)
  return np.asarray([float(((a @ (b / (e + n * l2)[:, None]) + t_mean).argmax(1) == y_val).mean())
                     for l2 in l2_grid])


def few_shot(x_train, y_train, x_val, y_val, num_classes: int, shots=(1, 5, 10), seed: int = 0,
             draws: int = 5, l2_grid=RIDGE_L2) -> dict:
  """{shots: val accuracy mean/std over `draws` seeded draws of `shots` training images per class
  (all of a class's images when it has fewer)}, the L2 chosen on val per draw. Milliseconds."""
  y_train = np.asarray(y_train)
  by_class = [np.flatnonzero(y_train == c) for c in range(num_classes)]
  out = {}
  for k in shots:
    accs = []
    for d in range(draws):
      rng = np.random.default_rng([seed, int(k), d])
      idx = np.concatenate([rng.choice(ids, min(int(k), len(ids)), replace=False)
                            for ids in by_class if len(ids)])
      accs.append(float(ridge_accuracies(x_train[idx], y_train[idx], x_val, y_val,
                                         num_classes, l2_grid).max()))
    out[str(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": accs}
  return out


def format_few_shot(doc: dict) -> str:
  return ", ".join(f"{k}-shot {v['mean']:.3f}" + (f"±{v['std']:.3f}" if v["std"] else "")
                   for k, v in doc.items())
