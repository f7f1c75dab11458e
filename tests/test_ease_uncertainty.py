"""Tests for the EASE uncertainty check (§4.5): the KS distance, the imputation residuals, the
Gaussian NLL against a train-fitted constant variance, and the benchmark that reports them."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from mmjax.data import drop_modalities, make_synthetic, standardize
from mmjax.data.synthetic import ModalitySpec
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods import ease
from mmjax.stats import fit_constant_variance, gaussian_nll_per_dim, ks_distance_to_standard_normal

with warnings.catch_warnings():  # ml_collections loads its --config default via load_module()
  warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
  from benchmarks import ease_uncertainty


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


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("error, var, expected", [
    (0.0, 1.0, _HALF_LOG_2PI),
    (2.0, 4.0, 0.5 * math.log(8 * math.pi) + 0.5),  # e^2 / v = 1
    (-3.0, 0.5, 0.5 * math.log(math.pi) + 9.0),  # log(2 pi 0.5) = log pi, e^2 / v = 18
    ([[1.0, 0.0]], [[1.0, math.e / (2 * math.pi)]], (_HALF_LOG_2PI + 0.5 + 0.5) / 2),
    # var [d] broadcasts over the pairs; the mean is over all P * d = 4 entries.
    ([[1.0, 2.0], [3.0, 0.0]], [1.0, 4.0], _HALF_LOG_2PI + 0.5 * math.log(4) / 2
     + (1.0 + 1.0 + 9.0 + 0.0) / 8),
])
def test_gaussian_nll_closed_form(error, var, expected):
  assert gaussian_nll_per_dim(error, var) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("error, var, match", [
    ([], [], "error.*empty"), ([1.0, 2.0], [1.0, 1.0, 1.0], "var.*broadcast"),
    ([np.nan], [1.0], "error.*finite"), ([1.0], [0.0], "var.*positive"),
    ([1.0], [-1.0], "var.*positive"), ([1.0], [np.inf], "var.*positive"),
])
def test_gaussian_nll_bad_input(error, var, match):
  with pytest.raises(ValueError, match=match):
    gaussian_nll_per_dim(error, var)


def test_fit_constant_variance_is_per_modality_mean_square():
  rng = np.random.default_rng(0)
  error = rng.normal(0.0, [1.0, 2.0, 0.5], (50, 3))
  target = rng.choice([0, 2, 3], 50)  # modality 1 is never a target
  fitted = fit_constant_variance(error, target, 4)
  assert fitted.shape == (4, 3)
  for m in (0, 2, 3):
    for j in range(3):
      squares = [error[p, j] ** 2 for p in range(50) if target[p] == m]
      assert fitted[m, j] == pytest.approx(sum(squares) / len(squares), rel=1e-12)
  assert np.all(np.isnan(fitted[1]))
  # It is the NLL-minimising constant on the data it was fitted on.
  rows = target == 2
  best = gaussian_nll_per_dim(error[rows], fitted[2])
  for factor in (0.9, 1.1):
    assert gaussian_nll_per_dim(error[rows], factor * fitted[2]) > best


@pytest.mark.parametrize("target, num_modalities, match", [
    (np.zeros(4, int), 2, "target.*\\[P\\]"), (np.full(5, 2), 2, "target.*0 .. 1"),
    (np.full(5, -1), 2, "target.*0 .. 1"), (np.zeros(5), 2, "target.*ints"),
])
def test_fit_constant_variance_bad_input(target, num_modalities, match):
  with pytest.raises(ValueError, match=match):
    fit_constant_variance(np.ones((5, 2)), target, num_modalities)


def _heteroscedastic(rng, n: int, d: int, log_std: float):
  """Errors e ~ N(0, v) with a per-(sample, dim) variance log v ~ N(0, log_std^2)."""
  var = np.exp(rng.normal(0.0, log_std, (n, d)))
  return rng.normal(0.0, np.sqrt(var)), var


def test_informative_variance_beats_train_constant_on_nll():
  """Predicted var = true var: the expected NLL gap to the best constant E[v] is
  (log E[v] - E[log v]) / 2 = s^2 / 4 for log v ~ N(0, s^2) (Jensen); here s = 1."""
  rng = np.random.default_rng(1)
  train_error, _ = _heteroscedastic(rng, 20_000, 2, 1.0)
  test_error, test_var = _heteroscedastic(rng, 20_000, 2, 1.0)
  const = fit_constant_variance(train_error, np.zeros(20_000, int), 1)[0]
  delta = gaussian_nll_per_dim(test_error, test_var) - gaussian_nll_per_dim(test_error, const)
  assert delta == pytest.approx(-0.25, abs=0.04)


@pytest.mark.parametrize("log_std", [0.0, 1.0])
def test_uninformative_variance_does_not_beat_train_constant(log_std):
  """Shuffled variances (right marginal, wrong samples) lose to the constant: the expected gap is
  (e^{s^2} - 1 - s^2 / 2) / 2, 0.61 for s = 1. With s = 0 the variance is the constant itself
  (all ones), so the gap is only the noise of fitting the constant on train."""
  rng = np.random.default_rng(2)
  train_error, _ = _heteroscedastic(rng, 20_000, 2, log_std)
  test_error, test_var = _heteroscedastic(rng, 20_000, 2, log_std)
  shuffled = rng.permutation(test_var.ravel()).reshape(test_var.shape)
  const = fit_constant_variance(train_error, np.zeros(20_000, int), 1)[0]
  delta = gaussian_nll_per_dim(test_error, shuffled) - gaussian_nll_per_dim(test_error, const)
  expected = (math.exp(log_std ** 2) - 1 - log_std ** 2 / 2) / 2
  assert delta == pytest.approx(expected, abs=0.1 if log_std else 0.005)
  assert delta > -0.005


def test_rate_stats_wiring(setup):
  """The benchmark's columns from EASE moments: test pairs scored, constant fitted on the train drop
  (key fold_in(key, 1)), per-modality KS on the pairs of that target, named by the modality."""
  config, spec, params, batch = setup
  train = batch.replace(valid=np.ones(8, bool))  # a stand-in train split with its own drop
  key = jax.random.key(3)
  stats = ease_uncertainty.rate_stats(params, train, batch, config, spec, 0.5, key)

  def moments(split, k):
    z_gt, mu, var, pairs = (np.asarray(x) for x in ease.imputation_moments(
        params, drop_modalities(k, split, 0.5), config, spec))
    return (z_gt - mu)[pairs], var[pairs], np.nonzero(pairs)[1]

  train_error, _, train_target = moments(train, jax.random.fold_in(key, 1))
  error, var, target = moments(batch, key)
  const = np.stack([np.mean(train_error[train_target == m] ** 2, 0)
                    for m in range(len(spec.modalities))])[target]
  r = error / np.sqrt(var)
  assert stats["pairs"] == len(error) > 0
  assert stats["ks"] == pytest.approx(ks_distance_to_standard_normal(r), abs=1e-6)
  for m, name in enumerate(spec.modalities):
    expected = ks_distance_to_standard_normal(r[target == m]) if np.any(target == m) else np.nan
    assert stats[f"ks {name}"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
  nll = np.mean(0.5 * (np.log(2 * np.pi * var) + error ** 2 / var))
  nll_const = np.mean(0.5 * (np.log(2 * np.pi * const) + error ** 2 / const))
  assert stats["nll"] == pytest.approx(nll, rel=1e-5)
  assert stats["nll_const"] == pytest.approx(nll_const, rel=1e-5)
  assert stats["delta_nll"] == pytest.approx(nll - nll_const, abs=1e-5)
  assert stats["ks_const"] == pytest.approx(
      ks_distance_to_standard_normal(error / np.sqrt(const)), abs=1e-6)
  table = ease_uncertainty.markdown_table("toy", spec.modalities, {0.5: [stats, stats]})
  assert "| KS text | KS audio | KS vision |" in table and "ΔNLL" in table
  assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1
