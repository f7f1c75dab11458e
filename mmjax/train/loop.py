"""The method-agnostic epoch loop: train, validate, early-stop, checkpoint, resume; stage by stage.

``fit(method, dataset, config)`` trains ``method`` on ``dataset.splits["train"]``, evaluates on
``"valid"`` after every epoch, keeps the best-validation state (early stopping with ``patience``)
and returns it. With ``workdir`` it writes ``metrics.jsonl`` (one line per epoch with every loss term)
and checkpoints; with ``resume=True`` it continues from the latest checkpoint and ends with the same
parameters as an uninterrupted run (all randomness is a function of the seed, the epoch and the step).
A method with ``stages`` runs that loop once per stage (see :func:`fit` and ``docs/training.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax import metrics as metrics_lib
from mmjax.data import (
    SCORINGS, Batch, Dataset, TrainCorruption, check_batch_size, iterate_batches, num_batches,
    parse_train_corruption)
from mmjax.data import protocols as protocols_lib
from mmjax.data.train_corruption import describe as describe_corruption
from mmjax.methods import Method, Stage, default_train_corruption
from mmjax.train import device_data
from mmjax.train.checkpoint import Checkpointer, latest_saved_epoch
from mmjax.train.sharding import (
    data_mesh, is_main_process, on_main_process, put_batch, put_replicated, replicated, to_host)
from mmjax.train.state import TrainState
from mmjax.train.steps import compile_epoch, compile_steps, mask_optimizer

# Validation metric used for model selection when config.select_metric == "auto".
# Keyed by Dataset.scoring (mmjax.data.SCORINGS).
AUTO_SELECT = {"regression": ("mae", "min"), "sims_regression": ("mae", "min"),
               "classification": ("accuracy", "max")}


def default_train_config() -> ml_collections.ConfigDict:
  """Training hyper-parameters shared by every method (methods add ``config.model``)."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      batch_size=16,
      eval_batch_size=256,
      num_epochs=30,
      learning_rate=1e-3,
      weight_decay=0.0,
      grad_clip_norm=0.0,  # 0 disables clipping
      patience=10,  # epochs without validation improvement before stopping; 0 disables
      select_metric="auto",  # a key of the validation metrics, or "auto" (see AUTO_SELECT)
      select_mode="auto",  # "min" | "max" | "auto"
      drop_remainder=False,  # last partial train batch: pad + mask (False) or drop (True)
      progress=True,  # progress bar on stderr when it is a terminal
      # Train-time corruption of every training batch (mmjax.data.train_corruption): "method" =
      # the method's own paper regime, "none", "fair" (FAIR_RECIPE), or a spec such as
      # "missing_rate:0:0.5+sample_gaussian:0:4+clean:0.5".
      train_corruption="method",
      noisy_view_fraction=0.5,  # share of each sample's modalities the sample_* noises hit
      # Validate on the valid split corrupted once (fixed key) by the train-time corruption, so
      # that model selection sees the training regime (EMMR trains, validates and tests at one
      # missing ratio); False: the valid split as given.
      validate_corrupted=False,
      # "scan": the training split on the devices once, each epoch one compiled lax.scan over its
      # steps (mmjax.train.device_data); "stream": batches sliced on the host and copied every
      # step (data larger than device memory); "auto": scan when the split fits.
      epoch_mode="auto",
      scan_chunk=0,  # steps per compiled chunk of a scanned epoch (signals act between); 0 = all
      async_checkpoint=False,  # write each epoch's latest checkpoint while the next one trains
      # "bfloat16": mixed precision (mmjax.methods.mixed_precision; float32 parameters, losses and
      # routing); the method must be built for it (mmjax.experiment.build_method does).
      compute_dtype="float32",
  ))

EPOCH_MODES = ("auto", "scan", "stream")

# fold_in(PRNGKey(seed), VALID_CORRUPTION_STREAM): the key of config.validate_corrupted.
VALID_CORRUPTION_STREAM = 0x7A1


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns: the best state and the per-epoch history."""

  state: TrainState
  history: list[dict[str, Any]]
  best_epoch: int
  best_valid: dict[str, float]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (``weight_decay == 0``) or AdamW, optionally after global-norm clipping."""
  if config.weight_decay:
    opt = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  else:
    opt = optax.adam(config.learning_rate)
  if config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt


