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


_THUNK_PROFILE = """
import json, sys
sys.path.insert(0, "benchmarks")
import thunk_profile
thunk_profile.enable_traceme()
import jax, jax.numpy as jnp
from mmjax.flops import matmul_flops
w = (jax.random.normal(jax.random.key(0), (64, 128)),
     jax.random.normal(jax.random.key(1), (128, 32)))
x = jax.random.normal(jax.random.key(2), (256, 64))
f = jax.jit(jax.grad(lambda w, x: jnp.sum((jnp.tanh(x @ w[0]) @ w[1]) ** 2)))
flops, sources = thunk_profile.dot_flops(f.lower(w, x).compile().as_text())
summary = thunk_profile.attribute(*thunk_profile.profile_calls(lambda: f(w, x), 3), flops, sources)
print(json.dumps([summary["matmul_gflop"], matmul_flops(f, w, x).flops / 1e9, summary["busy_ms"]]))
"""


def test_thunk_profile_finds_every_matmul_of_the_traced_program():
  """``benchmarks/thunk_profile``: the FLOPs of the matmul thunks the trace saw run (HLO dots x
  runs per call) equal the program's matmul count (forward and both backward products)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _THUNK_PROFILE], cwd=root, capture_output=True,
                       text=True, check=True, timeout=300)
  traced, counted, busy = json.loads(out.stdout.strip().splitlines()[-1])
  # Forward x @ w0, h @ w1; backward dW1, dh and dW0 (no dx): GFLOP.
  assert counted == pytest.approx((2 * 256 * (64 * 128 + 128 * 32) * 3 - 2 * 256 * 64 * 128) / 1e9)
  assert traced == pytest.approx(counted) and busy > 0
