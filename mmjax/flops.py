"""Matmul work of a JAX function, counted on its jaxpr with loop bodies times their trip count.

XLA's ``jit(f).lower(...).compile().cost_analysis()["flops"]`` counts every FLOP (elementwise ops
included) and a ``lax.scan`` / ``while`` body once. Throughput is measured against the machine's
matmul peak, so :func:`matmul_flops` counts the matmuls alone, as the program runs them:

* ``dot_general`` of ``lhs`` and ``rhs`` with output ``out``: ``2 * size(out) * prod(contracting
  sizes of lhs)`` (a multiply and an add per contracted element of each output);
* a ``scan`` body times its ``length``; a ``cond`` counts its most expensive branch, an upper
  bound on the branch that runs (reported apart as ``conditional``: EMMR skips the chunks of
  :func:`mmjax.nn.map_selected` without a selected row); a ``while`` body counts once (its trip
  count is data-dependent; reported as ``while_loops``);
* every other sub-program (``pjit``, ``custom_jvp`` / ``custom_vjp`` calls, ``remat``,
  ``shard_map``) once, as called.

The count is of the traced program, before XLA's optimisation (which does not remove matmuls
whose result is used); differentiate first (``jax.value_and_grad``) to count a train step's
backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core


class MatmulCount(NamedTuple):
  """``flops``: matmul FLOPs of one call; ``conditional``: the part of them inside ``cond``
  branches (the most expensive branch of each: at most that much runs); ``while_loops``: ``while``
  bodies met, each counted once."""

  flops: int
  conditional: int
  while_loops: int


def sub_jaxprs(value: Any) -> list[jex_core.Jaxpr]:
  """The jaxprs held by an equation's parameter ``value`` (a jaxpr, a closed one, or a tuple /
  list of them, as ``cond``'s ``branches``); ``[]`` for anything else."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in sub_jaxprs(v)]
  return []


def _count(jaxpr: jex_core.Jaxpr) -> MatmulCount:
  flops = conditional = loops = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      out_size = math.prod(eqn.outvars[0].aval.shape)
      flops += 2 * out_size * math.prod(lhs_shape[i] for i in lhs_contracting)
      continue
    if name == "cond":
      branches = [_count(b.jaxpr) for b in eqn.params["branches"]]
      most = max(b.flops for b in branches)
      flops, conditional = flops + most, conditional + most
      loops += sum(b.while_loops for b in branches)
      continue
    times = eqn.params["length"] if name == "scan" else 1
    loops += name == "while"
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        inner = _count(sub)
        flops += times * inner.flops
        conditional += times * inner.conditional
        loops += inner.while_loops
  return MatmulCount(flops, conditional, loops)


def matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MatmulCount:
  """Matmul FLOPs of one call ``fn(*args, **kwargs)`` (module docstring: what is counted).

  ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s; nothing is computed. A jitted ``fn`` is
  traced through (its body counts once per call).
  """
  return _count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
