"""Attention supervision losses of SAM-LML (papers/003): margin ranking and the variance / context
constraints on attention matrices.

Attention tensors are ``[..., Q, K]`` (queries x keys). ``where`` masks broadcast to that shape;
pass ``key_mask[..., None, :] & query_mask[..., :, None]`` to exclude padded keys and padded
query rows at once. A row with no selected key does not count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.losses._common import (
    as_float, broadcast_shapes, check_nonnegative, check_rank, masked_mean, where_mask)


def margin_ranking_loss(higher: Any, lower: Any, *, margin: float, where: Any = None) -> jax.Array:
  """Hinge that asks ``higher`` to exceed ``lower`` by ``margin``: ``mean max(lower - higher + margin, 0)``.

  The mean runs over the elements selected by ``where`` (all when ``None``; empty -> 0). SAM-LML's
  "rank(A ≻ B)" is ``margin_ranking_loss(A, B, margin=gamma_1)``: e.g. eq. 4
  ``max(A^n - A + gamma_1, 0)`` asks clean attention logits ``A`` to beat noise logits ``A^n``.

  Args:
    higher: ``<float>[...]`` values that should be larger.
    lower: ``<float>[...]`` values that should be smaller (broadcast against ``higher``).
    margin: the margin ``gamma_1``.
    where: optional ``<bool>[...]`` broadcastable selection.

  Returns:
    ``<float32>[]``.

  References:
    SAM-LML (papers/003) eq. 4, 6, 8, 28.
  """
  higher, lower = as_float("higher", higher), as_float("lower", lower)
  shape = broadcast_shapes(higher=higher, lower=lower, where=where)
  where = where_mask("where", where, shape)
  return masked_mean(jnp.maximum(lower - higher + margin, 0.0), where)


def attention_variance_loss(attn_logits: Any, *, beta: float, where: Any = None,
                            probs: Any = None) -> jax.Array:
  """Variance constraint: ``mean_rows max(0, beta - std(softmax(A)_row))``.

  Each query row is normalised with a softmax over its selected keys; ``std`` is the population
  standard deviation (ddof 0) of those probabilities. The loss is 0 for rows spread less uniformly
  than ``beta`` requires and pushes near-uniform rows to become peaked. (The paper's text says
  "variance" but writes ``Std``; we follow the equation.)

  Args:
    attn_logits: ``<float>[..., Q, K]`` attention logits ``A = Q K^T / sqrt(d)``.
    beta: the threshold ``beta >= 0``.
    where: optional ``<bool>`` broadcastable to ``[..., Q, K]`` selecting keys (per row).
    probs: optional ``[..., Q, K]`` softmax of ``attn_logits`` that the caller already has (an
      attention computes it anyway); every row with a selected key must be the softmax over
      exactly the selected keys (0 elsewhere). ``None``: computed here.

  Returns:
    ``<float32>[]``.

  References:
    SAM-LML (papers/003) eq. 14.
  """
  attn_logits = as_float("attn_logits", attn_logits)
  check_rank("attn_logits", attn_logits, 2, "[..., Q, K]")
  check_nonnegative("beta", beta)
  keys = _key_mask(where, attn_logits.shape)
  if probs is None:
    probs = _masked_softmax(attn_logits, keys)
  else:
    probs = as_float("probs", probs)
    if probs.shape != attn_logits.shape:
      raise ValueError(f"probs: expected shape {attn_logits.shape}, got {probs.shape}")
  n_keys = jnp.sum(keys, axis=-1)
  row_mean = 1.0 / jnp.maximum(n_keys, 1)  # a softmax row sums to 1
  var = masked_mean(jnp.square(probs - row_mean[..., None]), keys, axis=-1)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return masked_mean(jnp.maximum(beta - std, 0.0), n_keys > 0)


def attention_context_loss(
    attn_logits: Any, *, gamma: float, rho: int, where: Any = None) -> jax.Array:
  """Context constraint: ``mean_rows max(0, mean_j A_ij + gamma - mean_{j in W_i} A_ij)``.

  ``W_i`` holds the keys within ``floor(rho / 2)`` steps of the diagonal, ``|i - j| <= floor(rho/2)``
  (clipped at the sequence edges), so attention near the diagonal — to temporally adjacent steps —
  must exceed the row's average by ``gamma``. Both means run over selected keys only; rows whose
  window holds no selected key do not count. Uses the raw logits ``A`` (eq. 1), as the paper does.

  Args:
    attn_logits: ``<float>[..., Q, K]``.
    gamma: the margin ``gamma``.
    rho: window width ``rho >= 1`` (static int).
    where: optional ``<bool>`` broadcastable to ``[..., Q, K]`` selecting keys (per row).

  Returns:
    ``<float32>[]``.

  References:
    SAM-LML (papers/003) eq. 15.
  """
  attn_logits = as_float("attn_logits", attn_logits)
  check_rank("attn_logits", attn_logits, 2, "[..., Q, K]")
  if isinstance(rho, bool) or not isinstance(rho, int) or rho < 1:
    raise ValueError(f"rho: expected an int >= 1, got {rho!r}")
  q, k = attn_logits.shape[-2:]
  keys = _key_mask(where, attn_logits.shape)
  offset = jnp.abs(jnp.arange(q)[:, None] - jnp.arange(k)[None, :])
  window = keys & (offset <= rho // 2)
  row_mean = masked_mean(attn_logits, keys, axis=-1)
  window_mean = masked_mean(attn_logits, window, axis=-1)
  hinge = jnp.maximum(row_mean + gamma - window_mean, 0.0)
  return masked_mean(hinge, jnp.any(window, axis=-1))


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the selected entries of the last axis; unselected entries (and empty rows) are 0."""
  peak = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  unnormalised = jnp.where(mask, jnp.exp(jnp.where(mask, logits - peak, 0.0)), 0.0)
  return unnormalised / jnp.maximum(jnp.sum(unnormalised, axis=-1, keepdims=True), 1e-30)


def _key_mask(where: Any, shape: tuple[int, ...]) -> jax.Array:
  mask = where_mask("where", where, shape)
  return jnp.ones(shape, bool) if mask is None else mask
