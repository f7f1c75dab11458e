"""Tests for the first SAM-LML slice (papers/003, SPEC §6.3): attention, supervision, training.

The loss runs eagerly (after the first call every primitive is cached, so each further
configuration costs a fraction of a second instead of a fresh compilation); the training tests
share one :func:`mmjax.train.fit` run.
"""

from __future__ import annotations

import dataclasses
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
SUPERVISION = {"noise", "de", "orth", "mi", "recon", "mix", "var", "con"}
DECOMPOSITION = {"de", "orth", "mi", "recon"}


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
  assert len(records) == 3 + 6 and all(set(r) == {"logits", "weights"} for r in records.values())


# switch -> (terms it removes, terms that keep only their inter- (or intra-) modal part)
ABLATIONS = [
    ({}, set(), set()),
    ({"use_aux": False}, {"aux"}, set()),
    ({"use_noise": False}, {"noise"}, set()),
    ({"use_de": False}, DECOMPOSITION, set()),
    ({"use_mix": False}, {"mix"}, set()),
    ({"use_var": False}, {"var"}, set()),
    ({"use_con": False}, {"con"}, set()),
    ({"supervise_intra": False}, DECOMPOSITION | {"con"}, {"noise", "var"}),  # Table 4
    ({"supervise_inter": False}, {"mix"}, {"noise", "var"}),
    ({"supervise_intra": False, "supervise_inter": False}, SUPERVISION, set()),
]


@pytest.mark.parametrize("overrides, removed, reduced", ABLATIONS)
def test_total_is_weighted_sum_and_switches_remove_terms(spec, setup, batch, overrides, removed,
                                                         reduced):
  _, params, state = setup
  config = _config(**overrides)
  method = build("samlml", config, spec)
  key = jax.random.key(3)
  metrics, _ = _metrics(method, params, state, batch, key, True)
  reference, _ = _metrics(setup[0], params, state, batch, key, True)
  assert set(metrics) == ({"task", "aux", "loss"} | SUPERVISION) - removed
  for term, value in metrics.items():
    if term == "loss":
      continue
    if term in reduced:  # the supervised half only: strictly smaller, still positive
      assert 0 < value < reference[term], (term, value, reference[term])
    else:  # the other terms are unchanged
      np.testing.assert_allclose(value, reference[term], rtol=1e-5, err_msg=term)
  get = lambda name: metrics.get(name, 0.0)
  by_hand = (get("task") + config.alpha_p * get("aux")
             + config.alpha * (get("noise") + get("de")) + config.alpha * config.alpha_de * (
                 get("orth") + get("mi") + get("recon"))
             + config.alpha_mix * get("mix") + config.alpha_c * (get("var") + get("con")))
  np.testing.assert_allclose(metrics["loss"], by_hand, rtol=1e-6)
  if removed:
    assert metrics["loss"] < reference["loss"]


def test_evaluation_does_not_pay_for_supervision(setup, spec, batch):
  """The evaluation graph is the same with and without supervision (same primitives in the same
  order); the supervised training graph is larger."""
  _, params, state = setup
  unsupervised_params = {k: v for k, v in params.items() if not k.startswith("decompositions")}
  graphs = {}
  for supervised, p in ((True, params), (False, unsupervised_params)):
    method = build("samlml", _config(supervise_intra=supervised, supervise_inter=supervised), spec)
    graphs[supervised, "eval"] = [e.primitive.name for e in jax.make_jaxpr(method.predict)(
        p, state, batch).eqns]
    graphs[supervised, "train"] = jax.make_jaxpr(
        lambda p, k, m=method: m.loss(p, state, batch, k, True)[0])(p, jax.random.key(0)).eqns
  assert graphs[True, "eval"] == graphs[False, "eval"]
  assert len(graphs[True, "train"]) > 1.5 * len(graphs[False, "train"])


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
  units = model.apply(variables, batch.features, batch.step_mask, batch.present, batch.index,
                      None, train=False, method="encode")
  attended = model.apply(variables, units, batch.step_mask, method=lambda mdl, u, masks: {
      m: mdl.intra[i](u[m], u[m], masks[m]) for i, m in enumerate(mdl.modalities)})
  for i, m in enumerate(spec.modalities):
    logits, outputs = {m: attended[m].logits}, {m: attended[m].output}
    p = params[f"intra_{i}"]
    u = np.asarray(units[m], np.float64)
    expected = _logits(p, u, u)
    np.testing.assert_allclose(np.asarray(logits[m]), expected, rtol=1e-4, atol=1e-5)
    mask = np.asarray(batch.step_mask[m])[:, None, :]
    weights = np.exp(np.where(mask, expected - expected.max(-1, keepdims=True), -np.inf))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(attended[m].weights), weights, rtol=1e-4, atol=1e-6)
    h = weights @ (u @ np.asarray(p["value"]["kernel"]))
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    np.testing.assert_allclose(np.asarray(outputs[m]), h, rtol=1e-4, atol=1e-4)


