"""Losses between Gaussians: KL to N(0, I), negative log-likelihood, Cauchy-Schwarz divergences.

All return one value per sample: the last axis (or the last two, for full covariances) is the event
dimension, leading axes are batch axes and broadcast against each other.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.losses._common import as_float, broadcast_shapes, check_rank

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl_standard_normal(mean: Any, log_var: Any) -> jax.Array:
  """``KL(N(mu, diag(sigma^2)) || N(0, I)) = sum_d -1/2 (1 + log sigma_d^2 - mu_d^2 - sigma_d^2)``.

  Args:
    mean: ``<float>[..., D]`` means ``mu``.
    log_var: ``<float>[..., D]`` log-variances ``log sigma^2`` (broadcast against ``mean``).

  Returns:
    ``<float32>[...]`` one KL per sample (summed over ``D``; divide by ``D`` for a per-dimension mean).

  References:
    EUAR (papers/001) eq. 4; Kingma & Welling 2014, appendix B.
  """
  mean = as_float("mean", mean)
  log_var = as_float("log_var", log_var)
  check_rank("mean", mean, 1, "[..., D]")
  broadcast_shapes(mean=mean, log_var=log_var)
  return jnp.sum(-0.5 * (1.0 + log_var - jnp.square(mean) - jnp.exp(log_var)), axis=-1)


def gaussian_nll(target: Any, mean: Any, var: Any, *, min_var: float = 1e-12) -> jax.Array:
  """Negative log-likelihood of ``target`` under ``N(mean, diag(var))``.

  ``NLL = 1/2 sum_d ( log(2 pi sigma_d^2) + (x_d - mu_d)^2 / sigma_d^2 )``, with ``sigma^2`` clamped
  below at ``min_var`` so an exactly-zero variance gives a large finite value instead of ``inf``.

  Args:
    target: ``<float>[..., D]`` observations ``x`` (EASE: the clean feature ``z^gt``; pass it through
      ``jax.lax.stop_gradient`` if it must not be trained).
    mean: ``<float>[..., D]``.
    var: ``<float>[..., D]`` variances ``sigma^2`` (not log-variances).
    min_var: floor applied to ``var``.

  Returns:
    ``<float32>[...]`` one NLL per sample.

  References:
    EASE (papers/004) eq. 4 and eq. 16.
  """
  target = as_float("target", target)
  mean = as_float("mean", mean)
  var = jnp.maximum(as_float("var", var), min_var)
  check_rank("target", target, 1, "[..., D]")
  broadcast_shapes(target=target, mean=mean, var=var)
  return 0.5 * jnp.sum(_LOG_2PI + jnp.log(var) + jnp.square(target - mean) / var, axis=-1)


def gaussian_cs_divergence(mean_p: Any, var_p: Any, mean_q: Any, var_q: Any) -> jax.Array:
  """Closed-form Cauchy-Schwarz divergence between diagonal Gaussians p and q.

  ``D_CS(p, q) = -log[ (int p q)^2 / (int p^2 int q^2) ]`` equals, for ``S = Sigma_p + Sigma_q``::

    (mu_p - mu_q)^T S^-1 (mu_p - mu_q) + log|S| - 1/2 log|2 Sigma_p| - 1/2 log|2 Sigma_q|

  computed as a sum over dimensions, never forming a determinant. The log-determinant part of each
  dimension is written ``log cosh((log s_p - log s_q) / 2)`` (the same number, since
  ``(s_p + s_q) / (2 sqrt(s_p s_q)) = cosh(r / 2)``), which is exactly >= 0 and stable for extreme
  variance ratios. ``D_CS >= 0``, ``= 0`` iff p = q, and symmetric.

  Args:
    mean_p: ``<float>[..., D]``.
    var_p: ``<float>[..., D]`` diagonal variances of p (> 0).
    mean_q: ``<float>[..., D]`` (e.g. a class anchor ``[D]``, broadcast against a batch).
    var_q: ``<float>[..., D]``.

  Returns:
    ``<float32>[...]``.

  References:
    EASE (papers/004) eq. 8 and App. B.2 eq. 17-25; Kampffmeyer et al. 2019.
  """
  mean_p, var_p = as_float("mean_p", mean_p), as_float("var_p", var_p)
  mean_q, var_q = as_float("mean_q", mean_q), as_float("var_q", var_q)
  check_rank("mean_p", mean_p, 1, "[..., D]")
  broadcast_shapes(mean_p=mean_p, var_p=var_p, mean_q=mean_q, var_q=var_q)
  mahalanobis = jnp.square(mean_p - mean_q) / (var_p + var_q)
  half_log_ratio = 0.5 * (jnp.log(var_p) - jnp.log(var_q))
  log_det = jnp.logaddexp(half_log_ratio, -half_log_ratio) - math.log(2.0)  # log cosh
  return jnp.sum(mahalanobis + log_det, axis=-1)


def gaussian_cs_divergence_full(mean_p: Any, cov_p: Any, mean_q: Any, cov_q: Any) -> jax.Array:
  """Cauchy-Schwarz divergence between Gaussians with full covariances.

  The formula of :func:`gaussian_cs_divergence` with matrices: for ``S = Sigma_p + Sigma_q`` with
  Cholesky factor ``L`` (``S = L L^T``), the Mahalanobis term is ``||L^-1 (mu_p - mu_q)||^2`` and every
  ``log|.|`` is ``2 sum log diag(cholesky(.))`` — no determinant or inverse is formed. Covariances
  must be symmetric positive definite (otherwise the Cholesky factor, and the result, are NaN).

  Args:
    mean_p: ``<float>[..., D]``.
    cov_p: ``<float>[..., D, D]``.
    mean_q: ``<float>[..., D]``.
    cov_q: ``<float>[..., D, D]``.

  Returns:
    ``<float32>[...]``.

  References:
    EASE (papers/004) App. B.2 eq. 17-25 (eq. 24 with full ``Sigma``).
  """
  mean_p, cov_p = as_float("mean_p", mean_p), as_float("cov_p", cov_p)
  mean_q, cov_q = as_float("mean_q", mean_q), as_float("cov_q", cov_q)
  check_rank("mean_p", mean_p, 1, "[..., D]")
  d = mean_p.shape[-1]
  for name, cov in (("cov_p", cov_p), ("cov_q", cov_q)):
    if cov.ndim < 2 or cov.shape[-2:] != (d, d):
      raise ValueError(f"{name}: expected shape [..., {d}, {d}], got {tuple(cov.shape)}")
  if mean_q.shape[-1:] != (d,):
    raise ValueError(f"mean_q: expected shape [..., {d}], got {tuple(mean_q.shape)}")
  batch = broadcast_shapes(
      mean_p=mean_p[..., 0], cov_p=cov_p[..., 0, 0], mean_q=mean_q[..., 0], cov_q=cov_q[..., 0, 0])
  cov_p = jnp.broadcast_to(cov_p, batch + (d, d))
  cov_q = jnp.broadcast_to(cov_q, batch + (d, d))
  diff = jnp.broadcast_to(mean_p - mean_q, batch + (d,))
  # One stacked Cholesky instead of three: jaxlib 0.10's CPU LAPACK kernels can deadlock when
  # several batched factorisations run concurrently on a 2-thread pool (see docs/performance.md).
  # Shape: [3, ..., D, D] = chol(S), chol(Sigma_p), chol(Sigma_q)
  chol = jnp.linalg.cholesky(jnp.stack([cov_p + cov_q, cov_p, cov_q]))
  whitened = jax.lax.linalg.triangular_solve(
      chol[0], diff[..., None], left_side=True, lower=True)[..., 0]
  mahalanobis = jnp.sum(jnp.square(whitened), axis=-1)
  log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
  log_2 = d * math.log(2.0)
  return mahalanobis + log_det[0] - 0.5 * (log_2 + log_det[1]) - 0.5 * (log_2 + log_det[2])