def split_metrics(predictions: np.ndarray, labels: np.ndarray, scoring: str) -> dict[str, float]:
  """Paper metrics of one split (``mmjax.metrics``) for ``scoring`` = ``Dataset.scoring``:
  ``"regression"`` MOSI / MOSEI (:func:`~mmjax.metrics.msa_regression_metrics`),
  ``"sims_regression"`` CH-SIMS (:func:`~mmjax.metrics.sims_regression_metrics`) or
  ``"classification"``."""
  if scoring == "regression":
    return metrics_lib.msa_regression_metrics(predictions, labels)
  if scoring == "sims_regression":
    return metrics_lib.sims_regression_metrics(predictions, labels)
  if scoring == "classification":
    return metrics_lib.classification_metrics(predictions, labels)
  raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")


def predict(method: Method, state: TrainState, split: Batch, *, batch_size: int,
            mesh: Mesh | None = None, eval_step: Callable[..., Any] | None = None) -> np.ndarray:
  """Predictions for every sample of ``split`` in order: ``[N]`` scores or ``[N, C]`` logits."""
  mesh = data_mesh() if mesh is None else mesh
  if eval_step is None:
    eval_step = _compiled_eval_step(method, mesh)
  batch_size = _round_up(min(batch_size, split.batch_size), mesh.size)
  outputs = []
  for batch in iterate_batches(split, batch_size, num_devices=mesh.size):
    outputs.append(np.asarray(to_host(eval_step(state, put_batch(batch, mesh))))[batch.valid])
  return np.concatenate(outputs)[:split.batch_size]


@functools.lru_cache(maxsize=32)
def _compiled_eval_step(method: Method, mesh: Mesh) -> Callable[..., Any]:
  """One jitted eval step per (method, mesh), so repeated ``predict`` calls do not recompile."""
  return compile_steps(method, optax.identity(), mesh)[1]


def evaluate(method: Method, state: TrainState, split: Batch, scoring: str, *,
             batch_size: int = 256, mesh: Mesh | None = None,
             eval_step: Callable[..., Any] | None = None) -> dict[str, float]:
  """Paper metrics of ``method`` on ``split`` (``scoring``: see :func:`split_metrics`)."""
  preds = predict(method, state, split, batch_size=batch_size, mesh=mesh, eval_step=eval_step)
  return split_metrics(preds, np.asarray(split.label), scoring)


def check_compute_dtype(method: Method, config: ml_collections.ConfigDict) -> None:
  """Refuses ``config.compute_dtype`` other than what ``method`` computes in: the config would
  record a precision the run does not use."""
  wanted = config.get("compute_dtype", "float32")
  if wanted != method.compute_dtype:
    raise ValueError(
        f"config.compute_dtype: {wanted!r}, but the method {method.name} computes in "
        f"{method.compute_dtype!r}; build it with mmjax.methods.mixed_precision(method, "
        f"{wanted!r}) (mmjax.experiment.build_method does)")


def init_state(method: Method, dataset: Dataset, config: ml_collections.ConfigDict,
               optimizer: optax.GradientTransformation) -> TrainState:
  """Initial parameters from ``fold_in(seed, 0)``; the state's step key is ``fold_in(seed, 1)``."""
  params, method_state = _init_params(method, dataset, config)
  return _new_state(params, method_state, optimizer,
                    jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))


def train_corruption(method: Method, dataset: Dataset, config: ml_collections.ConfigDict
                     ) -> TrainCorruption | None:
  """``config.train_corruption`` parsed for ``dataset``; ``"method"`` = the method's own regime
  (:func:`mmjax.methods.default_train_corruption` of ``method.name``)."""
  spec = config.get("train_corruption", "method")
  if spec == "method":
    spec = default_train_corruption(method.name)
  available = protocols_lib.protocols(dataset.modalities,
                                      view_fraction=config.get("noisy_view_fraction", 0.5))
  return parse_train_corruption(spec, available)