def _selection(batch, names, query, key):
  """Valid sample, both modalities present, query and key real steps: ``[B, T_q, T_k]``."""
  present, valid = np.asarray(batch.present), np.asarray(batch.valid)
  return ((valid & present[:, names.index(query)] & present[:, names.index(key)])[:, None, None]
          & np.asarray(batch.step_mask[query])[:, :, None]
          & np.asarray(batch.step_mask[key])[:, None, :])


@pytest.fixture(scope="module")
def train_records(setup, spec, batch):
  """Training-mode records and metrics for one key (``TRAIN_KEY``)."""
  method, params, state = setup
  _, _, records = samlml.forward(samlml.make_model(_config(), spec), params, batch,
                                 jax.random.key(TRAIN_KEY), train=True)
  metrics, _ = _metrics(method, params, state, batch, jax.random.key(TRAIN_KEY), True)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), records), metrics


TRAIN_KEY = 5


def test_noise_ranking_term_by_hand(setup, spec, batch, train_records):
  """``L^n`` (eq. 3-6) summed over the 3 intra and 6 inter attentions, hinge means in NumPy."""
  _, params, _ = setup
  config = _config()
  records, metrics = train_records
  names = spec.modalities
  total = 0.0
  for name, r in records.items():
    query, _, key_name = name.partition("->")
    key_name = key_name or query
    block = f"{'inter' if '->' in name else 'intra'}_{names.index(query)}"
    q, k, noise, lam = r["queries"], r["keys"], r["noise"], r["noise_weight"]
    assert noise.shape == k.shape and lam.shape == (batch.batch_size, 1, 1)
    assert np.all((lam >= 0) & (lam < 1))
    a = _logits(params[block], q, k)
    a_noise = _logits(params[block], q, noise)
    a_noisy = _logits(params[block], q, lam * k + (1 - lam) * noise)
    np.testing.assert_allclose(r["logits"], a, rtol=1e-4, atol=1e-4)
    where = _selection(batch, names, query, key_name)
    total += (np.maximum(a_noise - a + config.gamma1, 0)[where].mean()
              + np.maximum(a_noise - a_noisy + config.gamma1, 0)[where].mean())
  np.testing.assert_allclose(metrics["noise"], total, rtol=1e-4)


def _gelu(x):  # flax's default (tanh) approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _mixing_total(params, records, batch, names, gamma1):
  """``L^mix`` (eq. 26-28) in NumPy, summed over the ordered pairs: full logit matrices of
  ``K^mix_t = lambda X_m2[s(t)] + (1 - lambda) X_m1[t]``, then the pairs ``(t, s(t))``."""
  total = 0.0
  for name, r in records.items():
    if "->" not in name:
      continue
    query, _, key = name.partition("->")
    p = params[f"inter_{names.index(query)}"]
    lam, steps = r["mix_weight"], r["mix_steps"].astype(int)
    assert lam.shape == (batch.batch_size, 1, 1) and np.all((lam >= 0) & (lam < 1))
    paired_keys = np.take_along_axis(r["mix_keys"], steps[..., None], axis=1)
    mixed = lam * paired_keys + (1 - lam) * r["mix_queries"]  # eq. 26 on the common grid
    a, a_mix = _logits(p, r["mix_queries"], r["mix_keys"]), _logits(p, r["mix_queries"], mixed)
    pair = lambda x: np.take_along_axis(x, steps[..., None], axis=-1)[..., 0]
    where = pair(_selection(batch, names, query, key))
    total += np.maximum(pair(a) - np.diagonal(a_mix, axis1=-2, axis2=-1) + gamma1, 0)[where].mean()
  return total


