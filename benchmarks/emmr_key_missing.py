"""How often EMMR's inconsistency check fires (papers/002 §3.6, eq. 13) under ``drop_one_modality``.

For each training seed the EMMR model of ``--workdir/emmr/seed<s>`` is loaded (trained first if that
run has not finished: same config and ``--resume`` semantics as ``experiments.robustness``, so point
``--workdir`` and ``--config`` at a robustness run to reuse its models). The test split is corrupted
at every level of the ``drop_one`` protocol with the keys :func:`mmjax.robustness.sweep` uses (so
the samples are the ones of the robustness table), and :func:`mmjax.methods.emmr.diagnostics`
gives per sample: whether a modality is missing, whether it is flagged key-missing, whether the
prediction is right. The Markdown table (mean ± population std over seeds; "–" where a column has
no sample) has, per ratio: the fraction of test samples with a missing modality, the fraction
flagged key-missing, the flagged share of the samples with a missing modality, the accuracy on the
flagged and on the other samples with a missing modality, and TF's reconstruction error of the
dropped segments (symmetric KL, mean over those samples).

A second table asks whether the flag is *right*, per missing modality ``k`` (samples of every ratio
> 0 pooled): the truth is a real disagreement on the clean copy, i.e. whether the same model's TF
views disagree on the complete sample (``argmax L_full != argmax L_{-k}``, all modalities
present). Columns: samples missing ``k``; flagged share; agreement of the flag with the truth;
precision and recall of the flag; and on the flagged samples the accuracy of each branch of eq. 13
(``backbone``: the head on ``F``; ``ensemble``: the head on the ensemble's ``r``; the model uses
the ensemble there). At ratio 0 no sample is flagged, so the model *is* its TF backbone.

A third table gives each member's reconstruction error of the dropped segments (eq. 16's symmetric KL
against the clean copy's ``X^full``, mean over the dropped steps, ratios > 0 pooled) next to the best
constant imputer: the train split's per-step mean of ``X^full``.

  python benchmarks/emmr_key_missing.py \\
      --config=experiments/configs/default.py:emmr,synthetic:classification \\
      --workdir=/tmp/emmr_syn --seeds=3 --config.num_epochs=8
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import data as data_lib
from mmjax import experiment, methods, robustness
from mmjax.losses import symmetric_kl
from mmjax.methods import emmr

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs",
                           "default.py:emmr,synthetic:classification"),
    "Experiment config; its method must be emmr.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Runs are read from / written to <workdir>/emmr/seed<s>.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds 0 .. seeds-1.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table to this file.")

COLUMNS = (("missing", "with a missing modality"), ("flagged", "flagged key-missing"),
           ("flagged_share", "flagged / with a missing modality"),
           ("acc_flagged", "accuracy, flagged"), ("acc_unflagged", "accuracy, missing not flagged"),
           ("recovery_tf", "TF reconstruction error"))


def per_sample(diagnose, params, split: data_lib.Batch) -> np.ndarray:
  """``[N, 4]``: has a missing modality, flagged, correct, TF's reconstruction error.

  ``diagnose(params, batch)`` is :func:`mmjax.methods.emmr.diagnostics` for the model's config.
  """
  out = diagnose(params, split)
  present = np.asarray(split.present)
  correct = np.asarray(out["logits"]).argmax(-1) == np.asarray(split.label)
  return np.stack([~present.all(-1), np.asarray(out["key_missing"]), correct,
                   np.asarray(out["recovery_error"])[0]], axis=-1).astype(np.float64)


MODALITY_COLUMNS = (("n", "samples missing it"), ("flagged", "flagged"),
                    ("agreement", "flag = clean-copy disagreement"), ("precision", "precision"),
                    ("recall", "recall"), ("acc_backbone", "accuracy flagged, backbone"),
                    ("acc_ensemble", "accuracy flagged, ensemble"))


def pooled_rows(diagnose, params, test: data_lib.Batch, protocol, key, modalities
                ) -> dict[str, dict[str, float]]:
  """:func:`mmjax.methods.emmr.key_missing_by_modality` over the ``drop_one`` levels > 0 (test corrupted as in the sweep),
  the samples of every level pooled."""
  truth = emmr.clean_disagreement(diagnose(params, test))
  outs, presents = [], []
  for level in protocol.levels:
    if level == 0:
      continue
    split = robustness.corrupt(test, protocol, level, key)
    outs.append({k: np.asarray(v) for k, v in diagnose(params, split).items()
                 if k in ("key_missing", "backbone_logits", "ensemble_logits", "logits")})
    presents.append(np.asarray(split.present))
  count = len(outs)
  pooled = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  return emmr.key_missing_by_modality(pooled, np.concatenate(presents), np.tile(np.asarray(test.label), count),
                      np.tile(truth, (count, 1)), modalities)


def reconstruction_row(diagnose, params, train: data_lib.Batch, test: data_lib.Batch, protocol,
                       key, members: Sequence[str]) -> dict[str, float]:
  """``{member: error, "constant": error}`` on the dropped steps of the corrupted test splits."""
  constant = np.asarray(diagnose(params, train)["x_full"]).mean(0)  # [T, d]
  errors = {e: [] for e in (*members, "constant")}
  for level in protocol.levels:
    if level == 0:
      continue
    split = robustness.corrupt(test, protocol, level, key)
    out = diagnose(params, split)
    segment = np.repeat(np.arange(len(split.modalities)),
                        [split.step_mask[m].shape[1] for m in split.modalities])
    real = np.concatenate([np.asarray(split.step_mask[m]) for m in split.modalities], 1)
    dropped = real & ~np.asarray(split.present)[:, segment]
    target = np.asarray(out["x_full"], np.float64)
    decoded = {e: np.asarray(out["decoded"][i], np.float64) for i, e in enumerate(members)}
    decoded["constant"] = np.broadcast_to(constant, target.shape)
    for e, d in decoded.items():
      errors[e].append(np.asarray(symmetric_kl(d, target))[dropped])
  return {e: float(np.concatenate(v).mean()) for e, v in errors.items()}


def reconstruction_table(rows_per_seed: list[dict[str, float]]) -> str:
  names = list(rows_per_seed[0])
  lines = ["Reconstruction error of the dropped segments (symmetric KL to X^full, ratios 0.1-0.5 "
           f"pooled; mean ± std over {len(rows_per_seed)} seeds)", "",
           "| " + " | ".join(names) + " |", "| " + " | ".join("---:" for _ in names) + " |"]
  values = [np.array([rows[n] for rows in rows_per_seed]) for n in names]
  lines.append("| " + " | ".join(f"{v.mean():.3f} ± {v.std():.3f}" for v in values) + " |")
  return "\n".join(lines) + "\n"


def modality_table(rows_per_seed: list[dict[str, dict[str, float]]]) -> str:
  lines = ["Is the flag right? Per missing modality, samples of ratios 0.1-0.5 pooled "
           f"(mean ± std over {len(rows_per_seed)} seeds)", "",
           "| missing modality | " + " | ".join(title for _, title in MODALITY_COLUMNS) + " |",
           "| --- | " + " | ".join("---:" for _ in MODALITY_COLUMNS) + " |"]
  for m in rows_per_seed[0]:
    cells = []
    for k, _ in MODALITY_COLUMNS:
      values = np.array([rows[m][k] for rows in rows_per_seed])
      values = values[~np.isnan(values)]
      cells.append("–" if not values.size else
                   (f"{values.mean():.0f}" if k == "n" else f"{values.mean():.3f} ± {values.std():.3f}"))
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def fractions(rows: np.ndarray, labels: np.ndarray, scoring: str) -> dict[str, float]:
  """The table's columns from :func:`per_sample` rows (``metrics_fn`` of ``robustness.sweep``)."""
  del labels, scoring
  missing, flagged, correct, error = (rows[:, i] for i in range(4))
  mean_where = lambda x, where: float(x[where].mean()) if where.any() else float("nan")
  missing, flagged = missing.astype(bool), flagged.astype(bool)
  return dict(missing=float(missing.mean()), flagged=float(flagged.mean()),
              flagged_share=mean_where(flagged, missing), acc_flagged=mean_where(correct, flagged),
              acc_unflagged=mean_where(correct, missing & ~flagged),
              recovery_tf=mean_where(error, missing))


