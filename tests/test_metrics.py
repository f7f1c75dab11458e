"""Tests for mmjax.metrics: hand-computed cases (arithmetic in comments), independent references."""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import metrics

# ---------------------------------------------------------------------------------------------
# msa_regression_metrics: one hand-built case covering t = 0, |p| > 3 and .5 ties in p and t.
# ---------------------------------------------------------------------------------------------

#                   0     1     2    3     4    5    6    7
MSA_LABEL = [-3.0, -1.2, 0.0, 0.0, 0.4, 2.5, 3.0, -0.5]
MSA_PRED = [-3.6, -0.6, 0.3, -0.2, 0.6, 2.2, 2.5, 0.4]

MSA_EXPECTED = {
    # acc7: round(clip(., ±3)), half to even
    #   t -> [-3, -1, 0, 0, 0, 2 (2.5 ties to even), 3, -0 (-0.5 ties to even)]
    #   p -> [-3 (clipped from -3.6), -1, 0, -0, 1, 2, 2 (2.5 ties to even), 0]
    #   equal at 0, 1, 2, 3 (0 == -0), 5, 7 -> 6/8.  (Rounding half away from zero would give
    #   5/8, or 7/8 if applied to p only; no clipping 5/8.)
    "acc7": 6 / 8,
    # acc5: clip ±2 -> t [-2, -1.2, 0, 0, .4, 2, 2, -.5], p [-2, -.6, .3, -.2, .6, 2, 2, .4]
    #   rounded t [-2, -1, 0, 0, 0, 2, 2, -0], p [-2, -1, 0, -0, 1, 2, 2, 0] -> miss only 4: 7/8.
    "acc5": 7 / 8,
    # has0: t >= 0 = [F F T T T T T F], p >= 0 = [F F T F T T T T] -> misses at 3, 7: 6/8.
    "acc2_has0": 6 / 8,
    # class T: support 5, predicted 5, TP 4 -> F1 = 8/10; class F: support 3, predicted 3, TP 2
    #   -> 4/6. weighted = (5·0.8 + 3·2/3) / 8 = 6/8.
    "f1_has0": 6 / 8,
    # non0 drops 2, 3: t > 0 = [F F T T T F], p > 0 = [F F T T T T] -> miss at 7: 5/6.
    "acc2_non0": 5 / 6,
    # T: support 3, predicted 4, TP 3 -> 6/7; F: support 3, predicted 2, TP 2 -> 4/5;
    #   weighted = (3·6/7 + 3·4/5) / 6 = 29/35.
    "f1_non0": 29 / 35,
    # |p - t| = .6 .6 .3 .2 .2 .3 .5 .9 (unclipped), sum 3.6 -> 3.6/8.
    "mae": 3.6 / 8,
    "corr": np.corrcoef(MSA_PRED, MSA_LABEL)[0, 1],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_msa_regression_hand_case(dtype):
  got = metrics.msa_regression_metrics(np.array(MSA_PRED, dtype), np.array(MSA_LABEL, dtype))
  assert set(got) == set(MSA_EXPECTED)
  for key, want in MSA_EXPECTED.items():
    assert got[key] == pytest.approx(want, abs=1e-6), key
    assert isinstance(got[key], float), key


def test_msa_regression_accepts_jax_and_integer_inputs():
  want = metrics.msa_regression_metrics(np.array(MSA_PRED), np.array(MSA_LABEL))
  got = metrics.msa_regression_metrics(jnp.array(MSA_PRED), jnp.array(MSA_LABEL))
  assert got == pytest.approx(want, abs=1e-6)
  # Integer inputs (e.g. labels stored as ints) are read as floats: p = [1, -2, 0], t = [1, -1, 0]
  #   acc7: 2/3; has0: [T F T] vs [T F T] -> 1; non0 (drop 2): [T F] vs [T F] -> 1; mae 1/3.
  got = metrics.msa_regression_metrics([1, -2, 0], np.array([1, -1, 0], np.int32))
  assert (got["acc7"], got["acc2_has0"], got["acc2_non0"]) == pytest.approx((2 / 3, 1.0, 1.0))
  assert got["mae"] == pytest.approx(1 / 3)


def test_msa_regression_constant_prediction_and_all_zero_labels():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # degenerate cases must not warn
    # p = 0.5 everywhere, t = [1, 2, -1, 0]
    got = metrics.msa_regression_metrics(np.full(4, 0.5), np.array([1.0, 2.0, -1.0, 0.0]))
    # all-zero labels: non0 subset empty
    zeros = metrics.msa_regression_metrics(np.array([0.2, -0.3, 0.0]), np.zeros(3))
  # corr: p is constant -> defined as 0.
  assert got["corr"] == 0.0
  # has0: p >= 0 all T, t >= 0 = [T T F T] -> 3/4; T: support 3, predicted 4, TP 3 -> 6/7;
  #   F: support 1, predicted 0 -> 0; weighted = 3·6/7 / 4 = 9/14.
  assert (got["acc2_has0"], got["f1_has0"]) == pytest.approx((3 / 4, 9 / 14))
  # non0 = samples 0..2: p > 0 all T, t > 0 = [T T F] -> 2/3; T: 2·2/(2+3) = 4/5, F: 0;
  #   weighted = 2·4/5 / 3 = 8/15.
  assert (got["acc2_non0"], got["f1_non0"]) == pytest.approx((2 / 3, 8 / 15))
  # acc7: round(.5) = 0 (half to even) vs [1, 2, -1, 0] -> 1/4.
  assert got["acc7"] == pytest.approx(1 / 4)
  assert math.isnan(zeros["acc2_non0"]) and math.isnan(zeros["f1_non0"])
  # has0 with t = 0 everywhere: t >= 0 all T, p >= 0 = [T F T] -> 2/3; only class T has support
  #   (3): F1_T = 2·2/(3+2) = 4/5, weighted = 3·4/5 / 3 = 4/5.
  assert (zeros["acc2_has0"], zeros["f1_has0"]) == pytest.approx((2 / 3, 4 / 5))
  assert zeros["corr"] == 0.0  # constant label
  # mae = (.2 + .3 + 0) / 3
  assert zeros["mae"] == pytest.approx(0.5 / 3)


# ---------------------------------------------------------------------------------------------
# sims_regression_metrics / sims_bins
# ---------------------------------------------------------------------------------------------

#                    0     1     2     3    4    5    6    7
SIMS_LABEL = [-1.0, -0.8, -0.1, 0.0, 0.1, 0.2, 0.8, 1.0]
SIMS_PRED = [-1.3, -0.6, -0.05, 0.05, 0.1, 0.7, 0.75, 1.4]
SIMS_PRED_CLIPPED = [-1.0, -0.6, -0.05, 0.05, 0.1, 0.7, 0.75, 1.0]


def test_sims_regression_hand_case():
  got = metrics.sims_regression_metrics(np.array(SIMS_PRED), np.array(SIMS_LABEL))
  want = {
      # 2-class (0 negative): t [0 0 0 0 1 1 1 1], p [0 0 0 1 1 1 1 1] -> miss 3: 7/8.
      "acc2": 7 / 8,
      # 3-class (-1.01,-.1] (-.1,.1] (.1,1.01]: t [0 0 0 1 1 2 2 2] (-0.1 -> 0, 0.1 -> 1),
      #   p [0 0 1 1 1 2 2 2] -> miss 2: 7/8.
      "acc3": 7 / 8,
      # 5-class (-1.01,-.7] (-.7,-.1] (-.1,.1] (.1,.7] (.7,1.01]: t [0 0 1 2 2 3 4 4],
      #   p [0 1 2 2 2 3 4 4] (0.7 -> 3, 0.75 -> 4) -> miss 1, 2: 6/8.
      "acc5": 6 / 8,
      # 2-class F1: class 0 support 4, predicted 3, TP 3 -> 6/7; class 1 support 4, predicted 5,
      #   TP 4 -> 8/9; weighted = (6/7 + 8/9) / 2 = 55/63.
      "f1": 55 / 63,
      # on clipped p: |p - t| = 0 .2 .05 .05 0 .5 .05 0 -> .85/8 (unclipped would be 1.55/8).
      "mae": 0.85 / 8,
      "corr": np.corrcoef(SIMS_PRED_CLIPPED, SIMS_LABEL)[0, 1],
  }
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("num_classes, values, want", [
    # edges and their neighbours; bins are (lo, hi]
    (2, [-1.5, -1.0, -1e-9, 0.0, 1e-9, 1.0, 7.0], [0, 0, 0, 0, 1, 1, 1]),
    (3, [-0.1, -0.0999, 0.1, 0.1001, -3.0], [0, 1, 1, 2, 0]),
    (5, [-0.7, -0.6999, -0.1, 0.1, 0.7, 0.7001, 1.0], [0, 1, 1, 2, 3, 4, 4]),
])
def test_sims_bins_edges(num_classes, values, want):
  np.testing.assert_array_equal(metrics.sims_bins(np.array(values), num_classes), want)


def test_sims_bins_compare_in_input_precision():
  # Compared in float32 each value equals its edge, so it falls in the bin the edge closes (as in
  # MMSA with float32 tensors). Widened to float64 the stored values miss the decimal edges:
  # float32(0.1) = 0.1000000015 > 0.1 -> bin 3 (not 2); float32(-0.1) = -0.1000000015 <= -0.1 ->
  # bin 1 either way; float32(0.7) = 0.6999999881 <= 0.7 -> bin 3 either way;
  # float32(-0.7) = -0.6999999881 > -0.7 -> bin 1 (not 0).
  x32 = np.array([0.1, -0.1, 0.7, -0.7], np.float32)
  np.testing.assert_array_equal(metrics.sims_bins(x32, 5), [2, 1, 3, 0])
  np.testing.assert_array_equal(metrics.sims_bins(x32.astype(np.float64), 5), [3, 1, 3, 1])


# ---------------------------------------------------------------------------------------------
# f1_scores / classification_metrics
# ---------------------------------------------------------------------------------------------


def test_f1_scores_hand_case():
  # label [0 0 0 1 1 2], pred [0 0 1 1 2 2]
  #   class 0: support 3, predicted 2, TP 2 -> 4/5; class 1: support 2, predicted 2, TP 1 -> 1/2;
  #   class 2: support 1, predicted 2, TP 1 -> 2/3; class 3: in neither -> nan.
  #   macro = (4/5 + 1/2 + 2/3) / 3 = 59/90; weighted = (3·4/5 + 2·1/2 + 1·2/3) / 6 = 61/90.
  got = metrics.f1_scores(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 2]), 4)
  np.testing.assert_allclose(got["per_class"], [4 / 5, 1 / 2, 2 / 3, np.nan])
  np.testing.assert_array_equal(got["support"], [3, 2, 1, 0])
  assert (got["macro"], got["weighted"]) == pytest.approx((59 / 90, 61 / 90))


