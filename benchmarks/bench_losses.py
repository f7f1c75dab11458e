"""Speed of every loss in ``mmjax.losses``: compile time and steady-state forward / forward+backward time.

Each case jits one loss at a realistic shape (batch 64, feature dims ``--dims``, 8 experts, 50x50
attention logits, 4 views x 3 classes), compiles it ahead of time (the compile time reported), runs
one warm-up call, then ``--repeats`` calls, each followed by ``block_until_ready``; the median is
reported in microseconds per call. "fwd" is the loss as called (per-sample outputs are not
reduced); "fwd+bwd" is ``value_and_grad`` of the mean of every output with respect to the
differentiable inputs listed in the table (in bold). The table is printed as Markdown.

  python benchmarks/bench_losses.py                                   # all cases, D = 128 and 768
  python benchmarks/bench_losses.py --dims=128 --only=cs --repeats=20
  python benchmarks/bench_losses.py --output=/tmp/losses.md           # also write the table
  python benchmarks/bench_losses.py --only=full --full_cov_max_dim=768 --repeats=3

Cases that call LAPACK (``gaussian_cs_divergence_full``: Cholesky factorisations and triangular
solves) run in a separate process with a time limit (``--isolated_timeout_s``). jaxlib 0.10.x's CPU
LAPACK kernels split their batch over XLA's intra-op thread pool and block waiting for it; when
XLA runs as many independent LAPACK calls concurrently as the pool has threads (2 on a 2-core
machine), every pool thread waits and the call never returns. Such a case is reported as
"timeout" instead of stopping the benchmark. SciPy's OpenBLAS, which those kernels call, is pinned
to one thread (``OPENBLAS_NUM_THREADS=1`` unless set by the caller): XLA already runs the batch in
parallel, and nested OpenBLAS threads oversubscribe the cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before SciPy's OpenBLAS is loaded (see above)

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import multiprocessing
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp

from mmjax import losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPEATS = flags.DEFINE_integer(
    "repeats", 200, "Timed calls per case, after one warm-up call; the median is reported.")
_DIMS = flags.DEFINE_list("dims", ["128", "768"], "Feature dimensions D of the D-dependent cases.")
_ONLY = flags.DEFINE_string("only", "", "Run only the cases whose name contains this substring.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table to this file.")
_FULL_COV_MAX_DIM = flags.DEFINE_integer(
    "full_cov_max_dim", 128,
    "Largest D for gaussian_cs_divergence_full (three [64, D, D] Cholesky factorisations per "
    "call: D = 768 takes seconds per call on a small CPU, so it is off by default).")
_ISOLATED_TIMEOUT_S = flags.DEFINE_float(
    "isolated_timeout_s", 90.0,
    "Time limit of each case run in its own process (the LAPACK-backed ones, see above).")

BATCH = 64
EXPERTS = 8
TOP_K = 2
SEQ = 50
VIEWS = 4
CLASSES = 3


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked call: ``loss(*make_args())``, differentiated with respect to ``argnums``."""
  name: str
  dim: int | None  # feature dimension D, None when the case does not depend on it
  inputs: str  # the argument shapes, differentiated ones in bold
  loss: Callable[..., Any]
  make_args: Callable[[], tuple[jax.Array, ...]]  # built lazily: only selected cases allocate
  argnums: tuple[int, ...]
  isolated: bool = False  # run in its own process with a time limit (calls LAPACK)


def _normal(seed: int, *shape: int) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _positive(seed: int, *shape: int) -> jax.Array:
  """Variances: ``softplus(N(0, 1)) + 1e-3``."""
  return jax.nn.softplus(_normal(seed, *shape)) + 1e-3


def _spd(seed: int, d: int) -> jax.Array:
  """``<float32>[B, D, D]`` covariances ``A A^T / D + 0.1 I``."""
  a = _normal(seed, BATCH, d, d)
  return jnp.einsum("bij,bkj->bik", a, a) / d + 0.1 * jnp.eye(d)


def _gates() -> jax.Array:
  return losses.top_k_gates(_normal(1, BATCH, EXPERTS), TOP_K)[0]


def _shapes(names_and_shapes: Sequence[tuple[str, tuple[int, ...]]], argnums: tuple[int, ...]) -> str:
  parts = []
  for i, (name, shape) in enumerate(names_and_shapes):
    text = f"{name}{list(shape)}"
    parts.append(f"**{text}**" if i in argnums else text)
  return ", ".join(parts)


def _case(
    name: str,
    dim: int | None,
    loss: Callable[..., Any],
    args_spec: Sequence[tuple[str, tuple[int, ...]]],
    make_args: Callable[[], tuple[jax.Array, ...]],
    argnums: tuple[int, ...],
    isolated: bool = False,
) -> Case:
  return Case(name, dim, _shapes(args_spec, argnums), loss, make_args, argnums, isolated)


