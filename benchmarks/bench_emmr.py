"""Size and speed of EMMR's ensembles TF, TF+AE, TF+AE+MMIN (papers/002 Fig. 9, Table 8).

Each case builds EMMR from ``mmjax.experiment.get_config("emmr")`` with ``members`` set to the case
and ``hidden`` from ``--hidden`` (other model defaults unchanged: AE widths 256-128-64, 5 MMIN
blocks, dropout 0.3), one random MOSI-shaped batch (:func:`bench_train_step.make_dataset`: text
``[B, 50, 768]``, audio ``[B, 50, 74]``, vision ``[B, 50, 47]``; its scores binned into 3 classes)
and times, on one device, the steps :func:`mmjax.train.fit` runs in stage ``"main"`` (the loss
of eq. 14 with the pre-trained network frozen: its leaves masked out of the optimiser) and the
evaluation step (``method.predict``), like ``bench_train_step.py``: "first call" = trace + compile
+ one run, "ms/step" = median of ``--repeats`` calls after ``--warmup`` warm-up calls, each blocked
on; the train step is fed the state it returned. "params": EMMR's parameters (``params["emmr"]``,
trained in stage 2) and the frozen full-modality network's (``params["pretrained"]``). "GFLOP":
XLA's count for one compiled step (:func:`bench_train_step.step_cost`; stable on a noisy machine).

  python benchmarks/bench_emmr.py                          # B = 32, d = 64
  python benchmarks/bench_emmr.py --hidden=300 --repeats=3 --warmup=1 --output=/tmp/emmr_perf.md
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as shared  # pylint: disable=g-import-not-at-top,wrong-import-position

_CASES = flags.DEFINE_list("cases", ["tf", "tf+ae", "tf+ae+mmin"], "Ensembles to time.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Width d (the paper's is 300).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size B (the paper's is 32).",
                                   lower_bound=1)
# --repeats, --warmup and --output are bench_train_step's flags (defined on import); its other
# flags (--devices, --experts, ...) are ignored here.
# pylint: disable-next=protected-access
_REPEATS, _WARMUP = shared._REPEATS, shared._WARMUP


def make_dataset(batch_size: int):
  """:func:`bench_train_step.make_dataset` with its scores binned into 3 classes (sign)."""
  from mmjax import data  # pylint: disable=g-import-not-at-top
  regression = shared.make_dataset(batch_size)
  batch = regression.splits["train"]
  batch = batch.replace(label=(np.sign(batch.label) + 1).astype(np.int32))
  return data.Dataset("bench", "classification", 3, {s: batch for s in data.SPLITS})


def time_case(case: str, hidden: int, batch_size: int, warmup: int, repeats: int
              ) -> dict[str, Any]:
  """Builds EMMR with the members of ``case`` and times its stage-2 train step and eval step."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import experiment, train  # pylint: disable=g-import-not-at-top
  from mmjax.train.sharding import replicated  # pylint: disable=g-import-not-at-top
  from mmjax.train.steps import mask_optimizer  # pylint: disable=g-import-not-at-top
  config = experiment.get_config("emmr")
  config.batch_size = batch_size
  config.model.hidden = hidden
  config.model.members = case.replace("+", ",")
  dataset = make_dataset(batch_size)
  method = experiment.build_method(config, dataset)
  main = method.stages[-1]
  stage_method = dataclasses.replace(method, loss=main.loss, predict=main.predict, stages=())
  state = train.init_state(method, dataset, config, train.make_optimizer(config))
  trainable = main.trainable(state.params)
  optimizer = mask_optimizer(train.make_optimizer(config), trainable)
  state = state.replace(opt_state=optimizer.init(state.params))
  mesh = train.data_mesh(jax.devices()[:1])
  train_step, eval_step = train.compile_steps(stage_method, optimizer, mesh, trainable)
  state = jax.device_put(state, replicated(mesh))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  batch = jax.block_until_ready(train.put_batch(dataset.splits["train"], mesh))
  state, train_first, train_s = shared.time_calls(
      train_step, state, batch, advance=True, warmup=warmup, repeats=repeats)
  _, eval_first, eval_s = shared.time_calls(
      eval_step, state, batch, advance=False, warmup=warmup, repeats=repeats)
  train_gflop, _ = shared.step_cost(train_step, state, batch)
  eval_gflop, _ = shared.step_cost(eval_step, state, batch)
  return dict(case=case.upper(), hidden=hidden, params=count(state.params["emmr"]),
              train_gflop=train_gflop, eval_gflop=eval_gflop,
              pretrained_params=count(state.params["pretrained"]), train_first_s=train_first,
              train_step_s=train_s, eval_first_s=eval_first, eval_step_s=eval_s)


def markdown_table(results: Sequence[dict[str, Any]], machine: dict[str, Any], batch_size: int,
                   warmup: int, repeats: int, load: tuple[float, float]) -> str:
  lines = ["| ensemble | d | params (EMMR) | params (pre-trained, frozen) | train GFLOP "
           "| train first call s | train ms/step | eval GFLOP | eval first call s | eval ms/step |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    lines.append(f"| {r['case']} | {r['hidden']} | {r['params']:,} | {r['pretrained_params']:,} "
                 f"| {r['train_gflop']:.2f} | {r['train_first_s']:.2f} "
                 f"| {1e3 * r['train_step_s']:.1f} | {r['eval_gflop']:.2f} "
                 f"| {r['eval_first_s']:.2f} | {1e3 * r['eval_step_s']:.1f} |")
  lines += ["", shared.step_table_footer(batch_size, "3 classes; stage-2 train step", warmup,
                                         repeats, machine, load)]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shared.check_timing_flags()
  known = {"tf", "tf+ae", "tf+mmin", "tf+ae+mmin"}
  if set(_CASES.value) - known:
    raise app.UsageError(f"--cases: expected some of {sorted(known)}, got {_CASES.value}")
  load_before = os.getloadavg()[0]
  results = []
  for case in _CASES.value:
    result = time_case(case, _HIDDEN.value, _BATCH_SIZE.value, _WARMUP.value, _REPEATS.value)
    sys.stderr.write(f"# {result}\n")
    results.append(result)
  table = markdown_table(results, shared.machine_info(), _BATCH_SIZE.value, _WARMUP.value,
                         _REPEATS.value, (load_before, os.getloadavg()[0]))
  shared.write_table(table)


if __name__ == "__main__":
  app.run(main)
