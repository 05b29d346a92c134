"""The training step: the state it carries (params, optimizer, EMA, plateau scale, batch
statistics), its loss (label smoothing, mixup/CutMix targets, class weights) and its compiled,
data-parallel form. train.py's loop, the sweep, lr_find and the benchmarks all drive this one
step, so a change to it is a change to all of them.

Data parallelism is `jax.jit` over the 1-D ('data',) mesh of every device of every process: the
global batch is sharded, params are replicated, XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from flaxtl import mixing, optim, parallel
from flaxtl.prepare import Setup, model_variables

__all__ = ["TrainState", "create_train_state", "jit_train_step", "loss_terms", "lr_scale",
           "plateau_update", "train_step", "zero_metrics"]


class TrainState(train_state.TrainState):
  """step, params, opt_state, and the params' moving average when config.ema_decay > 0 ({} when
  not: nothing extra is stored), all checkpointed together (+ apply_fn, tx as static fields)."""
  ema_params: Any = None
  plateau: Any = None  # optax reduce_on_plateau state (its `scale` multiplies every update); {} when off
  batch_stats: Any = None  # batch norms' running statistics (Flax imagenet's); {} without BN

  @property
  def eval_params(self):
    """What is evaluated, checkpointed as the model and exported: the EMA when it is kept."""
    return self.ema_params if self.ema_params else self.params

  @property
  def eval_variables(self) -> dict:
    return model_variables(self.eval_params, self.batch_stats)


def create_train_state(setup: Setup, lr) -> TrainState:
  tx = optim.create(setup.config, setup.params, setup.freeze, lr)
  ema = setup.params if setup.config.get("ema_decay", 0.0) > 0 else {}
  reduce = optim.plateau(setup.config.optimizer)
  return TrainState.create(apply_fn=setup.network, params=setup.params, tx=tx, ema_params=ema,
                           plateau=reduce.init(setup.params) if reduce else {},
                           batch_stats=setup.batch_stats or {})


def lr_scale(state: TrainState):
  return state.plateau.scale if state.plateau else 1.0


def plateau_update(state: TrainState, opt, val_loss: float, sharding) -> TrainState:
  """The epoch's validation loss into the plateau state (no-op when off); every process computes
  the same state from the same global val loss."""
  reduce = optim.plateau(opt)
  if reduce is None:
    return state
  _, new = reduce.update({}, state.plateau, value=jnp.asarray(val_loss, jnp.float32))
  return state.replace(plateau=jax.device_put(jax.tree.map(np.asarray, new), sharding))


def ema_update(ema, params, step, decay: float):
  """EMA of the weights with the usual warm-up (TF's ExponentialMovingAverage num_updates, timm):
  the decay is min(decay, (1 + t) / (10 + t)), so early steps do not freeze the start point."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def loss_terms(logits, labels, mask, label_smoothing: float = 0.0, mix=None, class_weight=None):
  """Sums (not means) of the loss and correct predictions over unmasked rows, in float32; with
  `label_smoothing`, the cross-entropy against smoothed one-hot targets (optax.smooth_labels);
  with `mix` = (partner labels, per-row weight), against the mixed targets (mixup); with
  `class_weight` (one per class), -sum_c w_c t_c log p_c (PyTorch's weighted cross-entropy: a
  hard label's loss times its class's weight). The caller divides by the row count, not the
  weights' sum (Keras, sklearn): the probe's weighted objective, in expectation."""
  logits = logits.astype(jnp.float32)
  if label_smoothing or mix is not None or class_weight is not None:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    if mix is not None:
      partner, lam = mix
      other = optax.smooth_labels(jax.nn.one_hot(partner, logits.shape[-1]), label_smoothing)
      targets = lam[:, None] * targets + (1.0 - lam[:, None]) * other
    if class_weight is not None:
      targets = targets * jnp.asarray(class_weight, jnp.float32)
    losses = optax.softmax_cross_entropy(logits, targets)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)


def zero_metrics(sums: dict | None = None) -> dict:
  m = {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
       "count": jnp.zeros((), jnp.float32), "nonfinite_step": jnp.full((), -1, jnp.int32)}
  return {**m, **{k: jnp.float32(v) for k, v in (sums or {}).items()}}


def train_step(state: TrainState, metrics: dict, batch: dict, rng,
               label_smoothing: float = 0.0, ema_decay: float = 0.0,
               mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
               class_weight=None) -> tuple[TrainState, dict]:
  """One optimizer step on the global batch; metrics are accumulated on device (no host sync)."""
  rng = jax.random.fold_in(rng, state.step)
  x, mix = batch["x"], None
  if mixup_alpha or cutmix_alpha:
    x, mix = mixing.mix_batch(jax.random.fold_in(rng, 1), x, batch["label"], batch["mask"],
                              mixup_alpha, cutmix_alpha)

  def loss_fn(params):
    variables = model_variables(params, state.batch_stats)
    if state.batch_stats:  # trainable stages' batch norms use and update the batch statistics
      logits, updated = state.apply_fn(variables, x, train=True, rngs={"dropout": rng},
                                       mutable=["batch_stats"])
      stats = updated["batch_stats"]
    else:
      logits, stats = state.apply_fn(variables, x, train=True, rngs={"dropout": rng}), {}
    loss_sum, correct, count = loss_terms(logits, batch["label"], batch["mask"], label_smoothing,
                                          mix, class_weight)
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, correct, count, stats)

  grads, (loss_sum, correct, count, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if state.plateau:  # the LR scale multiplies the updates (not the gradients: Adam would undo it)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.plateau.scale.astype(u.dtype), updates)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
  else:
    new_state = state.apply_gradients(grads=grads)
  if state.batch_stats:
    new_state = new_state.replace(batch_stats=stats)
  if ema_decay:
    new_state = new_state.replace(ema_params=ema_update(state.ema_params, new_state.params,
                                                       state.step, ema_decay))
  finite = jnp.isfinite(loss_sum)
  metrics = {"loss": metrics["loss"] + loss_sum, "correct": metrics["correct"] + correct,
             "count": metrics["count"] + count,
             "nonfinite_step": jnp.where((metrics["nonfinite_step"] < 0) & ~finite,
                                         state.step.astype(jnp.int32), metrics["nonfinite_step"])}
  return new_state, metrics


@functools.lru_cache(maxsize=8)
def jit_train_step(mesh, label_smoothing: float = 0.0, ema_decay: float = 0.0,
                   mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                   class_weight: tuple | None = None) -> Callable:
  """The compiled step; `class_weight` (a tuple: hashable) is a constant of the program."""
  rep, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  step = functools.partial(train_step, label_smoothing=label_smoothing, ema_decay=ema_decay,
                           mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                           class_weight=class_weight)
  return jax.jit(step, donate_argnums=(0, 1), in_shardings=(rep, rep, shard, rep),
                 out_shardings=(rep, rep))
