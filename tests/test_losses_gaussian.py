"""Gaussian losses against numerical integration, Monte Carlo and their defining properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mmjax.losses import (
    gaussian_cs_divergence, gaussian_cs_divergence_full, gaussian_kl_standard_normal, gaussian_nll)


def normal_pdf(x, mean, cov):
  """Density of N(mean, cov) at points x [..., D] (float64, written from the definition)."""
  d = len(mean)
  diff = x - mean
  quad = np.einsum("...i,ij,...j->...", diff, np.linalg.inv(cov), diff)
  return np.exp(-0.5 * quad) / np.sqrt((2 * np.pi) ** d * np.linalg.det(cov))


def grid(mean_p, cov_p, mean_q, cov_q, n):
  """A tensor grid covering both densities, and its cell volume."""
  d = len(mean_p)
  axes = []
  for i in range(d):
    sd = np.sqrt(max(cov_p[i, i], cov_q[i, i]))
    lo, hi = min(mean_p[i], mean_q[i]) - 9 * sd, max(mean_p[i], mean_q[i]) + 9 * sd
    axes.append(np.linspace(lo, hi, n))
  mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
  return mesh, np.prod([a[1] - a[0] for a in axes])


def cs_by_quadrature(mean_p, cov_p, mean_q, cov_q, n=801):
  """D_CS = -log[(int p q)^2 / (int p^2 int q^2)] by Riemann sums on a fine grid."""
  x, dv = grid(mean_p, cov_p, mean_q, cov_q, n)
  p, q = normal_pdf(x, mean_p, cov_p), normal_pdf(x, mean_q, cov_q)
  return -np.log((p * q).sum() * dv) * 2 + np.log((p * p).sum() * dv) + np.log((q * q).sum() * dv)


CS_CASES_1D = [
    (0.0, 1.0, 0.0, 1.0),
    (0.0, 1.0, 1.5, 1.0),
    (-1.0, 0.25, 2.0, 4.0),
    (0.3, 0.01, 0.2, 2.0),
]


@pytest.mark.parametrize("mp,vp,mq,vq", CS_CASES_1D)
def test_cs_divergence_1d_matches_quadrature(mp, vp, mq, vq):
  want = cs_by_quadrature(np.array([mp]), np.array([[vp]]), np.array([mq]), np.array([[vq]]), 20001)
  got = gaussian_cs_divergence(jnp.array([mp]), jnp.array([vp]), jnp.array([mq]), jnp.array([vq]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cs_divergence_2d_diagonal_and_full_match_quadrature():
  mean_p, mean_q = np.array([0.2, -0.5]), np.array([1.0, 0.4])
  var_p, var_q = np.array([0.5, 1.5]), np.array([2.0, 0.3])
  want_diag = cs_by_quadrature(mean_p, np.diag(var_p), mean_q, np.diag(var_q))
  np.testing.assert_allclose(gaussian_cs_divergence(mean_p, var_p, mean_q, var_q), want_diag,
                             rtol=1e-4)
  cov_p = np.array([[1.0, 0.6], [0.6, 0.8]])
  cov_q = np.array([[0.4, -0.2], [-0.2, 1.2]])
  want_full = cs_by_quadrature(mean_p, cov_p, mean_q, cov_q)
  np.testing.assert_allclose(gaussian_cs_divergence_full(mean_p, cov_p, mean_q, cov_q), want_full,
                             rtol=1e-4)


def test_cs_divergence_full_cross_term_by_monte_carlo():
  """int p q = E_{x~p}[q(x)], estimated with 400k samples, in 3-D with correlations."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
  cov_p, cov_q = a @ a.T + 0.5 * np.eye(3), b @ b.T + 0.5 * np.eye(3)
  mean_p, mean_q = rng.normal(size=3), rng.normal(size=3)
  x = rng.multivariate_normal(mean_p, cov_p, size=400_000)
  cross = normal_pdf(x, mean_q, cov_q).mean()
  self_p = 1 / np.sqrt((2 * np.pi) ** 3 * np.linalg.det(2 * cov_p))  # int p^2 = N(0; 0, 2 cov)
  self_q = 1 / np.sqrt((2 * np.pi) ** 3 * np.linalg.det(2 * cov_q))
  want = -2 * np.log(cross) + np.log(self_p) + np.log(self_q)
  got = gaussian_cs_divergence_full(mean_p, cov_p, mean_q, cov_q)
  np.testing.assert_allclose(got, want, rtol=2e-2)


