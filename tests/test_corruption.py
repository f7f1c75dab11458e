"""Tests for mmjax.data.corruption: each protocol against its definition (Monte Carlo / NumPy)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import corruption
from mmjax.data.batch import Batch

MODS = ("text", "audio", "vision")
T, D = 4, 2


# ---------------------------------------------------------------------------------- fixtures
def clean_batch(b: int, modalities=MODS, seed: int = 0) -> Batch:
  """All samples valid, all modalities present, all steps real."""
  rng = np.random.default_rng(seed)
  features = {m: rng.normal(size=(b, T, D)).astype(np.float32) for m in modalities}
  return Batch.create(features, np.zeros(b, np.float32))


def messy_batch(b: int = 64, seed: int = 1, dtype=np.float32) -> Batch:
  """Padded steps, absent modalities and invalid rows (whose features are ~100x larger)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=(b, len(MODS)))
  present = rng.random((b, len(MODS))) < 0.75
  present[np.arange(b), rng.integers(len(MODS), size=b)] = True
  valid = np.arange(b) < b - b // 8
  step_mask, features, full = {}, {}, {}
  for i, m in enumerate(MODS):
    step_mask[m] = np.arange(T)[None] < lengths[:, i, None]
    scale = np.where(valid, 1.0, 100.0)[:, None, None]
    full[m] = (rng.normal(size=(b, T, D)) * scale * step_mask[m][..., None]).astype(dtype)
    features[m] = full[m] * present[:, i, None, None]
  return Batch.create(features, np.zeros(b, np.float32), step_mask=step_mask, present=present,
                      full_features=full, valid=valid)


def observed(batch: Batch, i: int) -> np.ndarray:
  """Independent NumPy version of "observed entries": [B, T] bool."""
  m = batch.modalities[i]
  return (np.asarray(batch.step_mask[m]) & np.asarray(batch.present)[:, i, None]
          & np.asarray(batch.valid)[:, None])


def arrays(batch: Batch) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  return {jax.tree_util.keystr(p): np.asarray(x, np.float32) for p, x in leaves}


def assert_batches_equal(a: Batch, b: Batch, *, atol: float = 0.0) -> None:
  assert a.modalities == b.modalities
  xa, xb = arrays(a), arrays(b)
  assert xa.keys() == xb.keys()
  for k in xa:
    np.testing.assert_allclose(xa[k], xb[k], atol=atol, rtol=0, err_msg=k)


KEY = jax.random.key(0)

# (protocol, strength, static keyword arguments); keep_modalities takes (batch, subset) only.
CASES = {
    "drop_modalities": (corruption.drop_modalities, 0.5, {}),
    "drop_one_modality": (corruption.drop_one_modality, 0.4, {}),
    "keep_modalities": (corruption.keep_modalities, None, {"subset": ("text", "vision")}),
    "mask_time_steps": (corruption.mask_time_steps, 0.3, {}),
    "gaussian_noise": (corruption.gaussian_noise, 0.5, {"modalities": ("audio", "vision")}),
    "salt_pepper_noise": (corruption.salt_pepper_noise, 0.3, {"modalities": "audio"}),
    "mix_noise": (corruption.mix_noise, 0.3, {}),
    "laplace_noise": (corruption.laplace_noise, 0.7, {"modalities": ("text",)}),
    "random_erasing": (corruption.random_erasing, 0.3, {}),
    "laplace_or_erasing": (corruption.laplace_or_erasing, 0.4, {"modalities": ("audio", "text")}),
}
RANDOM = [name for name in CASES if name != "keep_modalities"]
VALUE_LEVEL = ["mask_time_steps", "gaussian_noise", "salt_pepper_noise", "mix_noise",
               "laplace_noise", "random_erasing", "laplace_or_erasing"]


def apply(name: str, key, batch: Batch, strength=None, *, jit: bool = False) -> Batch:
  fn, default, kwargs = CASES[name]
  f = jax.jit(fn, static_argnames=tuple(kwargs)) if jit else fn
  if name == "keep_modalities":
    return f(batch, **kwargs)
  return f(key, batch, default if strength is None else strength, **kwargs)


