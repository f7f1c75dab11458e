"""Contract shared by every public loss: jit == eager == vmap, finite-difference gradients,
finite values and gradients at the edges in float32 and bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import mmjax.losses as L

PUBLIC = {
    "top_k_gates", "load_balancing_loss", "uncertainty_routing_loss",
    "gaussian_kl_standard_normal", "gaussian_nll", "categorical_kl", "symmetric_kl",
    "gaussian_cs_divergence", "gaussian_cs_divergence_full", "kernel_cs_divergence",
    "margin_ranking_loss", "attention_variance_loss", "attention_context_loss",
    "predictive_consistency_loss", "anchored_consistency_loss",
}


def spd(rng, *shape):
  a = rng.normal(size=shape + shape[-1:])
  return a @ np.swapaxes(a, -1, -2) + shape[-1] * np.eye(shape[-1])


def typical_cases():
  """name -> (function of arrays only, arguments at a generic point: no ties, no hinge kinks)."""
  rng = np.random.default_rng(0)
  n = lambda *s: rng.normal(size=s)
  u = lambda *s: rng.uniform(0.3, 2.0, size=s)
  gates = np.asarray(L.top_k_gates(n(6, 5), 3)[0], np.float64)
  return {
      "top_k_gates": (lambda l: L.top_k_gates(l, 3)[0], (n(4, 6),)),
      "load_balancing_loss": (L.load_balancing_loss, (gates,)),
      "uncertainty_routing_loss": (L.uncertainty_routing_loss, (u(6, 5), u(6, 5, 3))),
      "gaussian_kl_standard_normal": (L.gaussian_kl_standard_normal, (n(4, 3), n(4, 3))),
      "gaussian_nll": (L.gaussian_nll, (n(4, 3), n(4, 3), u(4, 3))),
      "categorical_kl": (L.categorical_kl, (n(4, 3), n(4, 3))),
      "symmetric_kl": (L.symmetric_kl, (n(4, 3), n(4, 3))),
      "gaussian_cs_divergence": (L.gaussian_cs_divergence, (n(4, 3), u(4, 3), n(4, 3), u(4, 3))),
      "gaussian_cs_divergence_full": (
          L.gaussian_cs_divergence_full, (n(4, 3), spd(rng, 4, 3), n(4, 3), spd(rng, 4, 3))),
      "kernel_cs_divergence": (L.kernel_cs_divergence, (n(5, 3), n(6, 3) + 0.5)),
      "margin_ranking_loss": (functools.partial(L.margin_ranking_loss, margin=1.0),
                              (n(5, 4), n(5, 4))),
      "attention_variance_loss": (functools.partial(L.attention_variance_loss, beta=0.5),
                                  (0.3 * n(2, 5, 5),)),
      "attention_context_loss": (functools.partial(L.attention_context_loss, gamma=2.0, rho=3),
                                 (0.3 * n(2, 5, 5),)),
      "predictive_consistency_loss": (L.predictive_consistency_loss, (n(3, 4, 5),)),
      "anchored_consistency_loss": (L.anchored_consistency_loss, (n(3, 4, 5), n(4, 5))),
  }


def edge_cases():
  """name -> (function, arguments) at the numerical edges named in the spec."""
  big = np.array([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4]])
  tiny = np.full((2, 4), 1e-12)
  empty = np.zeros(2, bool)
  far = np.array([[0.0, 0.0], [1.0, 0.0]])
  return {
      "top_k_gates": (lambda l: L.top_k_gates(l, 2)[0], (big,)),
      "load_balancing_loss": (lambda g: L.load_balancing_loss(g, where=empty), (tiny,)),
      "uncertainty_routing_loss": (L.uncertainty_routing_loss, (tiny, np.full((2, 4, 3), 1e-12))),
      "gaussian_kl_standard_normal": (L.gaussian_kl_standard_normal,
                                      (big / 1e2, np.log(tiny))),
      "gaussian_nll": (L.gaussian_nll, (np.ones((2, 4)), np.zeros((2, 4)), tiny)),
      "categorical_kl": (L.categorical_kl, (big, big[::-1])),
      "symmetric_kl": (L.symmetric_kl, (big, big[::-1])),
      "gaussian_cs_divergence": (L.gaussian_cs_divergence, (np.ones((2, 4)), tiny, 0 * tiny, tiny)),
      "gaussian_cs_divergence_full": (
          L.gaussian_cs_divergence_full, (np.ones(2), 1e-6 * np.eye(2), np.zeros(2), np.eye(2))),
      "kernel_cs_divergence": (L.kernel_cs_divergence, (far, far + 300.0)),
      "margin_ranking_loss": (lambda h, l: L.margin_ranking_loss(h, l, margin=1.0, where=empty),
                              (big[:, 0], big[:, 1])),
      "attention_variance_loss": (functools.partial(L.attention_variance_loss, beta=0.1),
                                  (big[None],)),
      "attention_context_loss": (functools.partial(L.attention_context_loss, gamma=0.1, rho=3),
                                 (big[None, :, :2].repeat(2, 0),)),
      "predictive_consistency_loss": (L.predictive_consistency_loss, (np.stack([big, -big]),)),
      "anchored_consistency_loss": (lambda v, f: L.anchored_consistency_loss(v, f, where=empty),
                                    (np.stack([big, -big]), big)),
  }


def test_public_names():
  assert set(L.__all__) == PUBLIC
  assert all(callable(getattr(L, name)) for name in PUBLIC)
  assert set(typical_cases()) == PUBLIC and set(edge_cases()) == PUBLIC


def as_f32(args):
  return tuple(jnp.asarray(a, jnp.float32) for a in args)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_eager_equals_jit_equals_vmap(name):
  fn, args = typical_cases()[name]
  args = as_f32(args)
  eager = fn(*args)
  np.testing.assert_allclose(jax.jit(fn)(*args), eager, rtol=1e-5, atol=1e-6)
  # vmap over a new leading axis of 3 perturbed copies == the eager results stacked.
  stacked = tuple(jnp.stack([a, a * 1.1, a * 0.9]) for a in args)
  each = jnp.stack([fn(*(s[i] for s in stacked)) for i in range(3)])
  np.testing.assert_allclose(jax.vmap(fn)(*stacked), each, rtol=1e-5, atol=1e-6)


# Arguments that receive no gradient by design (EASE eq. 11: sg(p_full)); checked in its own test.
STOP_GRADIENT_ARGS = {"anchored_consistency_loss": {1}}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_gradients_match_finite_differences(name):
  fn, args = typical_cases()[name]
  free = [i for i in range(len(args)) if i not in STOP_GRADIENT_ARGS.get(name, set())]

  def total(*free_args):
    full = list(args)
    for i, a in zip(free, free_args):
      full[i] = a
    return jnp.sum(fn(*full))

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in args)
    check_grads(total, tuple(args[i] for i in free), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_finite_values_and_gradients_at_the_edges(name, dtype):
  fn, args = edge_cases()[name]
  args = tuple(jnp.asarray(a, dtype) for a in args)
  value = fn(*args)
  assert np.all(np.isfinite(np.asarray(value, np.float32))), value
  grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args))))(*args)
  for g, a in zip(grads, args):
    assert g.dtype == dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_bfloat16_agrees_with_float32(name):
  fn, args = typical_cases()[name]
  low = fn(*(jnp.asarray(a, jnp.bfloat16) for a in args))
  high = fn(*(jnp.asarray(jnp.asarray(a, jnp.bfloat16), jnp.float32) for a in args))
  # Same (bf16-rounded) inputs: computing internally in float32 gives the float32 answer.
  np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(high), rtol=1e-5, atol=1e-6)
