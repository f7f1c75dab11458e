"""EASE uncertainty check (§4.5, Fig. 4): are the imputation variances calibrated and informative?

For each training seed the EASE model of ``--workdir/ease/seed<s>`` is loaded (trained first if that
run has not finished: same config and ``--resume`` semantics as ``experiments.robustness``, so point
``--workdir`` at a robustness workdir to reuse its models). At each ``--missing_rates`` level,
modalities are dropped with :func:`mmjax.data.drop_modalities` on the test split (key
``k = fold_in(PRNGKey(2000 + seed), round(1000 * rate))``) and, for the constant reference below, on
the train split (same rate, key ``fold_in(k, 1)``). :func:`mmjax.methods.ease.imputation_moments`
gives ``z_gt, mu, var`` for every (valid sample, missing modality) pair; ``error = z_gt - mu`` and
``r = error / sigma`` per feature dimension. The Markdown table (printed and written to
``--output``) gives, per missing rate, mean ± population std over seeds of:

* ``KS``: KS distance of all test residuals ``r`` (every pair and dimension pooled) to ``N(0, 1)``
  (:func:`mmjax.stats.ks_distance_to_standard_normal`; the paper reports 0.076 / 0.083).
* ``KS <modality>``: the same for the test pairs whose *target* (missing) modality is that one,
  named by ``spec.modalities`` (the paper's Fig. 4 is per modality: acoustic, visual); NaN when a
  seed has no such pair.
* ``mean r``, ``std r``: of the pooled test residuals (0 and 1 when calibrated).
* ``KS, train-const σ``: KS of the test errors divided by ``sqrt(c[m, j])``, where ``c`` is one
  variance per (target modality ``m``, dimension ``j``) fitted on the TRAIN pairs
  (:func:`mmjax.stats.fit_constant_variance`: their mean squared error). This replaces the earlier
  "oracle" reference, whose RMS was computed on the same test pairs it was scored on.
* ``NLL``: held-out mean Gaussian negative log-likelihood per (pair, dimension), in nats, of the
  predicted ``N(mu, var)`` on the test pairs (:func:`mmjax.stats.gaussian_nll_per_dim`).
* ``NLL, train-const σ²``: the same ``mu`` with the train-fitted constant variance ``c``.
* ``ΔNLL``: ``NLL - NLL, train-const σ²`` per seed (then mean ± std). Both use the same ``mu``, so
  only the variances differ; the NLL is a proper score, so a negative ΔNLL means the per-sample
  variances carry information beyond each modality's error scale, which a KS distance cannot show
  (a constant σ can reach as low a KS). Both variances are fitted on the train split (the constant
  after training, ``var`` during it), so both face the same train-to-test shift of the errors.
* ``pairs / seed``: number of test pairs.

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
from mmjax.stats import (fit_constant_variance, gaussian_nll_per_dim,
                         ks_distance_to_standard_normal)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs",
                           "default.py:ease"),
    "Experiment config; its method must be ease.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Runs are read from / written to <workdir>/ease/seed<s>.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds 0 .. seeds-1.", lower_bound=1)
_RATES = flags.DEFINE_list("missing_rates", ["0.3", "0.7"], "drop_modalities missing rates.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table to this file.")


def pair_errors(params, split: data_lib.Batch, config, spec: methods.TaskSpec, rate: float,
                key: jax.Array, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Imputation errors of ``split`` after dropping modalities at ``rate`` with ``key``.

  The drop is done on the whole split, the evaluation pass in chunks of ``chunk`` rows (padding
  rows are not pairs).

  Returns:
    ``error = z_gt - mu`` and ``var``, ``[P, d]``, and ``target [P]`` (the missing modality) of the
    ``P`` (valid sample, missing modality) pairs, in the row-major order of ``pairs [B, M]``.
  """
  batch = data_lib.drop_modalities(key, split, rate)
  errors, variances, targets = [], [], []
  for part in data_lib.iterate_batches(batch, min(chunk, split.batch_size)):
    z_gt, mu, var, pairs = (np.asarray(x) for x in ease.imputation_moments(params, part, config,
                                                                           spec))
    errors.append((z_gt - mu)[pairs])
    variances.append(var[pairs])
    targets.append(np.nonzero(pairs)[1])
  return np.concatenate(errors), np.concatenate(variances), np.concatenate(targets)


def rate_stats(params, train: data_lib.Batch, test: data_lib.Batch, config,
               spec: methods.TaskSpec, rate: float, key: jax.Array) -> dict[str, float]:
  """The table's columns for one seed and missing rate (see the module docstring).

  ``key`` drops modalities on ``test``; ``fold_in(key, 1)`` on ``train``, whose pairs fit the
  constant variance.
  """
  num_mod = len(spec.modalities)
  train_error, _, train_target = pair_errors(params, train, config, spec, rate,
                                             jax.random.fold_in(key, 1))
  const = fit_constant_variance(train_error, train_target, num_mod)  # [M, d]
  error, var, target = pair_errors(params, test, config, spec, rate, key)
  unfitted = [spec.modalities[m] for m in np.unique(target) if np.isnan(const[m]).any()]
  if unfitted:
    raise ValueError(f"missing rate {rate:g}: no train pair has target modality {unfitted}, so "
                     "its constant variance cannot be fitted")
  const_var = const[target]  # [P, d]
  r = error / np.sqrt(var)
  stats = dict(ks=ks_distance_to_standard_normal(r))
  for m, name in enumerate(spec.modalities):
    stats[f"ks {name}"] = (ks_distance_to_standard_normal(r[target == m]) if np.any(target == m)
                           else float("nan"))
  stats.update(mean=float(r.mean()), std=float(r.std()),
               ks_const=ks_distance_to_standard_normal(error / np.sqrt(const_var)),
               nll=gaussian_nll_per_dim(error, var),
               nll_const=gaussian_nll_per_dim(error, const_var))
  stats.update(delta_nll=stats["nll"] - stats["nll_const"], pairs=int(r.shape[0]))
  return stats


def markdown_table(name: str, modalities: Sequence[str],
                   rows: dict[float, list[dict[str, float]]]) -> str:
  columns = {"ks": "KS", **{f"ks {m}": f"KS {m}" for m in modalities}, "mean": "mean r",
             "std": "std r", "ks_const": "KS, train-const σ", "nll": "NLL",
             "nll_const": "NLL, train-const σ²", "delta_nll": "ΔNLL"}
  lines = [f"EASE imputation uncertainty on the {name} test split, r = (z_gt - mu) / sigma "
           f"(mean ± std over {len(next(iter(rows.values())))} seeds). KS: distance to N(0, 1), "
           "pooled and per target modality. NLL: mean Gaussian NLL per (pair, dimension) in nats; "
           "train-const: one variance per (modality, dimension) fitted on the train split. "
           "ΔNLL = NLL - NLL, train-const σ² (< 0: per-sample variances are informative).", "",
           "| missing rate | " + " | ".join(columns.values()) + " | pairs / seed |",
           "| ---: " * (len(columns) + 2) + "|"]
  for rate, per_seed in rows.items():
    cells = [f"{np.mean(v := [s[k] for s in per_seed]):.3f} ± {np.std(v):.3f}" for k in columns]
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
      rows[rate].append(rate_stats(result.state.params, dataset.splits["train"],
                                   dataset.splits["test"], config.model, spec, rate, key))
  table = markdown_table(dataset.name, spec.modalities, rows)
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
