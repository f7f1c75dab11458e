"""Evaluation metrics for multimodal sentiment analysis (MSA) and classification.

Host-side NumPy (no sklearn), evaluated once per split on whole arrays of predictions. The MSA
definitions follow the MMSA toolkit's ``metricsTop`` (Yu et al., 2020, "CH-SIMS"; Mao et al., 2022,
"M-SENA"), which is what EUAR, SAM-LML and EASE report; F1 scores follow sklearn's ``f1_score``.
Every definition and edge case is written out in ``docs/metrics.md``.

Public API:
  * :func:`msa_regression_metrics` -- MOSI / MOSEI (labels in [-3, 3]).
  * :func:`sims_regression_metrics` -- CH-SIMS (labels in [-1, 1]).
  * :func:`classification_metrics` -- accuracy, macro-F1 (EMMR's M-F1), weighted F1.
  * :func:`f1_scores`, :func:`pearson`, :func:`sims_bins` -- the building blocks.

Inputs may be NumPy arrays, JAX arrays or sequences. Floating inputs keep their precision for the
threshold, rounding and binning steps (float32 predictions are compared with the bin edges in
float32, exactly as MMSA does with float32 tensors); float16 / bfloat16 are widened to float32 and
integer / bool values to float64. MAE, Pearson correlation and all averages accumulate in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any  # np.ndarray | jax.Array | Sequence[float]

# Bin edges of CH-SIMS' 2-, 3- and 5-class accuracies; bin i is the half-open interval
# (edges[i], edges[i + 1]] (MMSA ``__eval_sims_regression``).
SIMS_BIN_EDGES: dict[int, tuple[float, ...]] = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}

_HALF_PRECISION = ("float16", "bfloat16")


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _as_real_array(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
  """Converts ``x`` to a finite, non-empty real array of rank ``ndim`` (see module docstring)."""
  arr = np.asarray(x)
  if arr.ndim != ndim:
    shape = "[N]" if ndim == 1 else "[N, C]"
    raise ValueError(f"{name}: expected a {ndim}-D array {shape}, got shape {arr.shape}")
  if arr.shape[0] == 0:
    raise ValueError(f"{name}: empty array; metrics need at least one sample")
  if arr.dtype.kind in "iub":
    arr = arr.astype(np.float64)
  elif arr.dtype.name in _HALF_PRECISION:
    arr = arr.astype(np.float32)
  elif arr.dtype not in (np.float32, np.float64):
    raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name}: contains NaN or inf")
  return arr


def _as_class_ids(x: ArrayLike, name: str) -> np.ndarray:
  """Converts ``x`` to a non-empty 1-D int64 array of non-negative class ids."""
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array of class ids [N], got shape {arr.shape}")
  if arr.shape[0] == 0:
    raise ValueError(f"{name}: empty array; metrics need at least one sample")
  if arr.dtype.kind not in "iub":
    raise ValueError(f"{name}: class ids must be integers, got dtype {arr.dtype}")
  arr = arr.astype(np.int64)
  if arr.min() < 0:
    raise ValueError(f"{name}: class ids must be >= 0, got {arr.min()}")
  return arr


def _check_same_length(pred: np.ndarray, label: np.ndarray) -> None:
  if pred.shape[0] != label.shape[0]:
    raise ValueError(
        f"pred and label: lengths differ ({pred.shape[0]} vs {label.shape[0]})")


def _regression_inputs(pred: ArrayLike, label: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  p = _as_real_array(pred, "pred", ndim=1)
  t = _as_real_array(label, "label", ndim=1)
  _check_same_length(p, t)
  return p, t


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def pearson(pred: ArrayLike, label: ArrayLike) -> float:
  """Pearson correlation coefficient between two 1-D arrays.

  ``r = Σ_i (p_i − p̄)(t_i − t̄) / sqrt(Σ_i (p_i − p̄)² · Σ_i (t_i − t̄)²)``, the off-diagonal entry
  of ``np.corrcoef(pred, label)`` (MMSA's "Corr").

  The coefficient is undefined when either array is constant (zero variance, including N = 1);
  this function then returns ``0.0`` -- "no linear relationship" -- instead of NumPy's NaN and
  RuntimeWarning, so that a collapsed model (constant output) scores 0 rather than poisoning
  averages over seeds. Both arrays are rescaled by their largest magnitude first (r is scale
  invariant) so that finite inputs never overflow, and the result is clipped to [−1, 1].

  Args:
    pred: ``[N]`` real values.
    label: ``[N]`` real values.

  Returns:
    The correlation as a Python float in [−1, 1].

  Raises:
    ValueError: if either input is not 1-D, is empty, is not finite, or the lengths differ.
  """
  p, t = _regression_inputs(pred, label)
  p, t = p.astype(np.float64), t.astype(np.float64)
  if np.ptp(p) == 0 or np.ptp(t) == 0:
    return 0.0
  p = p / np.abs(p).max()
  t = t / np.abs(t).max()
  pc, tc = p - p.mean(), t - t.mean()
  denom = np.sqrt(np.sum(pc * pc) * np.sum(tc * tc))
  if denom == 0:  # distinct values that collapsed when rescaled
    return 0.0
  return float(np.clip(np.sum(pc * tc) / denom, -1.0, 1.0))


def f1_scores(pred: ArrayLike, label: ArrayLike, num_classes: int) -> dict[str, Any]:
  """Per-class, macro and support-weighted F1 of integer class predictions.

  Per class c: ``F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)`` (= harmonic mean of precision and
  recall, 0 when TP_c = 0). The averages run over the classes that occur in ``label`` or ``pred``
  (sklearn's default ``labels=unique_labels(y_true, y_pred)``); a class in neither has an
  undefined F1, reported as NaN in ``per_class`` and left out of both averages:

  * ``macro = mean_{c present} F1_c`` (sklearn ``average='macro'``);
  * ``weighted = Σ_c support_c · F1_c / N`` with ``support_c = #{i: label_i = c}`` (sklearn
    ``average='weighted'``; a class that is only predicted has weight 0).

  Args:
    pred: ``[N]`` integer class ids in ``[0, num_classes)``.
    label: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes C.

  Returns:
    A dict with ``per_class`` (``[C]`` float64, NaN for classes absent from both inputs),
    ``support`` (``[C]`` int64), ``macro`` and ``weighted`` (Python floats).

  Raises:
    ValueError: if an input is not 1-D integers, is empty, has ids outside ``[0, num_classes)``,
      or the lengths differ; or if ``num_classes`` is not a positive integer.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1):
    raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
  p = _as_class_ids(pred, "pred")
  t = _as_class_ids(label, "label")
  _check_same_length(p, t)
  for name, ids in (("pred", p), ("label", t)):
    if ids.max() >= num_classes:
      raise ValueError(f"{name}: class id {ids.max()} out of range for num_classes={num_classes}")
  true_pos = np.bincount(t[p == t], minlength=num_classes)
  support = np.bincount(t, minlength=num_classes)
  predicted = np.bincount(p, minlength=num_classes)
  denom = support + predicted  # = 2·TP + FP + FN
  present = denom > 0
  per_class = np.full(num_classes, np.nan)
  per_class[present] = 2.0 * true_pos[present] / denom[present]
  macro = float(per_class[present].mean())
  weighted = float(np.sum(support[present] * per_class[present]) / t.shape[0])
  return {"per_class": per_class, "support": support, "macro": macro, "weighted": weighted}


