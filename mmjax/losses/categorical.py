"""KL divergences between categorical distributions given by logits, and the consistency losses
built from them (EMMR eq. 15-16, EASE eq. 10-12).

Log-probabilities come from ``log_softmax``, so logits of +-1e4 give finite values and gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.losses._common import as_float, check_rank, check_same_shape, masked_mean, where_mask


def categorical_kl(p_logits: Any, q_logits: Any) -> jax.Array:
  """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` with ``p, q = softmax`` of the logits (last axis).

  Args:
    p_logits: ``<float>[..., C]``.
    q_logits: ``<float>[..., C]`` (same shape).

  Returns:
    ``<float32>[...]`` one KL per sample, >= 0.

  References:
    EASE (papers/004) eq. 10-11; EMMR (papers/002) eq. 15-16.
  """
  p_logits, q_logits = as_float("p_logits", p_logits), as_float("q_logits", q_logits)
  check_rank("p_logits", p_logits, 1, "[..., C]")
  check_same_shape(p_logits=p_logits, q_logits=q_logits)
  return _kl(jax.nn.log_softmax(p_logits, axis=-1), jax.nn.log_softmax(q_logits, axis=-1))


def symmetric_kl(p_logits: Any, q_logits: Any) -> jax.Array:
  """``1/2 (KL(p || q) + KL(q || p))`` (see :func:`categorical_kl`).

  Args:
    p_logits: ``<float>[..., C]``.
    q_logits: ``<float>[..., C]``.

  Returns:
    ``<float32>[...]``, symmetric in its arguments.

  References:
    EMMR (papers/002) eq. 15-16 (forward / backward losses, applied to softmax-normalised features).
  """
  p_logits, q_logits = as_float("p_logits", p_logits), as_float("q_logits", q_logits)
  check_rank("p_logits", p_logits, 1, "[..., C]")
  check_same_shape(p_logits=p_logits, q_logits=q_logits)
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  return 0.5 * (_kl(log_p, log_q) + _kl(log_q, log_p))


def predictive_consistency_loss(view_logits: Any, *, where: Any = None) -> jax.Array:
  """Mean KL between the predictions of every ordered pair of modality views.

  ``L_cons = mean_{s != t} mean_b KL(p_s(b) || p_t(b))`` over the ``V (V - 1)`` ordered pairs of
  views; 0 for a single view. Gradients reach every view.

  Args:
    view_logits: ``<float>[V, B, C]`` class logits of ``V`` views (random modality subsets) of the
      same ``B`` samples.
    where: optional ``<bool>[B]`` samples that count. Empty -> 0.

  Returns:
    ``<float32>[]``.

  References:
    EASE (papers/004) eq. 10.
  """
  view_logits = as_float("view_logits", view_logits)
  if view_logits.ndim != 3:
    raise ValueError(f"view_logits: expected shape [V, B, C], got {tuple(view_logits.shape)}")
  v = view_logits.shape[0]
  if v < 2:
    return jnp.zeros((), view_logits.dtype)
  where = where_mask("where", where, view_logits.shape[1:2])
  log_p = jax.nn.log_softmax(view_logits, axis=-1)
  # Shape: [V(s), V(t), B]; the diagonal s == t is exactly 0, so summing it in changes nothing.
  pair_kl = _kl(log_p[:, None], log_p[None, :])
  per_sample = jnp.sum(pair_kl, axis=(0, 1)) / (v * (v - 1))
  return masked_mean(per_sample, where)


def anchored_consistency_loss(view_logits: Any, full_logits: Any, *, where: Any = None) -> jax.Array:
  """Mean KL from each view's prediction to the stop-gradient full-view prediction.

  ``L_asym = mean_v mean_b KL(p_v(b) || sg(p_full(b)))``: partial views are pulled towards the
  full-modality prediction, which receives no gradient from this loss.

  Args:
    view_logits: ``<float>[V, B, C]``.
    full_logits: ``<float>[B, C]`` logits of the full-modality view.
    where: optional ``<bool>[B]`` samples that count. Empty -> 0.

  Returns:
    ``<float32>[]``.

  References:
    EASE (papers/004) eq. 11.
  """
  view_logits = as_float("view_logits", view_logits)
  full_logits = as_float("full_logits", full_logits)
  if view_logits.ndim != 3 or full_logits.shape != view_logits.shape[1:]:
    raise ValueError(
        "expected view_logits [V, B, C] and full_logits [B, C], got "
        f"view_logits{list(view_logits.shape)}, full_logits{list(full_logits.shape)}")
  where = where_mask("where", where, view_logits.shape[1:2])
  log_full = jax.lax.stop_gradient(jax.nn.log_softmax(full_logits, axis=-1))
  per_sample = jnp.mean(_kl(jax.nn.log_softmax(view_logits, axis=-1), log_full), axis=0)
  return masked_mean(per_sample, where)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``sum_c exp(log_p) (log_p - log_q)`` over the last axis, from normalised log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
