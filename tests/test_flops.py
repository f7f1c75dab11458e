"""mmjax.flops.matmul_flops against hand counts and XLA's own count of a matmul-only program."""

import jax
import jax.numpy as jnp
import pytest

from mmjax.flops import matmul_flops

A = jax.ShapeDtypeStruct((4, 5), jnp.float32)
B = jax.ShapeDtypeStruct((5, 6), jnp.float32)
X = jax.ShapeDtypeStruct((3, 4, 5), jnp.float32)  # a batch of 3 [4, 5] matrices
MM = 2 * 4 * 5 * 6  # one [4, 5] @ [5, 6]


def _scan(a, b):
  body = lambda c, _: (jnp.tanh(c @ b[:, :5]), None)
  return jax.lax.scan(body, a, None, length=7)[0]


def _cond(a, b):
  return jax.lax.cond(a[0, 0] > 0, lambda: a @ b, lambda: jnp.zeros((4, 6)) + a[:, :1])


def _while(a, b):
  return jax.lax.while_loop(lambda c: c[0, 0] < 1.0, lambda c: c @ b[:, :5], a)


def _scanned_cond(a, b):  # the cond inside a scan of 3: its branch counted 3 times
  return jax.lax.scan(lambda c, _: (_cond(c, b)[:, :5], None), a, None, length=3)[0]


@pytest.mark.parametrize("fn, args, flops, conditional, loops", [
    (lambda a, b: a @ b, (A, B), MM, 0, 0),
    # d/da and d/db of sum(a @ b): the forward matmul and one per cotangent.
    (jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1)), (A, B), 3 * MM, 0, 0),
    (jax.grad(lambda a, b: jnp.sum(a @ b)), (A, B), 2 * MM, 0, 0),  # d/db is never formed
    (lambda x, b: jnp.einsum("nij,jk->nik", x, b), (X, B), 3 * MM, 0, 0),
    (_scan, (A, B), 7 * 2 * 4 * 5 * 5, 0, 0),
    (jax.jit(_scan), (A, B), 7 * 2 * 4 * 5 * 5, 0, 0),
    (_cond, (A, B), MM, MM, 0),  # the most expensive branch, reported as conditional
    (_scanned_cond, (A, B), 3 * MM, 3 * MM, 0),
    (_while, (A, B), 2 * 4 * 5 * 5, 0, 1),  # the body once, reported
])
def test_matmul_flops_hand_counts(fn, args, flops, conditional, loops):
  assert tuple(matmul_flops(fn, *args)) == (flops, conditional, loops)


def test_matmul_flops_equal_xla_count_of_a_matmul_only_program():
  f = lambda x, b: jnp.einsum("nij,jk->nik", x, b)
  xla = jax.jit(f).lower(X, B).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  assert matmul_flops(f, X, B).flops == xla["flops"]