@pytest.mark.parametrize("pred, label, num_classes, want", [
    # 1-D ids; same as test_f1_scores_hand_case: accuracy 4/6.
    ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], None, (4 / 6, 59 / 90, 61 / 90)),
    # a class that is only predicted: label [0 0 1 1], pred [0 2 1 1]
    #   F1: class 0 2·1/(2+1) = 2/3, class 1 2·2/(2+2) = 1, class 2 0 (support 0, predicted 1).
    #   macro = (2/3 + 1 + 0)/3 = 5/9; weighted = (2·2/3 + 2·1 + 0)/4 = 5/6; accuracy 3/4.
    #   num_classes=4 adds class 3, absent from both: averages unchanged (not 5/12).
    ([0, 2, 1, 1], [0, 0, 1, 1], None, (3 / 4, 5 / 9, 5 / 6)),
    ([0, 2, 1, 1], [0, 0, 1, 1], 4, (3 / 4, 5 / 9, 5 / 6)),
    # single class present, all correct: every score 1.
    ([1, 1, 1], [1, 1, 1], 3, (1.0, 1.0, 1.0)),
    # constant wrong prediction: classes {0, 1}, both F1 = 0.
    ([0, 0, 0], [1, 1, 1], None, (0.0, 0.0, 0.0)),
    # bool ids are accepted as 0/1: label [T F T], pred [T T T]
    #   class 1: 2·2/(2+3) = 4/5, class 0: 0; macro 2/5, weighted 2·4/5 / 3 = 8/15.
    (np.array([True, True, True]), np.array([True, False, True]), None, (2 / 3, 2 / 5, 8 / 15)),
])
def test_classification_metrics_ids(pred, label, num_classes, want):
  got = metrics.classification_metrics(pred, label, num_classes=num_classes)
  assert (got["accuracy"], got["macro_f1"], got["weighted_f1"]) == pytest.approx(want)


