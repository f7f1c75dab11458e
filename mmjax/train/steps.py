"""``train_step`` / ``eval_step`` built from any method's loss, and their compiled, sharded forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from mmjax.data import Batch
from mmjax.methods import Method
from mmjax.train.sharding import batch_sharding, replicated
from mmjax.train.state import TrainState


def make_train_step(method: Method, optimizer: optax.GradientTransformation):
  """``train_step(state, batch) -> (state, metrics)``: one ``value_and_grad`` + optimiser update.

  The step's randomness is ``fold_in(state.key, state.step)``, so a resumed run draws the same
  numbers as an uninterrupted one. ``metrics`` holds every loss term of the method and the
  gradient norm.
  """

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(state.key, state.step)
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (_, (metrics, method_state, _)), grads = grad_fn(
        state.params, state.method_state, batch, key, True)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              method_state=method_state)
    return new_state, metrics

  return train_step


def make_eval_step(method: Method):
  """``eval_step(state, batch) -> predictions`` (evaluation mode, no loss terms)."""

  def eval_step(state: TrainState, batch: Batch):
    return method.predict(state.params, state.method_state, batch)

  return eval_step


def compile_steps(method: Method, optimizer: optax.GradientTransformation,
                  mesh: Mesh) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """Jitted steps over ``mesh``: batch sharded on ``'data'``, state replicated and donated."""
  data, repl = batch_sharding(mesh), replicated(mesh)
  train_step = jax.jit(make_train_step(method, optimizer), in_shardings=(repl, data),
                       out_shardings=(repl, repl), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(method), in_shardings=(repl, data), out_shardings=data)
  return train_step, eval_step
