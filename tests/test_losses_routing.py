"""Routing losses (EUAR eq. 5-10) against NumPy re-implementations and closed-form gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import load_balancing_loss, top_k_gates, uncertainty_routing_loss


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_top_k(probs, k):
  """Keeps the k largest per row; a stable sort on -p breaks ties by lowest index."""
  out = np.zeros_like(probs)
  n = probs.shape[-1]
  for row, p in zip(out.reshape(-1, n), probs.reshape(-1, n)):  # rows are views into out
    keep = np.argsort(-p, kind="stable")[:k]
    row[keep] = p[keep]
  return out


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_gates_matches_numpy(k, renormalize):
  logits = np.random.default_rng(k).normal(size=(5, 3, 8))
  gates, probs = top_k_gates(logits, k, renormalize=renormalize)
  want_probs = np_softmax(logits)
  want = np_top_k(want_probs, k)
  if renormalize:
    want = want / want.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gates, want, rtol=1e-5, atol=1e-7)
  assert np.all((np.asarray(gates) > 0).sum(-1) == k)


def test_top_k_gates_ties_lowest_index_wins():
  gates, _ = top_k_gates(jnp.array([[0.0, 1.0, 1.0, 1.0]]), 2)
  # Experts 1, 2, 3 tie; 1 and 2 are kept.
  np.testing.assert_array_equal(np.asarray(gates) > 0, [[False, True, True, False]])


@pytest.mark.parametrize("k", [0, 5, 2.0, True])
def test_top_k_gates_rejects_bad_k(k):
  with pytest.raises(ValueError, match="k: expected an int in"):
    top_k_gates(jnp.zeros((2, 4)), k)


def test_top_k_gates_gradient_only_through_kept_probabilities():
  logits = jnp.array([0.3, -1.0, 2.0, 0.7])
  # d gates_2 / d logits = d probs_2 / d logits = p_2 (e_2 - p) for a kept expert.
  jac = jax.jacobian(lambda l: top_k_gates(l, 2)[0])(logits)
  p = np_softmax(np.asarray(logits))
  np.testing.assert_allclose(jac[2], p[2] * (np.eye(4)[2] - p), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(jac[1], 0.0)  # dropped expert: constant 0


def np_load_balancing(gates, scale):
  b, n = gates.shape
  r = np.array([np.mean(gates.argmax(-1) == j) for j in range(n)])
  p = gates.mean(0)
  return (1 / n if scale == "euar" else n) * np.sum(r * p)


@pytest.mark.parametrize("scale", ["euar", "switch"])
def test_load_balancing_matches_numpy_and_closed_form_gradient(scale):
  gates = np.asarray(top_k_gates(np.random.default_rng(0).normal(size=(16, 8)), 3)[0])
  np.testing.assert_allclose(load_balancing_loss(gates, scale=scale),
                             np_load_balancing(gates, scale), rtol=1e-6)
  # Gradient flows only through P: dL/dgates[b, j] = factor * R_j / B.
  b, n = gates.shape
  r = np.array([np.mean(gates.argmax(-1) == j) for j in range(n)])
  factor = 1 / n if scale == "euar" else n
  grad = jax.grad(lambda g: load_balancing_loss(g, scale=scale))(jnp.asarray(gates))
  np.testing.assert_allclose(grad, np.broadcast_to(factor * r / b, (b, n)), rtol=1e-6)


def test_switch_scale_is_one_at_uniform_top1_routing():
  n = 4
  gates = jnp.tile(jnp.eye(n), (3, 1))  # every expert chosen equally often, gate 1
  assert float(load_balancing_loss(gates, scale="switch")) == pytest.approx(1.0)
  assert float(load_balancing_loss(gates, scale="euar")) == pytest.approx(1.0 / n**2)


def test_load_balancing_where_equals_subset_and_empty_is_zero():
  gates = np.asarray(top_k_gates(np.random.default_rng(1).normal(size=(10, 4)), 2)[0])
  where = np.arange(10) % 3 == 0
  np.testing.assert_allclose(load_balancing_loss(gates, where=where),
                             np_load_balancing(gates[where], "euar"), rtol=1e-6)
  empty = jnp.zeros(10, bool)
  assert float(load_balancing_loss(gates, where=empty)) == 0.0
  grad = jax.grad(lambda g: load_balancing_loss(g, where=empty))(jnp.asarray(gates))
  assert np.all(np.isfinite(grad))


def test_load_balancing_rejects_bad_input():
  with pytest.raises(ValueError, match=r"gates: expected shape \[B, N\]"):
    load_balancing_loss(jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="scale"):
    load_balancing_loss(jnp.zeros((2, 3)), scale="gshard")


def test_uncertainty_routing_loss_matches_numpy():
  rng = np.random.default_rng(2)
  gates = rng.uniform(size=(6, 5))
  variances = rng.uniform(0.1, 3.0, size=(6, 5, 7))
  want = np.mean([np.mean([gates[b, j] * variances[b, j].mean() for j in range(5)])
                  for b in range(6)])
  np.testing.assert_allclose(uncertainty_routing_loss(gates, variances), want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"variances\[6, 4, 7\]"):
    uncertainty_routing_loss(gates, variances[:, :4])


def test_u_loss_gradient_moves_gate_mass_away_from_high_variance_experts():
  """A gradient step on router logits lowers the gate of the noisiest expert (EUAR §3.4)."""
  logits = jnp.zeros((4, 5))
  variances = jnp.ones((4, 5, 3)).at[:, 2].set(10.0)  # expert 2 is uncertain

  def loss(l):
    return uncertainty_routing_loss(top_k_gates(l, 5)[0], variances)

  new_logits = logits - 1.0 * jax.grad(loss)(logits)
  before = top_k_gates(logits, 5)[1][:, 2]
  after = top_k_gates(new_logits, 5)[1][:, 2]
  assert np.all(after < before - 1e-3)
  # Gradient w.r.t. variances is gates / (N D): the loss also shrinks variances of used experts.
  gates = top_k_gates(logits, 5)[0]
  grad_var = jax.grad(lambda v: uncertainty_routing_loss(gates, v))(variances)
  np.testing.assert_allclose(grad_var, np.broadcast_to(gates[..., None] / (4 * 5 * 3), (4, 5, 3)),
                             rtol=1e-6)