def make_cases(dims: Sequence[int], full_cov_max_dim: int) -> list[Case]:
  """Every benchmarked case, D-independent ones first, then each loss at each ``D`` in ``dims``."""
  b, n, s, v, c = BATCH, EXPERTS, SEQ, VIEWS, CLASSES
  attn = (b, s, s)
  cases = [
      _case("top_k_gates", None, lambda x: losses.top_k_gates(x, TOP_K),
            [("logits", (b, n))], lambda: (_normal(0, b, n),), (0,)),
      _case("load_balancing_loss", None, losses.load_balancing_loss,
            [("gates", (b, n))], lambda: (_gates(),), (0,)),
      _case("margin_ranking_loss", None, lambda h, l: losses.margin_ranking_loss(h, l, margin=0.1),
            [("higher", attn), ("lower", attn)],
            lambda: (_normal(0, *attn), _normal(1, *attn)), (0, 1)),
      _case("attention_variance_loss", None,
            lambda a: losses.attention_variance_loss(a, beta=0.05),
            [("attn_logits", attn)], lambda: (_normal(0, *attn),), (0,)),
      _case("attention_context_loss", None,
            lambda a: losses.attention_context_loss(a, gamma=0.1, rho=5),
            [("attn_logits", attn)], lambda: (_normal(0, *attn),), (0,)),
      _case("predictive_consistency_loss", None, losses.predictive_consistency_loss,
            [("view_logits", (v, b, c))], lambda: (_normal(0, v, b, c),), (0,)),
      _case("anchored_consistency_loss", None, losses.anchored_consistency_loss,
            [("view_logits", (v, b, c)), ("full_logits", (b, c))],
            lambda: (_normal(0, v, b, c), _normal(1, b, c)), (0, 1)),
  ]
  for d in dims:
    bd = (b, d)
    cases += [
        _case("uncertainty_routing_loss", d, losses.uncertainty_routing_loss,
              [("gates", (b, n)), ("variances", (b, n, d))],
              lambda d=d: (_gates(), _positive(2, b, n, d)), (0, 1)),
        _case("gaussian_kl_standard_normal", d, losses.gaussian_kl_standard_normal,
              [("mean", bd), ("log_var", bd)], lambda d=d: (_normal(0, b, d), _normal(1, b, d)),
              (0, 1)),
        _case("gaussian_nll", d, losses.gaussian_nll,
              [("target", bd), ("mean", bd), ("var", bd)],
              lambda d=d: (_normal(0, b, d), _normal(1, b, d), _positive(2, b, d)), (1, 2)),
        # EMMR applies its KLs to softmax-normalised features, hence [B, D] logits.
        _case("categorical_kl", d, losses.categorical_kl,
              [("p_logits", bd), ("q_logits", bd)],
              lambda d=d: (_normal(0, b, d), _normal(1, b, d)), (0, 1)),
        _case("symmetric_kl", d, losses.symmetric_kl,
              [("p_logits", bd), ("q_logits", bd)],
              lambda d=d: (_normal(0, b, d), _normal(1, b, d)), (0, 1)),
        _case("gaussian_cs_divergence", d, losses.gaussian_cs_divergence,
              [("mean_p", bd), ("var_p", bd), ("mean_q", bd), ("var_q", bd)],
              lambda d=d: (_normal(0, b, d), _positive(1, b, d), _normal(2, b, d),
                           _positive(3, b, d)), (0, 1, 2, 3)),
    ]
    if d <= full_cov_max_dim:
      cases.append(_case(
          "gaussian_cs_divergence_full", d, losses.gaussian_cs_divergence_full,
          [("mean_p", bd), ("cov_p", (b, d, d)), ("mean_q", bd), ("cov_q", (b, d, d))],
          lambda d=d: (_normal(0, b, d), _spd(1, d), _normal(2, b, d), _spd(3, d)),
          (0, 1, 2, 3), isolated=True))
    cases += [
        _case("kernel_cs_divergence", d, lambda x, y: losses.kernel_cs_divergence(x, y),
              [("x", bd), ("y", bd)], lambda d=d: (_normal(0, b, d), _normal(1, b, d) + 0.5),
              (0, 1)),
        _case("kernel_cs_divergence (adaptive)", d,
              lambda x, y, ux, uy: losses.kernel_cs_divergence(
                  x, y, bandwidth=1.0, x_uncertainty=ux, y_uncertainty=uy, alpha=1.0),
              [("x", bd), ("y", bd), ("x_uncertainty", (b,)), ("y_uncertainty", (b,))],
              lambda d=d: (_normal(0, b, d), _normal(1, b, d) + 0.5, _positive(2, b),
                           _positive(3, b)), (0, 1, 2, 3)),
    ]
  return cases


def _mean_of_outputs(loss: Callable[..., Any]) -> Callable[..., jax.Array]:
  """The scalar that fwd+bwd differentiates: the sum over output leaves of each leaf's mean."""
  def scalar(*args):
    return sum(jnp.mean(leaf) for leaf in jax.tree.leaves(loss(*args)))
  return scalar


