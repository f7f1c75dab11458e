"""Robustness protocols as sweeps: corrupt the test split level by level and measure the paper metrics.

A :class:`Protocol` is one corruption function of :mod:`mmjax.data` and the levels the papers sweep:

===================  ========================================  ==========================
protocol             levels (default)                          source
===================  ========================================  ==========================
``missing_rate``     ``drop_modalities`` MR 0.0 ... 0.7        SAM-LML eq. 34, App. A.5
``fixed_subsets``    ``keep_modalities``: the 2^M - 1 subsets  EUAR Table 2, EASE Table 3
``drop_one``         ``drop_one_modality`` ratio 0.0 ... 0.5   EMMR Table 1
``time_mask``        ``mask_time_steps`` rate 0.0 ... 0.9      EASE §4.3
``gaussian``         ``gaussian_noise`` variance 0 ... 4       EUAR Table 3
``salt_pepper``      ``salt_pepper_noise`` amount 0 ... 0.4    EUAR Table 3
``mix``              ``mix_noise`` NR 0.0 ... 0.7              SAM-LML eq. 35
``laplace_erasing``  ``laplace_or_erasing`` NR 0.0 ... 0.7     SAM-LML App. A.14
===================  ========================================  ==========================

Corruption is applied to the (standardised) test features with a key derived from the seed, the
protocol and the level, so every method sees the same corrupted samples for a given seed.

:func:`sweep` corrupts only the test split of a model trained on clean data. :func:`matched_sweep`
is SAM-LML's protocol (App. A.5: "the same missing rate configuration is applied across the
training, validation, and test phases"): one model per level, trained with every training batch
corrupted at that level (:func:`matched_training`, a fresh key per step) and selected on a
validation split corrupted at that level, then tested at that level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mmjax import data as data_lib
from mmjax.methods import Method

NOISE_VARIANCES = (0.0, 0.5, 1.0, 2.0, 4.0)
SALT_PEPPER_AMOUNTS = (0.0, 0.05, 0.1, 0.2, 0.4)
RATES_07 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
RATES_09 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RATIOS_05 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)

# The metric plotted and shown first for each task.
HEADLINE = {"regression": ("mae", "acc2_non0", "f1_non0", "acc7", "corr"),
            "classification": ("accuracy", "macro_f1")}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """``apply(key, batch, level) -> batch`` swept over ``levels``; ``axis`` labels the plot."""

  name: str
  levels: tuple[Any, ...]
  apply: Callable[[jax.Array, data_lib.Batch, Any], data_lib.Batch]
  axis: str


def protocols(modalities: Sequence[str], noise_modalities: Sequence[str] | None = None
              ) -> dict[str, Protocol]:
  """Every sweep of the module table for data with ``modalities``; noise hits ``noise_modalities``
  (default: all)."""
  noisy = tuple(noise_modalities) if noise_modalities else None
  table = [
      Protocol("missing_rate", RATES_07, data_lib.drop_modalities, "missing rate"),
      Protocol("fixed_subsets", tuple(data_lib.modality_subsets(modalities)),
               lambda key, b, subset: data_lib.keep_modalities(b, subset), "available modalities"),
      Protocol("drop_one", RATIOS_05, data_lib.drop_one_modality, "missing ratio"),
      Protocol("time_mask", RATES_09, data_lib.mask_time_steps, "masked time-step rate"),
      Protocol("gaussian", NOISE_VARIANCES,
               lambda key, b, v: data_lib.gaussian_noise(key, b, v, noisy), "noise variance"),
      Protocol("salt_pepper", SALT_PEPPER_AMOUNTS,
               lambda key, b, a: data_lib.salt_pepper_noise(key, b, a, noisy), "corrupted fraction"),
      Protocol("mix", RATES_07, lambda key, b, r: data_lib.mix_noise(key, b, r, noisy), "noise rate"),
      Protocol("laplace_erasing", RATES_07,
               lambda key, b, r: data_lib.laplace_or_erasing(key, b, r, noisy), "noise rate"),
  ]
  return {p.name: p for p in table}


def select(names: Sequence[str], available: dict[str, Protocol]) -> list[Protocol]:
  unknown = [n for n in names if n not in available]
  if unknown:
    raise ValueError(f"protocols: unknown {unknown}; available: {sorted(available)}")
  return [available[n] for n in names]


def level_name(level: Any) -> str:
  return "+".join(level) if isinstance(level, tuple) else f"{level:g}"


# Pseudo-level holding, for numeric sweeps, each metric averaged over all levels (per seed).
MEAN_LEVEL = "mean"


def sweep(
    predict_fn: Callable[[data_lib.Batch], np.ndarray],
    split: data_lib.Batch,
    task: str,
    chosen: Sequence[Protocol],
    key: jax.Array,
    metrics_fn: Callable[[np.ndarray, np.ndarray, str], dict[str, float]],
) -> dict[str, dict[str, dict[str, float]]]:
  """``{protocol: {level: metrics}}`` of ``predict_fn`` on corrupted copies of ``split``.

  Numeric sweeps also get a ``"mean"`` entry: every metric averaged over the levels (equal weights),
  so that the mean ± std over seeds of :func:`aggregate` is taken over per-seed averages.
  """
  labels = np.asarray(split.label)
  results: dict[str, dict[str, dict[str, float]]] = {}
  for protocol in chosen:
    results[protocol.name] = {
        level_name(level): metrics_fn(predict_fn(corrupt(split, protocol, level, key)), labels,
                                      task)
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


def matched_training(method: Method, protocol: Protocol, level: Any) -> Method:
  """``method`` whose training losses (every stage's) see each batch corrupted by ``protocol`` at
  ``level``, with a key split from the step key; evaluation (``predict``, ``train=False``) is
  unchanged."""

  def wrap(loss):
    def corrupted_loss(params, state, batch, key, train):
      if train:
        key, corrupt_key = jax.random.split(key)
        batch = protocol.apply(corrupt_key, batch, level)
      return loss(params, state, batch, key, train)
    return corrupted_loss

  return dataclasses.replace(
      method, loss=wrap(method.loss),
      stages=tuple(dataclasses.replace(stage, loss=wrap(stage.loss)) for stage in method.stages))


def matched_sweep(
    fit_level: Callable[[Any, data_lib.Dataset], Callable[[data_lib.Batch], np.ndarray]],
    dataset: data_lib.Dataset,
    protocol: Protocol,
    key: jax.Array,
    metrics_fn: Callable[[np.ndarray, np.ndarray, str], dict[str, float]],
) -> dict[str, dict[str, float]]:
  """``{level: metrics}`` (+ ``"mean"``) of SAM-LML's train = valid = test protocol.

  Args:
    fit_level: ``fit_level(level, dataset) -> predict_fn`` trains on ``dataset`` (whose valid split
      is already corrupted at ``level``) with :func:`matched_training` and returns its predictor.
    dataset: the clean dataset.
    protocol: a numeric protocol.
    key: the seed's key; the test corruption equals :func:`sweep`'s for the same key.
    metrics_fn: ``(predictions, labels, task) -> metrics``.
  """
  if isinstance(protocol.levels[0], tuple):
    raise ValueError(f"--matched: {protocol.name!r} has no numeric levels to train at")
  test = dataset.splits["test"]
  results = {}
  for level in protocol.levels:
    valid = corrupt(dataset.splits["valid"], protocol, level, key, purpose="valid")
    predict_fn = fit_level(level, dataclasses.replace(
        dataset, splits={**dataset.splits, "valid": valid}))
    results[level_name(level)] = metrics_fn(
        predict_fn(corrupt(test, protocol, level, key)), np.asarray(test.label), dataset.task)
  _add_mean(results, protocol)
  return results


def _add_mean(results: dict[str, dict[str, float]], protocol: Protocol) -> None:
  """Adds the ``"mean"`` pseudo-level to a numeric sweep (EASE Table 1 averages over rates)."""
  if not isinstance(protocol.levels[0], tuple):
    levels = [results[level_name(level)] for level in protocol.levels]
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


def markdown_table(summary: dict[str, dict[str, Any]], task: str) -> str:
  """One table per protocol: rows = levels x methods, columns = headline metrics (mean ± std)."""
  metrics = HEADLINE[task]
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


def plot_curves(summary: dict[str, dict[str, Any]], chosen: Sequence[Protocol], task: str,
                directory: str) -> list[str]:
  """One PNG per protocol with numeric levels: headline metric vs level, one line per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = HEADLINE[task][0]
  paths = []
  for protocol in chosen:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [level_name(level) for level in protocol.levels]
    numeric = not isinstance(protocol.levels[0], tuple)
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


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def _pm(mean: float, std: float, *, percent: bool) -> str:
  scale = 100.0 if percent else 1.0
  return f"{scale * mean:.2f} ± {scale * std:.2f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _stable_hash(text: str) -> int:
  return zlib.crc32(text.encode()) & 0x7FFFFFFF
