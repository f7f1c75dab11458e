"""Size and speed of EMMR's ensembles TF, TF+AE, TF+AE+MMIN (papers/002 Fig. 9, Table 8).

Each case builds EMMR from ``mmjax.experiment.get_config("emmr")`` with ``members`` set to the case
and ``hidden`` from ``--hidden`` (other model defaults unchanged: AE widths 256-128-64, 5 MMIN
blocks, dropout 0.3), one random MOSI-shaped batch (:func:`step_timing.make_dataset`: text
``[B, 50, 768]``, audio ``[B, 50, 74]``, vision ``[B, 50, 47]``; its scores binned into 3 classes)
and times, on one device, the steps :func:`mmjax.train.fit` runs in stage ``"main"`` (the loss
of eq. 14 with the pre-trained network frozen: its leaves masked out of the optimiser; the batch
corrupted in the step by EMMR's own train-time corruption ``drop_one:0.5``) and the evaluation
step (``method.predict``) on the clean batch and on a ``drop_one:0.5`` copy, like
``bench_train_step.py``: "first call" = trace + compile + one run, "ms/step" = median of
``--repeats`` calls after ``--warmup`` warm-up calls, each blocked on; the train step is fed the
state it returned. Each case runs at every ``--lambda_semantic`` (1: mmjax's default, every view
trained; 0: eq. 14, the paper preset). "params": EMMR's parameters (``params["emmr"]``, trained in
stage 2) and the frozen full-modality network's (``params["pretrained"]``).

"GFLOP" is the work done: XLA's count for the compiled step (in parentheses; stable on a noisy
machine) counts each scan body once: MMIN's cascade is a scan (:func:`model_scans`; TF's
encoder-decoder is unrolled, counted whole), and the views (and, in the eval step, TF's decoder) run in scans over chunks
of the samples that need them (:func:`mmjax.methods.emmr.needed_forward`), as many chunks as the
batch needs. So the work is the count plus, per scan, the iterations run beyond one times its
body's count (:func:`executed_gflop`, :func:`chunk_scans`; a training chunk's body counts its
forward twice, recomputed in the backward pass, :func:`chunk_gflop`; the number of samples with a
missing modality and of flagged ones read from the loss's ``missing`` / ``key_missing`` terms on
one corrupted draw of the batch; the re-encoding scan of the loss runs no chunk under
``drop_one``).

  python benchmarks/bench_emmr.py                          # B = 32, d = 64
  python benchmarks/bench_emmr.py --hidden=300 --repeats=3 --warmup=1 --output=/tmp/emmr_perf.md
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_timing as shared  # pylint: disable=g-import-not-at-top,wrong-import-position

_CASES = flags.DEFINE_list("cases", ["tf", "tf+ae", "tf+ae+mmin"], "Ensembles to time.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Width d (the paper's is 300).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size B (the paper's is 32).",
                                   lower_bound=1)
_VIEW_CHUNK = flags.DEFINE_integer("row_chunk", None, "model.row_chunk (default: EMMR's).",
                                   lower_bound=1)
_LAMBDA_SEMANTIC = flags.DEFINE_list(
    "lambda_semantic", ["1", "0"], "model.lambda_semantic values (1: mmjax's default; 0: eq. 14, "
    "the paper preset).")
# --repeats, --warmup and --output are step_timing's flags (defined on import).
_REPEATS, _WARMUP = shared.REPEATS, shared.WARMUP


def make_dataset(batch_size: int):
  """:func:`step_timing.make_dataset` with its scores binned into 3 classes (sign)."""
  from mmjax import data  # pylint: disable=g-import-not-at-top
  regression = shared.make_dataset(batch_size)
  batch = regression.splits["train"]
  batch = batch.replace(label=(np.sign(batch.label) + 1).astype(np.int32))
  return data.Dataset("bench", "classification", 3, {s: batch for s in data.SPLITS})


def chunk_gflop(body, *args, train: bool, argnums=(0, 1)) -> float:
  """XLA's GFLOP of one chunk's ``body(*args)`` (a scalar): in training as ``mmjax.nn.map_selected``
  runs it, forward, the forward recomputed (``remat``) and backward w.r.t. ``argnums``."""
  import jax  # pylint: disable=g-import-not-at-top
  return shared.step_cost(jax.jit(jax.grad(jax.checkpoint(body), argnums=argnums) if train
                                  else body), *args)[0]


def row_chunk_gflop(method_config, spec, params, rows: int, train: bool, full: bool = True,
                    loo: bool = True) -> float:
  """XLA's GFLOP of EMMR's views on ``rows`` samples: ``L_full`` (eq. 8) with ``full``, the
  leave-one-out views ``L_{-k}`` (eq. 9; each of the ``M`` on ``rows`` samples) with ``loo``: the
  body of one chunk of :func:`mmjax.methods.emmr.needed_forward`'s scans; with ``train``, as
  :func:`chunk_gflop` counts it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  _, main = emmr.make_models(method_config, spec)
  t = int(sum(main.seq_lens))
  x, real = jnp.zeros((rows, t, main.hidden)), jnp.ones((rows, t), bool)
  views = lambda p, x: sum(jnp.sum(v) for v in main.apply(
      {"params": p}, x, real, train=False, full=full, loo=loo, method="view_logits")
      if v is not None)
  return chunk_gflop(views, params["emmr"], x, train=train)


