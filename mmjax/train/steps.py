"""``train_step`` / ``eval_step`` built from any method's loss, the scanned epoch of train steps on a
device-held split, and their compiled, sharded forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmjax.data import TRAIN_CORRUPTION_STREAM, Batch, TrainCorruption
from mmjax.methods import Method
from mmjax.train.device_data import DeviceSplit, gather_batch
from mmjax.train.sharding import batch_sharding, replicated
from mmjax.train.state import TrainState


def make_train_step(method: Method, optimizer: optax.GradientTransformation,
                    trainable: Any = None, corruption: TrainCorruption | None = None):
  """``train_step(state, batch) -> (state, metrics)``: one ``value_and_grad`` + optimiser update.

  The step's randomness is ``key = fold_in(state.key, state.step)``, so a resumed run draws the
  same numbers as an uninterrupted one. ``metrics`` holds every loss term of the method and the
  gradient norm.

  ``corruption`` (train-time corruption, :mod:`mmjax.data.train_corruption`): the batch becomes
  ``corruption(fold_in(key, TRAIN_CORRUPTION_STREAM), batch)`` before the method's loss, which
  still gets ``key`` — the same for every method, and the method's own draws are unchanged.

  ``trainable`` (a pytree of Python bools with the structure of ``state.params``; ``None`` = all
  ``True``) freezes the ``False`` leaves: the loss sees them through ``stop_gradient`` (so no
  gradient is computed for them; their gradient is zero), and they are carried over unchanged, so
  they come out bit-identical whatever ``optimizer`` does. ``optimizer`` should leave them out of
  its state and statistics (``fit`` uses :func:`mask_optimizer`).
  """

  def loss_fn(params, method_state, batch, key):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    return method.loss(params, method_state, batch, key, True)

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(state.key, state.step)
    if corruption is not None:
      batch = corruption(jax.random.fold_in(key, TRAIN_CORRUPTION_STREAM), batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, method_state, _)), grads = grad_fn(state.params, state.method_state, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if trainable is not None:
      params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, trainable)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              method_state=method_state)
    return new_state, metrics

  return train_step


def mask_optimizer(optimizer: optax.GradientTransformation,
                   trainable: Any) -> optax.GradientTransformation:
  """``optimizer`` on the ``True`` leaves of ``trainable``; zero updates and no state elsewhere.

  Frozen leaves get no Adam moments and no weight decay, and do not enter gradient clipping.
  """
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_eval_step(method: Method):
  """``eval_step(state, batch) -> predictions`` (evaluation mode, no loss terms)."""

  def eval_step(state: TrainState, batch: Batch):
    return method.predict(state.params, state.method_state, batch)

  return eval_step


def compile_steps(method: Method, optimizer: optax.GradientTransformation, mesh: Mesh,
                  trainable: Any = None, corruption: TrainCorruption | None = None
                  ) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """Jitted steps over ``mesh``: batch sharded on ``'data'``, state replicated and donated.

  ``trainable``, ``corruption``: see :func:`make_train_step` (the eval step is never corrupted).
  """
  data, repl = batch_sharding(mesh), replicated(mesh)
  train_step = jax.jit(make_train_step(method, optimizer, trainable, corruption),
                       in_shardings=(repl, data),
                       out_shardings=(repl, repl), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(method), in_shardings=(repl, data), out_shardings=data)
  return train_step, eval_step


def make_epoch(train_step: Callable[..., Any], mesh: Mesh | None = None):
  """``epoch(state, split, rows) -> (state, metrics, weights)``: ``train_step`` scanned over
  ``rows`` (``[K, B]`` int32 from :func:`mmjax.train.device_data.epoch_rows`), each batch
  gathered from the on-device ``split`` (:func:`~mmjax.train.device_data.gather_batch`).

  ``metrics``: every metric of every step, ``[K]`` per name; ``weights``: ``[K]`` float32, the
  valid rows of each batch. The same steps as ``train_step`` applied to the host path's batches.
  """

  def epoch(state: TrainState, split: DeviceSplit, rows: jax.Array):
    def body(state, step_rows):
      batch = gather_batch(split, step_rows, mesh)
      state, metrics = train_step(state, batch)
      return state, (metrics, jnp.sum(batch.valid).astype(jnp.float32))

    state, (metrics, weights) = jax.lax.scan(body, state, rows)
    return state, metrics, weights

  return epoch


def compile_epoch(method: Method, optimizer: optax.GradientTransformation, mesh: Mesh,
                  trainable: Any = None, corruption: TrainCorruption | None = None,
                  seeds: str | None = None) -> Callable[..., Any]:
  """:func:`make_epoch` of :func:`make_train_step`, jitted over ``mesh``: state replicated and
  donated, split and rows replicated (each device gathers its shard of every batch).

  ``seeds``: ``None`` trains one state. Otherwise ``S`` states stacked on a leading seed axis
  (every leaf ``[S, ...]``) with ``rows`` ``[S, K, B]`` (each seed its own order) on one shared
  split: ``"vmap"`` = ``jax.vmap`` of the epoch (batched ops: equal to ``S`` separate epochs up to
  float rounding); ``"map"`` = ``lax.map`` over the seeds (one after another inside the program:
  the same ops as one seed's epoch, bit-identical to separate epochs).
  """
  repl = replicated(mesh)
  epoch = make_epoch(make_train_step(method, optimizer, trainable, corruption), mesh)
  if seeds == "map":
    one_seed = epoch
    epoch = lambda state, split, rows: jax.lax.map(
        lambda args: one_seed(args[0], split, args[1]), (state, rows))
  elif seeds == "vmap":
    epoch = jax.vmap(epoch, in_axes=(0, None, 0))
  elif seeds is not None:
    raise ValueError(f"seeds: expected None, 'vmap' or 'map', got {seeds!r}")
  return jax.jit(epoch, in_shardings=(repl, repl, repl), out_shardings=(repl, repl, repl),
                 donate_argnums=0)
