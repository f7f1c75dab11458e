"""Sample-based (kernel) Cauchy-Schwarz divergence with an uncertainty-adaptive bandwidth (EASE eq. 5-7)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.losses._common import as_float, check_nonnegative, where_mask


def kernel_cs_divergence(
    x: Any,
    y: Any,
    *,
    bandwidth: float = 1.0,
    x_uncertainty: Any = None,
    y_uncertainty: Any = None,
    alpha: float = 0.0,
    x_where: Any = None,
    y_where: Any = None,
    normalize: bool = False,
) -> jax.Array:
  """Kernel Cauchy-Schwarz divergence between two sample sets.

  With the uncertainty-adaptive Gaussian kernel (EASE eq. 5-6)::

    K(a, b) = exp(-||a - b||^2 / (2 tau^2 psi(u_a, u_b))),   psi = 1 + alpha * (u_a + u_b) / 2

  the divergence (eq. 7) is::

    D = -log( mean K(x, y) / sqrt(mean K(x, x) * mean K(y, y)) )

  with means over all (selected) pairs, which equals the paper's sums when ``N = M``. Every mean is
  evaluated in log space (``logsumexp`` of the kernel exponents), so the value stays finite when all
  kernels underflow. ``u = 0`` when an uncertainty is ``None``; with ``alpha = 0`` the kernel is
  positive definite and ``D >= 0`` (= 0 when both sets are equal). As the paper writes it, an
  adaptive bandwidth makes the kernel indefinite: ``D`` can be negative and falls as the
  uncertainties grow (``D(x, x) < 0`` once ``u > 0``, down to ``0.5 log mean K(x, x)``), so a
  model can lower it by inflating them.

  ``normalize=True`` multiplies each kernel by ``psi^(-D/2)``, the normalisation of a Gaussian of
  covariance ``tau^2 psi I``. Then ``K(a, b) ∝ <N(a, s_a^2 I), N(b, s_b^2 I)>_{L2}`` with
  ``s^2 = tau^2 (1 + alpha u) / 2``: every sample is a Gaussian whose width grows with its
  uncertainty, and ``D`` is the Cauchy-Schwarz divergence of the two equal-weight Gaussian mixtures
  — ``>= 0`` always, ``= 0`` iff the mixtures coincide, and for coincident centres it grows with
  the uncertainty. With ``alpha = 0`` (or all ``u = 0``) both forms agree.

  Args:
    x: ``<float>[..., N, D]`` samples (EASE: real features ``z``).
    y: ``<float>[..., M, D]`` samples (EASE: completed features ``z_hat``).
    bandwidth: ``tau > 0``.
    x_uncertainty: optional ``<float>[..., N]`` per-sample uncertainty ``u >= 0`` (e.g. mean
      predicted variance).
    y_uncertainty: optional ``<float>[..., M]``.
    alpha: ``>= 0``, how much uncertainty widens the kernel.
    x_where: optional ``<bool>[..., N]`` samples of ``x`` that count.
    y_where: optional ``<bool>[..., M]``. If either selection is empty the result is 0.
    normalize: the Gaussian normalisation ``psi^(-D/2)`` of every kernel (see above; EASE's
      default in mmjax, ``model.uada_normalize``); ``False`` is eq. 5 as written.

  Returns:
    ``<float32>[...]`` (a scalar for unbatched inputs).

  References:
    EASE (papers/004) eq. 5-7; Principe 2010, "Information theoretic learning", ch. 2.
  """
  x, y = as_float("x", x), as_float("y", y)
  if x.ndim < 2 or y.ndim < 2 or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
    raise ValueError(
        f"expected x [..., N, D] and y [..., M, D] with equal D and batch axes, got "
        f"x{list(x.shape)}, y{list(y.shape)}")
  if isinstance(bandwidth, (int, float)) and bandwidth <= 0:
    raise ValueError(f"bandwidth: must be > 0, got {bandwidth}")
  check_nonnegative("alpha", alpha)
  u_x = _per_sample("x_uncertainty", x_uncertainty, x)
  u_y = _per_sample("y_uncertainty", y_uncertainty, y)
  w_x = where_mask("x_where", x_where, x.shape[:-1])
  w_y = where_mask("y_where", y_where, y.shape[:-1])
  w_x = jnp.ones(x.shape[:-1], bool) if w_x is None else w_x
  w_y = jnp.ones(y.shape[:-1], bool) if w_y is None else w_y
  scale = 2.0 * jnp.square(jnp.asarray(bandwidth, x.dtype))

  def log_mean_kernel(a, u_a, w_a, b, u_b, w_b):
    # Shape: [..., N, M]
    sq_dist = (jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
               - 2.0 * jnp.einsum("...nd,...md->...nm", a, b, precision="highest"))
    psi = 1.0 + alpha * 0.5 * (u_a[..., :, None] + u_b[..., None, :])
    exponent = -jnp.maximum(sq_dist, 0.0) / (scale * psi)
    if normalize:
      exponent = exponent - 0.5 * a.shape[-1] * jnp.log(psi)
    pair = w_a[..., :, None] & w_b[..., None, :]
    count = jnp.sum(pair, axis=(-2, -1))
    safe = jnp.where(pair, exponent, 0.0)
    peak = jax.lax.stop_gradient(jnp.max(jnp.where(pair, exponent, -jnp.inf), axis=(-2, -1)))
    peak = jnp.where(count > 0, peak, 0.0)
    total = jnp.sum(jnp.where(pair, jnp.exp(safe - peak[..., None, None]), 0.0), axis=(-2, -1))
    return peak + jnp.log(jnp.maximum(total, 1e-30)) - jnp.log(jnp.maximum(count, 1)), count

  log_xy, n_xy = log_mean_kernel(x, u_x, w_x, y, u_y, w_y)
  log_xx, _ = log_mean_kernel(x, u_x, w_x, x, u_x, w_x)
  log_yy, _ = log_mean_kernel(y, u_y, w_y, y, u_y, w_y)
  divergence = 0.5 * (log_xx + log_yy) - log_xy
  return jnp.where(n_xy > 0, divergence, 0.0)


def _per_sample(name: str, u: Any, samples: jax.Array) -> jax.Array:
  if u is None:
    return jnp.zeros(samples.shape[:-1], samples.dtype)
  u = as_float(name, u)
  if u.shape != samples.shape[:-1]:
    raise ValueError(f"{name}: expected shape {list(samples.shape[:-1])}, got {list(u.shape)}")
  return u

