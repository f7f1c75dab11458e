"""mmjax.robustness: the protocol table, test-time sweeps and SAM-LML's matched (train = test) sweep.

The methods here are stubs that record what they see, so each test checks the protocol plumbing
itself: which batches get corrupted, with which keys, at which levels.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mmjax import robustness
from mmjax.data import protocols as protocols_lib
from mmjax.data import make_synthetic


@pytest.fixture(scope="module")
def dataset():
  return make_synthetic(jax.random.key(0), n_train=32, n_valid=400, n_test=400, seq_len=3, dims=2)


@pytest.fixture(scope="module")
def available(dataset):
  return robustness.protocols(dataset.modalities)


def _missing_rate(batch) -> float:
  return 1.0 - float(np.mean(np.asarray(batch.present)))


def test_matched_sweep_trains_and_tests_at_each_level(dataset, available):
  protocol = dataclasses.replace(available["missing_rate"], levels=(0.0, 0.3, 0.6))
  key = jax.random.key(7)
  calls = []

  def fit_level(level, data):
    calls.append((level, _missing_rate(data.splits["valid"]), data.splits["train"]))
    return lambda split: np.full(split.batch_size, _missing_rate(split))  # "predicts" its MR

  def metrics_fn(predictions, labels, task):
    del labels, task
    return {"mr": float(predictions[0])}

  results = robustness.matched_sweep(fit_level, dataset, protocol, key, metrics_fn)
  assert [level for level, _, _ in calls] == [0.0, 0.3, 0.6]
  for level, valid_rate, train in calls:
    assert abs(valid_rate - level) < 0.05  # valid corrupted at the level
    assert train is dataset.splits["train"]  # training batches are corrupted per step instead
    # The test split is corrupted exactly as the test-time sweep corrupts it.
    expected = _missing_rate(robustness.corrupt(dataset.splits["test"], protocol, level, key))
    assert results[robustness.level_name(level)]["mr"] == expected
    assert abs(expected - level) < 0.05
  # Valid and test draw from different keys.
  assert calls[1][1] != results["0.3"]["mr"]
  assert results["mean"]["mr"] == pytest.approx(np.mean([results[k]["mr"]
                                                         for k in ("0", "0.3", "0.6")]))
  sweep = robustness.sweep(lambda split: np.full(split.batch_size, _missing_rate(split)),
                           dataset.splits["test"], dataset.task, [protocol], key, metrics_fn)
  assert sweep[protocol.name] == results


def test_matched_sweep_with_the_noise_inside_the_model(dataset, available):
  """``at_input=False`` (SAM-LML's representation-level noise): valid and test stay clean."""
  protocol = dataclasses.replace(available["missing_rate"], levels=(0.0, 0.5))
  seen = []

  def fit_level(level, data):
    seen.append(data.splits["valid"])
    return lambda split: (seen.append(split), np.full(split.batch_size, level))[1]

  results = robustness.matched_sweep(fit_level, dataset, protocol, jax.random.key(0),
                                     lambda p, labels, task: {"level": float(p[0])},
                                     at_input=False)
  assert all(split is dataset.splits[name] for split, name in zip(seen, ["valid", "test"] * 2))
  assert [results[k]["level"] for k in ("0", "0.5", "mean")] == [0.0, 0.5, 0.25]


def test_matched_sweep_needs_numeric_levels(dataset, available):
  with pytest.raises(ValueError, match="--matched: 'fixed_subsets'"):
    robustness.matched_sweep(None, dataset, available["fixed_subsets"], jax.random.key(0), None)


def test_protocol_table(available):
  assert set(available) == {"missing_rate", "fixed_subsets", "drop_one", "time_mask", "gaussian",
                            "salt_pepper", "mix", "laplace_erasing", "sample_gaussian",
                            "sample_salt_pepper"}
  assert available["laplace_erasing"].levels == protocols_lib.RATES_07
  assert available["sample_gaussian"].levels[-1] == 10.0  # strengths 0-10 (standardised units)
  assert [p.numeric for p in available.values()].count(False) == 1  # only fixed_subsets


def test_gain_table_differences_to_concat():
  """Clean and mean-over-levels accuracy per method, and the difference of the means to concat."""
  def result(clean, mean):
    return {"gaussian": {"0": {"accuracy": (clean, 0.01), "macro_f1": (0.0, 0.0)},
                         "mean": {"accuracy": (mean, 0.02), "macro_f1": (0.0, 0.0)}},
            "fixed_subsets": {"a": {"accuracy": (0.5, 0.0), "macro_f1": (0.0, 0.0)}}}
  summary = {"euar": result(0.90, 0.70), "concat": result(0.92, 0.60)}
  rows = [line for line in robustness.gain_table(summary, "classification").splitlines()
          if line.startswith("| gaussian")]
  assert rows == ["| gaussian | euar | 90.00 ± 1.00 | -2.00 | 70.00 ± 2.00 | +10.00 |",
                  "| gaussian | concat | 92.00 ± 1.00 | +0.00 | 60.00 ± 2.00 | +0.00 |"]
  assert robustness.gain_table({"euar": result(0.9, 0.7)}, "classification") == ""
