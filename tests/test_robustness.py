"""mmjax.robustness: the protocol table, test-time sweeps and SAM-LML's matched (train = test) sweep.

The methods here are stubs that record what they see, so each test checks the protocol plumbing
itself: which batches get corrupted, with which keys, at which levels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import robustness
from mmjax.data import make_synthetic
from mmjax.methods import Method, Stage


@pytest.fixture(scope="module")
def dataset():
  return make_synthetic(jax.random.key(0), n_train=32, n_valid=400, n_test=400, seq_len=3, dims=2)


@pytest.fixture(scope="module")
def available(dataset):
  return robustness.protocols(dataset.modalities)


def _missing_rate(batch) -> float:
  return 1.0 - float(np.mean(np.asarray(batch.present)))


def _recording_loss(seen):
  """A loss that reports the missing rate of the batch it is given."""
  def loss(params, state, batch, key, train):
    del params, key, train
    seen.append(_missing_rate(batch))
    return jnp.zeros(()), ({}, state, jnp.zeros(batch.batch_size))
  return loss


def test_matched_training_corrupts_training_batches_only(dataset, available):
  seen = []
  loss = _recording_loss(seen)
  method = Method("stub", init=None, loss=loss, predict=lambda p, s, b: _missing_rate(b),
                  stages=(Stage("a", loss), Stage("b", loss)))
  wrapped = robustness.matched_training(method, available["missing_rate"], 0.5)
  batch = dataset.splits["valid"]
  key = jax.random.key(1)
  for fn in (wrapped.loss, wrapped.stages[0].loss, wrapped.stages[1].loss):
    fn(None, {}, batch, key, True)
    fn(None, {}, batch, key, False)
  train_rates, eval_rates = seen[0::2], seen[1::2]
  assert eval_rates == [0.0] * 3  # evaluation sees the batch as given
  for rate in train_rates:  # 3 modalities, 400 samples: MR 0.5 within sampling error
    assert abs(rate - 0.5) < 0.05
  assert wrapped.predict(None, {}, batch) == 0.0
  # Different step keys draw different corruptions.
  wrapped.loss(None, {}, batch, jax.random.key(2), True)
  assert seen[-1] != train_rates[0]


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


def test_matched_sweep_needs_numeric_levels(dataset, available):
  with pytest.raises(ValueError, match="--matched: 'fixed_subsets'"):
    robustness.matched_sweep(None, dataset, available["fixed_subsets"], jax.random.key(0), None)


def test_protocol_table(available):
  assert set(available) == {"missing_rate", "fixed_subsets", "drop_one", "time_mask", "gaussian",
                            "salt_pepper", "mix", "laplace_erasing"}
  assert available["laplace_erasing"].levels == robustness.RATES_07
