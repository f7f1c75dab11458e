"""Robustness protocols as sweeps: corrupt the test split level by level and measure the paper metrics.

The protocols and their levels are the table of :mod:`mmjax.data.protocols` (re-exported here:
:class:`Protocol`, :func:`protocols`, :func:`select`, :func:`level_name`).

Corruption is applied to the (standardised) test features with a key derived from the seed, the
protocol and the level, so every method sees the same corrupted samples for a given seed.

:func:`sweep` corrupts only the test split of a trained model — trained on clean data, or with the
train-time corruption of ``config.train_corruption`` (:mod:`mmjax.data.train_corruption`), which
the fair comparisons give every method alike. :func:`matched_sweep` is SAM-LML's protocol (App.
A.5: "the same missing rate configuration is applied across the training, validation, and test
phases"): one model per level, trained with ``config.train_corruption = "<protocol>:<level>"``
(:func:`matched_corruption`: every training batch corrupted at that level, fresh draws per step)
and selected on a validation split corrupted at that level, then tested at that level.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mmjax import data as data_lib
from mmjax.data.protocols import Protocol, level_name, protocols, select

__all__ = ["Protocol", "protocols", "select", "level_name", "sweep", "corrupt",
           "matched_corruption", "matched_sweep", "aggregate", "markdown_table", "plot_curves"]

# The metric plotted and shown first for each task.
# Keyed by Dataset.scoring (mmjax.data.SCORINGS).
HEADLINE = {"regression": ("mae", "acc2_non0", "f1_non0", "acc7", "corr"),
            "sims_regression": ("mae", "acc2", "f1", "acc3", "acc5", "corr"),
            "classification": ("accuracy", "macro_f1")}


# Pseudo-level holding, for numeric sweeps, each metric averaged over all levels (per seed).
MEAN_LEVEL = "mean"


def sweep(
    predict_fn: Callable[[data_lib.Batch], np.ndarray],
    split: data_lib.Batch,
    scoring: str,
    chosen: Sequence[Protocol],
    key: jax.Array,
    metrics_fn: Callable[[np.ndarray, np.ndarray, str], dict[str, float]],
) -> dict[str, dict[str, dict[str, float]]]:
  """``{protocol: {level: metrics}}`` of ``predict_fn`` on corrupted copies of ``split``.

  ``scoring`` (``Dataset.scoring``) is passed to ``metrics_fn``. Each sweep also gets a ``"mean"``
  entry: every metric averaged over ``Protocol.averaged_levels`` (equal weights; for
  ``fixed_subsets`` the incomplete subsets), so that the mean ± std over seeds of :func:`aggregate`
  is taken over per-seed averages.
  """
  labels = np.asarray(split.label)
  results: dict[str, dict[str, dict[str, float]]] = {}
  for protocol in chosen:
    results[protocol.name] = {
        level_name(level): metrics_fn(predict_fn(corrupt(split, protocol, level, key)), labels,
                                      scoring)
        for level in protocol.levels}
    _add_mean(results[protocol.name], protocol)
  return results


def corrupt(split: data_lib.Batch, protocol: Protocol, level: Any, key: jax.Array,
            purpose: str = "test") -> data_lib.Batch:
  """``split`` corrupted by ``protocol`` at ``level``, with a key from ``key``, the protocol, the
  level and ``purpose`` (``"test"`` is the key :func:`sweep` uses)."""
  name = protocol.name if purpose == "test" else f"{purpose}/{protocol.name}"
  level_key = jax.random.fold_in(jax.random.fold_in(key, _stable_hash(name)),
                                 _stable_hash(level_name(level)))
  return jax.tree.map(np.asarray, protocol.apply(level_key, split, level))


def matched_corruption(protocol: Protocol, level: Any) -> str:
  """The ``config.train_corruption`` of SAM-LML's matched protocol: ``protocol`` at a constant
  ``level`` on every training sample (fresh draws every step, from the step key)."""
  return f"{protocol.name}:{level_name(level)}"


def matched_sweep(
    fit_level: Callable[[Any, data_lib.Dataset], Callable[[data_lib.Batch], np.ndarray]],
    dataset: data_lib.Dataset,
    protocol: Protocol,
    key: jax.Array,
    metrics_fn: Callable[[np.ndarray, np.ndarray, str], dict[str, float]],
    *,
    at_input: bool = True,
) -> dict[str, dict[str, float]]:
  """``{level: metrics}`` (+ ``"mean"``) of SAM-LML's train = valid = test protocol.

  Args:
    fit_level: ``fit_level(level, dataset) -> predict_fn`` trains on ``dataset`` (whose valid split
      is already corrupted at ``level``) with ``config.train_corruption =
      matched_corruption(protocol, level)`` and returns its predictor.
    dataset: the clean dataset.
    protocol: a numeric protocol.
    key: the seed's key; the test corruption equals :func:`sweep`'s for the same key.
    metrics_fn: ``(predictions, labels, scoring) -> metrics`` (``scoring = dataset.scoring``).
    at_input: ``False`` when the model itself adds the noise at ``level`` (SAM-LML's
      representation-level noise, eq. 35): the valid and test splits are then passed clean.
  """
  if not protocol.numeric:
    raise ValueError(f"--matched: {protocol.name!r} has no numeric levels to train at")
  test = dataset.splits["test"]
  results = {}
  for level in protocol.levels:
    valid = dataset.splits["valid"]
    if at_input:
      valid = corrupt(valid, protocol, level, key, purpose="valid")
    predict_fn = fit_level(level, dataclasses.replace(
        dataset, splits={**dataset.splits, "valid": valid}))
    test_input = corrupt(test, protocol, level, key) if at_input else test
    results[level_name(level)] = metrics_fn(
        predict_fn(test_input), np.asarray(test.label), dataset.scoring)
  _add_mean(results, protocol)
  return results


def _add_mean(results: dict[str, dict[str, float]], protocol: Protocol) -> None:
  """Adds the ``"mean"`` pseudo-level: every metric averaged over ``protocol.averaged_levels``
  (all rates; for ``fixed_subsets`` the incomplete subsets, as EASE Table 3)."""
  levels = [results[level_name(level)] for level in protocol.averaged_levels]
  if levels:
    results[MEAN_LEVEL] = {m: float(np.mean([r[m] for r in levels])) for m in levels[0]}


def aggregate(per_seed: list[dict[str, dict[str, dict[str, float]]]]
              ) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
  """Mean and (population) std over seeds of every metric: ``{protocol: {level: {m: (mean, std)}}}``."""
  out: dict[str, Any] = {}
  for protocol, levels in per_seed[0].items():
    out[protocol] = {}
    for level, metrics in levels.items():
      out[protocol][level] = {
          m: (float(np.mean(v := [r[protocol][level][m] for r in per_seed])), float(np.std(v)))
          for m in metrics}
  return out


def gain_table(summary: dict[str, dict[str, Any]], scoring: str, reference: str = "concat"
               ) -> str:
  """What each method buys over ``reference``: per protocol, the headline metric clean (level 0,
  or the full modality set) and averaged over the levels (``"mean"``), mean ± std over seeds, and
  the difference of the means to ``reference`` (higher is better for every metric but MAE).
  ``""`` without ``reference``.
  """
  if reference not in summary:
    return ""
  metric = HEADLINE[scoring][0]
  percent = metric not in ("mae", "corr")
  scale = 100.0 if percent else 1.0
  better = "lower" if metric == "mae" else "higher"
  lines = [f"### {metric}: clean and mean over levels, Δ = difference to {reference} "
           f"({better} is better)", "",
           "| protocol | method | clean | Δ clean | mean over levels | Δ mean |",
           "| --- | --- | --- | --- | --- | --- |"]
  ref = summary[reference]
  for protocol, levels in ref.items():
    if MEAN_LEVEL not in levels:
      continue
    clean = _clean_level_name(levels)
    for method, result in summary.items():
      cells = []
      for level in (clean, MEAN_LEVEL):
        mean, std = result[protocol][level][metric]
        delta = scale * (mean - ref[protocol][level][metric][0])
        cells += [_pm(mean, std, percent=percent), f"{delta:+.2f}" if percent else f"{delta:+.3f}"]
      lines.append(f"| {protocol} | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines + [""])


def _clean_level_name(levels: Sequence[str]) -> str:
  """The uncorrupted level among a sweep's level names: the first numeric one ("0"), or the
  largest modality subset ("text+audio+vision")."""
  names = [name for name in levels if name != MEAN_LEVEL]
  try:
    float(names[0])
    return names[0]
  except ValueError:
    return max(names, key=lambda name: len(name.split("+")))


def markdown_table(summary: dict[str, dict[str, Any]], scoring: str) -> str:
  """One table per protocol: rows = levels x methods, columns = headline metrics (mean ± std)."""
  metrics = HEADLINE[scoring]
  lines = []
  protocol_names = next(iter(summary.values())).keys()
  for protocol in protocol_names:
    lines += [f"### {protocol}", "", "| level | method | " + " | ".join(metrics) + " |",
              "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    levels = next(iter(summary.values()))[protocol].keys()
    for level in levels:
      for method, result in summary.items():
        cells = [_pm(*result[protocol][level][m], percent=m != "mae" and m != "corr")
                 for m in metrics]
        lines.append(f"| {level} | {method} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_curves(summary: dict[str, dict[str, Any]], chosen: Sequence[Protocol], scoring: str,
                directory: str) -> list[str]:
  """One PNG per protocol with numeric levels: headline metric vs level, one line per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = HEADLINE[scoring][0]
  paths = []
  for protocol in chosen:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [level_name(level) for level in protocol.levels]
    numeric = protocol.numeric
    x = np.asarray(protocol.levels, float) if numeric else np.arange(len(names))
    for method, result in summary.items():
      mean = np.array([result[protocol.name][n][metric][0] for n in names])
      std = np.array([result[protocol.name][n][metric][1] for n in names])
      ax.plot(x, mean, marker="o", label=method)
      ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if not numeric:
      ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_xlabel(protocol.axis)
    ax.set_ylabel(metric)
    ax.set_title(protocol.name)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(directory, f"{protocol.name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def _pm(mean: float, std: float, *, percent: bool) -> str:
  scale = 100.0 if percent else 1.0
  return f"{scale * mean:.2f} ± {scale * std:.2f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _stable_hash(text: str) -> int:
  return zlib.crc32(text.encode()) & 0x7FFFFFFF