# ---------------------------------------------------------------------------------- generic
@pytest.mark.parametrize("name", list(CASES))
def test_full_features_and_input_unchanged(name):
  batch = messy_batch()
  before = {k: v.copy() for k, v in arrays(batch).items()}
  out = apply(name, KEY, batch)
  for m in MODS:
    np.testing.assert_array_equal(
        np.asarray(out.full_features[m]), before[f".full_features['{m}']"])
    np.testing.assert_array_equal(
        np.asarray(out.full_step_mask[m]), before[f".full_step_mask['{m}']"])
  for k, v in arrays(batch).items():  # the input batch is not modified in place
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  assert isinstance(out, Batch) and out is not batch


@pytest.mark.parametrize("name", list(CASES))
def test_jit_matches_eager(name):
  batch = messy_batch()
  assert_batches_equal(apply(name, KEY, batch, jit=True), apply(name, KEY, batch), atol=1e-6)


def test_jit_traces_the_strength():
  """One compiled function serves every rate of a sweep (the rate is a traced argument)."""
  batch = clean_batch(256)
  traces = []

  @jax.jit
  def f(key, batch, rate):
    traces.append(rate)
    return corruption.drop_modalities(key, batch, rate)

  for rate in (0.2, 0.5):
    assert_batches_equal(f(KEY, batch, rate), corruption.drop_modalities(KEY, batch, rate))
  assert len(traces) == 1


@pytest.mark.parametrize("name", RANDOM)
def test_same_key_same_output_different_key_differs(name):
  batch = messy_batch()
  a, b = apply(name, KEY, batch), apply(name, KEY, batch)
  assert_batches_equal(a, b)
  c = apply(name, jax.random.key(1), batch)
  assert any(not np.array_equal(x, y) for x, y in zip(arrays(a).values(), arrays(c).values()))


@pytest.mark.parametrize("name", RANDOM)
def test_zero_strength_is_identity(name):
  batch = messy_batch()
  assert_batches_equal(apply(name, KEY, batch, 0.0), batch)


@pytest.mark.parametrize("name", list(CASES))
def test_dtype_preserved(name):
  batch = messy_batch(dtype=jnp.bfloat16)
  out = apply(name, KEY, batch)
  assert all(out.features[m].dtype == jnp.bfloat16 for m in MODS)
  assert all(out.step_mask[m].dtype == bool for m in MODS) and out.present.dtype == bool


@pytest.mark.parametrize("name", VALUE_LEVEL)
def test_only_observed_entries_of_listed_modalities_change(name):
  """Padding steps, absent modalities, invalid rows and unlisted modalities are untouched."""
  batch = messy_batch(b=256)
  out = apply(name, KEY, batch, 0.9)
  listed = CASES[name][2].get("modalities", MODS)
  listed = (listed,) if isinstance(listed, str) else listed
  for i, m in enumerate(MODS):
    x, y = np.asarray(batch.features[m]), np.asarray(out.features[m], np.float32)
    frozen = ~observed(batch, i) if m in listed else np.ones(x.shape[:2], bool)
    np.testing.assert_array_equal(y[frozen], x[frozen], err_msg=m)
    if m in listed:  # and the observed entries did change
      assert not np.array_equal(y[~frozen], x[~frozen]), m
  np.testing.assert_array_equal(np.asarray(out.present), np.asarray(batch.present))