def test_mixing_term_by_hand(setup, spec, batch, train_records):
  """``L^mix`` (eq. 26-28): ``max(A - A^mix + gamma_1, 0)`` on the diagonal, 6 ordered pairs."""
  _, params, _ = setup
  records, metrics = train_records
  for name, r in records.items():
    if "->" in name:  # aligned: the pairs are the diagonal
      np.testing.assert_array_equal(r["mix_steps"], np.broadcast_to(np.arange(6), (8, 6)))
  np.testing.assert_allclose(metrics["mix"], _mixing_total(params, records, batch, spec.modalities,
                                                           _config().gamma1), rtol=1e-4)


@pytest.mark.parametrize("query, key, expected", [
    ([1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0], [0, 2, 4, 6]),  # 3 real steps onto 6
    ([1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [2, 3, 4, 5]),  # front-padded key
    ([0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 3, 5]),  # clipped outside the query's extent
    ([1, 0, 1, 1], [0, 1, 1, 1], [0, 1, 2, 3]),  # aligned (same T): the diagonal, masks aside
])
def test_paired_steps(query, key, expected):
  steps = samlml.paired_steps(np.array([query], bool), np.array([key], bool))
  np.testing.assert_array_equal(np.asarray(steps)[0], expected)


def test_mixing_on_unaligned_sequences():
  """Table 11: the full model (mixing included) runs on unaligned sequences, and ``L^mix``
  equals the NumPy computation on the common time grid."""
  data = standardize(make_synthetic(jax.random.key(1), n_train=6, n_valid=0, n_test=0,
                                    seq_len={"text": 5, "audio": 9, "vision": 7}, dims=3))
  batch, spec = data.splits["train"], TaskSpec.from_dataset(data)
  method = build("samlml", _config(), spec)
  params, state = method.init(jax.random.key(0), batch)
  _, _, records = samlml.forward(samlml.make_model(_config(), spec), params, batch,
                                 jax.random.key(3), train=True)
  metrics, _ = _metrics(method, params, state, batch, jax.random.key(3), True)
  records = jax.tree.map(lambda x: np.asarray(x, np.float64), records)
  assert records["text->audio"]["mix_steps"].max() > 4  # text's 5 steps reach audio's later ones
  np.testing.assert_allclose(metrics["mix"], _mixing_total(params, records, batch, spec.modalities,
                                                           _config().gamma1), rtol=1e-4)


def test_decomposition_terms_by_hand(setup, spec, batch, train_records):
  """Eq. 7-12 from the parameters: Decom/Compo outputs, ``de`` ranking, ``orth``, ``mi``,
  ``recon`` summed over the 3 modalities."""
  _, params, _ = setup
  config = _config()
  records, metrics = train_records
  names = spec.modalities
  totals = dict.fromkeys(DECOMPOSITION, 0.0)
  predictor = lambda x: _dense(params["predictor_out"], _gelu(_dense(params["predictor_hidden"], x)))
  for i, m in enumerate(names):
    r, p = records[m], params[f"decompositions_{i}"]
    u = r["units"]
    h = _dense(p["decom_out"], _gelu(_dense(p["decom_hidden"], u)))
    k, relevant = h[..., :u.shape[-1]], h[..., u.shape[-1]:]
    recomposed = _dense(p["compo_out"], _gelu(_dense(p["compo_hidden"],
                                                     np.concatenate([k, relevant], -1))))
    for got, want in ((r["irrelevant"], k), (r["relevant"], relevant),
                      (r["recomposed"], recomposed)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    where = _selection(batch, names, m, m)
    a, a_de = _logits(params[f"intra_{i}"], u, u), _logits(params[f"intra_{i}"], u, k)
    totals["de"] += np.maximum(a_de - a + config.gamma1, 0)[where].mean()
    steps = where.any(-1)  # [B, T]
    sample = steps.any(-1)
    w = steps[..., None]
    orth = np.sqrt(((np.einsum("btd,bsd->bts", relevant * w, k * w)) ** 2).sum((1, 2)))
    totals["orth"] += orth[sample].mean()
    real = np.asarray(batch.step_mask[m])[..., None]  # the model pools over every real step
    pool = lambda x: (x * real).sum(1) / np.maximum(real.sum(1), 1)
    np.testing.assert_allclose(r["irrelevant_prediction"], predictor(pool(k)), rtol=1e-4,
                               atol=1e-4)
    # Eq. 12: N ~ N(0, I) in the predictor's input space [B, d] (not pooled over time).
    assert r["pred_noise"].shape == (u.shape[0], u.shape[-1])
    assert 0.8 < float(np.std(r["pred_noise"])) < 1.2
    np.testing.assert_allclose(r["noise_prediction"], predictor(r["pred_noise"]), rtol=1e-4,
                               atol=1e-4)
    gap = ((predictor(pool(k)) - r["noise_prediction"]) ** 2).sum(-1)
    distance = (((u - k) ** 2) * w).sum((1, 2)) / np.maximum(((u**2) * w).sum((1, 2)), 1e-12)
    mi = gap + config.mi_distance_weight * np.maximum(distance - config.mi_epsilon, 0)
    totals["mi"] += mi[sample].mean()
    totals["recon"] += ((u - recomposed) ** 2).mean(-1)[steps].mean()
  for term, value in totals.items():
    np.testing.assert_allclose(metrics[term], value, rtol=1e-4, err_msg=term)


def test_missing_modality_reads_noise(setup, spec, batch):
  """An absent modality's representation does not depend on its (zeroed) input at evaluation."""
  _, params, _ = setup
  model = samlml.make_model(_config(), spec)
  features = dict(batch.features)
  features["audio"] = features["audio"] + 5.0
  units = [model.apply({"params": params}, f, batch.step_mask, batch.present, batch.index, None,
                       train=False,
                       method="encode")["audio"] for f in (batch.features, features)]
  absent = ~np.asarray(batch.present)[:, 1]
  np.testing.assert_allclose(np.asarray(units[0])[absent], np.asarray(units[1])[absent])
  assert np.abs(np.asarray(units[0])[~absent] - np.asarray(units[1])[~absent]).max() > 1e-3


def test_evaluation_noise_differs_across_samples_not_runs(setup, spec, batch):
  """Missing-modality noise at evaluation is keyed by the sample's row in its split
  (``Batch.index``): the same input at two rows reads two draws; the same row reads the same draw
  in every batch and run."""
  _, params, _ = setup
  model = samlml.make_model(_config(), spec)
  rows = batch.take(np.array([0, 0, 0]))  # row 0 misses audio
  rows = rows.replace(index=np.array([0, 7, 0], np.int32))
  encode = lambda b: np.asarray(model.apply(
      {"params": params}, b.features, b.step_mask, b.present, b.index, None, train=False,
      method="encode")["audio"])
  units = encode(rows)
  np.testing.assert_array_equal(units[0], units[2])
  assert np.abs(units[0] - units[1]).max() > 1e-2
  np.testing.assert_array_equal(encode(rows), units)  # a second run
  np.testing.assert_array_equal(encode(batch)[0], units[0])  # another batch holding row 0


@pytest.mark.parametrize("kind", samlml.REPRESENTATION_NOISE_TYPES)
def test_representation_noise_at_the_stated_rate(setup, spec, batch, kind):
  """Eq. 35 / App. A.14 on ``U_m``, in training and evaluation: ``U^n = (1 - NR) U + NR N`` with
  unit-variance ``N`` (Gaussian, or per sample Laplace or erasing a fraction NR of the entries)."""
  _, params, _ = setup
  rate = 0.3
  clean_model = samlml.make_model(_config(), spec)
  noisy_model = samlml.make_model(_config(representation_noise=rate,
                                          representation_noise_type=kind), spec)
  for train in (True, False):
    encode = lambda model, key: np.stack([np.asarray(u, np.float64) for u in model.apply(
        {"params": params}, batch.features, batch.step_mask, batch.present, batch.index, key,
        train=train, method="encode").values()], axis=1)  # [B, M, T, d]
    clean, noisy = encode(clean_model, jax.random.key(1)), encode(noisy_model, jax.random.key(1))
    noise = (noisy - (1 - rate) * clean) / rate
    erased = np.all((noisy == 0) | np.isclose(noisy, clean, atol=1e-6), axis=(1, 2, 3))
    if kind == "gaussian":
      assert not erased.any()
    else:  # both types occur; erased samples lose a fraction NR of their entries
      assert erased.any() and not erased.all(), erased
      np.testing.assert_allclose((noisy[erased] == 0).mean(), rate, atol=0.05)
      laplace = noise[~erased]
      assert np.abs(laplace).mean() / laplace.std() < 0.76  # Laplace 0.71, Gaussian 0.80
      noise = laplace
    np.testing.assert_allclose([noise.mean(), noise.std()], [0.0, 1.0], atol=0.08)
    again = encode(noisy_model, jax.random.key(2))
    if train:  # fresh draws from the step key
      assert np.abs(again - noisy).max() > 1e-2
    else:  # evaluation: keyed by the sample's row, not by the caller's key
      np.testing.assert_array_equal(again, noisy)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden=15), "model.num_heads"),
    (dict(language=("speech",)), "model.language"),
    (dict(rho=0), "model.rho"),
    (dict(representation_noise=1.5), "model.representation_noise"),
    (dict(representation_noise_type="uniform"), "model.representation_noise_type"),
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