def sims_bins(values: ArrayLike, num_classes: int) -> np.ndarray:
  """CH-SIMS class index of each value: i such that ``edges[i] < v <= edges[i + 1]``.

  Values are clipped to [−1, 1] first; edges are :data:`SIMS_BIN_EDGES` (2-class: 0 is negative;
  3-class: negative / neutral [−0.1, 0.1] / positive, with −0.1 negative and 0.1 neutral). The
  comparison is made in the values' own float precision.

  Args:
    values: ``[N]`` real values (predictions or labels).
    num_classes: 2, 3 or 5.

  Returns:
    ``[N]`` int64 bin indices in ``[0, num_classes)``.

  Raises:
    ValueError: if ``num_classes`` is not 2, 3 or 5, or ``values`` is not a finite 1-D array.
  """
  if num_classes not in SIMS_BIN_EDGES:
    raise ValueError(
        f"num_classes: expected one of {sorted(SIMS_BIN_EDGES)}, got {num_classes!r}")
  v = np.clip(_as_real_array(values, "values", ndim=1), -1.0, 1.0)
  edges = np.asarray(SIMS_BIN_EDGES[num_classes], dtype=v.dtype)
  # searchsorted(side='left') = #{edges < v}; v > edges[0] always, so the bin is that count − 1.
  return np.searchsorted(edges, v, side="left").astype(np.int64) - 1