def test_full_with_diagonal_covariances_equals_diagonal_version_batched():
  rng = np.random.default_rng(1)
  mean_p, mean_q = rng.normal(size=(4, 6)), rng.normal(size=(6,))
  var_p, var_q = rng.uniform(0.1, 3, size=(4, 6)), rng.uniform(0.1, 3, size=(6,))
  cov_p = np.stack([np.diag(v) for v in var_p])
  np.testing.assert_allclose(
      gaussian_cs_divergence_full(mean_p, cov_p, mean_q, np.diag(var_q)),
      gaussian_cs_divergence(mean_p, var_p, mean_q, var_q), rtol=1e-5)


positive = st.floats(1e-3, 1e3)
real = st.floats(-50, 50)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(real, positive, real, positive), min_size=1, max_size=4))
def test_cs_divergence_properties(dims):
  mp, vp, mq, vq = (jnp.array(c, jnp.float32) for c in zip(*dims))
  d_pq = float(gaussian_cs_divergence(mp, vp, mq, vq))
  d_qp = float(gaussian_cs_divergence(mq, vq, mp, vp))
  assert d_pq >= 0.0
  assert d_pq == pytest.approx(d_qp, rel=1e-5, abs=1e-6)
  assert float(gaussian_cs_divergence(mp, vp, mp, vp)) == 0.0


def test_cs_divergence_finite_for_tiny_and_extreme_variances():
  mean = jnp.array([0.0, 1.0])
  for var_p, var_q in [(1e-12, 1e-12), (1e-12, 1e6), (1.0, 1e-12)]:
    f = lambda m, vp, vq: gaussian_cs_divergence(m, vp, jnp.zeros(2), vq)
    vp, vq = jnp.full(2, var_p), jnp.full(2, var_q)
    assert np.isfinite(float(f(mean, vp, vq)))
    grads = jax.grad(f, argnums=(0, 1, 2))(mean, vp, vq)
    assert all(np.all(np.isfinite(g)) for g in grads)


def kl_by_quadrature(mean, var):
  """KL(N(mean, var) || N(0, 1)) in 1-D = int p log(p / q), on a fine grid."""
  sd = np.sqrt(var)
  x = np.linspace(mean - 12 * sd, mean + 12 * sd, 200_001)
  p = np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)
  log_ratio = -0.5 * np.log(var) - 0.5 * (x - mean) ** 2 / var + 0.5 * x**2
  return np.sum(p * log_ratio) * (x[1] - x[0])


def test_kl_standard_normal_matches_quadrature_summed_over_dims():
  mean = np.array([0.0, 1.3, -0.7])
  var = np.array([1.0, 0.2, 4.0])
  want = sum(kl_by_quadrature(m, v) for m, v in zip(mean, var))
  got = gaussian_kl_standard_normal(mean, np.log(var))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(gaussian_kl_standard_normal(jnp.zeros(5), jnp.zeros(5))) == 0.0


def test_nll_matches_log_density_and_monte_carlo_entropy():
  rng = np.random.default_rng(3)
  x, mean = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  var = rng.uniform(0.2, 2.0, size=(5, 4))
  want = -np.sum(np.log(np.exp(-(x - mean) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)), -1)
  np.testing.assert_allclose(gaussian_nll(x, mean, var), want, rtol=1e-5)
  # E_{x ~ N(mu, s2)}[NLL] = differential entropy = 1/2 sum log(2 pi e s2).
  samples = mean[0] + np.sqrt(var[0]) * rng.normal(size=(200_000, 4))
  mc = float(jnp.mean(gaussian_nll(samples, mean[0], var[0])))
  assert mc == pytest.approx(0.5 * np.sum(np.log(2 * np.pi * np.e * var[0])), rel=5e-3)


def test_nll_zero_variance_is_clamped_and_finite():
  val = gaussian_nll(jnp.ones(3), jnp.zeros(3), jnp.zeros(3))
  want = 0.5 * 3 * (np.log(2 * np.pi * 1e-12) + 1e12)
  assert float(val) == pytest.approx(want, rel=1e-5)
  grads = jax.grad(lambda m, v: gaussian_nll(jnp.ones(3), m, v), argnums=(0, 1))(
      jnp.zeros(3), jnp.full(3, 1e-12))
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_shape_errors_name_the_arguments():
  with pytest.raises(ValueError, match=r"mean_p\[2, 3\].*var_q\[4\]"):
    gaussian_cs_divergence(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(4))
  with pytest.raises(ValueError, match=r"cov_q: expected shape \[\.\.\., 3, 3\]"):
    gaussian_cs_divergence_full(jnp.zeros(3), jnp.eye(3), jnp.zeros(3), jnp.eye(2))
  with pytest.raises(ValueError, match=r"target\[2, 3\].*mean\[2, 4\]"):
    gaussian_nll(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 4)))
