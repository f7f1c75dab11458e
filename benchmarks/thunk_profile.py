"""Where a compiled step's time goes, thunk by thunk, on XLA's CPU runtime (no flags: a library).

XLA's CPU runtime runs a compiled program as a sequence of *thunks* (one per fusion, dot, copy,
``while``, ...). With ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` set before JAX starts, a
``jax.profiler`` trace holds one event per thunk run, named after its HLO instruction, on whichever
thread ran it (XLA's pool ``tf_XLAEigen``, or the caller's for a small program).
:func:`profile_calls` traces ``calls`` calls of a jitted function and sums each event name's busy
time; :func:`dot_flops` reads every instruction of the optimised HLO
(``jit(f).lower(...).compile().as_text()``) with the FLOPs of its dots, fusions counting the dots
they call; :func:`attribute` keeps the events named after an instruction (the thunks) and joins the
two: matmul thunks by size with their achieved GFLOP/s, the time of the thunks without a matmul,
and the slowest thunks with the source op that made them (``metadata.op_name``). Used by
``bench_engine.py --profile``.

Busy time is per thread: with two threads running thunks side by side, the busy total can approach
twice the wall time. The trace adds a little time per thunk (~1 µs), so read wall times from runs
without the flag.
"""

from __future__ import annotations

import collections
import glob
import math
import os
import re
import tempfile
from typing import Any

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_SHAPE = r"[a-z]+\d*\[([\d,]*)\]"
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = " + _SHAPE)
_DOT = re.compile(r"= " + _SHAPE + r"\S* dot\(%?([\w.\-]+), .*?lhs_contracting_dims=\{([\d,]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SIZES = ((1e6, "< 1 MFLOP"), (1e7, "1-10 MFLOP"), (1e8, "10-100 MFLOP"),
          (math.inf, ">= 100 MFLOP"))


def enable_traceme() -> None:
  """Adds :data:`TRACEME_FLAG` to ``XLA_FLAGS``; call before JAX initialises its CPU backend."""
  flags = os.environ.get("XLA_FLAGS", "")
  if TRACEME_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _computations(hlo: str) -> dict[str, list[str]]:
  """Optimised HLO text -> ``{computation name: its instruction lines}``."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" ") and " = " not in line.split("{")[0]:
      current = computations.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)
  return computations


def dot_flops(hlo: str) -> tuple[dict[str, int], dict[str, str]]:
  """``({instruction: matmul FLOPs}, {instruction: source op_name})`` of an optimised HLO module,
  every instruction (0 FLOPs for those without a dot).

  A dot's FLOPs are ``2 * prod(output dims) * prod(lhs contracting dims)``; an instruction that
  calls a computation (a fusion) counts the dots in it. A ``while`` body's dots are those of its own
  instructions, once per trip, as the profile records them.
  """
  computations = _computations(hlo)
  shapes = {name: {m.group(1): _dims(m.group(2)) for m in map(_INSTRUCTION.match, lines) if m}
            for name, lines in computations.items()}

  def flops(line: str, computation: str) -> int:
    dot = _DOT.search(line)
    if not dot:
      return 0
    lhs = shapes[computation][dot.group(2)]
    return 2 * math.prod(_dims(dot.group(1))) * math.prod(lhs[i] for i in _dims(dot.group(3)))

  counts, sources = {}, {}
  for name, lines in computations.items():
    for line in lines:
      instruction = _INSTRUCTION.match(line)
      if not instruction:
        continue
      total = flops(line, name)
      called = _CALLS.search(line)
      if called and called.group(1) in computations:
        total += sum(flops(inner, called.group(1)) for inner in computations[called.group(1)])
      counts[instruction.group(1)] = total
      source = _OP_NAME.search(line)
      if source:
        sources[instruction.group(1)] = source.group(1)
  return counts, sources


def profile_calls(call, calls: int) -> tuple[dict[str, float], dict[str, float]]:
  """Traces ``calls`` runs of ``call()`` (each blocked on; a train step fed the state it returned);
  returns per run, per event name on any thread, ``(busy ms summed over threads, runs)`` — the
  thunks among them are the names of HLO instructions (:func:`attribute` keeps those)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  busy, runs = collections.defaultdict(float), collections.defaultdict(float)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(calls):
        jax.block_until_ready(call())
    trace = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        busy[event.name] += event.duration_ns / 1e6 / calls
        runs[event.name] += 1 / calls
  return dict(busy), dict(runs)


