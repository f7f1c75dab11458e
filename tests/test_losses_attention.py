"""SAM-LML attention losses against row-by-row NumPy loops and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import attention_context_loss, attention_variance_loss, margin_ranking_loss


def test_margin_ranking_hand_case_and_mask():
  higher = jnp.array([2.0, 0.0, 1.0, -1.0])
  lower = jnp.array([0.5, 0.0, 3.0, -1.0])
  # max(lower - higher + 1, 0) = [0, 1, 3, 1] -> mean 1.25; on the mask [T, F, T, F]: (0 + 3) / 2.
  assert float(margin_ranking_loss(higher, lower, margin=1.0)) == pytest.approx(1.25)
  where = jnp.array([True, False, True, False])
  assert float(margin_ranking_loss(higher, lower, margin=1.0, where=where)) == pytest.approx(1.5)
  assert float(margin_ranking_loss(higher, lower, margin=1.0, where=jnp.zeros(4, bool))) == 0.0
  # Gradient: -1/n on active elements for `higher`.
  g = jax.grad(lambda h: margin_ranking_loss(h, lower, margin=1.0))(higher)
  np.testing.assert_allclose(g, [0.0, -0.25, -0.25, -0.25])


def np_variance_loss(logits, beta, mask):
  losses = []
  for row, keep in zip(logits.reshape(-1, logits.shape[-1]), mask.reshape(-1, mask.shape[-1])):
    if not keep.any():
      continue
    e = np.exp(row[keep] - row[keep].max())
    p = e / e.sum()
    losses.append(max(0.0, beta - np.std(p)))
  return np.mean(losses)


def np_context_loss(logits, gamma, rho, mask):
  q, k = logits.shape[-2:]
  losses = []
  for mat, msk in zip(logits.reshape(-1, q, k), mask.reshape(-1, q, k)):
    for i in range(q):
      window = [j for j in range(k) if abs(i - j) <= rho // 2 and msk[i, j]]
      if not window:
        continue
      keys = [j for j in range(k) if msk[i, j]]
      losses.append(max(0.0, mat[i, keys].mean() + gamma - mat[i, window].mean()))
  return np.mean(losses)


@pytest.mark.parametrize("masked", [False, True])
def test_variance_and_context_losses_match_row_loops(masked):
  rng = np.random.default_rng(int(masked))
  logits = rng.normal(scale=0.3, size=(2, 6, 6))
  if masked:  # padded keys 4, 5 of sample 1 and its padded query row 5
    key_mask = np.ones((2, 6), bool)
    key_mask[1, 4:] = False
    query_mask = key_mask.copy()
    query_mask[1, 5] = False
    mask = key_mask[:, None, :] & query_mask[:, :, None]
  else:
    mask = np.ones((2, 6, 6), bool)
  where = mask if masked else None
  np.testing.assert_allclose(attention_variance_loss(logits, beta=0.2, where=where),
                             np_variance_loss(logits, 0.2, mask), rtol=1e-5)
  # An attention's own masked softmax (padded keys at -1e9, as SAM-LML's) passed as ``probs``
  # gives the same loss and the same gradient with respect to the logits.
  probs = lambda a: jax.nn.softmax(jnp.where(mask, a, -1e9), axis=-1)
  given = lambda a: attention_variance_loss(a, beta=0.2, where=where, probs=probs(a))
  computed = lambda a: attention_variance_loss(a, beta=0.2, where=where)
  np.testing.assert_allclose(given(logits), computed(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(given)(jnp.asarray(logits, jnp.float32)),
                             jax.grad(computed)(jnp.asarray(logits, jnp.float32)), atol=1e-7)
  for rho in (1, 3, 5):
    np.testing.assert_allclose(
        attention_context_loss(logits, gamma=0.5, rho=rho, where=where),
        np_context_loss(logits, 0.5, rho, mask), rtol=1e-5)


def test_context_loss_hand_case():
  # A = 3 I (4 x 4), rho = 3: row means 0.75; window means 1.5, 1, 1, 1.5;
  # hinges max(0, 0.75 + 0.5 - w) = 0, .25, .25, 0 -> 0.125.
  assert float(attention_context_loss(3 * jnp.eye(4), gamma=0.5, rho=3)) == pytest.approx(0.125)


def test_variance_loss_uniform_rows_cost_beta_with_finite_gradient():
  logits = jnp.zeros((3, 5))
  assert float(attention_variance_loss(logits, beta=0.1)) == pytest.approx(0.1)
  g = jax.grad(lambda a: attention_variance_loss(a, beta=0.1))(logits)
  assert np.all(np.isfinite(g))
  peaked = jnp.array([[40.0, 0.0, 0.0, 0.0]])  # std of (1, 0, 0, 0) is sqrt(3)/4
  assert float(attention_variance_loss(peaked, beta=0.5)) == pytest.approx(0.5 - np.sqrt(3) / 4,
                                                                            rel=1e-4)


def test_attention_losses_bad_arguments():
  with pytest.raises(ValueError, match="rho"):
    attention_context_loss(jnp.zeros((3, 3)), gamma=0.1, rho=0)
  with pytest.raises(ValueError, match="beta"):
    attention_variance_loss(jnp.zeros((3, 3)), beta=-1.0)
  with pytest.raises(ValueError, match=r"attn_logits: expected shape \[\.\.\., Q, K\]"):
    attention_variance_loss(jnp.zeros(3), beta=0.1)
  with pytest.raises(ValueError, match=r"where: mask shape \(2,\) does not broadcast"):
    attention_variance_loss(jnp.zeros((3, 3)), beta=0.1, where=jnp.ones(2, bool))
  with pytest.raises(ValueError, match="probs"):
    attention_variance_loss(jnp.zeros((3, 3)), beta=0.1, probs=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"higher\[3\], lower\[4\]"):
    margin_ranking_loss(jnp.zeros(3), jnp.zeros(4), margin=1.0)