# ---------------------------------------------------------------------------------- drops
@pytest.mark.parametrize("num_mod", [2, 3])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_drop_modalities_realised_missing_rate(num_mod, rate):
  b = 20_000
  batch = clean_batch(b, MODS[:num_mod])
  out = corruption.drop_modalities(jax.random.key(int(rate * 10)), batch, rate)
  present = np.asarray(out.present)
  target = min(rate, (num_mod - 1) / num_mod)
  assert abs((1 - present.sum() / (b * num_mod)) - target) < 0.01  # SAM-LML eq. 34
  dropped = num_mod - present.sum(axis=1)
  assert set(np.unique(dropped)) <= {math.floor(target * num_mod + 1e-9),
                                     math.ceil(target * num_mod - 1e-9)}
  assert dropped.max() <= num_mod - 1  # never a sample with no modality
  np.testing.assert_allclose(1 - present.mean(axis=0), target, atol=0.02)  # which: uniform
  for i, m in enumerate(batch.modalities):
    x, y = np.asarray(batch.features[m]), np.asarray(out.features[m])
    np.testing.assert_array_equal(y, x * present[:, i, None, None])
    np.testing.assert_array_equal(np.asarray(out.step_mask[m]), np.asarray(batch.step_mask[m]))


def test_drop_modalities_counts_already_absent_modalities():
  """Audio already absent: at MR 0.9 (2 of 3 dropped) one of text/vision is dropped, uniformly."""
  b = 20_000
  batch = corruption.keep_modalities(clean_batch(b), ("text", "vision"))
  present = np.asarray(corruption.drop_modalities(KEY, batch, 0.9).present)
  np.testing.assert_array_equal(present.sum(axis=1), 1)
  assert not present[:, 1].any()
  assert abs(present[:, 0].mean() - 0.5) < 4.5 * math.sqrt(0.25 / b)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_drop_one_modality(ratio):
  b = 20_000
  present = np.asarray(corruption.drop_one_modality(KEY, clean_batch(b), ratio).present)
  dropped = 3 - present.sum(axis=1)
  assert set(np.unique(dropped)) <= {0, 1}
  assert abs(dropped.mean() - ratio) < 4.5 * math.sqrt(ratio * (1 - ratio) / b)
  n = dropped.sum()
  which = (~present[dropped == 1]).mean(axis=0)  # share of each modality among the drops
  np.testing.assert_allclose(which, 1 / 3, atol=4.5 * math.sqrt(2 / 9 / n))


def test_drop_one_modality_spares_samples_with_one_modality():
  batch = corruption.keep_modalities(clean_batch(100), "audio")
  assert np.asarray(corruption.drop_one_modality(KEY, batch, 1.0).present)[:, 1].all()


@pytest.mark.parametrize("subset", corruption.modality_subsets(MODS))
def test_keep_modalities(subset):
  batch = messy_batch()
  out = corruption.keep_modalities(batch, subset)
  keep = np.array([m in subset for m in MODS])
  expected_present = np.asarray(batch.present) & keep
  np.testing.assert_array_equal(np.asarray(out.present), expected_present)
  for i, m in enumerate(MODS):
    x = np.asarray(batch.features[m])
    np.testing.assert_array_equal(np.asarray(out.features[m]), x * keep[i])
    np.testing.assert_array_equal(np.asarray(out.step_mask[m]), np.asarray(batch.step_mask[m]))


def test_modality_subsets_order():
  t, a, v = MODS
  assert corruption.modality_subsets(MODS) == [
      (t,), (a,), (v,), (t, a), (t, v), (a, v), (t, a, v)]
  four = corruption.modality_subsets(("a", "b", "c", "d"))
  assert len(four) == 15 == len(set(four)) and four[-1] == ("a", "b", "c", "d")


# ---------------------------------------------------------------------------------- intra-modal
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_mask_time_steps(rate):
  batch = messy_batch(b=8000)
  out = corruption.mask_time_steps(KEY, batch, rate)
  n_obs = n_masked = 0
  for i, m in enumerate(MODS):
    obs = observed(batch, i)
    before, after = np.asarray(batch.step_mask[m]), np.asarray(out.step_mask[m])
    masked = before & ~after
    assert not (after & ~before).any()  # masking never un-masks
    assert not (masked & ~obs).any()  # only observed steps are masked
    y, x = np.asarray(out.features[m]), np.asarray(batch.features[m])
    np.testing.assert_array_equal(y, np.where(masked[..., None], 0.0, x))
    n_obs, n_masked = n_obs + obs.sum(), n_masked + masked.sum()
  assert abs(n_masked / n_obs - rate) < 4.5 * math.sqrt(rate * (1 - rate) / n_obs)


