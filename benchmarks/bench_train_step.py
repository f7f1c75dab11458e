"""Speed of EUAR's jitted train / eval step at MOSI shapes: compile time and steady-state step time.

Each case builds the method from ``mmjax.experiment.get_config`` (EUAR with ``N`` experts,
``k = min(3, N)``, dense or sparse expert evaluation — sparse changes the eval step only, the loss
always evaluates all ``N`` experts; or the ``concat`` baseline for reference),
a data-parallel mesh over ``--devices`` CPU devices, and one batch of random standardised features
(text ``[B, 50, 768]``, audio ``[B, 50, 74]``, vision ``[B, 50, 47]``, MOSI's aligned shapes) with
regression labels. It then times the steps of :func:`mmjax.train.compile_steps`:

* "first call": the first call of the jitted step (trace + lower + compile + one run), with
  ``block_until_ready`` — what a training run pays once per shape;
* "ms/step": the median of ``--repeats`` calls after ``--warmup`` warm-up calls, each followed by
  ``block_until_ready``; the train step donates its state, so every call is fed the state the
  previous one returned. "ex/s" is ``B`` divided by that median.

The eval step (``method.predict``) is timed the same way on the trained state. The Markdown table is
printed (and written to ``--output``).

  python benchmarks/bench_train_step.py                          # full sweep (4-5 min on 2 cores)
  python benchmarks/bench_train_step.py --devices=1 --experts=8 --batch_sizes=16
  python benchmarks/bench_train_step.py --output=/tmp/train_step.md

Forced host devices (``--xla_force_host_platform_device_count``) must be set before JAX creates its
CPU backend, so the top-level process only parses flags and re-runs this script in one subprocess
per device count, with ``XLA_FLAGS`` set; the subprocesses print one JSON line per case. Forced
devices share the machine's cores: on a small CPU, ``devices=4`` measures the overhead of the
sharded program, not a parallel speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_timing as timing  # pylint: disable=g-import-not-at-top,wrong-import-position

_DEVICES = flags.DEFINE_list("devices", ["1", "4"], "Device counts (forced CPU devices), one run each.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64"], "Global batch sizes B.")
_EXPERTS = flags.DEFINE_list("experts", ["2", "4", "8", "16", "32"], "EUAR expert counts N.")
_MODES = flags.DEFINE_list("modes", ["dense", "sparse"], "Expert evaluation: dense and/or sparse.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also time the concat baseline at the same shapes.")
_WORKER = flags.DEFINE_integer(
    "worker", 0, "Internal: run every case on this many devices and print JSON lines.")

MAX_TOP_K = 3
RESULT_PREFIX = "RESULT "
MACHINE_PREFIX = "MACHINE "


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed configuration; ``num_experts`` is ``None`` for the concat baseline."""
  method: str
  batch_size: int
  num_experts: int | None = None
  sparse: bool = False

  @property
  def top_k(self) -> int | None:
    return None if self.num_experts is None else min(MAX_TOP_K, self.num_experts)


def make_cases(batch_sizes: Sequence[int], experts: Sequence[int], modes: Sequence[str],
               baseline: bool) -> list[Case]:
  """Per batch size: the baseline (if asked), then EUAR for every ``N`` and mode."""
  cases = []
  for b in batch_sizes:
    if baseline:
      cases.append(Case("concat", b))
    cases += [Case("euar", b, n, mode == "sparse") for n in experts for mode in modes]
  return cases


# ------------------------------------------------------------------ worker: runs inside one backend
def time_case(case: Case, num_devices: int, warmup: int, repeats: int) -> dict[str, Any]:
  """Builds ``case`` on the first ``num_devices`` devices and times its train and eval steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import experiment, train  # pylint: disable=g-import-not-at-top
  from mmjax.train.sharding import replicated  # pylint: disable=g-import-not-at-top
  config = experiment.get_config(case.method)
  config.batch_size = case.batch_size
  if case.num_experts is not None:
    config.model.num_experts = case.num_experts
    config.model.top_k = case.top_k
    config.model.sparse_experts = case.sparse
  dataset = timing.make_dataset(case.batch_size)
  method = experiment.build_method(config, dataset)
  optimizer = train.make_optimizer(config)
  mesh = train.data_mesh(jax.devices()[:num_devices])
  train_step, eval_step = train.compile_steps(method, optimizer, mesh)
  state = jax.device_put(train.init_state(method, dataset, config, optimizer), replicated(mesh))
  batch = jax.block_until_ready(train.put_batch(dataset.splits["train"], mesh))
  state, train_first, train_step_s = timing.time_calls(
      train_step, state, batch, advance=True, warmup=warmup, repeats=repeats)
  _, eval_first, eval_step_s = timing.time_calls(
      eval_step, state, batch, advance=False, warmup=warmup, repeats=repeats)
  return dict(dataclasses.asdict(case), top_k=case.top_k, devices=num_devices,
              train_first_s=train_first, train_step_s=train_step_s,
              eval_first_s=eval_first, eval_step_s=eval_step_s)


def run_worker(num_devices: int, cases: Sequence[Case], warmup: int, repeats: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() < num_devices:
    raise ValueError(f"--worker={num_devices}: the backend has only {jax.device_count()} devices "
                     f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
  print(MACHINE_PREFIX + json.dumps(timing.machine_info()), flush=True)
  for case in cases:
    result = time_case(case, num_devices, warmup, repeats)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    sys.stderr.write(
        f"# {num_devices} dev, {_label(result)}, B={case.batch_size}: train "
        f"{1e3 * result['train_step_s']:.2f} ms (first {result['train_first_s']:.2f} s), eval "
        f"{1e3 * result['eval_step_s']:.2f} ms\n")


# ------------------------------------------------------------------ driver: one worker per device count
def _xla_flags(num_devices: int) -> str:
  """The caller's ``XLA_FLAGS`` with the forced host device count replaced by ``num_devices``."""
  flags_ = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  return f"{flags_.strip()} --xla_force_host_platform_device_count={num_devices}".strip()


