"""The training engine: bare step vs the streaming epoch loop vs the scanned epoch, compile time with
and without the persistent cache, and S seeds vmapped vs S separate runs.

Per ``--methods`` entry (``<method>[:<model field>=<value>,...]``), on one device, at paper
shapes: the method's paper preset (``experiments/configs/paper.py``: its batch size and model;
``--batch_size`` and the entry's fields override), MOSI's feature shapes
(:func:`step_timing.make_dataset`, classification data for a classification preset), a training
split of ``--steps`` batches; a method with stages trains its last stage, after its ``prepare``,
with its trainable mask; every step applies the preset's train-time corruption, as ``fit`` does.
In one process:

* "bare step": the jitted train step of :func:`mmjax.train.compile_steps` called on one batch
  already on the device (median of ``--repeats`` after ``--warmup``);
* "stream loop": one epoch of what ``fit`` runs with ``epoch_mode="stream"`` (host slicing of every
  batch, ``put_batch``, the step, the metrics fetched after every step), per step;
* "scanned epoch": one epoch of ``epoch_mode="scan"`` (the split on the device, the epoch one
  compiled ``lax.scan``, metrics fetched once), per step; both epochs: the median of
  ``--repeats`` epochs after one warm-up epoch;
* compile: the scanned epoch's trace + lower, then its XLA compile with the persistent compilation
  cache (a fresh folder) cold (compiled and stored) and warm (after ``jax.clear_caches()``: loaded;
  the trace + lower are redone either way, as in a new process);
* work: XLA's FLOP count of the step and its matmul FLOPs (:func:`mmjax.flops.matmul_flops`, scan
  bodies times their trip count), matmul GFLOP/s of the bare step and the scanned epoch beside the
  machine's float32 matmul peak, minor page faults per step, the malloc in use (run under
  ``LD_PRELOAD=libtcmalloc_minimal.so.4`` to compare, docs/performance.md) and ``--prng_impl``.

This is also the accelerator script: on a GPU / TPU the same command times every method at these
shapes (``--methods=all``; ``--steps`` defaults to 32 there, 8 on CPU).

``--seeds=S`` (0: skip) also times, on the launchers' default synthetic data and config for each
method, ``S`` separate ``fit`` runs (seeds 0 .. S-1, one after the other, as the robustness
launcher runs them; streamed epochs, as before the engine, and scanned) against one ``fit_seeds``
call (vmapped, and ``exact``), wall time with compilation, and compares their test MAE: the
seeds' spread, and the largest difference per seed between the ways of running (float rounding,
amplified by training).

  python benchmarks/bench_engine.py                                  # EUAR: steps, compile, 8 seeds
  python benchmarks/bench_engine.py --methods=all --seeds=0          # every method (a GPU run)
  python benchmarks/bench_engine.py --methods=euar --steps=32 --output=/tmp/engine.md
  python benchmarks/bench_engine.py --methods=ease:hidden=32 --seeds=0 --precisions=float32 \
      --profile                                # + where the bare step's time goes, thunk by thunk
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
import step_timing as shared  # pylint: disable=g-import-not-at-top,wrong-import-position
import thunk_profile  # pylint: disable=g-import-not-at-top,wrong-import-position

ALL_METHODS = ("euar", "concat", "late_fusion", "ease", "samlml", "emmr")
_METHODS = flags.DEFINE_list(
    "methods", ["euar"], f"Methods to time, or 'all' = {ALL_METHODS}; each "
    "<method>[:<field>=<value>,...] overrides model fields of its preset, e.g. ease:hidden=32.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Batch size B; 0 = the paper preset's.",
                                   lower_bound=0)
_STEPS = flags.DEFINE_integer(
    "steps", 0, "Steps per timed epoch (the split has steps x B rows); 0 = 32 on an accelerator, "
    "8 on CPU.", lower_bound=0)
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds of the vmapped-vs-separate comparison; 0 skips.",
                              lower_bound=0)
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "bfloat16"],
    "config.compute_dtype values to time each method in (mmjax.methods.mixed_precision).")
_PRNG_IMPL = flags.DEFINE_enum(
    "prng_impl", "threefry2x32", ["threefry2x32", "rbg", "unsafe_rbg"],
    "JAX's default PRNG (jax_default_prng_impl, as JAX_DEFAULT_PRNG_IMPL sets it for a run).")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Also trace --repeats bare steps per method with XLA's per-thunk traceme and "
    "print where the time goes (thunk_profile.py: matmul thunks by size and their GFLOP/s, the "
    "busiest thunks and their source ops). The trace adds ~1 us per thunk to every timing.")
_REPEATS, _WARMUP = shared.REPEATS, shared.WARMUP


def _last_stage(method):
  """``(method as its last stage trains it, that stage)``; ``(method, None)`` without stages."""
  if not method.stages:
    return method, None
  return method.at_stage(method.stages[-1]), method.stages[-1]


def paper_config(name: str):
  """The paper preset of ``name`` (``experiments/configs/paper.py``)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments.configs import paper  # pylint: disable=g-import-not-at-top
  return paper.get_config(name)