# ---------------------------------------------------------------------------------- noise
def noise_diffs(fn, strength, b=20_000, **kwargs):
  """(output − input) on observed entries, pooled over modalities, and the pieces."""
  batch = messy_batch(b=b)
  out = fn(KEY, batch, strength, **kwargs)
  xs, ys = [], []
  for i, m in enumerate(MODS):
    obs = observed(batch, i)
    xs.append(np.asarray(batch.features[m])[obs])
    ys.append(np.asarray(out.features[m])[obs])
  return batch, out, np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("variance", [0.25, 2.0])
def test_gaussian_noise_variance(variance):
  _, _, x, y = noise_diffs(corruption.gaussian_noise, variance)
  diff = (y - x).ravel()
  se = math.sqrt(2 / diff.size)
  assert abs(diff.var() / variance - 1) < 4.5 * se
  assert abs(diff.mean()) < 4.5 * math.sqrt(variance / diff.size)


@pytest.mark.parametrize("scale", [0.3, 1.5])
def test_laplace_noise_variance_and_mean_abs(scale):
  _, _, x, y = noise_diffs(corruption.laplace_noise, scale)
  diff = (y - x).ravel()
  assert abs(diff.var() / (2 * scale**2) - 1) < 4.5 * math.sqrt(5 / diff.size)
  # E|noise| = scale for Laplace (a Gaussian of equal variance would give ~1.13 scale).
  assert abs(np.abs(diff).mean() / scale - 1) < 4.5 * math.sqrt(1 / diff.size)


@pytest.mark.parametrize("amount", [0.05, 0.3])
def test_salt_pepper_fraction_and_values(amount):
  batch, out, _, _ = noise_diffs(corruption.salt_pepper_noise, amount)
  hits = total = lows = 0
  for i, m in enumerate(MODS):
    obs = observed(batch, i)
    x, y = np.asarray(batch.features[m])[obs], np.asarray(out.features[m])[obs]  # [n, D]
    lo, hi = x.min(axis=0), x.max(axis=0)  # per feature dim over observed entries of the batch
    changed = y != x
    assert np.all((y == lo) | (y == hi) | ~changed)
    hits, total = hits + changed.sum(), total + changed.size
    lows += (changed & (y == lo)).sum()
  assert abs(hits / total - amount) < 4.5 * math.sqrt(amount * (1 - amount) / total)
  assert abs(lows / hits - 0.5) < 4.5 * math.sqrt(0.25 / hits)  # equal odds of min and max


@pytest.mark.parametrize("rate", [0.1, 0.6])
def test_random_erasing_fraction(rate):
  _, _, x, y = noise_diffs(corruption.random_erasing, rate)
  erased = (y == 0) & (x != 0)
  np.testing.assert_array_equal(y[~erased], x[~erased])
  assert abs(erased.mean() - rate) < 4.5 * math.sqrt(rate * (1 - rate) / erased.size)


