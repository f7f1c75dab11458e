"""Several seeds of one run trained together: one compiled epoch program for all of them.

``fit_seeds(method, dataset, config, seeds)`` returns what ``fit`` returns for each seed
(``config.seed = s``): the same initialisation, step keys, epoch orders, corruption and validation
as :func:`mmjax.train.fit`, but the ``S`` training states are stacked on a leading axis and every
epoch is one call of the scanned epoch over all of them (:func:`mmjax.train.compile_epoch` with
``seeds``) on the training split held once on the devices, compiled once for all seeds:
``jax.vmap``-ed (small per-seed matmuls become batched ones; each seed equals its own run up to
float rounding, which chaotic training amplifies: after ~10 epochs the trajectories part) or, with
``exact=True``, ``lax.map``-ped (the seeds one after another inside the program: each seed's ops
are its own run's, bit-identical).

Early stopping is per seed: a seed whose patience ran out is no longer validated, logged or
saved (its history and selected state are final). Stopped seeds leave the stack once they are half
of it (the epoch compiles once more for each smaller stack: at most log2 S recompiles, and under
half the steps are spent on stopped seeds). Validation slices
each seed's state out of the stack and uses the one compiled eval step of :func:`fit`.

With ``workdirs`` (one per seed) each seed's folder gets what ``fit`` writes there (its
``metrics.jsonl`` lines and a checkpoint per epoch, the same layout), so a later ``fit(...,
resume=True)`` on one seed's folder reloads or continues that seed alone; ``fit_seeds`` itself
starts fresh only (it refuses folders holding checkpoints) and acts on no signal: a killed group
keeps the checkpoints of its last finished epoch, seed by seed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.data import Dataset, check_batch_size
from mmjax.methods import Method
from mmjax.train import device_data, loop
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.sharding import data_mesh, is_main_process, put_replicated, replicated
from mmjax.train.steps import compile_epoch


def fit_seeds(method: Method, dataset: Dataset, config: ml_collections.ConfigDict,
              seeds: Sequence[int], *, workdirs: Sequence[str | os.PathLike] | None = None,
              exact: bool = False, mesh: Mesh | None = None,
              log: Callable[[int, str], None] = lambda seed, line: print(f"[seed {seed}] {line}")
              ) -> list[loop.FitResult]:
  """:func:`mmjax.train.fit` for each of ``seeds``, trained as one vmapped program.

  Args:
    method, dataset, config: as for ``fit`` (``config.seed`` is replaced by each seed;
      ``config.epoch_mode`` and ``scan_chunk`` are not used: epochs are always scanned whole on
      the device-held training split).
    seeds: distinct ints.
    workdirs: ``None``, or one fresh folder per seed (see the module docstring).
    exact: ``False``: the epoch ``jax.vmap``-ed over the seeds (batched matmuls: each seed equals
      its own run up to float rounding, which training amplifies); ``True``: ``lax.map`` over the
      seeds inside the one compiled program (each seed's ops are those of its own run:
      bit-identical to separate runs, without the batching).
    mesh: the ``'data'`` mesh (default every device).
    log: ``log(seed, line)`` for each seed's lines.

  Returns:
    One :class:`~mmjax.train.FitResult` per seed, in the order of ``seeds``.
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds: expected distinct ints, got {seeds}")
  if workdirs is not None and len(workdirs) != len(seeds):
    raise ValueError(f"workdirs: expected one per seed ({len(seeds)}), got {len(workdirs)}")
  mesh = data_mesh() if mesh is None else mesh
  if not is_main_process():
    log = lambda seed, line: None
  check_batch_size(config.batch_size, mesh.size)
  loop.check_compute_dtype(method, config)
  metric, mode = loop._selection(config, dataset.scoring)
  stages = loop._check_stages(method)
  corruption = loop.train_corruption(method, dataset, config)
  device_train = device_data.place_split(dataset.splits["train"], mesh)
  runs = []
  for i, seed in enumerate(seeds):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = seed
    workdir = None if workdirs is None else os.fspath(workdirs[i])
    if workdir is not None:
      loop.check_workdir(method, workdir, False)
    runs.append(loop._Run(
        loop._with_validation_split(dataset, seed_config, corruption), seed_config, mesh, metric,
        mode, False, lambda line, seed=seed: log(seed, line),
        None if workdir is None else os.path.join(workdir, "metrics.jsonl"), corruption,
        loop._StopRequest(), device_train))
    if corruption is not None:
      log(seed, loop.describe_corruption(corruption))
  checkpointers = [[] if workdirs is None else
                   [Checkpointer(os.path.join(workdirs[i], stage.name),
                                 async_save=config.get("async_checkpoint", False))
                    for stage in stages]
                   for i in range(len(seeds))]
  try:
    starts = [loop._init_params(method, dataset, run.config) for run in runs]
    histories: list[list[dict[str, Any]]] = [[] for _ in seeds]
    for index in range(len(stages)):
      results = _fit_stage_seeds(runs, method, stages, index, starts,
                                 [c[index] if c else None for c in checkpointers], exact)
      histories = [h + r.history for h, r in zip(histories, results)]
      starts = [(r.state.params, r.state.method_state) for r in results]
  finally:
    for per_seed in checkpointers:
      for checkpointer in per_seed:
        checkpointer.close()
  return [dataclasses.replace(r, history=h) for r, h in zip(results, histories)]