def run_device_count(num_devices: int, argv: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
  """Re-runs this script as ``--worker=num_devices`` on a fresh CPU backend; parses its lines."""
  env = dict(os.environ, XLA_FLAGS=_xla_flags(num_devices), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv[1:],
                         f"--worker={num_devices}"], env=env, stdout=subprocess.PIPE, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"worker for --devices={num_devices} exited with {proc.returncode}")
  lines = proc.stdout.splitlines()
  machine = next(json.loads(l[len(MACHINE_PREFIX):]) for l in lines if l.startswith(MACHINE_PREFIX))
  results = [json.loads(l[len(RESULT_PREFIX):]) for l in lines if l.startswith(RESULT_PREFIX)]
  return machine, results


def _label(r: dict[str, Any]) -> str:
  if r["num_experts"] is None:
    return r["method"]
  return f"{r['method']} N={r['num_experts']} k={r['top_k']} {'sparse' if r['sparse'] else 'dense'}"


def markdown_table(results: Sequence[dict[str, Any]], machine: dict[str, Any], *, warmup: int,
                   repeats: int, seconds: float, load: tuple[float, float]) -> str:
  lines = [
      "| devices | B | method | N | k | experts | train first call s | train ms/step | train ex/s "
      "| eval first call s | eval ms/step | eval ex/s |",
      "| ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in results:
    n, k = ("–", "–") if r["num_experts"] is None else (r["num_experts"], r["top_k"])
    experts = "–" if r["num_experts"] is None else ("sparse" if r["sparse"] else "dense")
    lines.append(
        f"| {r['devices']} | {r['batch_size']} | {r['method']} | {n} | {k} | {experts} "
        f"| {r['train_first_s']:.2f} | {1e3 * r['train_step_s']:.2f} "
        f"| {r['batch_size'] / r['train_step_s']:,.0f} "
        f"| {r['eval_first_s']:.2f} | {1e3 * r['eval_step_s']:.2f} "
        f"| {r['batch_size'] / r['eval_step_s']:,.0f} |")
  seq, dims = timing.SEQ_LEN, timing.FEATURE_DIMS
  lines += [
      "",
      f"Shapes: text [B, {seq}, {dims['text']}], audio [B, {seq}, {dims['audio']}], "
      f"vision [B, {seq}, {dims['vision']}], regression; "
      f"EUAR defaults otherwise (hidden 128, Adam). First call = trace + compile + one run; "
      f"ms/step = median of {repeats} calls after {warmup} warm-up calls. Machine: "
      f"{machine['nproc']} CPUs ({machine['cpu']}), jax {machine['jax']}, platform "
      f"{machine['platform']}; devices are forced host devices sharing those CPUs. Sweep took "
      f"{seconds:.0f} s; 1-min load average {load[0]:.2f} before it, {load[1]:.2f} after "
      "(other processes share the CPU).",
  ]
  return "\n".join(lines) + "\n"


def _ints(flag: flags.FlagHolder, minimum: int = 1) -> list[int]:
  try:
    values = [int(v) for v in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name}: expected comma-separated ints, got {flag.value}") from None
  if any(v < minimum for v in values):
    raise app.UsageError(f"--{flag.name}: every value must be >= {minimum}, got {values}")
  return values


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  timing.check_timing_flags()
  if set(_MODES.value) - {"dense", "sparse"}:
    raise app.UsageError(f"--modes: expected dense and/or sparse, got {_MODES.value}")
  devices = _ints(_DEVICES)
  batch_sizes = _ints(_BATCH_SIZES)
  for b in batch_sizes:
    for d in devices:
      if b % d:
        raise app.UsageError(f"--batch_sizes: {b} is not divisible by --devices value {d}")
  cases = make_cases(batch_sizes, _ints(_EXPERTS), _MODES.value, _BASELINE.value)
  if not cases:
    raise app.UsageError("no case selected (empty --experts/--modes and --nobaseline)")
  if _WORKER.value:
    run_worker(_WORKER.value, cases, timing.WARMUP.value, timing.REPEATS.value)
    return
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  results, machine = [], None
  for d in devices:
    machine, device_results = run_device_count(d, sys.argv)
    results += device_results
  table = markdown_table(results, machine, warmup=timing.WARMUP.value, repeats=timing.REPEATS.value,
                         seconds=time.perf_counter() - start,
                         load=(load_before, os.getloadavg()[0]))
  timing.write_table(table)


if __name__ == "__main__":
  app.run(main)