def markdown_table(name: str, summary: dict[str, dict[str, tuple[float, float]]],
                   seeds: int) -> str:
  lines = [f"EMMR key-missing check on the {name} test split under drop_one_modality "
           f"(mean ± std over {seeds} seeds)", "",
           "| missing ratio | " + " | ".join(title for _, title in COLUMNS) + " |",
           "| ---: | " + " | ".join("---:" for _ in COLUMNS) + " |"]
  for level, values in summary.items():
    if level == robustness.MEAN_LEVEL:
      continue
    cells = ["–" if np.isnan(values[k][0]) else f"{values[k][0]:.3f} ± {values[k][1]:.3f}"
             for k, _ in COLUMNS]
    lines.append(f"| {level} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.method != "emmr":
    raise app.UsageError(f"--config: method must be emmr, got {config.method!r}")
  dataset = experiment.exit_on_bad_input(experiment.load_data)(config)
  spec = methods.TaskSpec.from_dataset(dataset)
  protocol = robustness.protocols(dataset.modalities)["drop_one"]
  diagnose = jax.jit(functools.partial(emmr.diagnostics, config=config.model, spec=spec))
  runs, modality_rows, reconstruction_rows = [], [], []
  members = emmr.parse_members(config.model.members)
  for seed in range(_SEEDS.value):
    config.seed = seed
    workdir = os.path.join(_WORKDIR.value, "emmr", f"seed{seed}")
    _, _, result = experiment.train(config, workdir, resume=True, dataset=dataset,
                                    log=lambda line, s=seed: print(f"[emmr s{s}] {line}"))
    predict_fn = functools.partial(per_sample, diagnose, result.state.params)
    key = jax.random.PRNGKey(1000 + seed)
    runs.append(robustness.sweep(predict_fn, dataset.splits["test"], dataset.scoring, [protocol],
                                 key, fractions))
    modality_rows.append(pooled_rows(diagnose, result.state.params, dataset.splits["test"],
                                     protocol, key, dataset.modalities))
    reconstruction_rows.append(reconstruction_row(
        diagnose, result.state.params, dataset.splits["train"], dataset.splits["test"], protocol,
        key, members))
  summary = robustness.aggregate(runs)["drop_one"]
  table = (markdown_table(dataset.name, summary, _SEEDS.value) + "\n"
           + modality_table(modality_rows) + "\n" + reconstruction_table(reconstruction_rows))
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
