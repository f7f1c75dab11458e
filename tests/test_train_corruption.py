"""Train-time corruption (mmjax.data.train_corruption), per-sample levels and sample-wise noise.

What is checked is what gets realised: per-sample rates drawn from the configured distribution,
the share of clean samples, which modalities the sample-wise noise touches, that the trainer
corrupts training batches only, from the step key, identically for any method.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import methods
from mmjax.data import (
    FAIR_RECIPE, TRAIN_CORRUPTION_STREAM, Batch, make_synthetic, noisy_views,
    parse_train_corruption, samplewise_gaussian_noise, samplewise_salt_pepper_noise)
from mmjax.data import protocols as protocols_lib
from mmjax.methods import Method, TaskSpec
from mmjax.train import default_train_config, fit, init_state, make_optimizer
from mmjax.train import make_train_step, train_corruption
from mmjax.train.loop import VALID_CORRUPTION_STREAM
from tests.test_corruption import assert_batches_equal, clean_batch, messy_batch

MODS3 = ("text", "audio", "vision")
AVAILABLE = protocols_lib.protocols(MODS3)


def _batch(b, t, mods=MODS3, seed=0):
  rng = np.random.default_rng(seed)
  return Batch.create({m: rng.normal(size=(b, t, 2)).astype(np.float32) for m in mods},
                      np.zeros(b, np.float32))


def _ks_uniform(x, low, high):
  """Kolmogorov-Smirnov distance of the sample ``x`` to U(low, high)."""
  x = np.sort((np.asarray(x) - low) / (high - low))
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


# ---------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec, message", [
    ("blur:0:1", "unknown protocol 'blur'"),
    ("fixed_subsets:0:1", "no numeric levels"),
    ("missing_rate", "cannot read the term"),
    ("missing_rate:a:b", "cannot read the term"),
    ("missing_rate:0:0.5:0.7", "cannot read the term"),
    ("missing_rate:0.6:0.2", "0 <= low <= high <= 1"),
    ("time_mask:0:1.5", "0 <= low <= high <= 1"),
    ("gaussian:-1:2", "0 <= low <= high <= inf"),
    ("clean:1.5", "clean fraction"),
    ("clean:0.5", "names no protocol"),
])
def test_bad_spec_names_the_field(spec, message):
  with pytest.raises(ValueError, match=f"config.train_corruption: .*{message}"):
    parse_train_corruption(spec, AVAILABLE)


def test_spec_forms():
  assert parse_train_corruption("none", AVAILABLE) is None
  assert parse_train_corruption("", AVAILABLE) is None
  fair = parse_train_corruption("fair", AVAILABLE)
  assert fair.spec == FAIR_RECIPE and fair.clean_fraction == 0.5
  assert [(t.protocol.name, t.low, t.high) for t in fair.terms] == [
      ("missing_rate", 0.0, 0.5), ("sample_gaussian", 0.0, 4.0)]
  const = parse_train_corruption("drop_one:0.5", AVAILABLE)
  assert (const.terms[0].low, const.terms[0].high) == (0.5, 0.5)


def test_method_regimes():
  """``"method"``: EASE and EMMR's own training corruption, nothing for the others."""
  data = make_synthetic(jax.random.key(0), n_train=8, n_valid=4, n_test=4, seq_len=2, dims=2)
  config = default_train_config()
  stub = lambda name: Method(name, None, None, None)
  got = {name: train_corruption(stub(name), data, config) for name in ("ease", "emmr", "euar")}
  assert got["euar"] is None
  assert [(t.protocol.name, t.low, t.high) for t in got["ease"].terms] == [("time_mask", 0., 1.)]
  assert got["ease"].clean_fraction == 0.5  # EASE App. A.3 / LNLN
  assert [(t.protocol.name, t.low, t.high) for t in got["emmr"].terms] == [("drop_one", .5, .5)]
  config.train_corruption = "none"
  assert train_corruption(stub("ease"), data, config) is None


# ---------------------------------------------------------------------------------- realised levels
def test_lnln_regime_realises_uniform_rates_and_clean_half():
  """EASE App. A.3 / LNLN: per-sample masking rate ~ U(0, 1), half of the samples clean."""
  b, t = 4000, 400
  corruption = parse_train_corruption("time_mask:0:1+clean:0.5", AVAILABLE)
  batch = _batch(b, t)
  out = corruption(jax.random.key(3), batch)
  masked = 1.0 - np.mean(np.asarray(out.step_mask["text"]), axis=1)  # [B] realised rate
  # The three modalities of a sample share its rate.
  masked_audio = 1.0 - np.mean(np.asarray(out.step_mask["audio"]), axis=1)
  assert np.max(np.abs(masked - masked_audio)) < 0.2
  clean = masked == 0.0
  assert abs(clean.mean() - 0.5) < 4 * math.sqrt(0.25 / b)  # 4 sigma of a binomial share
  # Non-clean rates: U(0, 1) up to the binomial noise of 400 steps (std <= 0.025).
  assert _ks_uniform(masked[~clean], 0.0, 1.0) < 0.05
  clean_draw, _ = corruption.levels(jax.random.key(3), b)
  np.testing.assert_array_equal(np.asarray(clean_draw) & ~clean, False)