def _fit_stage_seeds(runs: list[loop._Run], method: Method, stages: tuple[Any, ...], index: int,
                     starts: list[tuple[Any, Any]], checkpointers: list[Checkpointer | None],
                     exact: bool) -> list[loop.FitResult]:
  """Stage ``index`` of every seed: the vmapped epoch, then per-seed validation and bookkeeping."""
  config, mesh = runs[0].config, runs[0].mesh
  setups = [loop._StageSetup.create(run, method, stages, index, params)
            for run, (params, _) in zip(runs, starts)]
  first = setups[0]
  epoch_fn = compile_epoch(first.method, first.optimizer, mesh, first.trainable,
                           runs[0].corruption, seeds="map" if exact else "vmap")
  eval_step = loop._compiled_eval_step(first.method, mesh)
  train = runs[0].dataset.splits["train"]
  states = [setup.start_state(params, method_state, train)
            for setup, (params, method_state) in zip(setups, starts)]
  best_states = [jax.device_get(s) for s in states]
  stacked = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *best_states), replicated(mesh))
  progress = [loop._Bookkeeping() for _ in runs]
  for run in runs:
    if run.jsonl is not None and index == 0:
      loop._write_jsonl(run.jsonl, [])
  data_keys = [jax.random.fold_in(setup.root, 2) for setup in setups]
  stacked_seeds = list(range(len(runs)))  # which seed each row of the stack is
  for epoch in range(1, first.num_epochs + 1):
    active = [i for i in stacked_seeds
              if not (config.patience and progress[i].bad_epochs >= config.patience)]
    if not active:
      break
    if len(active) <= len(stacked_seeds) // 2:  # halve the stack: at most log2(S) recompiles
      keep = np.asarray([stacked_seeds.index(i) for i in active])
      stacked, stacked_seeds = jax.tree.map(lambda x: x[keep], stacked), active
    start = time.perf_counter()
    rows = np.stack([device_data.epoch_rows(train.batch_size, config.batch_size,
                                            jax.random.fold_in(data_keys[i], epoch),
                                            config.drop_remainder) for i in stacked_seeds])
    step = int(stacked.step[0])
    stacked, metrics, weights = epoch_fn(stacked, runs[0].device_train, put_replicated(rows, mesh))
    metrics, weights = jax.device_get((metrics, weights))
    seconds = time.perf_counter() - start
    for row, i in enumerate(stacked_seeds):
      if i not in active:  # stopped, still in the stack until it halves
        continue
      run = runs[i]
      terms = loop._EpochTerms(None, loop._ProgressBar(0, "", enabled=False))
      try:
        terms.add_steps({name: v[row] for name, v in metrics.items()}, weights[row], step)
      except loop._NonFinite as bad:
        raise loop._diverged(f"seed {run.config.seed}: {setups[i].tag}", epoch, bad,
                             checkpointers[i], progress[i]) from None
      state = jax.tree.map(lambda x, row=row: x[row], stacked)
      best = loop._close_epoch(run, setups[i], progress[i], epoch, state, terms.means(), seconds,
                               eval_step, checkpointers[i])
      if best is not None:
        best_states[i] = best
  return [loop._stage_result(best, p) for best, p in zip(best_states, progress)]