def test_classification_metrics_logits_argmax_and_ties():
  # rows argmax -> [0, 0, 1, 1, 2, 2]; row 3 is a tie between classes 1 and 2 -> lowest id (1).
  logits = np.array([[3.0, 1.0, 0.0],
                     [0.9, 0.1, 0.0],
                     [0.0, 5.0, 1.0],
                     [0.0, 2.0, 2.0],
                     [-1.0, -2.0, 0.0],
                     [0.0, 0.0, 1e4]], np.float32)
  label = np.array([0, 0, 0, 1, 1, 2])
  want = metrics.classification_metrics(np.array([0, 0, 1, 1, 2, 2]), label)
  for scores in (logits, jnp.asarray(logits), jnp.asarray(logits, jnp.bfloat16)):
    assert metrics.classification_metrics(scores, label, num_classes=3) == pytest.approx(want)


def _reference_f1(pred: list[int], label: list[int]) -> tuple[float, float]:
  """Macro / weighted F1 from index sets, precision and recall (sklearn's definition)."""
  classes = sorted(set(pred) | set(label))
  f1 = {}
  for c in classes:
    predicted = {i for i, v in enumerate(pred) if v == c}
    actual = {i for i, v in enumerate(label) if v == c}
    hits = len(predicted & actual)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(actual) if actual else 0.0
    f1[c] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  macro = sum(f1.values()) / len(classes)
  weighted = sum(f1[c] * label.count(c) for c in classes) / len(label)
  return macro, weighted