def test_missing_rate_range_realises_its_mean():
  """missing_rate ~ U(0, 0.6) per sample: the realised missing fraction has mean 0.3."""
  b = 6000
  out = parse_train_corruption("missing_rate:0:0.6", AVAILABLE)(jax.random.key(0), _batch(b, 1))
  missing = 1.0 - np.asarray(out.present).mean(axis=1)  # [B] in {0, 1/3, 2/3}
  assert abs(missing.mean() - 0.3) < 4 * math.sqrt(missing.var() / b)
  assert np.asarray(out.present).sum(axis=1).min() == 1  # at least one modality always kept


def test_same_key_same_corruption_and_keys_matter():
  corruption = parse_train_corruption(FAIR_RECIPE, AVAILABLE)
  batch = messy_batch(64)
  a = corruption(jax.random.key(5), batch)
  assert_batches_equal(a, corruption(jax.random.key(5), batch))
  b = corruption(jax.random.key(6), batch)
  assert not np.array_equal(np.asarray(a.present), np.asarray(b.present))
  assert_batches_equal(jax.jit(corruption)(jax.random.key(5), batch), a, atol=1e-6)


@pytest.mark.parametrize("name, level", [
    ("missing_rate", 0.4), ("drop_one", 0.3), ("time_mask", 0.3), ("gaussian", 2.0),
    ("salt_pepper", 0.2), ("mix", 0.3), ("laplace_erasing", 0.3), ("sample_gaussian", 3.0),
    ("sample_salt_pepper", 0.2)])
def test_constant_per_sample_level_equals_scalar_level(name, level):
  """A ``[B]`` level array of one value gives exactly the scalar's output (and 0 is identity)."""
  batch, key = messy_batch(48), jax.random.key(2)
  apply = AVAILABLE[name].apply
  assert_batches_equal(apply(key, batch, jnp.full((48,), level)), apply(key, batch, level))
  assert_batches_equal(apply(key, batch, jnp.zeros(48)), batch)


def test_per_sample_level_shape_is_checked():
  with pytest.raises(ValueError, match=r"rate: expected a scalar or an array of shape \[8\]"):
    AVAILABLE["time_mask"].apply(jax.random.key(0), clean_batch(8), jnp.zeros(5))
  with pytest.raises(ValueError, match="missing_rate: expected a value in"):
    AVAILABLE["missing_rate"].apply(jax.random.key(0), clean_batch(8), np.full(8, 1.5))


# ------------------------------------------------------------------------------ sample-wise noise
@pytest.mark.parametrize("mods, fraction, counts", [
    (("a", "b", "c", "d", "e", "f"), 0.5, {3: 1.0}),  # Handwritten: 3 of 6 views
    (("a", "b"), 0.5, {1: 1.0}),  # CUB: one of two
    (MODS3, 0.5, {1: 0.5, 2: 0.5}),  # E[k] = 1.5
    (MODS3, 1.0, {3: 1.0}),
])
def test_noisy_views_counts_and_uniform_choice(mods, fraction, counts):
  b = 6000
  chosen = np.asarray(noisy_views(jax.random.key(1), _batch(b, 1, mods), fraction))
  k = chosen.sum(axis=1)
  for count, share in counts.items():
    assert abs(np.mean(k == count) - share) < 0.03
  assert set(np.unique(k)) == set(counts)
  # Every modality equally likely to be chosen: share E[k] / M each.
  np.testing.assert_allclose(chosen.mean(axis=0), fraction, atol=0.03)


def test_noisy_views_only_present_modalities():
  batch = messy_batch(400)
  chosen = np.asarray(noisy_views(jax.random.key(0), batch, 1.0))
  np.testing.assert_array_equal(chosen, np.asarray(batch.present))


@pytest.mark.parametrize("noise, level", [(samplewise_gaussian_noise, 2.0),
                                          (samplewise_salt_pepper_noise, 1.0)])
def test_samplewise_noise_touches_exactly_the_drawn_modalities(noise, level):
  batch, key = clean_batch(256), jax.random.key(4)
  out = noise(key, batch, level)
  chosen = np.asarray(noisy_views(jax.random.split(key)[0], batch, 0.5))
  for i, m in enumerate(batch.modalities):
    changed = np.any(np.asarray(out.features[m]) != np.asarray(batch.features[m]), axis=(1, 2))
    np.testing.assert_array_equal(changed, chosen[:, i])
    np.testing.assert_array_equal(out.full_features[m], batch.full_features[m])


