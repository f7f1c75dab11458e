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
  runs = []
  for seed in range(_SEEDS.value):
    config.seed = seed
    workdir = os.path.join(_WORKDIR.value, "emmr", f"seed{seed}")
    _, _, result = experiment.train(config, workdir, resume=True, dataset=dataset,
                                    log=lambda line, s=seed: print(f"[emmr s{s}] {line}"))
    predict_fn = functools.partial(per_sample, diagnose, result.state.params)
    runs.append(robustness.sweep(predict_fn, dataset.splits["test"], dataset.scoring, [protocol],
                                 jax.random.PRNGKey(1000 + seed), fractions))
  summary = robustness.aggregate(runs)["drop_one"]
  table = markdown_table(dataset.name, summary, _SEEDS.value)
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