def fit(
    method: Method,
    dataset: Dataset,
    config: ml_collections.ConfigDict,
    *,
    workdir: str | os.PathLike | None = None,
    resume: bool = False,
    mesh: Mesh | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
  """Trains ``method`` with early stopping on validation, stage after stage (``docs/training.md``).

  A method without ``stages`` is one implicit stage: ``method.loss`` on every parameter, selected
  with ``method.predict``. Otherwise ``method.stages`` run in order, each one a complete
  early-stopped run of its own (``config.patience`` and the selection metric, validated with the
  stage's ``predict``, ``stage.num_epochs`` or ``config.num_epochs`` epochs). Stage 0 starts from
  ``method.init``; stage ``s > 0`` from the best (selected) params and method state of stage
  ``s - 1`` (passed through ``stage.prepare`` where it has one), with a fresh optimiser state and
  step 0. Leaves a stage's ``trainable`` marks ``False``
  get no gradient and no optimiser state and leave the stage bit-identical.

  Train-time corruption: ``config.train_corruption`` (:func:`train_corruption`) corrupts every
  training batch of every stage inside the compiled train step, from the step key; validation sees
  the valid split as given or, with ``config.validate_corrupted``, corrupted once by the same
  corruption with ``fold_in(root, VALID_CORRUPTION_STREAM)`` (the same copy every epoch and stage).

  Randomness: ``root = PRNGKey(seed)``; init uses ``fold_in(root, 0)``. Stage 0 (and the implicit
  stage) steps with ``fold_in(fold_in(root, 1), step)`` and shuffles epoch ``e`` with
  ``fold_in(fold_in(root, 2), e)``; stage ``s > 0`` does the same with ``fold_in(root, 2 + s)`` in
  place of ``root``. So a one-stage method equals its implicit form, and the whole run is a
  function of the seed.

  ``workdir``: ``metrics.jsonl`` there gets one line per epoch (with a ``"stage"`` field when the
  method has stages); each stage checkpoints under ``workdir/<stage.name>/checkpoints`` (the
  implicit stage under ``workdir/checkpoints``). ``resume=True`` restores every finished stage (no
  retraining) and continues the interrupted one from its latest checkpoint, ending with the same
  parameters and history as an uninterrupted run; a fresh run refuses a workdir that holds
  checkpoints.

  Epochs: ``config.epoch_mode`` ``"scan"`` (``"auto"`` when the training split fits in device
  memory) holds the split on the devices and runs each epoch as compiled ``lax.scan`` chunks of
  ``config.scan_chunk`` steps (0 = the whole epoch; a signal is acted on between chunks);
  ``"stream"`` copies host batches step by step. Both run the same steps on the same batches.

  Several processes (``jax.distributed``): every process runs this loop on the same global batches;
  process 0 alone logs and writes ``metrics.jsonl``; checkpoints go through orbax's multi-process
  saves (each process writes its devices' shards, process 0 the metadata).

  Returns:
    The last stage's best state, ``best_epoch`` and ``best_valid``; the history of every stage.
  """
  mesh = data_mesh() if mesh is None else mesh
  log = on_main_process(log)
  check_batch_size(config.batch_size, mesh.size)
  check_compute_dtype(method, config)
  metric, mode = _selection(config, dataset.scoring)
  stages = _check_stages(method)
  corruption = train_corruption(method, dataset, config)
  dataset = _with_validation_split(dataset, config, corruption)
  if resume and workdir is None:
    raise ValueError("resume: needs a workdir to resume from")
  run = _Run(dataset, config, mesh, metric, mode, resume, log,
             None if workdir is None else os.path.join(workdir, "metrics.jsonl"), corruption,
             _StopRequest(), _device_train_split(config, dataset.splits["train"], mesh))
  if corruption is not None:
    log(describe_corruption(corruption))
  if workdir is not None:
    check_workdir(method, workdir, resume, log)
  checkpointers = ([] if workdir is None else
                   [Checkpointer(os.path.join(workdir, stage.name),
                                 async_save=config.get("async_checkpoint", False))
                    for stage in stages])
  try:
    if workdir is not None:  # somewhere to save: SIGTERM / SIGINT stop at the next step boundary
      run.stop.install()
    params, method_state = _init_params(method, dataset, config)
    history = []
    for index in range(len(stages)):
      result = _fit_stage(run, method, stages, index, params, method_state,
                          checkpointers[index] if checkpointers else None, history)
      history = history + result.history
      params, method_state = result.state.params, result.state.method_state
  finally:
    run.stop.uninstall()
    for checkpointer in checkpointers:
      checkpointer.close()
  return dataclasses.replace(result, history=history)


def _with_validation_split(dataset: Dataset, config: ml_collections.ConfigDict,
                           corruption: TrainCorruption | None) -> Dataset:
  """``dataset`` with the valid split model selection sees: as given or, with
  ``config.validate_corrupted``, corrupted once with ``fold_in(PRNGKey(seed),
  VALID_CORRUPTION_STREAM)``."""
  if not config.get("validate_corrupted", False) or corruption is None:
    return dataset
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), VALID_CORRUPTION_STREAM)
  valid = jax.tree.map(np.asarray, jax.jit(corruption)(key, dataset.splits["valid"]))
  return dataclasses.replace(dataset, splits={**dataset.splits, "valid": valid})


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT reached :func:`fit`: the state after the current step was saved (the
  message says where and how to resume); ``signum`` is the signal's number."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class _StopRequest:
  """Remembers a SIGTERM / SIGINT during :func:`fit` (handlers in the main thread only; the
  previous ones are put back after), acted on at the next step boundary."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._remember)

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _remember(self, signum, frame) -> None:
    del frame
    self.signum = signum


def check_workdir(method: Method, workdir: str | os.PathLike, resume: bool,
                  log: Callable[[str], None] = print) -> None:
  """Refuses a fresh run (``resume=False``) into a workdir that holds checkpoints (orbax would
  silently skip saving epochs up to its latest one); with ``resume`` and no checkpoint at all, says
  in one line that the run starts fresh. Reads the file system only (creates nothing)."""
  dirs = [os.path.join(workdir, stage.name) for stage in _check_stages(method)]
  epochs = [(d, latest_saved_epoch(d)) for d in dirs if latest_saved_epoch(d) is not None]
  interrupted = [d for d in dirs if latest_saved_epoch(d, "interrupted") is not None]
  if (epochs or interrupted) and not resume:
    where, epoch = epochs[0] if epochs else (interrupted[0], 0)
    raise ValueError(
        f"workdir: {where} already holds checkpoints up to epoch {epoch}"
        f"{' and an interrupted epoch' if interrupted else ''}; pass resume=True (--resume) to "
        "continue that run, or use an empty workdir")
  if resume and not (epochs or interrupted):
    log(f"resume: no checkpoint in {workdir}; training from scratch")


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the stages of one :func:`fit` call share."""

  dataset: Dataset
  config: ml_collections.ConfigDict
  mesh: Mesh
  metric: str
  mode: str
  resume: bool
  log: Callable[[str], None]
  jsonl: str | None  # metrics.jsonl, or None without a workdir
  corruption: TrainCorruption | None  # train-time corruption of every training batch
  stop: _StopRequest  # a signal asking fit to save and stop
  device_train: device_data.DeviceSplit | None  # the training split on the devices, or None