@pytest.mark.parametrize("seed", range(20))
def test_f1_matches_set_based_reference(seed):
  rng = np.random.default_rng(seed)
  num_classes = int(rng.integers(1, 7))
  n = int(rng.integers(1, 40))
  # skewed class frequencies so that some classes are missing from label, pred or both
  probs = rng.dirichlet(np.full(num_classes, 0.5))
  label = rng.choice(num_classes, size=n, p=probs)
  pred = np.where(rng.random(n) < 0.5, label, rng.choice(num_classes, size=n, p=probs))
  got = metrics.f1_scores(pred, label, num_classes)
  want_macro, want_weighted = _reference_f1(pred.tolist(), label.tolist())
  assert (got["macro"], got["weighted"]) == pytest.approx((want_macro, want_weighted), abs=1e-12)
  cls = metrics.classification_metrics(pred, label, num_classes=num_classes)
  assert cls["accuracy"] == pytest.approx(sum(a == b for a, b in zip(pred, label)) / n)


# ---------------------------------------------------------------------------------------------
# pearson
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, label, want", [
    # means 2, 2: centred p [-1 0 1], t [-1 1 0]; Σ pc·tc = 1, Σ pc² = Σ tc² = 2 -> 1/2.
    ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], 0.5),
    ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 1.0),
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], -1.0),
    # scale invariance holds even where Σ x² would overflow float64
    ([1e300, 2e300, 3e300], [1.0, 3.0, 2.0], 0.5),
    # undefined (a constant input, or N = 1) -> 0.0
    ([0.1, 0.1, 0.1], [1.0, 2.0, 3.0], 0.0),
    ([1.0, 2.0, 3.0], [-2.0, -2.0, -2.0], 0.0),
    ([4.0], [2.0], 0.0),
])
def test_pearson_hand_cases(pred, label, want):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.pearson(np.array(pred), np.array(label)) == pytest.approx(want, abs=1e-12)


def test_pearson_matches_corrcoef_on_random_data():
  rng = np.random.default_rng(0)
  for _ in range(10):
    p = rng.normal(size=50)
    t = 0.7 * p + rng.normal(size=50)
    assert metrics.pearson(p, t) == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

_REGRESSION = (metrics.msa_regression_metrics, metrics.sims_regression_metrics, metrics.pearson)


@pytest.mark.parametrize("fn", _REGRESSION)
@pytest.mark.parametrize("pred, label, match", [
    ([0.1, 0.2], [0.1, 0.2, 0.3], "pred and label: lengths differ"),
    ([[0.1], [0.2]], [0.1, 0.2], "pred: expected a 1-D"),
    ([0.1, 0.2], [[0.1, 0.2]], "label: expected a 1-D"),
    ([0.1, np.nan], [0.1, 0.2], "pred: contains NaN or inf"),
    ([0.1, 0.2], [np.inf, 0.2], "label: contains NaN or inf"),
    ([], [], "pred: empty"),
    (["a", "b"], [0.1, 0.2], "pred: expected real numbers"),
])
def test_regression_input_errors(fn, pred, label, match):
  with pytest.raises(ValueError, match=match):
    fn(np.array(pred), np.array(label))


@pytest.mark.parametrize("pred, label, kwargs, match", [
    ([0.0, 1.0], [0, 1], {}, "pred_or_logits: class ids must be integers"),
    (np.zeros((2, 2, 2)), [0, 1], {}, r"pred_or_logits: expected class ids \[N\] or logits"),
    ([[0.0, np.nan], [1.0, 0.0]], [0, 1], {}, "pred_or_logits: contains NaN"),
    ([[0.0, 1.0], [1.0, 0.0]], [0, 1], {"num_classes": 3}, "pred_or_logits: logits have 2"),
    (np.zeros((2, 0)), [0, 1], {}, "pred_or_logits: logits have no classes"),
    ([0, 1], [0, 1.0], {}, "label: class ids must be integers"),
    ([0, 1], [0, -1], {}, "label: class ids must be >= 0"),
    ([0, 1], [0, 2], {"num_classes": 2}, "label: class id 2 out of range"),
    ([0, 3], [0, 1], {"num_classes": 2}, "pred: class id 3 out of range"),
    ([0, 1, 1], [0, 1], {}, "pred and label: lengths differ"),
])
def test_classification_input_errors(pred, label, kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.classification_metrics(np.array(pred), np.array(label), **kwargs)


@pytest.mark.parametrize("num_classes", [0, 2.0, True])
def test_f1_scores_rejects_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    metrics.f1_scores(np.array([0, 1]), np.array([0, 1]), num_classes)


def test_sims_bins_rejects_unknown_class_count():
  with pytest.raises(ValueError, match="num_classes: expected one of"):
    metrics.sims_bins(np.array([0.0]), 7)