@pytest.mark.parametrize("rate", [0.1, 0.7])
def test_mix_noise_formula(rate):
  """(1 − NR)·U + NR·N(0, 1) with N = normal(fold_in(key, i)) exactly (SAM-LML eq. 35)."""
  batch = messy_batch()
  out = corruption.mix_noise(KEY, batch, rate)
  for i, m in enumerate(MODS):
    x = np.asarray(batch.features[m])
    eps = np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), x.shape, jnp.float32))
    expected = np.where(observed(batch, i)[..., None], (1 - rate) * x + rate * eps, x)
    np.testing.assert_allclose(np.asarray(out.features[m]), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_laplace_or_erasing_per_sample(rate):
  """One noise type per sample (equal odds, shared by its modalities): erased samples keep or zero
  each entry (fraction ``rate``); the others are ``(1 − NR) x + NR ε`` with ``ε`` of unit
  variance and Laplace's ``E|ε| = 1/√2`` (a Gaussian would give ``√(2/π) ≈ 0.80``)."""
  batch = messy_batch(b=4000)
  out = corruption.laplace_or_erasing(KEY, batch, rate)
  kinds = []  # per sample and modality: True = Laplace
  erased_hits = erased_total = 0
  residuals = []
  for i, m in enumerate(MODS):
    obs = observed(batch, i)[..., None] & np.ones(batch.features[m].shape, bool)
    x, y = np.asarray(batch.features[m]), np.asarray(out.features[m])
    np.testing.assert_array_equal(y[~obs], x[~obs])
    untouched_or_zero = np.where(obs, (y == x) | (y == 0), True).all(axis=(1, 2))
    kinds.append(~untouched_or_zero)
    erased = obs & untouched_or_zero[:, None, None]
    erased_hits += ((y == 0) & (x != 0) & erased).sum()
    erased_total += erased.sum()
    laplace = obs & ~untouched_or_zero[:, None, None]
    residuals.append(((y - (1 - rate) * x) / rate)[laplace])
  has_any = np.stack([observed(batch, i).any(-1) for i in range(len(MODS))], -1)  # [B, M]
  kinds = np.stack(kinds, -1)
  # One type per sample: over its observed modalities, all Laplace or all erasing.
  assert np.all((kinds | ~has_any).all(-1) | (~kinds | ~has_any).all(-1))
  share = kinds[has_any.any(-1)].any(-1).mean()
  assert abs(share - 0.5) < 4.5 * math.sqrt(0.25 / has_any.any(-1).sum())
  assert abs(erased_hits / erased_total - rate) < 4.5 * math.sqrt(rate * (1 - rate) / erased_total)
  eps = np.concatenate(residuals)
  assert abs(eps.var() - 1) < 4.5 * math.sqrt(5 / eps.size)
  assert abs(np.abs(eps).mean() - 1 / math.sqrt(2)) < 4.5 * math.sqrt(0.5 / eps.size)


def test_per_modality_noise_does_not_depend_on_the_listed_set():
  batch = messy_batch()
  one = corruption.gaussian_noise(KEY, batch, 1.0, modalities="vision")
  all_ = corruption.gaussian_noise(KEY, batch, 1.0)
  np.testing.assert_array_equal(np.asarray(one.features["vision"]),
                                np.asarray(all_.features["vision"]))


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, arg", [
    (lambda b: corruption.drop_modalities(KEY, b, -0.1), "missing_rate"),
    (lambda b: corruption.drop_modalities(KEY, b, 1.5), "missing_rate"),
    (lambda b: corruption.drop_modalities(KEY, b, float("nan")), "missing_rate"),
    (lambda b: corruption.drop_one_modality(KEY, b, 2.0), "ratio"),
    (lambda b: corruption.mask_time_steps(KEY, b, -1), "rate"),
    (lambda b: corruption.mask_time_steps(KEY, b, np.array([0.1, 0.2])), "rate"),
    (lambda b: corruption.gaussian_noise(KEY, b, -1.0), "variance"),
    (lambda b: corruption.salt_pepper_noise(KEY, b, 1.2), "amount"),
    (lambda b: corruption.mix_noise(KEY, b, 1.5), "rate"),
    (lambda b: corruption.laplace_noise(KEY, b, -0.5), "scale"),
    (lambda b: corruption.random_erasing(KEY, b, 2), "rate"),
    (lambda b: corruption.gaussian_noise(KEY, b, 1.0, modalities=("text", "depth")), "modalities"),
    (lambda b: corruption.mix_noise(KEY, b, 0.1, modalities=()), "modalities"),
    (lambda b: corruption.keep_modalities(b, ()), "subset"),
    (lambda b: corruption.keep_modalities(b, ("rgb",)), "subset"),
    (lambda b: corruption.modality_subsets(("text", "text")), "modalities"),
])
def test_bad_arguments_raise_value_error_naming_them(call, arg):
  with pytest.raises(ValueError, match=arg):
    call(clean_batch(8))


def test_drop_one_modality_needs_two_modalities():
  with pytest.raises(ValueError, match="batch.modalities"):
    corruption.drop_one_modality(KEY, clean_batch(8, ("text",)), 0.1)