def _device_train_split(config: ml_collections.ConfigDict, train: Batch, mesh: Mesh
                        ) -> device_data.DeviceSplit | None:
  """The training split placed on ``mesh`` when ``config.epoch_mode`` scans epochs, else None."""
  mode, chunk = config.get("epoch_mode", "auto"), config.get("scan_chunk", 0)
  if mode not in EPOCH_MODES:
    raise ValueError(f"epoch_mode: expected one of {EPOCH_MODES}, got {mode!r}")
  if not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f"scan_chunk: expected an int >= 0 (0 = the whole epoch), got {chunk!r}")
  if mode == "stream":
    return None
  return device_data.place_split(train, mesh,
                                 device_data.memory_budget(mesh) if mode == "auto" else None)


def _fit_stage(run: _Run, method: Method, stages: tuple[Stage, ...], index: int, params: Any,
               method_state: Any, checkpointer: Checkpointer | None,
               earlier: list[dict[str, Any]]) -> FitResult:
  """Stage ``stages[index]`` from ``(params, method_state)``: the epoch loop with early stopping.

  ``earlier`` is the history of the previous stages (rewritten to ``metrics.jsonl`` together with
  this stage's restored epochs). Returns this stage's best state and its own history.
  """
  config, mesh = run.config, run.mesh
  setup = _StageSetup.create(run, method, stages, index, params)
  method, tag = setup.method, setup.tag
  train_step, eval_step = compile_steps(method, setup.optimizer, mesh, setup.trainable,
                                        run.corruption)
  if run.device_train is not None:
    epoch_fn = compile_epoch(method, setup.optimizer, mesh, setup.trainable, run.corruption)
  state = jax.device_put(setup.start_state(params, method_state, run.dataset.splits["train"]),
                         replicated(mesh))
  progress = _Bookkeeping()
  partial = None  # (steps done, metric sums) of an epoch interrupted by a signal
  # Host copy (the step donates the device buffers); stays the start state if no epoch improves.
  best_state = jax.device_get(state)
  if run.resume:
    restored = checkpointer.restore_latest(state, log=lambda line: run.log(tag + line))
    if restored is not None:
      state, meta = restored
      progress = _Bookkeeping(**meta)
      best = checkpointer.restore_best(state, progress.best_epoch, upto=progress.epoch)
      if best is not None:
        best_state = jax.device_get(best)
      run.log(f"{tag}resumed after epoch {progress.epoch} (step {int(state.step)})")
    interrupted = checkpointer.restore_interrupted(state)
    if interrupted is not None and interrupted[1]["epoch"] == progress.epoch + 1:
      state, meta = interrupted
      partial = (meta["steps_done"], meta["sums"])
      run.log(f"{tag}continuing epoch {meta['epoch']} after step {int(state.step)} "
              f"({meta['steps_done']} of its steps done before the interruption)")
  if run.jsonl is not None:  # the restored epochs, or none: drops lines of epochs never saved
    _write_jsonl(run.jsonl, earlier + progress.history)

  data_key = jax.random.fold_in(setup.root, 2)
  train = run.dataset.splits["train"]
  steps = num_batches(train.batch_size, config.batch_size, config.drop_remainder)
  for epoch in range(progress.epoch + 1, setup.num_epochs + 1):
    if config.patience and progress.bad_epochs >= config.patience:
      break
    start = time.perf_counter()
    epoch_key = jax.random.fold_in(data_key, epoch)
    bar = _ProgressBar(steps, f"{tag}epoch {epoch}", enabled=config.progress)
    try:
      if run.device_train is None:
        batches = iterate_batches(train, config.batch_size, key=epoch_key,
                                  drop_remainder=config.drop_remainder, num_devices=mesh.size)
        if partial is not None:
          batches = itertools.islice(batches, partial[0], None)
        state, train_terms = _train_epoch(train_step, state, batches, mesh, bar, run.stop,
                                          partial)
      else:
        rows = device_data.epoch_rows(train.batch_size, config.batch_size, epoch_key,
                                      config.drop_remainder)
        state, train_terms = _train_epoch_scanned(epoch_fn, state, run.device_train, rows,
                                                  config.get("scan_chunk", 0), mesh, bar,
                                                  run.stop, partial)
    except _Interrupted as stopped:
      checkpointer.save_interrupted(stopped.state, {"epoch": epoch, "steps_done": stopped.done,
                                                    "sums": stopped.sums})
      name = signal.Signals(run.stop.signum).name
      raise TrainingInterrupted(
          f"{tag}interrupted by {name} at epoch {epoch}, step {int(stopped.state.step)}: saved "
          f"under {checkpointer.root}; resume with --resume (fit(..., resume=True)) and the same "
          "config", run.stop.signum) from None
    except _NonFinite as bad:
      raise _diverged(tag, epoch, bad, checkpointer, progress) from None
    best = _close_epoch(run, setup, progress, epoch, state, train_terms,
                        time.perf_counter() - start, eval_step, checkpointer)
    if best is not None:
      best_state = best
    partial = None
  return _stage_result(best_state, progress)