# ----------------------------------------------------------------------------- Fig. 3 / §4.6

NOISY_STEP_FRACTION = 0.3


def _with_noisy_steps(split, key):
  """``split`` with a random 30% of each sequence's real steps replaced by ``N(0, 1)`` features
  (train and test alike); returns the split and the replaced steps ``{m: [B, T] bool}``."""
  features, noisy = dict(split.features), {}
  for i, m in enumerate(split.modalities):
    pick_key, noise_key = jax.random.split(jax.random.fold_in(key, i))
    shape = features[m].shape
    noisy[m] = (np.asarray(jax.random.uniform(pick_key, shape[:2])) < NOISY_STEP_FRACTION) & (
        np.asarray(split.step_mask[m]))
    features[m] = np.where(noisy[m][..., None], np.asarray(jax.random.normal(noise_key, shape)),
                           features[m])
  return split.replace(features=features, full_features=features), noisy


def _weight_on_noisy_keys(weights, query_real, query_noisy, key_real, key_noisy, outside):
  """Mean attention weight per noisy key over mean weight per clean key, for clean real queries
  and keys ``outside [T_q, T_k]`` (1 = noise is attended like clean data)."""
  rows = (query_real & ~query_noisy)[:, :, None] & key_real[:, None, :] & outside[None]
  noisy = rows & key_noisy[:, None, :]
  clean = rows & ~key_noisy[:, None, :]
  return (weights * noisy).sum() / noisy.sum() / ((weights * clean).sum() / clean.sum())


