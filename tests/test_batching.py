"""Tests for mmjax.data.batching: train-only standardisation and fixed-shape epoch iterators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import Batch, Dataset
from mmjax.data.batching import (
    STD_FLOOR,
    FeatureStats,
    apply_standardizer,
    check_batch_size,
    fit_standardizer,
    iterate_batches,
    num_batches,
    standardize,
)


def _random_split(seed: int, n: int, *, shift: float = 0.0) -> Batch:
  """``n`` samples; text ``[n, 5, 3]`` and audio ``[n, 4, 2]`` with random lengths, zero padded.

  Sample ``i`` has label ``i`` so an iterator's output can be traced back to its rows.
  """
  rng = np.random.default_rng(seed)
  features, step_mask = {}, {}
  for m, (t, d) in {"text": (5, 3), "audio": (4, 2)}.items():
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=n)[:, None]
    x = rng.normal(loc=[3.0, -2.0, 0.5][:d], scale=[2.0, 0.5, 1.0][:d], size=(n, t, d)) + shift
    features[m] = np.where(mask[..., None], x, 0.0).astype(np.float32)
    step_mask[m] = mask
  return Batch.create(features, np.arange(n, dtype=np.float32), step_mask=step_mask)


def _dataset(shift_test: float = 0.0) -> Dataset:
  return Dataset(name="toy", task="regression", num_classes=None, splits={
      "train": _random_split(0, 40), "valid": _random_split(1, 9),
      "test": _random_split(2, 7, shift=shift_test)})


# ------------------------------------------------------------------ standardisation
def test_fit_standardizer_counts_only_real_present_valid_steps():
  # text [3 samples, 2 steps, 1 feature]; counted: (0,0)=1, (0,1)=3, (2,0)=8.
  # Excluded: (1, *) modality absent, (2,1) padding, sample 3 is an invalid (padding) row.
  text = np.array([[[1.0], [3.0]], [[100.0], [100.0]], [[8.0], [0.0]], [[50.0], [50.0]]],
                  np.float32)
  batch = Batch.create(
      {"text": text, "audio": np.ones((4, 1, 2), np.float32)}, np.zeros(4, np.float32),
      step_mask={"text": np.array([[1, 1], [1, 1], [1, 0], [1, 1]], bool),
                 "audio": np.ones((4, 1), bool)},
      present=np.array([[1, 1], [0, 1], [1, 1], [1, 1]], bool),
      valid=np.array([1, 1, 1, 0], bool))
  stats = fit_standardizer(batch)
  np.testing.assert_allclose(stats.mean["text"], [4.0])
  np.testing.assert_allclose(stats.std["text"], [np.sqrt(((1 - 4) ** 2 + 1 + 16) / 3)])
  # audio is constant: std is floored and the transform maps it to 0, not inf.
  np.testing.assert_allclose(stats.mean["audio"], [1.0, 1.0])
  np.testing.assert_allclose(stats.std["audio"], [STD_FLOOR, STD_FLOOR])
  out = apply_standardizer(batch, stats)
  np.testing.assert_array_equal(out.features["audio"][:3], 0.0)
  # Absent modality: zero in features, standardised in the clean copy; padding zero in both.
  np.testing.assert_array_equal(out.features["text"][1], 0.0)
  np.testing.assert_allclose(out.full_features["text"][1],
                             np.full((2, 1), (100.0 - 4.0) / stats.std["text"][0]))
  assert out.features["text"][2, 1, 0] == 0.0 and out.full_features["text"][2, 1, 0] == 0.0


def test_train_split_is_standardized_to_zero_mean_unit_std_over_valid_steps():
  ds = standardize(_dataset())
  train = ds.splits["train"]
  for m in train.modalities:
    valid = train.features[m][train.step_mask[m]]  # Shape: [n_valid_steps, D]
    np.testing.assert_allclose(valid.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(valid.std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(train.features[m][~train.step_mask[m]], 0.0)
    np.testing.assert_array_equal(train.full_features[m], train.features[m])
    assert train.features[m].dtype == np.float32


def test_statistics_come_from_train_only():
  """Shifting the test split changes neither the fitted transform nor the other splits."""
  base, shifted = _dataset(), _dataset(shift_test=100.0)
  out_base, out_shifted = standardize(base), standardize(shifted)
  for split in ("train", "valid"):
    for m in base.modalities:
      np.testing.assert_array_equal(out_shifted.splits[split].features[m],
                                    out_base.splits[split].features[m])
  stats = fit_standardizer(base.splits["train"])
  for m in base.modalities:
    mask = base.splits["test"].step_mask[m][..., None]
    expected = np.where(mask, out_base.splits["test"].features[m] + 100.0 / stats.std[m], 0.0)
    np.testing.assert_allclose(out_shifted.splits["test"].features[m], expected, rtol=1e-5,
                               atol=1e-3)
  # Explicit stats are used as given.
  given = FeatureStats(mean={m: np.zeros_like(v) for m, v in stats.mean.items()},
                       std={m: np.full_like(v, 2.0) for m, v in stats.std.items()})
  halved = standardize(base, given)
  np.testing.assert_allclose(halved.splits["valid"].features["text"],
                             base.splits["valid"].features["text"] / 2.0)


@pytest.mark.parametrize("make_case, field", [
    (lambda b: (b.replace(step_mask={m: np.zeros_like(v) for m, v in b.step_mask.items()}),
                None), "no valid time step"),
    (lambda b: (b, FeatureStats(mean={"text": np.zeros(3)}, std={"text": np.ones(3)})),
     "'audio'"),
    (lambda b: (b, FeatureStats(mean={"text": np.zeros(2), "audio": np.zeros(2)},
                                std={"text": np.ones(2), "audio": np.ones(2)})),
     "feature dimension 3"),
])
def test_standardizer_errors_name_the_problem(make_case, field):
  batch, stats = make_case(_random_split(0, 4))
  with pytest.raises(ValueError, match=field):
    apply_standardizer(batch, stats) if stats is not None else fit_standardizer(batch)


# ------------------------------------------------------------------ iteration
@pytest.mark.parametrize("n, batch_size, drop_remainder, expected", [
    (10, 4, False, 3), (10, 4, True, 2), (8, 4, False, 2), (8, 4, True, 2),
    (3, 4, False, 1), (3, 4, True, 0), (0, 4, False, 0),
])
def test_num_batches(n, batch_size, drop_remainder, expected):
  assert num_batches(n, batch_size, drop_remainder) == expected


@pytest.mark.parametrize("n, batch_size, shuffle, drop_remainder", [
    (10, 4, False, False), (10, 4, True, False), (10, 4, True, True),
    (12, 4, True, False), (3, 8, False, False), (3, 8, True, True), (1, 1, True, False),
])
def test_epoch_covers_each_sample_once_with_fixed_shapes(n, batch_size, shuffle, drop_remainder):
  split = _random_split(3, n)
  key = jax.random.key(7) if shuffle else None
  batches = list(iterate_batches(split, batch_size, key=key, drop_remainder=drop_remainder))
  assert len(batches) == num_batches(n, batch_size, drop_remainder)
  seen = []
  for batch in batches:
    assert batch.modalities == split.modalities
    for leaf, full in zip(jax.tree.leaves(batch), jax.tree.leaves(split)):
      assert isinstance(leaf, np.ndarray) and leaf.dtype == full.dtype
      assert leaf.shape == (batch_size, *full.shape[1:])
    rows = batch.label[batch.valid].astype(int)  # label i <=> row i of the split
    for m in split.modalities:  # real rows are the split's rows, padded rows are all-zero
      np.testing.assert_array_equal(batch.features[m][batch.valid], split.features[m][rows])
      np.testing.assert_array_equal(batch.step_mask[m][batch.valid], split.step_mask[m][rows])
      assert not batch.features[m][~batch.valid].any()
      assert not batch.step_mask[m][~batch.valid].any()
    assert not batch.present[~batch.valid].any() and not batch.label[~batch.valid].any()
    seen.extend(rows)
  if drop_remainder:
    assert len(seen) == len(set(seen)) == (n // batch_size) * batch_size
    assert all(batch.valid.all() for batch in batches)
  else:
    assert sorted(seen) == list(range(n))
    assert sum((~batch.valid).sum() for batch in batches) == len(batches) * batch_size - n
  if not shuffle:
    assert seen == list(range(len(seen)))


def test_shuffle_order_is_a_function_of_the_key():
  split = _random_split(0, 50)

  def order(key):
    return np.concatenate([b.label[b.valid] for b in iterate_batches(split, 8, key=key)])

  np.testing.assert_array_equal(order(jax.random.key(1)), order(jax.random.key(1)))
  np.testing.assert_array_equal(order(jax.random.key(1)),
                                np.asarray(jax.random.permutation(jax.random.key(1), 50)))
  assert not np.array_equal(order(jax.random.key(1)), order(jax.random.key(2)))
  assert not np.array_equal(order(jax.random.key(1)), np.arange(50))


def test_device_arrays_come_back_as_numpy():
  split = jax.tree.map(jnp.asarray, _random_split(0, 5))
  batch = next(iterate_batches(split, 4))
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(batch))


@pytest.mark.parametrize("batch_size, num_devices, message", [
    (6, 4, "batch_size: 6 is not divisible by the number of devices 4"),
    (0, 1, "batch_size"), (True, 1, "batch_size"), (4.0, 1, "batch_size"),
    (4, 0, "num_devices"),
])
def test_bad_batch_size_raises_eagerly(batch_size, num_devices, message):
  split = _random_split(0, 8)
  with pytest.raises(ValueError, match=message):
    iterate_batches(split, batch_size, num_devices=num_devices)  # no next(): checked at the call
  with pytest.raises(ValueError, match=message):
    check_batch_size(batch_size, num_devices)


def test_divisible_batch_size_with_the_forced_devices():
  check_batch_size(8, jax.device_count())  # conftest forces 4 CPU devices
  batches = list(iterate_batches(_random_split(0, 9), 8, num_devices=jax.device_count()))
  assert [b.valid.sum() for b in batches] == [8, 1]


def test_standardize_keeps_dataset_metadata():
  ds = _dataset()
  out = standardize(ds)
  assert (out.name, out.task, out.num_classes) == (ds.name, ds.task, ds.num_classes)
  assert out.feature_shapes() == ds.feature_shapes()