def _binary_acc_f1(pred_positive: np.ndarray, label_positive: np.ndarray) -> tuple[float, float]:
  """Accuracy and weighted F1 of two boolean arrays; (nan, nan) when they are empty."""
  if label_positive.shape[0] == 0:
    return float("nan"), float("nan")
  p, t = pred_positive.astype(np.int64), label_positive.astype(np.int64)
  return float(np.mean(p == t)), f1_scores(p, t, num_classes=2)["weighted"]


def _rounded_accuracy(p: np.ndarray, t: np.ndarray, bound: float) -> float:
  """``mean(round(clip(p, ±bound)) == round(clip(t, ±bound)))`` with round-half-to-even."""
  return float(np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(t, -bound, bound))))


# ---------------------------------------------------------------------------------------------
# Task-level metric sets
# ---------------------------------------------------------------------------------------------


def msa_regression_metrics(pred: ArrayLike, label: ArrayLike) -> dict[str, float]:
  """MOSI / MOSEI regression metrics, labels in [−3, 3] (MMSA ``__eval_mosei_regression``).

  * ``mae = mean_i |p_i − t_i|`` on the raw (unclipped) values;
  * ``corr`` = :func:`pearson` (p, t) on the raw values (0.0 if either is constant);
  * ``acc7 = mean(round(clip(p, −3, 3)) == round(clip(t, −3, 3)))`` and ``acc5`` the same with
    clip ±2, where ``round`` is ``np.round`` (half to even: 2.5 → 2, −0.5 → −0 == 0);
  * ``acc2_has0 = mean((p ≥ 0) == (t ≥ 0))`` over all samples (negative vs non-negative) and
    ``f1_has0`` its support-weighted F1 (:func:`f1_scores` ``weighted``);
  * ``acc2_non0`` / ``f1_non0``: the same on the samples with ``t ≠ 0`` comparing ``p > 0`` with
    ``t > 0`` (negative vs positive, neutral excluded) -- the "Acc2 / F1" of EUAR and SAM-LML.
    NaN when every label is 0 (the subset is empty).

  Args:
    pred: ``[N]`` predicted sentiment scores.
    label: ``[N]`` true sentiment scores.

  Returns:
    A dict of Python floats with keys ``acc2_has0, f1_has0, acc2_non0, f1_non0, acc5, acc7, mae,
    corr`` (fractions in [0, 1], not percentages).

  Raises:
    ValueError: if an input is not a finite, non-empty 1-D real array or the lengths differ.
  """
  p, t = _regression_inputs(pred, label)
  acc2_has0, f1_has0 = _binary_acc_f1(p >= 0, t >= 0)
  non0 = t != 0
  acc2_non0, f1_non0 = _binary_acc_f1(p[non0] > 0, t[non0] > 0)
  return {
      "acc2_has0": acc2_has0,
      "f1_has0": f1_has0,
      "acc2_non0": acc2_non0,
      "f1_non0": f1_non0,
      "acc5": _rounded_accuracy(p, t, 2.0),
      "acc7": _rounded_accuracy(p, t, 3.0),
      "mae": float(np.mean(np.abs(p.astype(np.float64) - t.astype(np.float64)))),
      "corr": pearson(p, t),
  }


