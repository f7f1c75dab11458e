"""Tests for the first SAM-LML slice (papers/003, SPEC §6.3): attention, supervision, training.

The loss runs eagerly (after the first call every primitive is cached, so each further
configuration costs a fraction of a second instead of a fresh compilation); the training tests
share one :func:`mmjax.train.fit` run.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mmjax.data import make_synthetic, standardize
from mmjax.data.synthetic import ModalitySpec
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods import samlml
from mmjax.train import default_train_config, evaluate, fit

SMALL = dict(hidden=16, num_heads=2)
SUPERVISION = {"noise", "var", "con"}
SWITCHES = {"use_aux": "aux", "use_noise": "noise", "use_var": "var", "use_con": "con"}


def _config(**overrides):
  config = default_model_config("samlml")
  config.update(dict(SMALL, **overrides))
  return config


@pytest.fixture(scope="module")
def dataset():
  return standardize(make_synthetic(jax.random.key(0), n_train=64, n_valid=32, n_test=8,
                                    seq_len=6, dims=4))


@pytest.fixture(scope="module")
def spec(dataset):
  return TaskSpec.from_dataset(dataset)


@pytest.fixture(scope="module")
def batch(dataset):
  """8 samples of mixed lengths; audio absent in rows 0-1, text absent in row 2, row 7 padding."""
  batch = dataset.splits["train"].take(np.arange(8))
  present = np.ones((8, 3), bool)
  present[:2, 1] = False
  present[2, 0] = False
  features = dict(batch.features)
  features["audio"] = np.where(present[:, 1, None, None], features["audio"], 0.0)
  features["text"] = np.where(present[:, 0, None, None], features["text"], 0.0)
  return batch.replace(features=features, present=present, valid=np.arange(8) < 7)


@pytest.fixture(scope="module")
def setup(spec, batch):
  method = build("samlml", _config(), spec)
  params, state = method.init(jax.random.key(0), batch)
  return method, params, state


def _metrics(method, params, state, batch, key, train):
  _, (metrics, _, predictions) = method.loss(params, state, batch, key, train)
  return {k: float(v) for k, v in metrics.items()}, np.asarray(predictions)


# ----------------------------------------------------------------------------- loss terms


def test_terms_reported_in_training_only(setup, spec, batch):
  method, params, state = setup
  train, _ = _metrics(method, params, state, batch, jax.random.key(1), True)
  evaluation, _ = _metrics(method, params, state, batch, jax.random.key(1), False)
  assert set(train) == {"task", "aux", "loss"} | SUPERVISION
  assert set(evaluation) == {"task", "aux", "loss"}
  assert all(np.isfinite(v) for v in train.values()), train
  assert all(train[k] > 0 for k in SUPERVISION), train  # fresh weights violate every margin
  # Evaluation does not even compute the supervision logits.
  _, _, records = samlml.forward(samlml.make_model(_config(), spec), params, batch, None,
                                 train=False)
  assert len(records) == 3 + 6 and all(set(r) == {"logits"} for r in records.values())


@pytest.mark.parametrize("switch", [None, *SWITCHES])
def test_total_is_weighted_sum_and_switches_remove_terms(spec, setup, batch, switch):
  _, params, state = setup
  config = _config(**({switch: False} if switch else {}))
  method = build("samlml", config, spec)
  key = jax.random.key(3)
  metrics, _ = _metrics(method, params, state, batch, key, True)
  reference, _ = _metrics(setup[0], params, state, batch, key, True)
  removed = SWITCHES.get(switch)
  assert set(metrics) == ({"task", "aux", "loss"} | SUPERVISION) - {removed}
  for term, value in metrics.items():  # the other terms are unchanged
    if term != "loss":
      np.testing.assert_allclose(value, reference[term], rtol=1e-5, err_msg=term)
  by_hand = (metrics["task"] + config.alpha_p * metrics.get("aux", 0.0)
             + config.alpha * metrics.get("noise", 0.0)
             + config.alpha_c * (metrics.get("var", 0.0) + metrics.get("con", 0.0)))
  np.testing.assert_allclose(metrics["loss"], by_hand, rtol=1e-6)
  if removed:
    assert metrics["loss"] < reference["loss"]


# ----------------------------------------------------------------------------- randomness


def test_evaluation_ignores_the_key_training_uses_it(setup, batch):
  method, params, state = setup
  eval_a, pred_a = _metrics(method, params, state, batch, jax.random.key(1), False)
  eval_b, pred_b = _metrics(method, params, state, batch, jax.random.key(2), False)
  assert eval_a == eval_b
  np.testing.assert_array_equal(pred_a, pred_b)
  np.testing.assert_array_equal(pred_a, np.asarray(method.predict(params, state, batch)))
  # A sample's evaluation noise does not depend on its position in the batch.
  reverse = np.arange(batch.batch_size)[::-1]
  np.testing.assert_allclose(
      np.asarray(method.predict(params, state, batch.take(reverse))), pred_a[reverse], atol=1e-5)
  # Training: the key changes the noise of the missing modalities only (dropout is 0), and the
  # same key gives the same numbers.
  _, train_a = _metrics(method, params, state, batch, jax.random.key(1), True)
  metrics_a, train_again = _metrics(method, params, state, batch, jax.random.key(1), True)
  metrics_b, train_b = _metrics(method, params, state, batch, jax.random.key(2), True)
  np.testing.assert_array_equal(train_a, train_again)
  complete = np.asarray(batch.present).all(-1)
  np.testing.assert_allclose(train_a[complete], train_b[complete], atol=1e-5)
  assert np.all(np.abs(train_a[~complete] - train_b[~complete]) > 1e-6)
  assert metrics_a["noise"] != metrics_b["noise"]


# ----------------------------------------------------------------------------- attention


def _logits(attention_params, queries, keys):
  q = np.asarray(queries) @ np.asarray(attention_params["query"]["kernel"])
  k = np.asarray(keys) @ np.asarray(attention_params["key"]["kernel"])
  return np.einsum("bqd,bkd->bqk", q, k) / math.sqrt(q.shape[-1])


def test_intra_attention_matches_numpy(setup, spec, batch):
  """Eq. 1-2 recomputed from the parameters: ``A = U W_q (U W_k)^T / sqrt(d)``,
  ``X = LN(softmax_masked(A) U W_v)``."""
  _, params, _ = setup
  model = samlml.make_model(_config(), spec)
  variables = {"params": params}
  units = model.apply(variables, batch.features, batch.step_mask, batch.present, None,
                      train=False, method="encode")
  outputs, logits = model.apply(variables, units, batch.step_mask, method="attend_intra")
  for i, m in enumerate(spec.modalities):
    p = params[f"intra_{i}"]
    u = np.asarray(units[m], np.float64)
    expected = _logits(p, u, u)
    np.testing.assert_allclose(np.asarray(logits[m]), expected, rtol=1e-4, atol=1e-5)
    mask = np.asarray(batch.step_mask[m])[:, None, :]
    weights = np.exp(np.where(mask, expected - expected.max(-1, keepdims=True), -np.inf))
    weights /= weights.sum(-1, keepdims=True)
    h = weights @ (u @ np.asarray(p["value"]["kernel"]))
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    np.testing.assert_allclose(np.asarray(outputs[m]), h, rtol=1e-4, atol=1e-4)


def test_noise_ranking_term_by_hand(setup, spec, batch):
  """``L^n`` (eq. 3-6) summed over the 3 intra and 6 inter attentions, hinge means in NumPy."""
  method, params, state = setup
  config = _config()
  key = jax.random.key(5)
  _, _, records = samlml.forward(samlml.make_model(config, spec), params, batch, key, train=True)
  present, valid = np.asarray(batch.present), np.asarray(batch.valid)
  names = spec.modalities
  total = 0.0
  for name, r in records.items():
    query, _, key_name = name.partition("->")
    key_name = key_name or query
    block = f"{'inter' if '->' in name else 'intra'}_{names.index(query)}"
    q, k = np.asarray(r["queries"], np.float64), np.asarray(r["keys"], np.float64)
    noise, lam = np.asarray(r["noise"], np.float64), np.asarray(r["mix_weight"], np.float64)
    assert noise.shape == k.shape and lam.shape == (batch.batch_size, 1, 1)
    assert np.all((lam >= 0) & (lam < 1))
    a = _logits(params[block], q, k)
    a_noise = _logits(params[block], q, noise)
    a_mixed = _logits(params[block], q, lam * k + (1 - lam) * noise)
    np.testing.assert_allclose(np.asarray(r["logits"]), a, rtol=1e-4, atol=1e-4)
    where = ((valid & present[:, names.index(query)] & present[:, names.index(key_name)])
             [:, None, None] & np.asarray(batch.step_mask[query])[:, :, None]
             & np.asarray(batch.step_mask[key_name])[:, None, :])
    total += (np.maximum(a_noise - a + config.gamma1, 0)[where].mean()
              + np.maximum(a_noise - a_mixed + config.gamma1, 0)[where].mean())
  metrics, _ = _metrics(method, params, state, batch, key, True)
  np.testing.assert_allclose(metrics["noise"], total, rtol=1e-4)


def test_missing_modality_reads_noise(setup, spec, batch):
  """An absent modality's representation does not depend on its (zeroed) input at evaluation."""
  _, params, _ = setup
  model = samlml.make_model(_config(), spec)
  features = dict(batch.features)
  features["audio"] = features["audio"] + 5.0
  units = [model.apply({"params": params}, f, batch.step_mask, batch.present, None, train=False,
                       method="encode")["audio"] for f in (batch.features, features)]
  absent = ~np.asarray(batch.present)[:, 1]
  np.testing.assert_allclose(np.asarray(units[0])[absent], np.asarray(units[1])[absent])
  assert np.abs(np.asarray(units[0])[~absent] - np.asarray(units[1])[~absent]).max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden=15), "model.num_heads"),
    (dict(language=("speech",)), "model.language"),
    (dict(rho=0), "model.rho"),
])
def test_bad_config_raises(spec, overrides, message):
  with pytest.raises(ValueError, match=message):
    build("samlml", _config(**overrides), spec)