def variant_config(variant: str):
  """The paper preset of ``variant``'s method with its model fields overridden
  (:func:`mmjax.experiment.variant_config`: ``ease:hidden=32``)."""
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  try:
    return experiment.variant_config(paper_config(variant.partition(":")[0]), variant)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def time_engine(variant: str, precision: str, batch_size: int, steps: int, warmup: int,
                repeats: int, profile: bool = False) -> dict[str, Any]:
  """Bare step, stream loop, scanned epoch and compile times of ``variant`` (:func:`variant_config`;
  ``batch_size`` 0: the preset's), the step's matmul FLOPs and page faults; with ``profile`` also
  the bare step's per-thunk attribution (:func:`profile_step`, Markdown)."""
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import data, experiment, flops, train  # pylint: disable=g-import-not-at-top
  from mmjax.train import device_data, loop  # pylint: disable=g-import-not-at-top
  config = variant_config(variant)
  config.compute_dtype = precision
  batch_size = batch_size or config.batch_size
  config.batch_size = batch_size
  task = "regression" if config.task == "auto" else config.task
  dataset = shared.make_dataset(batch_size * steps, task=task)
  split = dataset.splits["train"]
  method, stage = _last_stage(experiment.build_method(config, dataset))
  params, method_state = method.init(jax.random.key(0), split.take(range(2)))
  optimizer, trainable = train.make_optimizer(config), None
  if stage is not None:
    if stage.prepare is not None:
      method_state = stage.prepare(params, method_state, split)
    if stage.trainable is not None:
      trainable = stage.trainable(params)
      optimizer = train.mask_optimizer(optimizer, trainable)
  params, method_state = jax.device_get((params, method_state))  # each fresh() state: a new copy
  mesh = train.data_mesh(jax.devices()[:1])
  corruption = train.train_corruption(method, dataset, config)  # inside the step, as fit runs it
  train_step, _ = train.compile_steps(method, optimizer, mesh, trainable, corruption=corruption)
  epoch_fn = train.compile_epoch(method, optimizer, mesh, trainable, corruption=corruption)
  fresh = lambda: jax.device_put(loop._new_state(params, method_state, optimizer,  # pylint: disable=protected-access
                                                 jax.random.key(1)), train.sharding.replicated(mesh))
  batch = jax.block_until_ready(train.put_batch(split.take(range(batch_size)), mesh))
  state, _, bare_s = shared.time_calls(train_step, fresh(), batch, advance=True, warmup=warmup,
                                       repeats=repeats)
  gflop, _ = shared.step_cost(train_step, state, batch)
  matmul = flops.matmul_flops(train_step, state, batch)
  state, bare_faults = shared.page_faults_per_call(train_step, state, batch, advance=True,
                                                   calls=repeats)
  attribution = None
  if profile:
    state, attribution = profile_step(train_step, state, batch, repeats)
    attribution = thunk_profile.markdown(f"{variant}, {precision}, B {batch_size}",
                                         1e3 * bare_s, attribution)
  placed = device_data.place_split(split, mesh)
  # Before the epoch's first call, which would compile (and store) it: here the cold compile is one.
  lower, cold, warm = _compile_times(epoch_fn, fresh(), placed, device_data.epoch_rows(
      split.batch_size, batch_size, jax.random.key(0)))
  stop, bar = loop._StopRequest(), loop._ProgressBar(steps, "", enabled=False)  # pylint: disable=protected-access

  def stream(state, epoch):
    batches = data.iterate_batches(split, batch_size, key=jax.random.key(epoch))
    return loop._train_epoch(train_step, state, batches, mesh, bar, stop)[0]  # pylint: disable=protected-access

  def scanned(state, epoch):
    rows = device_data.epoch_rows(split.batch_size, batch_size, jax.random.key(epoch))
    return loop._train_epoch_scanned(epoch_fn, state, placed, rows, 0, mesh, bar, stop)[0]  # pylint: disable=protected-access

  per_step, faults = {}, {}
  for label, epoch in (("stream", stream), ("scan", scanned)):
    seconds = []
    for e in range(1 + repeats):
      if e == 1:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      state = jax.block_until_ready(epoch(state, e))
      seconds.append(time.perf_counter() - start)
    faults[label] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / (
        repeats * steps)
    per_step[label] = statistics.median(seconds[1:]) / steps
  return dict(method=variant, precision=precision, batch_size=batch_size, steps=steps, gflop=gflop,
              matmul_gflop=matmul.flops / 1e9, matmul_cond_gflop=matmul.conditional / 1e9,
              bare_s=bare_s, bare_faults=bare_faults,
              stream_s=per_step["stream"], scan_s=per_step["scan"], scan_faults=faults["scan"],
              lower_s=lower, compile_cold_s=cold, compile_warm_s=warm, profile=attribution)