FIG3_SEEDS = (0, 1)


def test_noise_addition_moves_attention_off_noisy_steps():
  """Paper Fig. 3 / §4.6: some time slices replaced by Gaussian noise (train and test), the
  noise-addition ranking alone (eq. 3-6; decomposition, mixing, variance and context off) makes
  the attention weight a noisy key less than unsupervised attention does (same seeds): intra-modal
  keys outside the context window ``|t - s| > rho // 2`` (where the context constraint cannot
  act) and the inter-modal vision -> text attention of Fig. 3 (noisy language columns).

  With ``use_noise=False`` the two models are the same model and the test fails (ratio 1).
  Features are 16-d readings of a few latent factors, so Gaussian noise leaves their subspace as
  it leaves real features'; every modality uses the per-step ``Dense`` network (a convolution
  smears a noisy step over its neighbours). The supervision weight is 400x Table 7's.
  """
  modality = ModalitySpec(seq_len=8, dim=16, signal=1.0, intensity=0.0, reading_noise=0.3,
                          bias=0.0, bias_visibility=0.0, nuisance=0.3)
  ratios = {True: [], False: []}
  for seed in FIG3_SEEDS:
    clean = standardize(make_synthetic(jax.random.key(seed), n_train=128, n_valid=32, n_test=64,
                                       modalities={"text": modality, "vision": modality}))
    splits, noisy = {}, {}
    for i, (name, split) in enumerate(clean.splits.items()):
      splits[name], noisy[name] = _with_noisy_steps(split, jax.random.key(10 + i + 100 * seed))
    dataset = dataclasses.replace(clean, splits=splits)
    spec = TaskSpec.from_dataset(dataset)
    test, noisy = dataset.splits["test"], noisy["test"]
    real = {m: np.asarray(test.step_mask[m]) for m in spec.modalities}
    steps = np.arange(8)
    beyond_window = np.abs(steps[:, None] - steps[None, :]) > _config().rho // 2
    for supervised in (True, False):
      only_noise = dict(use_de=False, use_mix=False, use_var=False, use_con=False)
      config = _config(language=("text", "vision"), alpha=2.0,
                       **(only_noise if supervised else dict(supervise_intra=False,
                                                             supervise_inter=False)))
      method = build("samlml", config, spec)
      train_config = _train_config(8)
      train_config.seed = seed
      params = fit(method, dataset, train_config, log=lambda line: None).state.params
      _, _, records = samlml.forward(samlml.make_model(config, spec), params, test, None,
                                     train=False)
      weights = {name: np.asarray(r["weights"], np.float64) for name, r in records.items()}
      intra = np.mean([_weight_on_noisy_keys(weights[m], real[m], noisy[m], real[m], noisy[m],
                                             beyond_window) for m in spec.modalities])
      inter = _weight_on_noisy_keys(weights["vision->text"], real["vision"], noisy["vision"],
                                    real["text"], noisy["text"], np.ones((8, 8), bool))
      ratios[supervised].append((intra, inter))
  supervised, unsupervised = np.mean(ratios[True], axis=0), np.mean(ratios[False], axis=0)
  assert np.all(supervised < 0.93 * unsupervised), ratios


