"""What the step benchmarks share (``bench_train_step``, ``bench_methods``, ``bench_emmr``): the
timing flags, the MOSI-shaped batch, XLA's cost count, the timing loop and the table footer.

Imported by those scripts (run as ``python benchmarks/<script>.py``); it defines ``--repeats``,
``--warmup`` and ``--output`` for all of them.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from absl import app, flags

import machine  # benchmarks/ is on sys.path: its scripts run as files

REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per step; the median is reported.")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls between the first call and the timed ones.")
OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table to this file.")

SEQ_LEN = 50
FEATURE_DIMS = {"text": 768, "audio": 74, "vision": 47}  # MOSI aligned_50 feature widths


def make_dataset(batch_size: int, seed: int = 0, task: str = "regression"):
  """A :class:`~mmjax.data.Dataset` whose three splits are one random MOSI-shaped batch: sentiment
  scores in [-3, 3], or for ``task="classification"`` those scores in 3 classes (negative /
  neutral / positive, :func:`mmjax.data.sentiment_to_class`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax import data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  features = {m: rng.standard_normal((batch_size, SEQ_LEN, d)).astype(np.float32)
              for m, d in FEATURE_DIMS.items()}
  label = rng.uniform(-3.0, 3.0, batch_size).astype(np.float32)  # MOSI sentiment range
  num_classes = None
  if task == "classification":
    num_classes = 3
    label = np.asarray(data.sentiment_to_class(label, num_classes), np.int32)
  batch = data.Batch.create(features, label, task=task, num_classes=num_classes)
  return data.Dataset("bench", task, num_classes, {s: batch for s in data.SPLITS})


def step_cost(step, *args) -> tuple[float, float]:
  """``(GFLOP, GB accessed)`` of one call of the jitted ``step`` by XLA's cost analysis."""
  cost = step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 1e9, cost["bytes accessed"] / 1e9


def time_calls(step, state, batch, *, advance: bool, warmup: int, repeats: int):
  """Calls ``step(state, batch)`` ``1 + warmup + repeats`` times, each blocked on.

  Returns ``(state, first-call seconds, median of the last repeats in seconds)``; with ``advance``
  each call gets the state the previous call returned (the train step donates its input state).
  """
  import jax  # pylint: disable=g-import-not-at-top
  seconds = []
  for _ in range(1 + warmup + repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(step(state, batch))
    seconds.append(time.perf_counter() - start)
    if advance:
      state = out[0]
  return state, seconds[0], statistics.median(seconds[1 + warmup:])


def page_faults_per_call(step, state, batch, *, advance: bool, calls: int):
  """Minor page faults of this process per call of ``step(state, batch)`` (each blocked on), by
  ``getrusage``; returns ``(state, faults per call)``. Call after the step is compiled."""
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    out = jax.block_until_ready(step(state, batch))
    if advance:
      state = out[0]
  return state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """The machine's float32 matmul throughput: GFLOP/s of a jitted ``[n, n] @ [n, n]``
  (``2 n^3`` FLOP), median of ``repeats`` calls after one warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    seconds.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(seconds) / 1e9


def machine_info() -> dict[str, Any]:
  """``nproc``, CPU model, jax version and the devices of this backend."""
  import jax  # pylint: disable=g-import-not-at-top
  return dict(nproc=os.cpu_count(), cpu=machine.cpu_model(), jax=jax.__version__,
              platform=jax.devices()[0].platform, device_count=jax.device_count())


def step_table_footer(batch_size: int | str, labels: str, warmup: int, repeats: int,
                      machine: dict[str, Any], load: tuple[float, float]) -> str:
  """The line under a one-device step-time table (bench_methods, bench_emmr): shapes, timing, machine."""
  return (f"B = {batch_size}; text [B, {SEQ_LEN}, {FEATURE_DIMS['text']}], audio [B, {SEQ_LEN}, "
          f"{FEATURE_DIMS['audio']}], vision [B, {SEQ_LEN}, {FEATURE_DIMS['vision']}], {labels}; "
          f"one device. ms/step = median of {repeats} calls after {warmup} warm-up calls. "
          f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), jax {machine['jax']}, platform "
          f"{machine['platform']}; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after.")


def check_timing_flags() -> None:
  if REPEATS.value < 1 or WARMUP.value < 0:
    raise app.UsageError(f"--repeats must be >= 1 and --warmup >= 0, got {REPEATS.value}, "
                         f"{WARMUP.value}")


def write_table(table: str) -> None:
  """Prints ``table`` and writes it to ``--output`` when given."""
  print(table)
  if OUTPUT.value:
    with open(OUTPUT.value, "w") as f:
      f.write(table)