def _compile(fn: Callable[..., Any], args: tuple[jax.Array, ...]) -> tuple[Any, float]:
  """Ahead-of-time ``jit(fn)`` for ``args``; returns the executable and the seconds it took."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _median_call_seconds(compiled: Any, args: tuple[jax.Array, ...], repeats: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations, caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median call times and compile times of one case; all ``None`` when it timed out."""
  case: Case
  fwd_us: float | None
  fwd_bwd_us: float | None
  compile_fwd_ms: float | None
  compile_fwd_bwd_ms: float | None


def time_case(case: Case, repeats: int) -> tuple[float, float, float, float]:
  """Compiles and times ``case``: ``(fwd_us, fwd_bwd_us, compile_fwd_ms, compile_fwd_bwd_ms)``."""
  args = jax.block_until_ready(case.make_args())
  fwd, compile_fwd = _compile(case.loss, args)
  fwd_bwd, compile_fwd_bwd = _compile(
      jax.value_and_grad(_mean_of_outputs(case.loss), argnums=case.argnums), args)
  return (1e6 * _median_call_seconds(fwd, args, repeats),
          1e6 * _median_call_seconds(fwd_bwd, args, repeats),
          1e3 * compile_fwd, 1e3 * compile_fwd_bwd)


def _time_case_by_key(name: str, dim: int | None, repeats: int) -> tuple[float, float, float, float]:
  """:func:`time_case` of the case ``(name, dim)``; what an isolated worker process runs."""
  dims = [] if dim is None else [dim]
  (case,) = [c for c in make_cases(dims, dim or 0) if (c.name, c.dim) == (name, dim)]
  return time_case(case, repeats)


def time_case_isolated(case: Case, repeats: int, timeout_s: float) -> tuple[float, ...] | None:
  """:func:`time_case` in a fresh process; ``None`` if it has not finished after ``timeout_s``."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving the block kills the worker
    result = pool.apply_async(_time_case_by_key, (case.name, case.dim, repeats))
    try:
      return result.get(timeout_s)
    except multiprocessing.TimeoutError:
      return None


def machine_line() -> str:
  """``nproc``, CPU model, jax version and devices, for the record."""
  return (f"{os.cpu_count()} CPUs ({machine.cpu_model()}), jax {jax.__version__}, "
          f"devices {[str(d) for d in jax.devices()]}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")


def markdown_table(timings: Sequence[Timing], repeats: int, timeout_s: float) -> str:
  lines = [
      "| loss | D | inputs (differentiated in bold) | fwd µs | fwd+bwd µs | compile fwd / fwd+bwd ms |",
      "| --- | ---: | --- | ---: | ---: | ---: |",
  ]
  for t in timings:
    dim = "–" if t.case.dim is None else str(t.case.dim)
    if t.fwd_us is None:
      numbers = "timeout | timeout | – "
    else:
      numbers = (f"{t.fwd_us:,.1f} | {t.fwd_bwd_us:,.1f} "
                 f"| {t.compile_fwd_ms:,.0f} / {t.compile_fwd_bwd_ms:,.0f} ")
    lines.append(f"| `{t.case.name}` | {dim} | {t.case.inputs} | {numbers}|")
  lines.append("")
  lines.append(f"Median of {repeats} calls after one warm-up call; {machine_line()}.")
  if any(t.fwd_us is None for t in timings):
    lines.append("")
    lines.append(f"timeout: did not finish within {timeout_s:g} s (on jaxlib 0.10.x, the CPU LAPACK "
                 "thread-pool deadlock described in benchmarks/bench_losses.py).")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _REPEATS.value < 1:
    raise app.UsageError(f"--repeats: must be >= 1, got {_REPEATS.value}")
  try:
    dims = [int(d) for d in _DIMS.value]
  except ValueError:
    raise app.UsageError(f"--dims: expected comma-separated ints, got {_DIMS.value}") from None
  cases = [c for c in make_cases(dims, _FULL_COV_MAX_DIM.value) if _ONLY.value in c.name]
  if not cases:
    raise app.UsageError(f"--only={_ONLY.value!r} matches no case")
  timings = []
  for case in cases:
    if case.isolated:
      numbers = time_case_isolated(case, _REPEATS.value, _ISOLATED_TIMEOUT_S.value)
    else:
      numbers = time_case(case, _REPEATS.value)
    timings.append(Timing(case, *(numbers or (None,) * 4)))
    print(f"# {case.name} D={case.dim}: " + (
        "timeout" if numbers is None else f"fwd {numbers[0]:,.1f} µs, fwd+bwd {numbers[1]:,.1f} µs"),
        flush=True)
  table = markdown_table(timings, _REPEATS.value, _ISOLATED_TIMEOUT_S.value)
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
