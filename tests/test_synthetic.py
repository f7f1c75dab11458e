"""Tests for the synthetic MSA generator (mmjax.data.synthetic).

The difficulty claims of the generative model are checked with an independent NumPy pipeline:
per-step standardisation fitted on train, masked mean-pooling, ridge regression fitted on train,
MAE on test.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mmjax.data import Batch, Dataset
from mmjax.data.synthetic import DEFAULT_MODALITIES, make_synthetic, sentiment_to_class

MODALITIES = ("text", "audio", "vision")


# ------------------------------------------------------------------ independent NumPy reference
def _stats(split: Batch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return {m: (split.features[m][split.step_mask[m]].mean(0),
              split.features[m][split.step_mask[m]].std(0)) for m in split.modalities}


def _pooled(split: Batch, stats, modalities=MODALITIES, *, zero=(), noise_variance=0.0,
            seed=0) -> np.ndarray:
  """``[N, Σ D_m]``: standardised, optionally noised / zeroed, masked-mean-pooled features."""
  rng = np.random.default_rng(seed)
  out = []
  for m in modalities:
    mask = split.step_mask[m][..., None]
    z = (split.features[m].astype(np.float64) - stats[m][0]) / stats[m][1]
    z = z + rng.normal(0.0, np.sqrt(noise_variance), z.shape)
    pooled = np.where(mask, z, 0.0).sum(1) / mask.sum(1)
    out.append(np.zeros_like(pooled) if m in zero else pooled)
  return np.concatenate(out, axis=-1)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> np.ndarray:
  xa = np.c_[x, np.ones(len(x))]
  reg = lam * np.eye(xa.shape[1])
  reg[-1, -1] = 0.0  # no penalty on the intercept
  return np.linalg.solve(xa.T @ xa + reg, xa.T @ y)


def _mae(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.abs(np.c_[x, np.ones(len(x))] @ w - y).mean())


@pytest.fixture(scope="module", params=[0, 1])
def ridge_maes(request) -> dict[str, float]:
  """Test MAEs of ridge models on the default dataset for key ``request.param``."""
  ds = make_synthetic(jax.random.key(request.param))
  train, test = ds.splits["train"], ds.splits["test"]
  stats = _stats(train)
  maes = {}
  for subset in (("text",), ("vision",), MODALITIES):
    w = _ridge(_pooled(train, stats, subset), train.label)
    maes["+".join(subset)] = _mae(w, _pooled(test, stats, subset), test.label)
  w = _ridge(_pooled(train, stats), train.label)
  for m in ("text", "vision"):
    maes[f"all_without_{m}"] = _mae(w, _pooled(test, stats, zero=(m,)), test.label)
  maes["all_noise1"] = _mae(w, _pooled(test, stats, noise_variance=1.0), test.label)
  maes["chance"] = float(np.abs(test.label - np.median(train.label)).mean())
  return maes


# ------------------------------------------------------------------ difficulty (a)-(d)
def test_text_alone_beats_vision_alone_and_chance(ridge_maes):
  assert ridge_maes["text"] < 0.8 * ridge_maes["vision"]
  assert ridge_maes["vision"] < 0.9 * ridge_maes["chance"]


def test_all_modalities_beat_text_alone(ridge_maes):
  assert ridge_maes["text+audio+vision"] < 0.85 * ridge_maes["text"]


def test_dropping_text_hurts_much_more_than_dropping_vision(ridge_maes):
  full = ridge_maes["text+audio+vision"]
  text_loss = ridge_maes["all_without_text"] - full
  vision_loss = ridge_maes["all_without_vision"] - full
  assert vision_loss > 0
  assert text_loss > 2.5 * vision_loss
  assert text_loss > 0.3


def test_unit_variance_noise_hurts_concatenation(ridge_maes):
  assert ridge_maes["all_noise1"] > 1.15 * ridge_maes["text+audio+vision"]


# ------------------------------------------------------------------ determinism (e)
def test_same_key_same_arrays_different_key_different_arrays():
  a, b = (make_synthetic(jax.random.key(3), 40, 10, 10) for _ in range(2))
  c = make_synthetic(jax.random.key(4), 40, 10, 10)
  for split in ("train", "valid", "test"):
    for leaf_a, leaf_b in zip(jax.tree.leaves(a.splits[split]), jax.tree.leaves(b.splits[split])):
      np.testing.assert_array_equal(leaf_a, leaf_b)
    assert not np.array_equal(a.splits[split].features["text"], c.splits[split].features["text"])
    assert not np.array_equal(a.splits[split].label, c.splits[split].label)


def test_smaller_split_is_a_prefix_and_splits_are_independent_of_other_sizes():
  big = make_synthetic(jax.random.key(5), 300, 7, 9)
  small = make_synthetic(jax.random.key(5), 20, 7, 1)
  expected = {"train": big.splits["train"].take(np.arange(20)), "valid": big.splits["valid"],
              "test": big.splits["test"].take(np.arange(1))}
  for split, want in expected.items():
    for got_leaf, want_leaf in zip(jax.tree.leaves(small.splits[split]), jax.tree.leaves(want)):
      np.testing.assert_array_equal(got_leaf, want_leaf)


# ------------------------------------------------------------------ labels (f)
def test_regression_labels_cover_every_acc7_class_within_range():
  ds = make_synthetic(jax.random.key(0))
  assert ds.task == "regression" and ds.num_classes is None and ds.name == "synthetic"
  for split in ds.splits.values():
    assert split.label.dtype == np.float32
    assert np.abs(split.label).max() <= 3.0
  train = ds.splits["train"].label
  np.testing.assert_array_equal(np.unique(np.round(train)), np.arange(-3, 4))
  assert 0.01 < np.mean(train == 0) < 0.1  # the documented 5 % exact zeros
  assert 1.2 < train.std() < 1.8


def test_classification_bins_the_regression_scores_with_balanced_classes():
  regression = make_synthetic(jax.random.key(0))
  classification = make_synthetic(jax.random.key(0), task="classification", num_classes=3)
  assert classification.num_classes == 3
  for split in ("train", "valid", "test"):
    label = classification.splits[split].label
    assert label.dtype == np.int32
    # Same key -> same latent draws: the class is the bin of the regression score.
    np.testing.assert_array_equal(
        label, np.asarray(sentiment_to_class(regression.splits[split].label, 3)))
    np.testing.assert_array_equal(classification.splits[split].features["audio"],
                                  regression.splits[split].features["audio"])
  share = np.bincount(classification.splits["train"].label, minlength=3) / 1200
  assert share.min() > 0.2 and share.max() < 0.45, share


@pytest.mark.parametrize("num_classes, score, expected", [
    (2, [-3.0, -1e-6, 0.0, 0.3, 3.0], [0, 0, 1, 1, 1]),
    (3, [-3.0, -0.51, -0.5, 0.0, 0.5, 0.51, 3.0], [0, 0, 1, 1, 1, 2, 2]),
    (7, [-3.7, -2.5, -1.5, -0.5, 0.0, 0.5, 1.49, 2.5, 2.51, 9.0], [0, 1, 1, 3, 3, 3, 4, 5, 6, 6]),
])
def test_sentiment_to_class_bins(num_classes, score, expected):
  got = np.asarray(sentiment_to_class(np.array(score, np.float32), num_classes))
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.int32


def test_label_noise_perturbs_labels_only():
  clean = make_synthetic(jax.random.key(2), 2000, 1, 1)
  noisy = make_synthetic(jax.random.key(2), 2000, 1, 1, label_noise=0.5)
  np.testing.assert_array_equal(clean.splits["train"].features["text"],
                                noisy.splits["train"].features["text"])
  diff = noisy.splits["train"].label - clean.splits["train"].label
  inside = np.abs(clean.splits["train"].label) < 1.5  # clipping at ±3 is rare there
  assert np.abs(noisy.splits["train"].label).max() <= 3.0
  assert abs(diff[inside].mean()) < 0.05
  assert 0.45 < diff[inside].std() < 0.55


# ------------------------------------------------------------------ sequences (g) and shapes
def test_padding_is_zero_masked_and_a_shared_suffix():
  ds = make_synthetic(jax.random.key(0), 200, 1, 1)
  train = ds.splits["train"]
  lengths = {m: train.step_mask[m].sum(1) for m in MODALITIES}
  for m in MODALITIES:
    mask = train.step_mask[m]
    # Valid steps form a prefix of length L in [ceil(0.5 T), T].
    np.testing.assert_array_equal(mask, np.arange(20)[None, :] < lengths[m][:, None])
    assert lengths[m].min() >= 10 and lengths[m].max() == 20 and lengths[m].min() < 20
    np.testing.assert_array_equal(train.features[m][~mask], 0.0)
    assert np.all(np.abs(train.features[m][mask]).max(-1) > 0)
    np.testing.assert_array_equal(train.full_features[m], train.features[m])
  # Equal T_m: one utterance length per sample, shared by the (aligned) modalities.
  np.testing.assert_array_equal(lengths["text"], lengths["vision"])
  assert train.present.all() and train.valid.all()


@pytest.mark.parametrize("seq_len, min_gain_spread", [(12, 0.9), (1, 0.0)])
def test_noise_free_model_is_a_fixed_projection_of_the_sentiment_times_the_gain(
    seq_len, min_gain_spread):
  """With every noise source off, x_t = g_t · s · w: one direction w for all samples and splits."""
  spec = dataclasses.replace(DEFAULT_MODALITIES["text"], seq_len=seq_len, dim=5, intensity=0.0,
                             reading_noise=0.0, bias=0.0, bias_visibility=0.0, nuisance=0.0)
  ds = make_synthetic(jax.random.key(1), 50, 1, 20, modalities={"text": spec}, step_noise=0.0)
  batch = jax.tree.map(lambda a, b: np.concatenate([a, b]), ds.splits["train"], ds.splits["test"])
  x, mask, s = batch.features["text"], batch.step_mask["text"], batch.label
  keep = np.abs(s) > 0.1
  x, mask, s = x[keep], mask[keep], s[keep]
  pooled = x.sum(1) / mask.sum(1, keepdims=True)  # = s · w: the gain averages to exactly 1
  w = pooled / s[:, None]
  np.testing.assert_allclose(w, np.broadcast_to(w[0], w.shape), rtol=1e-4, atol=1e-5)
  gain = (x @ w[0]) / (s[:, None] * (w[0] @ w[0]))  # g_t, Shape: [N, T]
  np.testing.assert_allclose(x, gain[..., None] * s[:, None, None] * w[0], atol=1e-5)
  assert gain[mask].min() >= 0.5 - 1e-4 and gain[mask].max() <= 1.5 + 1e-4
  assert gain[mask].max() - gain[mask].min() >= min_gain_spread  # the sinusoid really varies


@pytest.mark.parametrize("seq_len, dims, expected", [
    (None, None, {"text": (20, 32), "audio": (20, 16), "vision": (20, 16)}),
    (8, {"vision": 3}, {"text": (8, 32), "audio": (8, 16), "vision": (8, 3)}),
    ({"audio": 30}, 4, {"text": (20, 4), "audio": (30, 4), "vision": (20, 4)}),
])
def test_shapes_and_overrides(seq_len, dims, expected):
  ds = make_synthetic(jax.random.key(0), 6, 2, 3, seq_len=seq_len, dims=dims)
  assert isinstance(ds, Dataset)
  assert ds.modalities == MODALITIES
  assert ds.feature_shapes() == expected
  assert {s: b.batch_size for s, b in ds.splits.items()} == {"train": 6, "valid": 2, "test": 3}
  for m, (t, d) in expected.items():
    assert ds.splits["valid"].features[m].dtype == np.float32
    assert ds.splits["valid"].step_mask[m].shape == (2, t)


def test_empty_evaluation_splits_are_allowed():
  ds = make_synthetic(jax.random.key(0), 3, 0, 0, seq_len=4, dims=2)
  assert ds.splits["test"].batch_size == 0
  assert ds.splits["test"].features["text"].shape == (0, 4, 2)


@pytest.mark.parametrize("kwargs, field", [
    ({"n_train": 0}, "n_train"),
    ({"n_test": -1}, "n_test"),
    ({"n_valid": 2.0}, "n_valid"),
    ({"task": "ranking"}, "task"),
    ({"task": "classification", "num_classes": 4}, "num_classes"),
    ({"seq_len": {"depth": 3}}, "seq_len"),
    ({"dims": 0}, "dim"),
    ({"seq_len": 2.5}, "seq_len"),
    ({"label_noise": -0.1}, "label_noise"),
    ({"min_length_fraction": 0.0}, "min_length_fraction"),
    ({"zero_fraction": 1.5}, "zero_fraction"),
    ({"modalities": {}}, "modalities"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    make_synthetic(jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match="num_classes"):
    sentiment_to_class(np.zeros(2), 5)