def sims_regression_metrics(pred: ArrayLike, label: ArrayLike) -> dict[str, float]:
  """CH-SIMS regression metrics, labels in [−1, 1] (MMSA ``__eval_sims_regression``).

  p and t are clipped to [−1, 1] first; then

  * ``acc2`` / ``acc3`` / ``acc5 = mean(bin_k(p) == bin_k(t))`` with :func:`sims_bins`
    (half-open bins (lo, hi] with edges [−1.01, 0, 1.01], [−1.01, −0.1, 0.1, 1.01],
    [−1.01, −0.7, −0.1, 0.1, 0.7, 1.01]);
  * ``f1`` = support-weighted F1 of the 2-class bins;
  * ``mae = mean|p − t|`` and ``corr`` = :func:`pearson`, both on the clipped values.

  Args:
    pred: ``[N]`` predicted sentiment scores.
    label: ``[N]`` true sentiment scores.

  Returns:
    A dict of Python floats with keys ``acc2, acc3, acc5, f1, mae, corr``.

  Raises:
    ValueError: if an input is not a finite, non-empty 1-D real array or the lengths differ.
  """
  p, t = _regression_inputs(pred, label)
  p, t = np.clip(p, -1.0, 1.0), np.clip(t, -1.0, 1.0)
  bins = {k: (sims_bins(p, k), sims_bins(t, k)) for k in SIMS_BIN_EDGES}
  return {
      "acc2": float(np.mean(bins[2][0] == bins[2][1])),
      "acc3": float(np.mean(bins[3][0] == bins[3][1])),
      "acc5": float(np.mean(bins[5][0] == bins[5][1])),
      "f1": f1_scores(bins[2][0], bins[2][1], num_classes=2)["weighted"],
      "mae": float(np.mean(np.abs(p.astype(np.float64) - t.astype(np.float64)))),
      "corr": pearson(p, t),
  }


def classification_metrics(pred_or_logits: ArrayLike, label: ArrayLike, *,
                           num_classes: int | None = None) -> dict[str, float]:
  """Accuracy, macro F1 (EMMR's "M-F1") and support-weighted F1 of a classifier.

  ``pred = argmax_c logits[:, c]`` for 2-D scores (ties go to the lowest class id), else the given
  integer ids; ``accuracy = mean(pred == label)``; ``macro_f1`` / ``weighted_f1`` from
  :func:`f1_scores`, averaged over the classes present in ``label`` or ``pred``.

  Args:
    pred_or_logits: ``[N]`` integer class ids, or ``[N, C]`` logits / probabilities.
    label: ``[N]`` integer class ids.
    num_classes: C. Optional: checked against the logits' width and the ids when given, otherwise
      taken from the logits or from the largest id. It never changes the averages (classes absent
      from both inputs are not counted).

  Returns:
    A dict of Python floats with keys ``accuracy, macro_f1, weighted_f1``.

  Raises:
    ValueError: on wrong rank, non-integer ids, non-finite logits, ids outside
      ``[0, num_classes)``, a logits width different from ``num_classes``, or mismatched lengths.
  """
  scores = np.asarray(pred_or_logits)
  if scores.ndim == 2:
    logits = _as_real_array(scores, "pred_or_logits", ndim=2)
    if logits.shape[1] == 0:
      raise ValueError(f"pred_or_logits: logits have no classes, shape {logits.shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
      raise ValueError(f"pred_or_logits: logits have {logits.shape[1]} classes, "
                       f"num_classes={num_classes}")
    num_classes = logits.shape[1]
    pred = np.argmax(logits, axis=1)
  elif scores.ndim == 1:
    pred = _as_class_ids(scores, "pred_or_logits")
  else:
    raise ValueError("pred_or_logits: expected class ids [N] or logits [N, C], "
                     f"got shape {scores.shape}")
  t = _as_class_ids(label, "label")
  _check_same_length(pred, t)
  if num_classes is None:
    num_classes = int(max(pred.max(), t.max())) + 1
  f1 = f1_scores(pred, t, num_classes)
  return {
      "accuracy": float(np.mean(pred == t)),
      "macro_f1": f1["macro"],
      "weighted_f1": f1["weighted"],
  }