def profile_step(train_step, state, batch, calls: int):
  """``(state, thunk_profile.attribute(...))`` of ``calls`` bare train steps (traced)."""
  flops, sources = thunk_profile.dot_flops(train_step.lower(state, batch).compile().as_text())
  holder = [state]

  def call():
    holder[0] = train_step(holder[0], batch)[0]
    return holder[0]

  busy, runs = thunk_profile.profile_calls(call, calls)
  return holder[0], thunk_profile.attribute(busy, runs, flops, sources)


def _compile_times(fn, *args) -> tuple[float, float, float]:
  """Seconds to trace + lower ``fn(*args)``, then to compile it with a cold persistent cache (a
  program it has not seen: compiled and stored), then warm (in-memory caches cleared: loaded)."""
  import jax  # pylint: disable=g-import-not-at-top
  seconds = []
  for _ in range(2):
    jax.clear_caches()
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    seconds.append((lowered_at - start, time.perf_counter() - lowered_at))
  return seconds[0][0], seconds[0][1], seconds[1][1]


def time_seeds(name: str, num_seeds: int) -> dict[str, Any]:
  """``num_seeds`` separate fits (streamed epochs, as before the engine; scanned) vs one
  ``fit_seeds``, on the default synthetic data and config; their test MAE."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax import experiment, train  # pylint: disable=g-import-not-at-top
  config = experiment.variant_config(experiment.get_config(name.partition(":")[0]), name)
  config.progress = False
  dataset, method = experiment.prepare(config)
  quiet = lambda *args: None
  test_mae = lambda result: train.evaluate(method, result.state, dataset.splits["test"],
                                           dataset.scoring)["mae"]
  seconds, results = {}, {}
  for mode in ("stream", "scan"):
    config.epoch_mode = mode
    jax.clear_caches()
    start = time.perf_counter()
    results[mode] = []
    for seed in range(num_seeds):
      config.seed = seed
      results[mode].append(train.fit(method, dataset, config, log=quiet))
    seconds[mode] = time.perf_counter() - start
  for mode, exact in (("vmap", False), ("map", True)):
    jax.clear_caches()
    start = time.perf_counter()
    results[mode] = train.fit_seeds(method, dataset, config, range(num_seeds), exact=exact,
                                    log=quiet)
    seconds[mode] = time.perf_counter() - start
  maes = {mode: np.asarray([test_mae(r) for r in rs]) for mode, rs in results.items()}
  return dict(method=name, seeds=num_seeds, separate_stream_s=seconds["stream"],
              separate_s=seconds["scan"], vmapped_s=seconds["vmap"], mapped_s=seconds["map"],
              mapped_equal=maes["map"].tolist() == maes["scan"].tolist(),
              epochs=[len(r.history) for r in results["scan"]],
              vmapped_epochs=[len(r.history) for r in results["vmap"]],
              mae_std=float(maes["scan"].std()),
              mae_diff=float(np.abs(maes["vmap"] - maes["scan"]).max()),
              mae_diff_stream=float(np.abs(maes["stream"] - maes["scan"]).max()))


def markdown_table(engine: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]],
                   machine: dict[str, Any], warmup: int, repeats: int,
                   load: tuple[float, float]) -> str:
  lines = ["| method | precision | B | steps/epoch | matmul GFLOP/step | XLA GFLOP/step "
           "| bare step ms "
           "| bare matmul GFLOP/s | bare page faults/step | stream loop ms/step "
           "| scanned epoch ms/step | scanned matmul GFLOP/s | scanned page faults/step "
           "| scan / bare | trace + lower s | XLA compile s (cold cache) | from the warm cache s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
           "| ---: | ---: | ---: | ---: | ---: |"]
  def matmul(r, key=None):  # GFLOP (or GFLOP/s): certain – with every lax.cond branch run
    low, high = r["matmul_gflop"] - r["matmul_cond_gflop"], r["matmul_gflop"]
    scale, fmt = (1.0, ".3f") if key is None else (1.0 / r[key], ".1f")
    return (f"{scale * high:{fmt}}" if low == high else
            f"{scale * low:{fmt}} – {scale * high:{fmt}}")

  for r in engine:
    lines.append(f"| {r['method']} | {r['precision']} | {r['batch_size']} | {r['steps']} "
                 f"| {matmul(r)} "
                 f"| {r['gflop']:.3f} | {1e3 * r['bare_s']:.2f} "
                 f"| {matmul(r, 'bare_s')} | {r['bare_faults']:,.0f} "
                 f"| {1e3 * r['stream_s']:.2f} | {1e3 * r['scan_s']:.2f} "
                 f"| {matmul(r, 'scan_s')} | {r['scan_faults']:,.0f} "
                 f"| {r['scan_s'] / r['bare_s']:.2f} "
                 f"| {r['lower_s']:.2f} | {r['compile_cold_s']:.2f} | {r['compile_warm_s']:.2f} |")
  if engine:
    lines += ["", shared.step_table_footer("the paper preset's", "paper presets", warmup, repeats,
                                           machine, load)
              + " Each step applies the preset's train-time corruption, as fit does. Epochs: "
              "median of the repeats after one warm-up epoch. Matmul GFLOP: "
              "mmjax.flops.matmul_flops of the train step (scan bodies times their trip count; a "
              "range where lax.cond branches hold matmuls: without – with them all run); GFLOP/s "
              "= that / ms per step. Page faults: minor faults of the process per step "
              f"(getrusage; bare: {repeats} more calls; scanned: over the timed epochs). "
              f"malloc: {machine['allocator']}; PRNG: {machine['prng']}; float32 matmul peak (jitted 2048 x 2048 matmul): "
              f"{machine['peak']:.0f} GFLOP/s."]
  if seeds:
    lines += ["", "| method | seeds | epochs per seed (separate / vmapped) | separate, streamed s "
              "| separate, scanned s | fit_seeds s | vmapped / streamed | vmapped / scanned "
              "| fit_seeds exact s (test MAE equal) | test MAE: seed std "
              "| max abs diff vmapped vs scanned | streamed vs scanned |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in seeds:
      lines.append(f"| {r['method']} | {r['seeds']} | {r['epochs']} / {r['vmapped_epochs']} "
                   f"| {r['separate_stream_s']:.1f} | {r['separate_s']:.1f} | {r['vmapped_s']:.1f} "
                   f"| {r['vmapped_s'] / r['separate_stream_s']:.2f} "
                   f"| {r['vmapped_s'] / r['separate_s']:.2f} "
                   f"| {r['mapped_s']:.1f} ({r['mapped_equal']}) | {r['mae_std']:.4f} "
                   f"| {r['mae_diff']:.4f} | {r['mae_diff_stream']:.4f} |")
    lines += ["", "Default synthetic data and launcher config (30 epochs, patience 10), wall "
              "time with compilation (in-memory caches cleared before each side; the separate "
              "runs of one side share one process, as the robustness launcher's do)."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shared.check_timing_flags()
  if _PROFILE.value:
    thunk_profile.enable_traceme()  # before JAX starts its CPU client
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_prng_impl", _PRNG_IMPL.value)
  names = (list(ALL_METHODS) if _METHODS.value == ["all"]
           else experiment.split_variants(_METHODS.value))
  steps = _STEPS.value or (8 if jax.devices()[0].platform == "cpu" else 32)
  load_before = os.getloadavg()[0]
  seeds = []  # first: before the persistent cache is turned on
  for name in names if _SEEDS.value else ():
    seeds.append(time_seeds(name, _SEEDS.value))
    sys.stderr.write(f"# {seeds[-1]}\n")
  engine = []
  with tempfile.TemporaryDirectory() as cache:
    experiment.enable_compilation_cache(cache)
    for name in names:
      for precision in _PRECISIONS.value:
        engine.append(time_engine(name, precision, _BATCH_SIZE.value, steps, _WARMUP.value,
                                  _REPEATS.value, _PROFILE.value))
        sys.stderr.write(f"# {engine[-1]}\n")
    cache_line = experiment.compilation_cache_line()  # the warm compiles must be loads
  info = dict(shared.machine_info(), allocator=machine.allocator(), prng=_PRNG_IMPL.value,
              peak=shared.matmul_peak_gflops())
  shared.write_table(markdown_table(engine, seeds, info, _WARMUP.value,
                                    _REPEATS.value, (load_before, os.getloadavg()[0]))
                     + f"\nPersistent cache during the step timing (XLA's counters): "
                     f"{cache_line.split(': ', 1)[1]}; the warm compiles are the loads.\n"
                     + "".join(f"\n{r['profile']}" for r in engine if r["profile"]))


if __name__ == "__main__":
  app.run(main)