def loo_rows_chunk_gflop(method_config, spec, params, rows: int, train: bool) -> float:
  """XLA's GFLOP of ``rows`` leave-one-out views (eq. 9), each of its own sample and view ``k``
  (:func:`mmjax.nn.apply_copy_per_row`): the body of one chunk of the other members' ``L_{-k}``
  scan in :func:`mmjax.methods.emmr.needed_forward`; with ``train``, as :func:`chunk_gflop`
  counts it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  from mmjax.nn import apply_copy_per_row  # pylint: disable=g-import-not-at-top
  _, main = emmr.make_models(method_config, spec)
  index, _ = main.loo_steps()
  x, mask = jnp.zeros((rows, index.shape[1], main.hidden)), jnp.ones((rows, index.shape[1]), bool)
  view = emmr.ViewClassifier(main.num_classes, main.num_heads, main.mlp_dim, main.dropout)
  copy = jnp.arange(rows) % len(main.modalities)
  views = lambda p, x: jnp.sum(apply_copy_per_row(view, p, copy, x, mask, deterministic=True))
  return chunk_gflop(views, params["emmr"]["loo_views"], x, train=train)


def encode_chunk_gflop(method_config, spec, params, batch, rows: int) -> float:
  """XLA's GFLOP of EMMR's encoders (eq. 1-2) on ``rows`` samples in training
  (:func:`chunk_gflop`): the body of one chunk of
  :func:`mmjax.methods.emmr.encode_observed_and_clean`'s re-encoding scan."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  _, main = emmr.make_models(method_config, spec)
  part = batch.take(np.arange(rows))
  encode = lambda p: jnp.sum(main.apply({"params": p}, part.features, part.step_mask,
                                        jnp.asarray(part.present), method="encode"))
  return chunk_gflop(encode, params["emmr"], train=True, argnums=0)