def attribute(busy: dict[str, float], runs: dict[str, float], flops: dict[str, int],
              sources: dict[str, str], top: int = 8) -> dict[str, Any]:
  """Joins :func:`profile_calls` and :func:`dot_flops` (all per call) on the events named after an
  HLO instruction (the thunks): totals, matmul thunks by size (runs, busy ms, GFLOP, GFLOP/s per
  busy thread), the busiest kinds of thunk without a matmul, and the ``top`` busiest thunks."""
  busy = {name: ms for name, ms in busy.items() if name in flops}
  if not busy:
    raise RuntimeError(f"no thunk in the trace: set {TRACEME_FLAG} in XLA_FLAGS before JAX "
                       "starts (thunk_profile.enable_traceme)")
  matmul = {name for name in busy if flops[name] > 0}
  sizes = {label: [0.0, 0.0, 0.0] for _, label in _SIZES}
  for name in matmul:
    label = next(label for bound, label in _SIZES if flops[name] < bound)
    sizes[label][0] += runs[name]
    sizes[label][1] += busy[name]
    sizes[label][2] += flops[name] * runs[name] / 1e9
  kinds = collections.defaultdict(float)
  for name in set(busy) - matmul:
    kinds[re.sub(r"[.\d]+$", "", name)] += busy[name]
  slowest = sorted(busy, key=busy.get, reverse=True)[:top]
  return dict(
      busy_ms=sum(busy.values()), thunks=sum(runs[n] for n in busy),
      matmul_ms=sum(busy[n] for n in matmul),
      matmul_gflop=sum(flops[n] * runs[n] for n in matmul) / 1e9,
      sizes={k: v for k, v in sizes.items() if v[0]},
      other=sorted(kinds.items(), key=lambda kv: -kv[1])[:top],
      slowest=[(n, busy[n], runs[n], flops[n] * runs[n] / 1e9, _short(sources.get(n, "")))
               for n in slowest])


def _short(op_name: str, parts: int = 4) -> str:
  """The last ``parts`` components of an op_name path (``.../attention/...hqk,...khd/dot_general``)."""
  return "/".join(op_name.split("/")[-parts:])


def markdown(title: str, wall_ms: float, summary: dict[str, Any]) -> str:
  """One method's attribution as Markdown: a header line, sizes table, other thunks, slowest."""
  rate = lambda gflop, ms: f"{gflop / ms * 1e3:.1f}" if ms else "–"
  busy, matmul_ms, matmul_gflop = summary["busy_ms"], summary["matmul_ms"], summary["matmul_gflop"]
  lines = [f"**{title}**: wall {wall_ms:.2f} ms a step; thunks {summary['thunks']:,.0f} a step, "
           f"busy {busy:.2f} ms (all threads); matmul thunks {matmul_ms:.2f} ms for "
           f"{matmul_gflop:.3f} GFLOP ({rate(matmul_gflop, matmul_ms)} GFLOP/s a busy thread); "
           f"thunks without a matmul {busy - matmul_ms:.2f} ms.", "",
           "| matmul thunk size | runs / step | busy ms | GFLOP | GFLOP/s |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for label, (n, ms, gflop) in summary["sizes"].items():
    lines.append(f"| {label} | {n:,.0f} | {ms:.2f} | {gflop:.3f} | {rate(gflop, ms)} |")
  lines += ["", "Busiest thunks without a matmul (by kind): " + ", ".join(
      f"`{kind}` {ms:.2f} ms" for kind, ms in summary["other"]) + ".", "",
            "| busiest thunks | busy ms | runs | GFLOP/s | source op |",
            "| --- | ---: | ---: | ---: | --- |"]
  for name, ms, n, gflop, source in summary["slowest"]:
    lines.append(f"| `{name}` | {ms:.3f} | {n:.0f} | {rate(gflop, ms) if gflop else '–'} "
                 f"| `{source}` |")
  return "\n".join(lines) + "\n"