@dataclasses.dataclass(frozen=True)
class _StageSetup:
  """What one stage of :func:`fit` (or of every seed of :func:`mmjax.train.fit_seeds`) trains
  with: the stage's method, optimiser and trainable mask, its root key, epochs and log tag."""

  stage: Stage
  method: Method  # the stage's loss and predict
  trainable: Any  # Python-bool pytree or None (all trainable)
  optimizer: optax.GradientTransformation
  root: jax.Array  # PRNGKey(seed), folded with 2 + index for stages after the first
  num_epochs: int
  tag: str  # "[<stage>] " or ""

  @classmethod
  def create(cls, run: _Run, method: Method, stages: tuple[Stage, ...], index: int,
             params: Any) -> _StageSetup:
    config, stage = run.config, stages[index]
    trainable = _trainable_mask(stage, index, params)
    optimizer = make_optimizer(config)
    if trainable is not None:
      optimizer = mask_optimizer(optimizer, trainable)
    root = jax.random.PRNGKey(config.seed)
    if index:
      root = jax.random.fold_in(root, 2 + index)
    setup = cls(
        stage=stage, method=method.at_stage(stage), trainable=trainable, optimizer=optimizer,
        root=root,
        num_epochs=config.num_epochs if stage.num_epochs is None else stage.num_epochs,
        tag=f"[{stage.name}] " if stage.name else "")
    if stage.name:
      total = len(jax.tree.leaves(params))
      count = total if trainable is None else sum(jax.tree.leaves(trainable))
      run.log(f"{setup.tag}stage {index + 1}/{len(stages)}: {count}/{total} parameter arrays "
              f"trainable, up to {setup.num_epochs} epochs")
    return setup

  def start_state(self, params: Any, method_state: Any, train: Batch) -> TrainState:
    """Step 0 from ``(params, method_state)`` (through ``stage.prepare``), fresh optimiser."""
    if self.stage.prepare is not None:
      method_state = self.stage.prepare(params, method_state, train)
    return _new_state(params, method_state, self.optimizer, jax.random.fold_in(self.root, 1))