def test_samplewise_gaussian_std_is_the_strength():
  batch = clean_batch(2000)
  out = samplewise_gaussian_noise(jax.random.key(0), batch, 3.0, fraction=1.0)
  diff = np.concatenate([np.asarray(out.features[m] - batch.features[m]).ravel()
                         for m in batch.modalities])
  assert abs(diff.std() - 3.0) < 0.03 and abs(diff.mean()) < 0.03


# ---------------------------------------------------------------------------------- in the trainer
def _recording_method(batch_example):
  """A stub whose 'loss terms' are what the batch realises: missing share, clean-copy checksum."""
  def init(key, batch):
    del key, batch
    return {"w": jnp.zeros(())}, {}

  def loss(params, state, batch, key, train):
    del key, train
    present = jnp.asarray(batch.present, jnp.float32)
    valid = jnp.asarray(batch.valid, jnp.float32)
    missing = jnp.sum((1 - present.mean(axis=1)) * valid) / jnp.sum(valid)
    full = sum(jnp.sum(jnp.abs(batch.full_features[m])) for m in batch.modalities)
    metrics = {"missing": missing, "full": full, "loss": jnp.square(params["w"])}
    return metrics["loss"], (metrics, state, jnp.zeros(batch.batch_size))

  def predict(params, state, batch):
    del params, state
    return 1.0 - jnp.asarray(batch.present, jnp.float32).mean(axis=1)  # the sample's missing share

  del batch_example
  return Method("stub", init, loss, predict)


def test_fit_corrupts_training_batches_only():
  data = make_synthetic(jax.random.key(0), n_train=512, n_valid=64, n_test=8, seq_len=1, dims=2)
  config = default_train_config()
  config.update(num_epochs=2, batch_size=64, patience=0, progress=False,
                train_corruption="missing_rate:0:0.6", select_metric="mae", select_mode="min")
  result = fit(_recording_method(None), data, config, log=lambda line: None)
  for record in result.history:
    # 1024 samples over the run: E[missing] = 0.3, per-sample std <= 0.3.
    assert abs(record["train/missing"] - 0.3) < 0.05
    # Predictions on the uncorrupted validation split are all 0: |0 - label| = |label|.
    np.testing.assert_allclose(record["valid/mae"], np.mean(np.abs(data.splits["valid"].label)),
                               rtol=1e-5)
  full = [r["train/full"] for r in result.history]
  config.train_corruption = "none"
  clean = fit(_recording_method(None), data, config, log=lambda line: None)
  # (a scanned epoch may fuse the stub's mean differently: 0 up to float rounding)
  assert [r["train/missing"] for r in clean.history] == pytest.approx([0.0, 0.0], abs=1e-6)
  assert [r["train/full"] for r in clean.history] == full  # the clean copy is never corrupted
  # validate_corrupted: the valid split corrupted once, fold_in(PRNGKey(seed), stream), every epoch.
  config.update(train_corruption="missing_rate:0:0.6", validate_corrupted=True)
  corrupted = fit(_recording_method(None), data, config, log=lambda line: None)
  valid = train_corruption(_recording_method(None), data, config)(
      jax.random.fold_in(jax.random.PRNGKey(0), VALID_CORRUPTION_STREAM), data.splits["valid"])
  missing = 1.0 - np.asarray(valid.present, np.float32).mean(axis=1)
  assert abs(missing.mean() - 0.3) < 0.1
  for record in corrupted.history:
    np.testing.assert_allclose(record["valid/mae"],
                               np.mean(np.abs(missing - data.splits["valid"].label)), rtol=1e-5)


def test_concat_with_corruption_equals_concat_on_precorrupted_batches():
  """The trainer's corruption is exactly ``corruption(fold_in(step_key, STREAM), batch)``."""
  data = make_synthetic(jax.random.key(1), n_train=32, n_valid=8, n_test=8, seq_len=3, dims=2)
  spec = TaskSpec.from_dataset(data)
  model = ml_collections.ConfigDict(dict(methods.default_model_config("concat")))
  model.hidden = 8
  method = methods.build("concat", model, spec)
  config = default_train_config()
  corruption = parse_train_corruption(FAIR_RECIPE, protocols_lib.protocols(data.modalities))
  optimizer = make_optimizer(config)
  batch = data.splits["train"]
  with_corruption = jax.jit(make_train_step(method, optimizer, corruption=corruption))
  plain = jax.jit(make_train_step(method, optimizer))
  a = b = init_state(method, data, config, optimizer)
  for _ in range(3):
    key = jax.random.fold_in(b.key, b.step)
    pre = corruption(jax.random.fold_in(key, TRAIN_CORRUPTION_STREAM), batch)
    a, metrics_a = with_corruption(a, batch)
    b, metrics_b = plain(b, pre)
    # Equal up to float rounding (XLA fuses the corruption into the step differently).
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8),
               a.params, b.params)
  c = init_state(method, data, config, optimizer)
  c, metrics_c = plain(c, batch)  # and it does change the loss
  assert float(metrics_c["loss"]) != float(with_corruption(init_state(
      method, data, config, optimizer), batch)[1]["loss"])
