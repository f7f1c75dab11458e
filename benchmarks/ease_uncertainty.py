"""EASE uncertainty check (§4.5): KS distance of the standardised imputation residuals to N(0, 1).

For each training seed the EASE model of ``--workdir/ease/seed<s>`` is loaded (trained first if that
run has not finished: same config and ``--resume`` semantics as ``experiments.robustness``, so point
``--workdir`` at a robustness workdir to reuse its models). On the test split, modalities are
dropped with :func:`mmjax.data.drop_modalities` at each ``--missing_rates`` level (key
``fold_in(PRNGKey(2000 + seed), round(1000 * rate))``), and the residuals
``r = (z_gt - mu) / sigma`` of every (valid sample, missing modality) pair and every feature
dimension (:func:`mmjax.methods.ease.imputation_residuals`) are pooled into one KS distance
(:func:`mmjax.stats.ks_distance_to_standard_normal`). The Markdown table (mean ± population std over
seeds of KS, mean and std of ``r``; number of pairs per seed) is printed and written to
``--output``.
As a reference it also gives the KS distance of the same errors scaled by one oracle constant per
(target modality, dimension) — their RMS over the pairs — instead of the predicted ``sigma``: if the
two are close, the per-sample variances add little beyond a calibrated scale.

  python benchmarks/ease_uncertainty.py --workdir=/tmp/ease_syn --seeds=3 --config.num_epochs=8
  python benchmarks/ease_uncertainty.py \
      --config=experiments/configs/default.py:ease,multiview:../shared/data/handwritten_6views.mat \
      --workdir=/tmp/ease_hw --seeds=3 --config.num_epochs=30
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import data as data_lib
from mmjax import experiment, methods
from mmjax.methods import ease
from mmjax.stats import ks_distance_to_standard_normal

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs",
                           "default.py:ease"),
    "Experiment config; its method must be ease.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Runs are read from / written to <workdir>/ease/seed<s>.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds 0 .. seeds-1.", lower_bound=1)
_RATES = flags.DEFINE_list("missing_rates", ["0.3", "0.7"], "drop_modalities missing rates.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table to this file.")


def residual_stats(params, split: data_lib.Batch, config, spec: methods.TaskSpec, rate: float,
                   key: jax.Array) -> dict[str, float]:
  """KS distance, mean and std of the pooled residuals of ``split`` after dropping at ``rate``."""
  batch = data_lib.drop_modalities(key, split, rate)
  moments = ease.imputation_moments(params, batch, config, spec)
  z_gt, mu, var, pairs = (np.asarray(x) for x in moments)
  error, var = (z_gt - mu)[pairs], var[pairs]  # [P, d]
  r = error / np.sqrt(var)
  # Reference: one oracle scale per (target modality, dimension), the RMS error of these pairs.
  target = np.broadcast_to(np.arange(pairs.shape[1]), pairs.shape)[pairs]  # [P]
  rms = np.stack([np.sqrt(np.mean(np.square(error[target == m]), 0)) if np.any(target == m)
                  else np.ones(error.shape[1]) for m in range(pairs.shape[1])])  # [M, d]
  return dict(ks=ks_distance_to_standard_normal(r), mean=float(r.mean()), std=float(r.std()),
              ks_const=ks_distance_to_standard_normal(error / rms[target]),
              pairs=int(r.shape[0]))


def markdown_table(name: str, rows: dict[float, list[dict[str, float]]]) -> str:
  lines = [f"KS distance of r = (z_gt - mu) / sigma to N(0, 1) on the {name} test split "
           f"(mean ± std over {len(next(iter(rows.values())))} seeds)", "",
           "| missing rate | KS | mean r | std r | KS, constant oracle sigma | pairs / seed |",
           "| ---: | ---: | ---: | ---: | ---: | ---: |"]
  for rate, per_seed in rows.items():
    cells = [f"{np.mean(v := [s[k] for s in per_seed]):.3f} ± {np.std(v):.3f}"
             for k in ("ks", "mean", "std", "ks_const")]
    lines.append(f"| {rate:g} | " + " | ".join(cells)
                 + f" | {np.mean([s['pairs'] for s in per_seed]):.0f} |")
  return "\n".join(lines) + "\n"


def _rates(values: Sequence[str]) -> list[float]:
  try:
    rates = [float(v) for v in values]
  except ValueError:
    raise app.UsageError(
        f"--missing_rates: expected comma-separated floats, got {values}") from None
  if not all(0.0 < r <= 1.0 for r in rates):
    raise app.UsageError(f"--missing_rates: every rate must be in (0, 1], got {rates}")
  return rates


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.method != "ease":
    raise app.UsageError(f"--config: method must be ease, got {config.method!r}")
  rates = _rates(_RATES.value)
  dataset = experiment.exit_on_bad_input(experiment.load_data)(config)
  spec = methods.TaskSpec.from_dataset(dataset)
  rows: dict[float, list[dict[str, float]]] = {r: [] for r in rates}
  for seed in range(_SEEDS.value):
    config.seed = seed
    workdir = os.path.join(_WORKDIR.value, "ease", f"seed{seed}")
    _, _, result = experiment.train(config, workdir, resume=True, dataset=dataset,
                                    log=lambda line, s=seed: print(f"[ease s{s}] {line}"))
    for rate in rates:
      key = jax.random.fold_in(jax.random.PRNGKey(2000 + seed), round(1000 * rate))
      rows[rate].append(residual_stats(result.state.params, dataset.splits["test"], config.model,
                                       spec, rate, key))
  table = markdown_table(dataset.name, rows)
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
