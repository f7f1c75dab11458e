"""Speed and size of any method's jitted train / eval step at MOSI shapes (one CPU device).

Each ``--case=<method>[:<field>=<value>,...]`` builds the method from
``mmjax.experiment.get_config`` with those model fields overridden (values parsed as Python
literals), one random MOSI-shaped regression batch (:func:`step_timing.make_dataset`: text
``[B, 50, 768]``, audio ``[B, 50, 74]``, vision ``[B, 50, 47]``) and times the steps of
:func:`mmjax.train.compile_steps` like ``bench_train_step.py`` does: "first call" = trace +
compile + one run, "ms/step" = median of ``--repeats`` calls after ``--warmup`` warm-up calls, each
blocked on; the train step is fed the state it returned. "params" counts the trainable parameters
(not the optimizer state, not method state such as EASE's anchors). "GFLOP" is XLA's count for one
compiled step (``jit(step).lower(...).compile().cost_analysis()["flops"]``; stable on a noisy
machine; both branches of a ``lax.cond`` are counted, although only one runs); "GFLOP/s" divides it
by the step time, beside the machine's matmul peak (:func:`step_timing.matmul_peak_gflops`) in the
footer; "page faults/step" are the process's minor faults per train-step call (``getrusage``). ``--corrupt``
applies the method's own train-time corruption (``config.train_corruption = "method"``) inside the
train step, as training does; without it the batch is uncorrupted.

  python benchmarks/bench_methods.py --case=ease:hidden=32 --case=ease:hidden=128 --case=concat \
      --case=euar                                                    # EASE, B = 64
  python benchmarks/bench_methods.py --case=ease --corrupt          # EASE as it trains (LNLN)
  python benchmarks/bench_methods.py --batch_size=48 --case=samlml \
      --case=samlml:supervise_intra=False,supervise_inter=False     # SAM-LML with / without supervision
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_timing as shared  # pylint: disable=g-import-not-at-top,wrong-import-position

_CASES = flags.DEFINE_multi_string(
    "case", ["ease:hidden=32", "ease:hidden=128", "concat", "euar"],
    "<method>[:<model field>=<value>,...]; repeat the flag for several cases.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size B.", lower_bound=1)
_CORRUPT = flags.DEFINE_bool(
    "corrupt", False, "Apply the method's own train-time corruption inside the train step.")
# --repeats, --warmup and --output are step_timing's flags (defined on import).
_REPEATS, _WARMUP = shared.REPEATS, shared.WARMUP


def parse_case(case: str) -> tuple[str, dict[str, Any]]:
  """``"samlml:hidden=64,use_mix=False"`` -> ``("samlml", {"hidden": 64, "use_mix": False})``
  (:func:`mmjax.experiment.parse_variant`, the launchers' ``--methods`` syntax)."""
  from mmjax.experiment import parse_variant  # pylint: disable=g-import-not-at-top
  try:
    return parse_variant(case, "--case")
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def time_method(case: str, batch_size: int, warmup: int, repeats: int,
                corrupt: bool = False) -> dict[str, Any]:
  """Builds the method of ``case`` (see :func:`parse_case`) and times its train and eval steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import experiment, train  # pylint: disable=g-import-not-at-top
  from mmjax.train.sharding import replicated  # pylint: disable=g-import-not-at-top
  method_name, overrides = parse_case(case)
  config = experiment.get_config(method_name)
  config.batch_size = batch_size
  config.model.update(overrides)
  dataset = shared.make_dataset(batch_size)
  method = experiment.build_method(config, dataset)
  optimizer = train.make_optimizer(config)
  mesh = train.data_mesh(jax.devices()[:1])
  corruption = train.train_corruption(method, dataset, config) if corrupt else None
  train_step, eval_step = train.compile_steps(method, optimizer, mesh, corruption=corruption)
  state = jax.device_put(train.init_state(method, dataset, config, optimizer), replicated(mesh))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = jax.block_until_ready(train.put_batch(dataset.splits["train"], mesh))
  state, train_first, train_s = shared.time_calls(
      train_step, state, batch, advance=True, warmup=warmup, repeats=repeats)
  _, eval_first, eval_s = shared.time_calls(
      eval_step, state, batch, advance=False, warmup=warmup, repeats=repeats)
  state, train_faults = shared.page_faults_per_call(train_step, state, batch, advance=True,
                                                    calls=repeats)
  # After the timing, so that "first call" still includes the compilation.
  train_gflop, train_gb = shared.step_cost(train_step, state, batch)
  eval_gflop, _ = shared.step_cost(eval_step, state, batch)
  return dict(case=case + (" (corrupted)" if corrupt else ""), hidden=config.model.get("hidden"),
              params=params, train_gflop=train_gflop, train_gb=train_gb, eval_gflop=eval_gflop,
              train_first_s=train_first, train_step_s=train_s, train_faults=train_faults,
              eval_first_s=eval_first, eval_step_s=eval_s)


def markdown_table(results: Sequence[dict[str, Any]], machine: dict[str, Any], batch_size: int,
                   warmup: int, repeats: int, load: tuple[float, float], peak: float) -> str:
  lines = ["| case | hidden | params | train GFLOP | train GB | train first call s "
           "| train ms/step | train GFLOP/s | train page faults/step | eval GFLOP "
           "| eval first call s | eval ms/step |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    lines.append(f"| {r['case']} | {r['hidden']} | {r['params']:,} | {r['train_gflop']:.3f} "
                 f"| {r['train_gb']:.3f} | {r['train_first_s']:.2f} "
                 f"| {1e3 * r['train_step_s']:.1f} | {r['train_gflop'] / r['train_step_s']:.1f} "
                 f"| {r['train_faults']:,.0f} | {r['eval_gflop']:.3f} "
                 f"| {r['eval_first_s']:.2f} | {1e3 * r['eval_step_s']:.1f} |")
  lines += ["", shared.step_table_footer(batch_size, "regression", warmup, repeats, machine,
                                         load)
            + f" GFLOP/s = XLA's GFLOP count of the step / ms per step (all FLOPs, not matmuls "
            f"only); page faults: minor faults of the process per call over {repeats} more calls "
            f"(getrusage). The machine's float32 matmul peak, a jitted 2048 x 2048 matmul: "
            f"{peak:.0f} GFLOP/s."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shared.check_timing_flags()
  load_before = os.getloadavg()[0]
  results = []
  for case in _CASES.value:
    result = time_method(case, _BATCH_SIZE.value, _WARMUP.value, _REPEATS.value, _CORRUPT.value)
    sys.stderr.write(f"# {result}\n")
    results.append(result)
  table = markdown_table(results, shared.machine_info(), _BATCH_SIZE.value, _WARMUP.value,
                         _REPEATS.value, (load_before, os.getloadavg()[0]),
                         shared.matmul_peak_gflops())
  shared.write_table(table)


if __name__ == "__main__":
  app.run(main)
