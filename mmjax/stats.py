"""Small statistics helpers for checking predicted uncertainty (EASE §4.5).

EASE checks its imputation variances with standardised residuals ``r = (z_gt - mu) / sigma``: if the
predicted Gaussians are calibrated, ``r ~ N(0, 1)``, and the Kolmogorov-Smirnov distance of the
residuals to the standard normal is small (the paper reports 0.076 and 0.083). A KS distance alone
cannot tell per-sample variances from one well-chosen constant scale, so the module also has the
proper score :func:`gaussian_nll_per_dim` and the constant reference :func:`fit_constant_variance`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

_standard_normal_cdf = np.vectorize(lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))),
                                    otypes=[np.float64])


def ks_distance_to_standard_normal(samples: npt.ArrayLike) -> float:
  """Exact two-sided Kolmogorov-Smirnov statistic of ``samples`` against ``N(0, 1)``.

  With the sorted samples ``x_(1) <= ... <= x_(n)`` and ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``:
  ``D_n = sup_x |F_n(x) - Phi(x)| = max_i max(i / n - Phi(x_(i)), Phi(x_(i)) - (i - 1) / n)``
  (the supremum of the step function's gap is reached just before or at a jump).

  Args:
    samples: any shape (flattened), at least one value, all finite.

  Returns:
    ``D_n`` in ``(0, 1]``.

  Raises:
    ValueError: ``samples`` empty or with a non-finite value.
  """
  x = np.sort(np.asarray(samples, np.float64).ravel())
  if x.size == 0:
    raise ValueError("samples: expected at least one value, got an empty array")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"samples: expected finite values, got {int(np.sum(~np.isfinite(x)))} "
                     "NaN/inf")
  n = x.size
  cdf = _standard_normal_cdf(x)
  i = np.arange(1, n + 1)
  return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


def gaussian_nll_per_dim(error: npt.ArrayLike, var: npt.ArrayLike) -> float:
  """Mean Gaussian negative log-likelihood per entry, in nats.

  For a prediction ``N(mu, var)`` of a target ``z`` with ``error = z - mu``, elementwise
  ``nll = (log(2 pi var) + error^2 / var) / 2``, averaged over every entry (e.g. over the
  ``(pair, dimension)`` entries of ``[P, d]`` arrays). It is a proper score: on held-out data a
  lower value means a better predictive distribution, so it rewards variances that track the
  per-sample error scale, which a KS distance of pooled residuals does not.

  Args:
    error: ``z - mu``, any shape, at least one value, all finite.
    var: predicted variances, broadcastable to ``error`` (e.g. ``[P, d]`` or one ``[d]`` row),
      all finite and ``> 0``.

  Returns:
    ``mean(nll)`` over the broadcast shape.

  Raises:
    ValueError: empty ``error``, shapes that do not broadcast, a non-finite value, or ``var <= 0``.
  """
  error = np.asarray(error, np.float64)
  var = np.asarray(var, np.float64)
  if error.size == 0:
    raise ValueError("error: expected at least one value, got an empty array")
  try:
    error, var = np.broadcast_arrays(error, var)
  except ValueError:
    raise ValueError(
        f"var: shape {var.shape} does not broadcast to error's {error.shape}") from None
  if not np.all(np.isfinite(error)):
    raise ValueError(f"error: expected finite values, got {int(np.sum(~np.isfinite(error)))} "
                     "NaN/inf")
  if not np.all(np.isfinite(var) & (var > 0)):
    raise ValueError(f"var: expected finite positive values, got "
                     f"{int(np.sum(~(np.isfinite(var) & (var > 0))))} that are not")
  return float(np.mean(0.5 * (np.log(2.0 * np.pi * var) + np.square(error) / var)))


def fit_constant_variance(error: npt.ArrayLike, target: npt.ArrayLike,
                          num_modalities: int) -> np.ndarray:
  """One variance per (target modality, dimension): the mean squared error of its pairs.

  ``var_c[m, j] = mean_{p : target[p] = m} error[p, j]^2`` — the maximum-likelihood constant
  variance of a zero-mean Gaussian for the errors of modality ``m``, dimension ``j`` (it minimises
  :func:`gaussian_nll_per_dim` over constants on the data it is fitted on). Fit it on the train
  split and score it on the test split to get a reference that knows each modality's error scale
  but nothing per sample.

  Args:
    error: ``[P, d]`` errors ``z - mu`` of ``P`` (sample, missing modality) pairs, all finite.
    target: ``[P]`` int, the target modality of each pair, in ``0 .. num_modalities - 1``
      (for ``pairs [B, M]`` and ``error = (z_gt - mu)[pairs]`` this is ``np.nonzero(pairs)[1]``).
    num_modalities: ``M >= 1``.

  Returns:
    ``[M, d]`` float64; the row of a modality that no pair targets is NaN.

  Raises:
    ValueError: ``error`` not 2-D or not finite, ``target`` not ``[P]`` or out of range.
  """
  error = np.asarray(error, np.float64)
  target = np.asarray(target)
  if error.ndim != 2:
    raise ValueError(f"error: expected [P, d], got shape {error.shape}")
  if not np.all(np.isfinite(error)):
    raise ValueError(f"error: expected finite values, got {int(np.sum(~np.isfinite(error)))} "
                     "NaN/inf")
  if target.shape != error.shape[:1] or (target.size and not np.issubdtype(target.dtype,
                                                                          np.integer)):
    raise ValueError(f"target: expected [P] = [{error.shape[0]}] ints, got shape {target.shape} "
                     f"dtype {target.dtype}")
  if num_modalities < 1 or np.any((target < 0) | (target >= num_modalities)):
    raise ValueError(f"target: expected values in 0 .. {num_modalities - 1} (num_modalities "
                     f"{num_modalities}), got {np.unique(target).tolist()}")
  target = target.astype(np.int64)
  count = np.bincount(target, minlength=num_modalities)[:, None]  # [M, 1]
  total = np.zeros((num_modalities, error.shape[1]))
  np.add.at(total, target, np.square(error))
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)