def test_single_modality_raises():
  spec = TaskSpec("regression", None, ("text",), {"text": (6, 4)})
  with pytest.raises(ValueError, match="modalities"):
    build("samlml", _config(), spec)


# ----------------------------------------------------------------------------- training


def _train_config(num_epochs):
  config = default_train_config()
  config.update(dict(num_epochs=num_epochs, batch_size=16, learning_rate=3e-3, patience=0,
                     progress=False))
  return config


@pytest.fixture(scope="module")
def easy_dataset():
  """Two low-noise modalities (``r_m = s + 0.3 eps``): a few epochs on 64 samples beat the mean.

  Two modalities also halve the compiled graph (2 intra + 2 inter attentions) and exercise
  ``|M| = 2``.
  """
  modality = ModalitySpec(seq_len=6, dim=4, signal=1.0, intensity=0.0, reading_noise=0.3,
                          bias=0.0, bias_visibility=0.0, nuisance=0.3)
  return standardize(make_synthetic(jax.random.key(0), n_train=64, n_valid=32, n_test=8,
                                    modalities={"text": modality, "audio": modality}))


@pytest.fixture(scope="module")
def trained(easy_dataset):
  method = build("samlml", _config(), TaskSpec.from_dataset(easy_dataset))
  return method, fit(method, easy_dataset, _train_config(4), log=lambda line: None)


def test_fit_learns(trained, easy_dataset):
  method, result = trained
  labels = np.asarray(easy_dataset.splits["valid"].label)
  baseline = float(np.mean(np.abs(labels - np.mean(easy_dataset.splits["train"].label))))
  mae = evaluate(method, result.state, easy_dataset.splits["valid"], easy_dataset.task)["mae"]
  assert mae < 0.8 * baseline, (mae, baseline)
  assert SUPERVISION <= {k[6:] for k in result.history[0] if k.startswith("train/")}


def test_same_seed_same_metrics(trained, easy_dataset):
  method = build("samlml", _config(), TaskSpec.from_dataset(easy_dataset))
  again = fit(method, easy_dataset, _train_config(1), log=lambda line: None).history[0]
  first = trained[1].history[0]
  for key, value in first.items():
    if key != "seconds":
      assert again[key] == value, key
