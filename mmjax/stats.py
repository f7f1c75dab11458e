"""Small statistics helpers for checking predicted uncertainty (EASE §4.5).

EASE checks its imputation variances with standardised residuals ``r = (z_gt - mu) / sigma``: if the
predicted Gaussians are calibrated, ``r ~ N(0, 1)``, and the Kolmogorov-Smirnov distance of the
residuals to the standard normal is small (the paper reports 0.076 and 0.083).
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
