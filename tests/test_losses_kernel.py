"""Kernel Cauchy-Schwarz divergence against a direct double-loop computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import kernel_cs_divergence


def np_kernel_cs(x, y, tau, u_x, u_y, alpha):
  """EASE eq. 5-7 written pair by pair in float64 (means over pairs)."""
  def mean_kernel(a, u_a, b, u_b):
    total = 0.0
    for i in range(len(a)):
      for j in range(len(b)):
        psi = 1 + alpha * (u_a[i] + u_b[j]) / 2
        total += np.exp(-np.sum((a[i] - b[j]) ** 2) / (2 * tau**2 * psi))
    return total / (len(a) * len(b))
  return -np.log(mean_kernel(x, u_x, y, u_y)
                 / np.sqrt(mean_kernel(x, u_x, x, u_x) * mean_kernel(y, u_y, y, u_y)))


@pytest.mark.parametrize("tau,alpha,n,m", [(1.0, 0.0, 6, 6), (2.0, 0.0, 5, 8), (1.5, 0.7, 7, 4)])
def test_matches_double_loop(tau, alpha, n, m):
  rng = np.random.default_rng(n * m)
  x, y = rng.normal(size=(n, 3)), rng.normal(loc=0.8, size=(m, 3))
  u_x, u_y = rng.uniform(0, 2, size=n), rng.uniform(0, 2, size=m)
  got = kernel_cs_divergence(x, y, bandwidth=tau, x_uncertainty=u_x, y_uncertainty=u_y, alpha=alpha)
  np.testing.assert_allclose(got, np_kernel_cs(x, y, tau, u_x, u_y, alpha), rtol=1e-4, atol=1e-6)


def test_zero_for_equal_sets_nonnegative_and_symmetric():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(8, 4)), rng.normal(size=(5, 4)) + 0.5
  assert float(kernel_cs_divergence(x, x)) == pytest.approx(0.0, abs=1e-6)
  d_xy, d_yx = float(kernel_cs_divergence(x, y)), float(kernel_cs_divergence(y, x))
  assert d_xy > 0.0
  assert d_xy == pytest.approx(d_yx, rel=1e-5)


def test_finite_when_every_kernel_underflows():
  # One point each, 1e3 apart: exp(-5e5) underflows, yet D = ||x - y||^2 / (2 tau^2) exactly.
  x, y = jnp.zeros((1, 2)), jnp.array([[1e3, 0.0]])
  got = kernel_cs_divergence(x, y, bandwidth=1.0)
  assert float(got) == pytest.approx(5e5, rel=1e-5)
  grads = jax.grad(kernel_cs_divergence, argnums=(0, 1))(x, y)
  np.testing.assert_allclose(grads[1], [[1e3, 0.0]], rtol=1e-5)  # d/dy ||y||^2 / 2
  # Two clusters far apart: finite, and the log-space value matches the analytic limit.
  a = jnp.array([[0.0], [1.0]])
  b = a + 100.0
  got = kernel_cs_divergence(a, b)
  # mean K(a, b) ~ exp(-99^2 / 2) / 4 (closest pair dominates); mean K(a, a) = (2 + 2 e^-1/2) / 4.
  want = 99.0**2 / 2 + np.log(4) + np.log((2 + 2 * np.exp(-0.5)) / 4)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_masks_select_samples_and_empty_gives_zero():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(7, 3))
  wx, wy = np.array([1, 1, 0, 1, 0, 1], bool), np.array([0, 1, 1, 1, 0, 0, 1], bool)
  np.testing.assert_allclose(kernel_cs_divergence(x, y, x_where=wx, y_where=wy),
                             kernel_cs_divergence(x[wx], y[wy]), rtol=1e-5)
  empty = np.zeros(7, bool)
  assert float(kernel_cs_divergence(x, y, y_where=empty)) == 0.0
  grad = jax.grad(lambda a: kernel_cs_divergence(a, y, y_where=empty))(jnp.asarray(x))
  np.testing.assert_array_equal(grad, 0.0)


def test_uncertainty_widens_the_kernel_and_lowers_divergence():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 3)) + 2.0
  base = float(kernel_cs_divergence(x, y))
  widened = float(kernel_cs_divergence(x, y, y_uncertainty=np.full(10, 2.0), alpha=1.0))
  assert widened < base


def test_batched_leading_axes_and_errors():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 4, 3))
  np.testing.assert_allclose(
      kernel_cs_divergence(x, y), [kernel_cs_divergence(x[i], y[i]) for i in range(2)], rtol=1e-6)
  with pytest.raises(ValueError, match=r"x\[5, 3\], y\[4, 2\]"):
    kernel_cs_divergence(x[0], y[0, :, :2])
  with pytest.raises(ValueError, match="bandwidth"):
    kernel_cs_divergence(x, y, bandwidth=0.0)
  with pytest.raises(ValueError, match="alpha"):
    kernel_cs_divergence(x, y, alpha=-1.0)
  with pytest.raises(ValueError, match=r"y_uncertainty: expected shape \[2, 4\]"):
    kernel_cs_divergence(x, y, y_uncertainty=np.ones(4))


def np_mixture_cs(x, y, s2_x, s2_y):
  """CS divergence of two equal-weight isotropic Gaussian mixtures (centres ``x``, ``y``, per-point
  variances ``s2``) from the L2 inner products <N(a, s_a^2), N(b, s_b^2)> = N(a - b; 0, s_a^2 + s_b^2),
  normalisation constants included, in float64."""
  def inner(a, s_a, b, s_b):
    d = a.shape[1]
    total = 0.0
    for i in range(len(a)):
      for j in range(len(b)):
        v = s_a[i] + s_b[j]
        total += (2 * np.pi * v) ** (-d / 2) * np.exp(-np.sum((a[i] - b[j]) ** 2) / (2 * v))
    return total / (len(a) * len(b))
  return -np.log(inner(x, s2_x, y, s2_y) / np.sqrt(inner(x, s2_x, x, s2_x) * inner(y, s2_y, y, s2_y)))


@pytest.mark.parametrize("tau,alpha", [(1.0, 1.0), (2.5, 0.3)])
def test_normalized_kernel_is_the_gaussian_mixture_cs_divergence(tau, alpha):
  """normalize=True: each sample a Gaussian of variance tau^2 (1 + alpha u) / 2 per dimension."""
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(6, 4)), rng.normal(loc=0.5, size=(5, 4))
  u_x, u_y = rng.uniform(0, 3, size=6), rng.uniform(0, 3, size=5)
  got = kernel_cs_divergence(x, y, bandwidth=tau, x_uncertainty=u_x, y_uncertainty=u_y,
                             alpha=alpha, normalize=True)
  want = np_mixture_cs(x, y, tau**2 * (1 + alpha * u_x) / 2, tau**2 * (1 + alpha * u_y) / 2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_normalized_uada_cannot_be_lowered_by_inflating_the_variance():
  """EASE's L_uada: as written (eq. 5-7) D(x, x) < 0 once u > 0 and falls with u (towards
  0.5 log mean K(x, x)); the normalised kernel keeps D >= 0 and D(x, x; u) increasing in u."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(8, 16))
  us = [0.0, 0.1, 1.0, 10.0, 1e2, 1e4]
  def d(u, normalize):
    return float(kernel_cs_divergence(x, x, bandwidth=4.0, y_uncertainty=np.full(8, u), alpha=1.0,
                                      normalize=normalize))
  paper = [d(u, False) for u in us]
  assert paper[0] == pytest.approx(0.0, abs=1e-5)
  assert all(b < a for a, b in zip(paper, paper[1:])), paper
  fixed = [d(u, True) for u in us]
  assert fixed[0] == pytest.approx(0.0, abs=1e-5)
  assert all(b > a for a, b in zip(fixed, fixed[1:])), fixed
  # Non-negative on random sets with random uncertainties, and the gradient w.r.t. u is >= 0 at
  # coincident centres (inflating the variance only costs).
  for seed in range(20):
    r = np.random.default_rng(100 + seed)
    a, b = r.normal(size=(5, 8)), r.normal(loc=r.uniform(0, 2), size=(7, 8))
    value = kernel_cs_divergence(a, b, bandwidth=2.0, x_uncertainty=r.uniform(0, 5, 5),
                                 y_uncertainty=r.uniform(0, 5, 7), alpha=1.0, normalize=True)
    assert float(value) >= -1e-5
  grad = jax.grad(lambda u: kernel_cs_divergence(x, x, bandwidth=4.0, y_uncertainty=u, alpha=1.0,
                                                 normalize=True))(jnp.full(8, 0.5))
  assert np.all(np.asarray(grad) >= 0) and float(grad.sum()) > 0