def _close_epoch(run: _Run, setup: _StageSetup, progress: _Bookkeeping, epoch: int,
                 state: TrainState, train_terms: dict[str, float], seconds: float,
                 eval_step: Callable[..., Any], checkpointer: Checkpointer | None
                 ) -> TrainState | None:
  """Validates ``state`` after ``epoch``, updates ``progress``, logs, checkpoints and appends to
  ``metrics.jsonl``. Returns the host copy of ``state`` when it becomes the selected one."""
  config, tag = run.config, setup.tag
  valid = evaluate(setup.method, state, run.dataset.splits["valid"], run.dataset.scoring,
                   batch_size=config.eval_batch_size, mesh=run.mesh, eval_step=eval_step)
  improved = _better(valid[run.metric], progress.best_value, run.mode)
  # A tie with the best value keeps the later (longer-trained) state; patience still counts
  # from the last strict improvement. Small validation splits tie often (20 samples at 100 %).
  tied = not improved and valid[run.metric] == progress.best_value
  best_state = None
  if improved or tied:
    progress.best_epoch, best_state = epoch, jax.device_get(state)
  if improved:
    progress.best_value, progress.bad_epochs = valid[run.metric], 0
  else:
    progress.bad_epochs += 1
  record = {**({"stage": setup.stage.name} if setup.stage.name else {}),
            "epoch": epoch, "step": int(state.step), "seconds": seconds,
            **{f"train/{k}": v for k, v in train_terms.items()},
            **{f"valid/{k}": v for k, v in valid.items()}}
  progress.epoch = epoch
  progress.history.append(record)
  run.log(tag + _epoch_line(record, run.metric, improved))
  if checkpointer is not None:  # checkpoint first: metrics.jsonl never runs ahead of it
    try:
      checkpointer.save(epoch, state, dataclasses.asdict(progress), best=improved or tied)
    except OSError as e:  # e.g. disk full: orbax renames complete saves only
      kept = (f"epoch {epoch - 1} in {os.path.join(checkpointer.root, 'latest')} is intact"
              if epoch > 1 else "no earlier checkpoint")
      raise OSError(e.errno, f"{tag}the checkpoint of epoch {epoch} could not be written "
                    f"({e.strerror or e}); {kept}; free space and resume with --resume") from e
    checkpointer.clear_interrupted()
    _write_jsonl(run.jsonl, [record], mode="a")
  return best_state


def _stage_result(best_state: TrainState, progress: _Bookkeeping) -> FitResult:
  best_valid = next((r for r in progress.history if r["epoch"] == progress.best_epoch), {})
  return FitResult(state=best_state, history=progress.history, best_epoch=progress.best_epoch,
                   best_valid={k[6:]: v for k, v in best_valid.items() if k.startswith("valid/")})


def _diverged(tag: str, epoch: int, bad: _NonFinite, checkpointer: Checkpointer | None,
              progress: _Bookkeeping) -> TrainingDiverged:
  kept = (f"the checkpoints up to epoch {progress.epoch} are kept"
          if checkpointer is not None and progress.epoch else "no checkpoint was written")
  return TrainingDiverged(
      f"{tag}training diverged at epoch {epoch}, step {bad.step}: {bad.name} = {bad.value}; "
      f"{kept}; lower learning_rate or set grad_clip_norm")


