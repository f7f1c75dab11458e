"""Mixed precision for any method: low-precision compute, float32 parameters, losses and routing.

:func:`mixed_precision` wraps a :class:`~mmjax.methods.base.Method` so that its loss and predict see

* the parameters cast to ``compute_dtype`` (``bfloat16``), except those of modules named in
  :data:`FLOAT32_MODULES` (EUAR's ``router``: routing logits, top-k and gates stay float32 —
  flaxformer's rule for MoE routers; a Dense with float32 parameters promotes its bfloat16 input);
  the optimiser keeps and updates the float32 master copy (the cast's gradient is float32);
* the batch's ``features`` / ``full_features`` cast to ``compute_dtype`` (masks and labels as
  they are).

Every Flax module then computes in ``compute_dtype`` (inputs and parameters agree); LayerNorm
statistics, the softmax of :func:`mmjax.nn.transformer.fused_attention` and every loss of
:mod:`mmjax.losses` compute in float32 (they upcast). The returned loss, metrics and predictions
are float32, and the method state (EASE's anchors) keeps its dtype. No loss scaling: bfloat16
has float32's exponent range. Stages' ``prepare`` (EMMR's teacher table) runs in float32.

``config.compute_dtype = "bfloat16"`` makes :func:`mmjax.experiment.build_method` wrap the method;
``mmjax.train.fit`` refuses a config whose ``compute_dtype`` is not the method's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.methods.base import Method

COMPUTE_DTYPES = ("float32", "bfloat16")
FLOAT32_MODULES = ("router",)  # parameters under a module of this name stay float32


def _keeps_float32(path) -> bool:
  return any(getattr(k, "key", None) in FLOAT32_MODULES for k in path)


def compute_params(params: Any, dtype: jnp.dtype) -> Any:
  """Float leaves of ``params`` cast to ``dtype``, except under :data:`FLOAT32_MODULES`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
      and not _keeps_float32(path) else p, params)


def compute_batch(batch, dtype: jnp.dtype):
  """``batch`` with its (clean and corrupted) features cast to ``dtype``."""
  cast = lambda features: {m: x.astype(dtype) for m, x in features.items()}
  return batch.replace(features=cast(batch.features), full_features=cast(batch.full_features))


def _float32(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def mixed_precision(method: Method, compute_dtype: str) -> Method:
  """``method`` computing in ``compute_dtype`` (module docstring); ``"float32"``: ``method``."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
  if compute_dtype == method.compute_dtype:
    return method
  if method.compute_dtype != "float32":
    raise ValueError(f"compute_dtype: {method.name} already computes in {method.compute_dtype}")
  dtype = jnp.dtype(compute_dtype)

  def wrap_loss(loss):
    def low_precision_loss(params, state, batch, key, train):
      total, (metrics, new_state, predictions) = loss(
          compute_params(params, dtype), state, compute_batch(batch, dtype), key, train)
      new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
      return total.astype(jnp.float32), (_float32(metrics), new_state, _float32(predictions))
    return low_precision_loss

  def wrap_predict(predict):
    if predict is None:
      return None
    return lambda params, state, batch: _float32(
        predict(compute_params(params, dtype), state, compute_batch(batch, dtype)))

  stages = tuple(dataclasses.replace(s, loss=wrap_loss(s.loss), predict=wrap_predict(s.predict))
                 for s in method.stages)
  return dataclasses.replace(method, loss=wrap_loss(method.loss),
                             predict=wrap_predict(method.predict), stages=stages,
                             compute_dtype=compute_dtype)