def decoder_chunk_gflop(method_config, spec, params, rows: int) -> float:
  """XLA's GFLOP of TF's decoder (eq. 7) on ``rows`` samples, forward: the body of one chunk of
  :func:`mmjax.methods.emmr.decode_tf_where_missing`'s scan (the eval step's)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  from mmjax.nn import apply_half  # pylint: disable=g-import-not-at-top
  _, main = emmr.make_models(method_config, spec)
  t = int(sum(main.seq_lens))
  x, real = jnp.zeros((rows, t, main.hidden)), jnp.ones((rows, t), bool)
  tf = main.bind({"params": params["emmr"]}).encoder_decoders["tf"]
  return shared.step_cost(jax.jit(lambda p, x: apply_half(tf, p, 1, x, real)),
                          tf.variables["params"], x)[0]


def model_scans(method_config, spec, params, batch_size: int, train: bool
                ) -> list[tuple[int, float]]:
  """The model's own ``nn.scan`` s in a step, as :func:`executed_gflop` takes them:
  ``(iterations, GFLOP of one)`` for MMIN's cascade (``num_residual_blocks``
  :class:`~mmjax.nn.MLPAutoencoder` s on ``[B, M d]``); with ``train`` forward and backward. (TF's
  encoder-decoder scan is unrolled: XLA counts both of its halves.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  from mmjax.nn import MLPAutoencoder  # pylint: disable=g-import-not-at-top
  _, main = emmr.make_models(method_config, spec)
  bound = main.bind({"params": params["emmr"]})
  cost = lambda f, *args: shared.step_cost(jax.jit(jax.grad(
      lambda *a: jnp.sum(f(*a)), argnums=tuple(range(len(args)))) if train else f), *args)[0]
  scans = []
  if "mmin" in main.members:
    cascade = bound.encoder_decoders["mmin"]
    block = jax.tree.map(lambda p: p[0], cascade.variables["params"]["blocks"])
    scans.append((cascade.num_blocks, cost(
        lambda p, u: MLPAutoencoder(cascade.hidden).apply({"params": p}, u)[1], block,
        jnp.zeros((batch_size, len(main.modalities) * main.hidden)))))
  return scans


def executed_gflop(compiled: float, scans: Sequence[tuple[int, float]]) -> float:
  """XLA's count of a step, in which each scan body counts once, plus, for each of the step's scans
  given as ``(iterations run, GFLOP of one body)`` (:func:`chunk_scans`, :func:`model_scans`), the
  iterations beyond one (none run: the body is subtracted)."""
  return compiled + sum((runs - 1) * body for runs, body in scans)


def chunk_scans(present: np.ndarray, flagged: np.ndarray, chunk: int,
                view_body: Callable[[int, bool, bool], float], loo_rows_body: float,
                members: int, semantic: bool, decoder_body: float | None = None
                ) -> list[tuple[int, float]]:
  """The scans over chunks of a step of :func:`mmjax.methods.emmr.needed_forward`, as
  :func:`executed_gflop` takes them, for availability ``present [B, M]`` and the step's key-missing
  flags ``flagged [B]``; ``view_body(n, full, loo)`` the views' GFLOP on ``n`` samples
  (:func:`row_chunk_gflop`), ``loo_rows_body`` one chunk's of the other members' leave-one-out
  rows (:func:`loo_rows_chunk_gflop`). The TF member's views scan the incomplete samples unless ``semantic``
  (then they run on all, unscanned); the other members' ``L_full`` scans the incomplete ones
  (``semantic`` only), their ``L_{-k}`` the rows of :func:`mmjax.methods.emmr.
  member_loo_selection` among the incomplete (``semantic``) or flagged ones; TF's decoder scans the
  incomplete ones where ``decoder_body`` is given (no ``reconstruct``)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  from mmjax.nn import chunks_run  # pylint: disable=g-import-not-at-top
  incomplete = ~present.all(-1)[None]
  scans = [] if semantic else [(chunks_run(incomplete, chunk), view_body(chunk, True, True))]
  if members > 1:
    if semantic:
      scans.append((chunks_run(incomplete, chunk), view_body((members - 1) * chunk, True, False)))
    need = incomplete[0] if semantic else flagged
    selected = emmr.member_loo_selection(jnp.asarray(need), jnp.asarray(present), members - 1)
    scans.append((chunks_run(selected.reshape(1, -1), chunk), loo_rows_body))
  if decoder_body is not None:
    scans.append((chunks_run(incomplete, chunk), decoder_body))
  return scans


def step_flags(main_network, params, batch, config, key) -> np.ndarray:
  """``key_missing [B]`` as the stage-2 loss (``key`` given: training mode, that key) or ``predict``
  (``key=None``) computes it on ``batch``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmjax.methods import emmr  # pylint: disable=g-import-not-at-top
  present = jnp.asarray(batch.present)
  x = emmr.encode_observed_and_clean(main_network, params, batch, config.row_chunk)[0]
  real = jnp.concatenate([jnp.asarray(batch.step_mask[m]) for m in main_network.modalities], 1)
  out = jax.jit(lambda x: emmr.needed_forward(
      main_network, {"params": params["emmr"]}, x, real, present, train=key is not None, key=key,
      semantic=config.lambda_semantic > 0, chunk=config.row_chunk,
      reconstruct=key is not None and config.use_backward))(x)
  return np.asarray(out["key_missing"])


def time_case(case: str, hidden: int, batch_size: int, warmup: int, repeats: int,
              lambda_semantic: float) -> dict[str, Any]:
  """Builds EMMR with the members of ``case`` and times its stage-2 train step (with EMMR's own
  train-time corruption, as ``fit`` runs it) and its eval step on the clean batch and on the batch
  with EMMR's corruption (``drop_one:0.5``)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import data, experiment, train  # pylint: disable=g-import-not-at-top
  from mmjax.methods import TaskSpec, emmr  # pylint: disable=g-import-not-at-top
  from mmjax.nn import chunks_run  # pylint: disable=g-import-not-at-top
  from mmjax.train.sharding import replicated  # pylint: disable=g-import-not-at-top
  from mmjax.train.steps import mask_optimizer  # pylint: disable=g-import-not-at-top
  config = experiment.get_config("emmr")
  config.batch_size = batch_size
  config.model.hidden = hidden
  config.model.members = case.replace("+", ",")
  config.model.lambda_semantic = lambda_semantic
  if _VIEW_CHUNK.value is not None:
    config.model.row_chunk = _VIEW_CHUNK.value
  dataset = make_dataset(batch_size)
  method = experiment.build_method(config, dataset)
  main = method.stages[-1]
  stage_method = dataclasses.replace(method, loss=main.loss, predict=main.predict, stages=())
  state = train.init_state(method, dataset, config, train.make_optimizer(config))
  state = state.replace(method_state=main.prepare(state.params, state.method_state,
                                                  dataset.splits["train"]))  # as fit does
  trainable = main.trainable(state.params)
  optimizer = mask_optimizer(train.make_optimizer(config), trainable)
  state = state.replace(opt_state=optimizer.init(state.params))
  mesh = train.data_mesh(jax.devices()[:1])
  corruption = train.train_corruption(method, dataset, config)
  train_step, eval_step = train.compile_steps(stage_method, optimizer, mesh, trainable, corruption)
  state = jax.device_put(state, replicated(mesh))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  clean = dataset.splits["train"]
  batch = jax.block_until_ready(train.put_batch(clean, mesh))
  corrupted = train.put_batch(data.drop_one_modality(jax.random.key(1), clean, 0.5), mesh)
  state, train_first, train_s = shared.time_calls(
      train_step, state, batch, advance=True, warmup=warmup, repeats=repeats)
  _, eval_first, eval_s = shared.time_calls(
      eval_step, state, batch, advance=False, warmup=warmup, repeats=repeats)
  _, _, eval_corrupted_s = shared.time_calls(
      eval_step, state, corrupted, advance=False, warmup=warmup, repeats=repeats)
  train_gflop, _ = shared.step_cost(train_step, state, batch)
  eval_gflop, _ = shared.step_cost(eval_step, state, batch)
  # The data-dependent part of the count: which samples the views run on in each step (one draw
  # of the train-time corruption with the loss's key 3; the evaluation-mode flags on the eval
  # batches).
  train_batch = corruption(jax.random.key(2), batch)
  spec = TaskSpec.from_dataset(dataset)
  _, network = emmr.make_models(config.model, spec)
  availability = lambda b: np.asarray(b.present)
  train_flags = step_flags(network, state.params, train_batch, config.model, jax.random.key(3))
  eval_flags = {name: step_flags(network, state.params, b, config.model, None)
                for name, b in (("clean", batch), ("corrupted", corrupted))}
  eval_present = {"clean": availability(batch), "corrupted": availability(corrupted)}
  members = len(emmr.parse_members(config.model.members))
  chunk = config.model.row_chunk
  body = lambda train: functools.cache(
      lambda n, full, loo: row_chunk_gflop(config.model, spec, state.params, n, train, full, loo))
  semantic = lambda_semantic > 0
  train_body, eval_body = body(True), body(False)
  loo_body = {train: loo_rows_chunk_gflop(config.model, spec, state.params, chunk, train)
              for train in (True, False)}
  decoder_gflop = decoder_chunk_gflop(config.model, spec, state.params, chunk)
  eval_model_scans = model_scans(config.model, spec, state.params, batch_size, False)
  return dict(
      case=case.upper(), hidden=hidden, params=count(state.params["emmr"]),
      lambda_semantic=lambda_semantic, pretrained_params=count(state.params["pretrained"]),
      # The train step's backward loss reads TF's decoder everywhere (use_backward): no scan.
      train_gflop=executed_gflop(train_gflop, chunk_scans(
          availability(train_batch), train_flags, chunk, train_body, loo_body[True], members,
          semantic) + [
              (chunks_run(np.asarray(emmr.changed_rows(train_batch))[None], chunk),
               encode_chunk_gflop(config.model, spec, state.params, clean, chunk))]
          + model_scans(config.model, spec, state.params, batch_size, True)),
      eval_gflop={name: executed_gflop(eval_gflop, chunk_scans(
          eval_present[name], flags, chunk, eval_body, loo_body[False], members, False,
          decoder_gflop)
                                       + eval_model_scans)
                  for name, flags in eval_flags.items()},
      compiled_gflop=(train_gflop, eval_gflop),
      missing=float(np.mean(~availability(train_batch).all(-1))),
      flagged=float(np.mean(train_flags)),
      train_first_s=train_first, train_step_s=train_s, eval_first_s=eval_first,
      eval_step_s=eval_s, eval_corrupted_s=eval_corrupted_s)


def markdown_table(results: Sequence[dict[str, Any]], machine: dict[str, Any], batch_size: int,
                   warmup: int, repeats: int, load: tuple[float, float]) -> str:
  lines = ["| ensemble | λ_sem | d | params (EMMR) | params (pre-trained, frozen) | train GFLOP "
           "(XLA count) | train first call s | train ms/step | eval GFLOP clean / drop_one 0.5 "
           "(XLA count) | eval first call s | eval ms/step clean / drop_one 0.5 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    compiled_train, compiled_eval = r["compiled_gflop"]
    lines.append(
        f"| {r['case']} | {r['lambda_semantic']:g} | {r['hidden']} | {r['params']:,} "
        f"| {r['pretrained_params']:,} | {r['train_gflop']:.2f} ({compiled_train:.2f}) "
        f"| {r['train_first_s']:.2f} | {1e3 * r['train_step_s']:.1f} "
        f"| {r['eval_gflop']['clean']:.2f} / {r['eval_gflop']['corrupted']:.2f} "
        f"({compiled_eval:.2f}) | {r['eval_first_s']:.2f} "
        f"| {1e3 * r['eval_step_s']:.1f} / {1e3 * r['eval_corrupted_s']:.1f} |")
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
    for lambda_semantic in _LAMBDA_SEMANTIC.value:
      result = time_case(case, _HIDDEN.value, _BATCH_SIZE.value, _WARMUP.value, _REPEATS.value,
                         float(lambda_semantic))
      sys.stderr.write(f"# {result}\n")
      results.append(result)
  table = markdown_table(results, shared.machine_info(), _BATCH_SIZE.value, _WARMUP.value,
                         _REPEATS.value, (load_before, os.getloadavg()[0]))
  shared.write_table(table)


if __name__ == "__main__":
  app.run(main)