class TrainingDiverged(ValueError):
  """A train step gave a non-finite loss or gradient norm: :func:`fit` stops, naming the stage,
  epoch and step; the checkpoints of the epochs before stay as they are (a non-finite state is
  never saved, so never selected)."""


@dataclasses.dataclass
class _NonFinite(Exception):
  name: str
  value: float
  step: int


@dataclasses.dataclass
class _Interrupted(Exception):
  state: TrainState
  done: int  # steps of the epoch done
  sums: dict[str, float]


def _train_epoch(train_step: Callable[..., Any], state: TrainState, batches: Any, mesh: Mesh,
                 bar: _ProgressBar, stop: _StopRequest,
                 partial: tuple[int, dict[str, float]] | None = None
                 ) -> tuple[TrainState, dict[str, float]]:
  """``train_step`` over ``batches``; every metric averaged over the valid samples of the epoch.

  ``partial``: ``(steps done, sums)`` of the epoch so far (``batches`` then holds the rest). After
  a step with ``stop.signum`` set, raises :class:`_Interrupted` with what ``partial`` needs."""
  terms = _EpochTerms(partial, bar)
  for batch in batches:
    state, step_metrics = train_step(state, put_batch(batch, mesh))
    terms.add(jax.device_get(step_metrics), float(batch.valid.sum()), int(state.step))
    if stop.signum is not None:
      bar.close()
      raise _Interrupted(state, terms.done, terms.sums)
  return state, terms.means()


def _train_epoch_scanned(epoch_fn: Callable[..., Any], state: TrainState,
                         split: device_data.DeviceSplit,
                         rows: np.ndarray, chunk: int, mesh: Mesh, bar: _ProgressBar,
                         stop: _StopRequest, partial: tuple[int, dict[str, float]] | None = None
                         ) -> tuple[TrainState, dict[str, float]]:
  """:func:`_train_epoch` on the device-held ``split``: ``rows`` (``[steps, B]``, from
  :func:`~mmjax.train.device_data.epoch_rows`) in compiled chunks of ``chunk`` steps (0 = all
  remaining), metrics fetched once per chunk; a signal is acted on after the chunk."""
  terms = _EpochTerms(partial, bar)
  rows = rows[terms.done:]
  chunk = chunk or len(rows)
  for first in range(0, len(rows), chunk):
    step = int(state.step)
    state, metrics, weights = epoch_fn(state, split, put_replicated(rows[first:first + chunk], mesh))
    metrics, weights = jax.device_get((metrics, weights))
    terms.add_steps(metrics, weights, step)
    if stop.signum is not None:
      bar.close()
      raise _Interrupted(state, terms.done, terms.sums)
  return state, terms.means()


class _EpochTerms:
  """Sums of one epoch's step metrics weighted by valid samples, checked finite step by step."""

  def __init__(self, partial: tuple[int, dict[str, float]] | None, bar: _ProgressBar):
    self.done, self.sums = (0, {}) if partial is None else (partial[0], dict(partial[1]))
    self.bar = bar

  def add(self, step_metrics: dict[str, Any], weight: float, step: int) -> None:
    """One step's metrics (host scalars); ``step`` = the state's step after it."""
    for name in ("loss", "grad_norm"):
      if name in step_metrics and not math.isfinite(float(step_metrics[name])):
        self.bar.close()
        raise _NonFinite(name, float(step_metrics[name]), step)
    for k, v in step_metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + weight * float(v)
    self.sums["_n"] = self.sums.get("_n", 0.0) + weight
    self.done += 1
    self.bar.update()

  def add_steps(self, metrics: dict[str, np.ndarray], weights: np.ndarray, step: int) -> None:
    """:meth:`add` for each of ``len(weights)`` consecutive steps after ``step``: ``metrics[name]``
    and ``weights`` ``[K]`` host arrays (a scanned chunk's)."""
    for i, weight in enumerate(weights):
      self.add({k: v[i] for k, v in metrics.items()}, float(weight), step + i + 1)

  def means(self) -> dict[str, float]:
    self.bar.close()
    sums = dict(self.sums)
    n = sums.pop("_n")
    return {k: v / n for k, v in sums.items()}


