"""Top-k expert routing and its auxiliary losses (EUAR, papers/001 eq. 5-10).

Routing math runs in float32 (or wider) whatever the model dtype, as in flaxformer's MoE router.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.losses._common import as_float, check_rank, masked_mean, where_mask

LOAD_BALANCING_SCALES = ("euar", "switch")


def top_k_gates(logits: Any, k: int, *, renormalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Top-k softmax gates: ``G(x) = TOP_k(softmax(logits))``.

  ``probs = softmax(logits)`` over the last (expert) axis; ``gates`` keeps the ``k`` largest entries
  of ``probs`` and sets the others to 0 (EUAR eq. 5: no renormalisation unless ``renormalize``, in
  which case the kept entries are divided by their sum). Ties are broken by expert index, the lowest
  index wins, so the selection is deterministic. The selection itself carries no gradient; the kept
  probabilities do.

  Args:
    logits: ``<float>[..., N]`` router logits.
    k: number of experts kept, ``1 <= k <= N`` (static Python int).
    renormalize: divide the kept gates by their sum.

  Returns:
    ``(gates, probs)``, both ``<float32>[..., N]``.

  References:
    EUAR (papers/001) eq. 5-6; Shazeer et al. 2017, "Outrageously large neural networks".
  """
  logits = as_float("logits", logits)
  check_rank("logits", logits, 1, "[..., N]")
  n = logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k: expected an int in [1, N={n}], got {k!r}")
  probs = jax.nn.softmax(logits, axis=-1)
  # rank[..., j] = #{i : p_i > p_j} + #{i < j : p_i == p_j}; keep rank < k.
  # Shape: [..., N(j), N(i)]
  p_j, p_i = probs[..., :, None], probs[..., None, :]
  lower_index = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
  beats = (p_i > p_j) | ((p_i == p_j) & lower_index)
  rank = jnp.sum(beats, axis=-1)
  gates = jnp.where(rank < k, probs, 0.0)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return gates, probs


def load_balancing_loss(gates: Any, *, scale: str = "euar", where: Any = None) -> jax.Array:
  """Load-balancing auxiliary loss over one routing group (the whole, global batch).

  With ``R_j = mean_b 1{argmax_n gates[b, n] = j}`` (EUAR eq. 8, no gradient) and
  ``P_j = mean_b gates[b, j]`` (eq. 9)::

    "euar":   L_aux = (1/N) sum_j R_j P_j          (EUAR eq. 7)
    "switch": L_aux =  N    sum_j R_j P_j          (Switch Transformer scale; 1 at uniform top-1)

  The ``"switch"`` value is ``N**2`` times the paper's. Under data parallelism call it on the
  global batch (inside one ``jit`` over sharded inputs), not per device: ``R`` and ``P`` are
  batch statistics. ``argmax`` ties go to the lowest index.

  Args:
    gates: ``<float>[B, N]`` gate values (e.g. from :func:`top_k_gates`).
    scale: ``"euar"`` or ``"switch"``.
    where: optional ``<bool>[B]``: samples that count (e.g. not padding). Empty -> 0.

  Returns:
    ``<float32>[]``.
  """
  gates = as_float("gates", gates)
  if gates.ndim != 2:
    raise ValueError(f"gates: expected shape [B, N], got {tuple(gates.shape)}")
  if scale not in LOAD_BALANCING_SCALES:
    raise ValueError(f"scale: expected one of {LOAD_BALANCING_SCALES}, got {scale!r}")
  b, n = gates.shape
  where = where_mask("where", where, (b,))
  mask = None if where is None else where[:, None]
  # Shape: [B, N]
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), n, dtype=gates.dtype)
  r = masked_mean(jax.lax.stop_gradient(top1), mask, axis=0)
  p = masked_mean(gates, mask, axis=0)
  factor = 1.0 / n if scale == "euar" else float(n)
  return factor * jnp.sum(r * p)


def uncertainty_routing_loss(gates: Any, variances: Any, *, where: Any = None) -> jax.Array:
  """U-loss: gate mass weighted by expert variance, ``mean_b (1/N) sum_j G_j(x_b) mean_d sigma2_bjd``.

  Minimising it moves gate mass away from experts that are uncertain (high variance) about a sample
  (EUAR eq. 10, with the per-expert variance vector reduced by its mean over dimensions and the
  batch reduced by its mean). Gradients reach both the gates and the variances.

  Args:
    gates: ``<float>[B, N]``.
    variances: ``<float>[B, N, D]`` expert variances sigma^2 (not log-variances).
    where: optional ``<bool>[B]`` samples that count. Empty -> 0.

  Returns:
    ``<float32>[]``.
  """
  gates = as_float("gates", gates)
  variances = as_float("variances", variances)
  if gates.ndim != 2 or variances.ndim != 3 or variances.shape[:2] != gates.shape:
    raise ValueError(
        "expected gates [B, N] and variances [B, N, D], got "
        f"gates{list(gates.shape)}, variances{list(variances.shape)}")
  where = where_mask("where", where, gates.shape[:1])
  per_sample = jnp.mean(gates * jnp.mean(variances, axis=-1), axis=-1)  # Shape: [B]
  return masked_mean(per_sample, where)