def test_trains_on_a_multiview_mat(tmp_path):
  """Multi-view data (views ``view0 ...``, one step each; every view gets the ``Dense`` network):
  SAM-LML loads a ``.mat`` in the benchmarks' pre-split layout and learns the classes."""
  scipy_io = pytest.importorskip("scipy.io")
  from mmjax.data import load_multiview_mat
  rng = np.random.default_rng(0)
  centers = [rng.normal(size=(3, d)) for d in (5, 4)]
  mat = {}
  for split, n in (("train", 60), ("test", 30)):
    y = np.arange(n) % 3
    for v, c in enumerate(centers):
      mat[f"x{v + 1}_{split}"] = c[y] + 0.5 * rng.normal(size=(n, c.shape[1]))
    mat[f"gt_{split}"] = (y + 1)[:, None].astype(np.uint8)
  scipy_io.savemat(tmp_path / "views.mat", mat)
  data = standardize(load_multiview_mat(tmp_path / "views.mat", valid_fraction=0.2))
  method = build("samlml", _config(), TaskSpec.from_dataset(data))
  result = fit(method, data, _train_config(6), log=lambda line: None)
  assert data.modalities == ("view0", "view1")
  assert evaluate(method, result.state, data.splits["test"], data.task)["accuracy"] > 0.8


@pytest.mark.parametrize("modalities, lengths, language, expected", [
    (("text", "audio", "vision"), (50, 50, 50), ("auto",), ("text",)),
    (("view0", "view1", "view2"), (1, 1, 1), ("auto",), ("view0", "view1", "view2")),  # multi-view
    (("view0", "clip"), (1, 20), ("auto",), ("view0",)),
    (("view0", "view1"), (1, 1), ("view1",), ("view1",)),
])
def test_language_modalities_adapt_to_the_data(modalities, lengths, language, expected):
  spec = TaskSpec("classification", 3, modalities,
                  {m: (t, 4) for m, t in zip(modalities, lengths)})
  assert samlml.language_modalities(_config(language=language), spec) == expected
  build("samlml", _config(language=language, use_mix=len(set(lengths)) == 1), spec)  # builds
