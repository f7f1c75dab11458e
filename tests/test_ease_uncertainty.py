"""Tests for the EASE uncertainty check (§4.5): the KS distance and the imputation residuals."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from mmjax.data import drop_modalities, make_synthetic, standardize
from mmjax.data.synthetic import ModalitySpec
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods import ease
from mmjax.stats import ks_distance_to_standard_normal


def _phi(x: float) -> float:
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("samples, expected", [
    ([0.0], 0.5),  # F_n jumps 0 -> 1 at 0 where Phi = 1/2
    ([1.0, -1.0], _phi(1.0) - 0.5),  # gaps 1/2 - Phi(-1) and Phi(1) - 1/2, equal by symmetry
    ([[1.0], [-1.0]], _phi(1.0) - 0.5),  # any shape is flattened
    ([10.0, 10.0, 10.0], 1.0),  # all mass far right: F_n = 0 while Phi ~ 1
    ([-0.5, 0.0, 0.5, 3.0], max(_phi(3.0) - 0.75, 0.25 - _phi(-0.5), 0.5 - _phi(0.0),
                                0.75 - _phi(0.5), 1.0 - _phi(3.0), _phi(-0.5),
                                _phi(0.0) - 0.25, _phi(0.5) - 0.5)),
])
def test_ks_hand_computed(samples, expected):
  assert ks_distance_to_standard_normal(samples) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, loc, scale", [(1, 0.3, 1.0), (7, 0.0, 1.0), (100, 0.5, 1.0),
                                           (1000, 0.0, 3.0)])
def test_ks_matches_scipy(n, loc, scale):
  x = np.random.default_rng(n).normal(loc, scale, n)
  expected = scipy.stats.kstest(x, "norm", method="exact").statistic
  assert ks_distance_to_standard_normal(x) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("std, expected", [
    (1.0, 0.0),
    # sup_x |Phi(x / 2) - Phi(x)| is reached at x^2 = 8 ln 2 / 3 (equal densities): about 0.161.
    (2.0, _phi(math.sqrt(8 * math.log(2) / 3)) - _phi(math.sqrt(8 * math.log(2) / 3) / 2)),
])
def test_ks_of_normal_samples_near_population_distance(std, expected):
  # DKW: P(|D_n - D| > 0.015) <= 2 exp(-2 n 0.015^2) ~ 2e-8 for n = 40000.
  x = np.random.default_rng(0).normal(0.0, std, 40_000)
  assert ks_distance_to_standard_normal(x) == pytest.approx(expected, abs=0.015)


@pytest.mark.parametrize("samples, match", [([], "empty"), ([0.0, np.nan], "finite"),
                                            ([np.inf], "finite")])
def test_ks_bad_input(samples, match):
  with pytest.raises(ValueError, match=f"samples.*{match}"):
    ks_distance_to_standard_normal(samples)


@pytest.fixture(scope="module")
def setup():
  modality = ModalitySpec(seq_len=3, dim=4, signal=1.0, intensity=0.0, reading_noise=1.0,
                          bias=0.0, bias_visibility=0.0, nuisance=0.5)
  dataset = standardize(make_synthetic(
      jax.random.key(0), n_train=8, n_valid=8, n_test=8,
      modalities={m: modality for m in ("text", "audio", "vision")}))
  spec = TaskSpec.from_dataset(dataset)
  config = default_model_config("ease")
  config.update(hidden=8, num_heads=2)
  params, _ = build("ease", config, spec).init(jax.random.key(1), dataset.splits["train"])
  batch = drop_modalities(jax.random.key(2), dataset.splits["test"], 0.5)
  batch = batch.replace(valid=np.arange(8) < 6)  # last two rows are padding
  return config, spec, params, batch


def test_residuals_match_hand_computation(setup):
  config, spec, params, batch = setup
  residuals, pairs = ease.imputation_residuals(params, batch, config, spec)
  present = np.asarray(batch.present)
  # Independent path: encode corrupted and clean inputs in separate calls, then eq. 1-2.
  model = ease.make_model(config, spec)
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  observed = {m: np.asarray(batch.step_mask[m]) & present[:, i, None]
              for i, m in enumerate(spec.modalities)}
  z = apply(batch.features, observed, train=False, method="encode")
  z_gt = apply(batch.full_features, batch.full_step_mask, train=False, method="encode")
  mu, var = apply(z, jnp.asarray(present), method="complete")
  expected = (np.asarray(z_gt) - np.asarray(mu)) / np.sqrt(np.asarray(var))
  np.testing.assert_allclose(residuals, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pairs, ~present & (np.arange(8) < 6)[:, None])
  assert 0 < pairs.sum() < pairs.size  # the drop left both missing and observed pairs


def test_residuals_ignore_dropped_features(setup):
  """Only the clean copy and the observed modalities enter: rewriting the (zeroed) features of the
  dropped modalities changes no residual, rewriting the clean copy changes the missing ones."""
  config, spec, params, batch = setup
  residuals, pairs = ease.imputation_residuals(params, batch, config, spec)
  present = np.asarray(batch.present)
  junk = {m: np.where(present[:, i, None, None], np.asarray(x), 5.0).astype(np.float32)
          for i, (m, x) in enumerate(batch.features.items())}
  again, _ = ease.imputation_residuals(params, batch.replace(features=junk), config, spec)
  np.testing.assert_allclose(again, residuals, rtol=1e-6, atol=1e-6)
  shifted = {m: np.asarray(x) + 1.0 for m, x in batch.full_features.items()}
  moved, _ = ease.imputation_residuals(params, batch.replace(full_features=shifted), config, spec)
  assert np.all(np.abs(np.asarray(moved) - np.asarray(residuals))[np.asarray(pairs)].max(-1) > 1e-4)
