"""Categorical KLs and consistency losses against their definitions on enumerated distributions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import (
    anchored_consistency_loss, categorical_kl, predictive_consistency_loss, symmetric_kl)


def np_probs(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
  """KL from its definition, one term per outcome, in float64."""
  return sum(p[..., c] * (np.log(p[..., c]) - np.log(q[..., c])) for c in range(p.shape[-1]))


def test_categorical_kl_enumerated_cases():
  # Two-outcome case by hand: p = (1/2, 1/2), q = (1/4, 3/4):
  # KL = 1/2 log(2) + 1/2 log(2/3).
  p_logits = jnp.array([0.0, 0.0])
  q_logits = jnp.log(jnp.array([0.25, 0.75]))
  want = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
  assert float(categorical_kl(p_logits, q_logits)) == pytest.approx(want, rel=1e-6)
  rng = np.random.default_rng(0)
  p, q = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
  np.testing.assert_allclose(categorical_kl(p, q), np_kl(np_probs(p), np_probs(q)), rtol=1e-5)
  np.testing.assert_allclose(
      symmetric_kl(p, q), 0.5 * (np_kl(np_probs(p), np_probs(q)) + np_kl(np_probs(q), np_probs(p))),
      rtol=1e-5)
  np.testing.assert_allclose(symmetric_kl(p, q), symmetric_kl(q, p), rtol=1e-6)
  np.testing.assert_allclose(categorical_kl(p, p + 3.0), 0.0, atol=1e-6)  # shift-invariant


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_categorical_kl_huge_logits_finite(dtype):
  p = jnp.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], dtype)
  q = jnp.array([[-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]], dtype)
  val = categorical_kl(p, q)
  # p is one-hot on outcome 0 (row 0) / 2 (row 1): KL = -log q_0 = 2e4 (as rounded to `dtype`), log 3.
  np.testing.assert_allclose(val, [2 * float(p[0, 0].astype(jnp.float32)), np.log(3)], rtol=1e-5)
  grads = jax.grad(lambda a, b: symmetric_kl(a, b).sum(), argnums=(0, 1))(p, q)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_predictive_consistency_is_mean_over_ordered_pairs():
  rng = np.random.default_rng(1)
  views = rng.normal(size=(3, 6, 4))
  probs = np_probs(views)
  pairs = [(s, t) for s, t in itertools.product(range(3), repeat=2) if s != t]
  want = np.mean([np_kl(probs[s], probs[t]).mean() for s, t in pairs])
  np.testing.assert_allclose(predictive_consistency_loss(views), want, rtol=1e-5)
  where = np.array([True, False, True, True, False, False])
  want_masked = np.mean([np_kl(probs[s][where], probs[t][where]).mean() for s, t in pairs])
  np.testing.assert_allclose(predictive_consistency_loss(views, where=where), want_masked, rtol=1e-5)
  assert float(predictive_consistency_loss(views[:1])) == 0.0
  assert float(predictive_consistency_loss(views, where=np.zeros(6, bool))) == 0.0


def test_anchored_consistency_value_and_stop_gradient():
  rng = np.random.default_rng(2)
  views, full = rng.normal(size=(2, 5, 3)), rng.normal(size=(5, 3))
  want = np.mean([np_kl(np_probs(views[v]), np_probs(full)).mean() for v in range(2)])
  np.testing.assert_allclose(anchored_consistency_loss(views, full), want, rtol=1e-5)
  g_views, g_full = jax.grad(anchored_consistency_loss, argnums=(0, 1))(
      jnp.asarray(views), jnp.asarray(full))
  np.testing.assert_array_equal(g_full, 0.0)  # no gradient into the full view
  assert float(jnp.abs(g_views).sum()) > 1e-3
  # The symmetric loss does train every view.
  g_sym = jax.grad(predictive_consistency_loss)(jnp.asarray(views))
  assert float(jnp.abs(g_sym).min()) > 0


def test_consistency_shape_errors():
  with pytest.raises(ValueError, match=r"view_logits: expected shape \[V, B, C\]"):
    predictive_consistency_loss(jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"full_logits\[4, 3\]"):
    anchored_consistency_loss(jnp.zeros((2, 5, 3)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"p_logits\[2, 3\], q_logits\[2, 4\]"):
    categorical_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