def _init_params(method: Method, dataset: Dataset, config: ml_collections.ConfigDict):
  """``method.init(fold_in(PRNGKey(seed), 0), two training samples)``."""
  example = dataset.splits["train"].take(np.arange(min(2, dataset.splits["train"].batch_size)))
  return method.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0), example)


def _new_state(params: Any, method_state: Any, optimizer: optax.GradientTransformation,
               key: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    method_state=method_state, key=key)


def _check_stages(method: Method) -> tuple[Stage, ...]:
  """``method.stages`` validated, or the implicit stage (name ``""``: no tag, workdir itself)."""
  if not method.stages:
    return (Stage(name="", loss=method.loss, predict=method.predict),)
  names = [stage.name for stage in method.stages]
  for i, stage in enumerate(method.stages):
    if (not isinstance(stage.name, str) or stage.name in ("", ".", "..")
        or os.sep in stage.name or "/" in stage.name):
      raise ValueError(f"stages[{i}].name: expected a plain folder name, got {stage.name!r}")
    if stage.name in names[:i]:
      raise ValueError(f"stages[{i}].name: {stage.name!r} used twice")
    if stage.num_epochs is not None and (not isinstance(stage.num_epochs, int)
                                         or stage.num_epochs < 1):
      raise ValueError(f"stages[{i}].num_epochs: expected a positive int or None, "
                       f"got {stage.num_epochs!r}")
  return method.stages


def _trainable_mask(stage: Stage, index: int, params: Any) -> Any:
  """``stage.trainable(params)``, checked: bools with ``params``' structure. ``None`` if unset."""
  if stage.trainable is None:
    return None
  mask = stage.trainable(params)
  if jax.tree.structure(mask) != jax.tree.structure(params):
    raise ValueError(f"stages[{index}].trainable: expected a pytree with the structure of the "
                     f"params, {jax.tree.structure(params)}; got {jax.tree.structure(mask)}")
  if not all(isinstance(t, (bool, np.bool_)) for t in jax.tree.leaves(mask)):
    raise ValueError(f"stages[{index}].trainable: expected Python bools as leaves")
  return jax.tree.map(bool, mask)


@dataclasses.dataclass
class _Bookkeeping:
  """Loop progress saved beside the state (JSON) so that a resumed run continues identically."""

  epoch: int = 0
  best_value: float | None = None
  best_epoch: int = 0
  bad_epochs: int = 0
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _selection(config: ml_collections.ConfigDict, scoring: str) -> tuple[str, str]:
  metric, mode = AUTO_SELECT[scoring]
  if config.select_metric != "auto":
    metric = config.select_metric
    if config.select_mode == "auto":
      raise ValueError(f"select_mode: give 'min' or 'max' for select_metric={metric!r}")
  if config.select_mode != "auto":
    mode = config.select_mode
  if mode not in ("min", "max"):
    raise ValueError(f"select_mode: expected 'min', 'max' or 'auto', got {mode!r}")
  return metric, mode


def _better(value: float, best: float | None, mode: str) -> bool:
  if not math.isfinite(value):
    return False
  if best is None:
    return True
  return value < best if mode == "min" else value > best


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _epoch_line(record: dict[str, Any], metric: str, improved: bool) -> str:
  terms = " ".join(f"{k[6:]}={v:.4g}" for k, v in record.items() if k.startswith("train/"))
  valid = record[f"valid/{metric}"]
  mark = " *" if improved else ""
  return (f"epoch {record['epoch']:3d} | {terms} | valid {metric}={valid:.4f}{mark} "
          f"| {record['seconds']:.1f}s")


def _write_jsonl(path: str, records: list[dict[str, Any]], mode: str = "w") -> None:
  """Writes (``"w"``) or appends ``records`` to ``path``, from process 0 only."""
  if not is_main_process():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, mode) as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


class _ProgressBar:
  """A one-line progress bar on stderr, shown only when stderr is a terminal."""

  def __init__(self, total: int, label: str, *, enabled: bool):
    self.total, self.label, self.done = total, label, 0
    self.enabled = enabled and sys.stderr.isatty()

  def update(self) -> None:
    self.done += 1
    if self.enabled:
      filled = int(30 * self.done / max(self.total, 1))
      sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{self.done}/{self.total}")
      sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write("\r" + " " * (len(self.label) + 45) + "\r")
