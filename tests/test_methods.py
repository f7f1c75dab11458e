"""Tests for mmjax.methods: EUAR (papers/001) and the concat / late-fusion baselines.

Forward passes and loss terms are checked against an independent NumPy implementation of each model
(float64, from the papers' equations and SPEC §6.1 / §6.5), on parameters perturbed away from
their initialisation so that biases and gates are non-trivial.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mmjax.data import (
    Batch, iterate_batches, make_synthetic, mask_time_steps, sentiment_to_class, standardize)
from mmjax.methods import REGISTRY, TaskSpec, build, default_model_config
from mmjax.methods.euar import EUARModel
from mmjax.train import TrainState, default_train_config, evaluate, fit, make_train_step

METHODS = ("euar", "concat", "late_fusion")
HIDDEN, NUM_EXPERTS, TOP_K = 16, 4, 2


@pytest.fixture(scope="module")
def dataset():
  return standardize(make_synthetic(
      jax.random.key(0), n_train=384, n_valid=64, n_test=128, seq_len=4, dims=8))


@pytest.fixture(scope="module")
def spec(dataset):
  return TaskSpec.from_dataset(dataset)


def _model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  config = default_model_config(name)
  config.hidden = HIDDEN
  if name == "euar":
    config.update(dict(num_experts=NUM_EXPERTS, top_k=TOP_K))
  config.update(overrides)
  return config


def _perturbed(params, seed: int = 0, scale: float = 0.3):
  """``params`` plus N(0, scale^2) noise on every entry: non-zero biases, uneven gates."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def batch(dataset) -> Batch:
  """16 test samples: every subset of the 3 modalities present twice; the last 4 rows padding."""
  batch = dataset.splits["test"].take(np.arange(16))
  present = np.array(list(itertools.product([False, True], repeat=3)) * 2)
  return batch.replace(present=present, valid=np.arange(16) < 12)


def _init(name, spec, batch, **overrides):
  method = build(name, _model_config(name, **overrides), spec)
  params, state = method.init(jax.random.key(1), batch)
  return method, _perturbed(params), state


# ----------------------------------------------------------------------------- NumPy reference


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _dense(p, x):
  return x @ _np(p["kernel"]) + _np(p["bias"])


def _encode(params, batch, i, m):
  """relu(Dense(masked_mean_pool(x) * present)) -> ``[B, H]`` (SPEC §6.1 encoder)."""
  mask = _np(batch.step_mask[m])
  pooled = np.einsum("btd,bt->bd", _np(batch.features[m]), mask)
  pooled = pooled / np.maximum(mask.sum(1, keepdims=True), 1.0) * _np(batch.present)[:, i:i + 1]
  return np.maximum(_dense(params[f"encoder_{m}"]["proj"], pooled), 0.0)


def _np_moe(params, batch, k):
  """Per modality: top-k softmax gates (eq. 5), expert means and log-variances (eq. 2)."""
  out = {}
  for i, m in enumerate(batch.modalities):
    x, p = _encode(params, batch, i, m), params[f"moe_{m}"]
    logits = _dense(p["router"], x)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, top, np.take_along_axis(probs, top, -1), -1)
    expert = lambda q: np.einsum("bi,nio->bno", x, _np(q["kernel"])) + _np(q["bias"])
    out[m] = dict(gates=gates, mean=expert(p["mean"]))
    if "log_var" in p:  # Gaussian experts
      out[m]["log_var"] = expert(p["log_var"])
  return out


def _np_predict(name, params, batch, k=TOP_K):
  """Evaluation-mode ``[B]`` predictions of ``name`` (regression)."""
  mods = batch.modalities
  if name == "euar":  # h_m = sum_j G_j mu_j (eq. 6, z_j = mu_j at evaluation); Linear(concat h_m)
    moe = _np_moe(params, batch, k)
    h = np.concatenate([np.einsum("bn,bnd->bd", moe[m]["gates"], moe[m]["mean"]) for m in mods], -1)
    return _dense(params["head"], h)[:, 0]
  encoded = [_encode(params, batch, i, m) for i, m in enumerate(mods)]
  if name == "concat":
    fused = np.maximum(_dense(params["fusion"], np.concatenate(encoded, -1)), 0.0)
    return _dense(params["head"], fused)[:, 0]
  # late_fusion: the mean of the present modalities' head outputs (0 when none is present).
  outs = np.stack([_dense(params[f"head_{m}"], e)[:, 0] for m, e in zip(mods, encoded)], -1)
  present = _np(batch.present)
  return np.sum(outs * present, -1) / np.maximum(present.sum(-1), 1.0)


def _masked_mean(x, valid):
  return x[np.asarray(valid)].mean(0)


def _np_regularizers(params, batch, k):
  """Sums over modalities of the load balancing (eq. 7-9) and, for Gaussian experts, the KL
  (eq. 4, summed over dimensions, mean over all N experts) and the U-loss (eq. 10), each over the
  valid samples in which the modality is present."""
  terms = {}
  add = lambda term, value: terms.__setitem__(term, terms.get(term, 0.0) + value)
  for i, a in enumerate(_np_moe(params, batch, k).values()):
    where = np.asarray(batch.valid) & np.asarray(batch.present)[:, i]
    gates, n = a["gates"], a["gates"].shape[1]
    top1 = np.eye(n)[gates.argmax(-1)]
    add("balance", np.sum(_masked_mean(top1, where) * _masked_mean(gates, where)) / n)
    if "log_var" not in a:
      continue
    mean, log_var = a["mean"], a["log_var"]
    per_expert = 0.5 * np.sum(np.exp(log_var) + mean**2 - 1.0 - log_var, -1)
    add("kl", _masked_mean(per_expert.mean(-1), where))
    add("uloss", _masked_mean(np.mean(gates * np.exp(log_var).mean(-1), -1), where))
  return terms


# ----------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize("name, overrides", [
    ("euar", {}),
    ("euar", dict(sparse_experts=True)),
    ("euar", dict(expert_type="mlp")),
    ("concat", {}),
    ("late_fusion", {}),
])
def test_predict_matches_numpy_forward(name, overrides, spec, batch):
  method, params, state = _init(name, spec, batch, **overrides)
  got = method.predict(params, state, batch)
  np.testing.assert_allclose(got, _np_predict(name, params, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, absent_is_zero_input", [
    ("euar", True), ("concat", True), ("late_fusion", False)])
def test_absent_modalities(name, absent_is_zero_input, spec, batch):
  """Absent inputs never matter; EUAR and concat see them as zeros, late fusion leaves them out."""
  method, params, state = _init(name, spec, batch)
  absent = ~np.asarray(batch.present)
  rng = np.random.default_rng(0)
  replaced = lambda fill: {  # absent modalities' features replaced by fill(shape)
      m: np.where(absent[:, i, None, None], fill(batch.features[m].shape), batch.features[m])
      for i, m in enumerate(batch.modalities)}
  garbage, zeroed = replaced(lambda shape: 10 * rng.normal(size=shape)), replaced(np.zeros)
  predict = lambda b: np.asarray(method.predict(params, state, b))
  expected = predict(batch)
  np.testing.assert_allclose(predict(batch.replace(features=garbage)), expected, rtol=1e-6)
  as_zero_input = predict(batch.replace(features=zeroed, present=np.ones_like(absent)))
  assert np.allclose(as_zero_input, expected, rtol=1e-6, atol=1e-6) == absent_is_zero_input
  fully_present = np.all(~absent, axis=1)
  np.testing.assert_allclose(as_zero_input[fully_present], expected[fully_present], rtol=1e-6)


# ----------------------------------------------------------------------------- loss terms


@pytest.mark.parametrize("overrides, terms", [
    ({}, {"kl", "balance", "uloss"}),
    (dict(use_kl=False), {"balance", "uloss"}),
    (dict(use_uloss=False), {"kl", "balance"}),
    (dict(expert_type="mlp"), {"balance"}),
    (dict(sparse_experts=True), {"kl", "balance", "uloss"}),
])
def test_euar_loss_terms(overrides, terms, spec, batch):
  weights = {"kl": 0.3, "balance": 0.2, "uloss": 0.1}
  method, params, state = _init("euar", spec, batch, alpha_kl=weights["kl"],
                                beta_balance=weights["balance"], lambda_u=weights["uloss"],
                                **overrides)
  expected = _np_regularizers(params, batch, TOP_K)
  for train in (False, True):
    total, (metrics, _, predictions) = method.loss(params, state, batch, jax.random.key(2), train)
    metrics = {k: float(v) for k, v in metrics.items()}
    assert set(metrics) == {"task", "loss"} | terms
    assert all(np.isfinite(v) for v in metrics.values())
    # Mean squared error over the valid rows only (padding rows carry garbage predictions).
    task = _masked_mean((_np(predictions) - _np(batch.label)) ** 2, batch.valid)
    assert metrics["task"] == pytest.approx(task, rel=1e-5)
    # Gates, means and log-variances do not depend on the sampling noise: same terms in both modes.
    for term in terms:
      assert metrics[term] == pytest.approx(expected[term], rel=1e-4), term
    hand_total = metrics["task"] + sum(weights[t] * metrics[t] for t in terms)
    assert metrics["loss"] == pytest.approx(hand_total, rel=1e-6)
    assert float(total) == metrics["loss"]
  np.testing.assert_allclose(  # evaluation mode: the predictions of the NumPy forward pass
      method.loss(params, state, batch, jax.random.key(2), False)[1][2],
      _np_predict("euar", params, batch), rtol=1e-4, atol=1e-5)


def test_classification_task_loss_is_cross_entropy():
  dataset = make_synthetic(jax.random.key(3), n_train=16, n_valid=0, n_test=0, seq_len=2, dims=4,
                           task="classification", num_classes=3)
  split = dataset.splits["train"]
  split = split.replace(valid=np.arange(16) < 10)
  method, params, state = _init("concat", TaskSpec.from_dataset(dataset), split)
  _, (metrics, _, logits) = method.loss(params, state, split, jax.random.key(0), False)
  assert logits.shape == (16, 3)
  log_probs = _np(jax.nn.log_softmax(_np(logits), axis=-1))
  nll = -np.take_along_axis(log_probs, np.asarray(split.label)[:, None], -1)[:, 0]
  assert float(metrics["task"]) == pytest.approx(_masked_mean(nll, split.valid), rel=1e-5)


@pytest.mark.parametrize("name, overrides", [
    ("euar", {}), ("concat", dict(dropout=0.5)), ("late_fusion", dict(dropout=0.5))])
def test_only_training_mode_is_random(name, overrides, spec, batch):
  method, params, state = _init(name, spec, batch, **overrides)
  key1, key2 = jax.random.key(10), jax.random.key(11)

  def run(key, train):
    total, (_, _, predictions) = method.loss(params, state, batch, key, train)
    return float(total), np.asarray(predictions)

  eval1, eval2 = run(key1, False), run(key2, False)
  assert eval1[0] == eval2[0]
  np.testing.assert_array_equal(eval1[1], eval2[1])
  np.testing.assert_array_equal(method.predict(params, state, batch), eval1[1])
  train1, train2 = run(key1, True), run(key2, True)
  np.testing.assert_array_equal(run(key1, True)[1], train1[1])  # same key, same draw
  assert train1[0] != train2[0]
  assert not np.allclose(train1[1], train2[1])
  assert not np.allclose(train1[1], eval1[1])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_predict_never_reads_the_clean_copy(name, spec, batch):
  """Every method: ``predict`` on a corrupted batch is unchanged when its clean copy
  (``full_features``, ``full_step_mask``) is replaced by noise."""
  config = default_model_config(name)
  config.hidden = 16
  if "num_heads" in config:
    config.num_heads = 2
  if name == "emmr":  # a classifier
    spec = TaskSpec("classification", 3, spec.modalities, spec.feature_shapes)
    batch = batch.replace(label=np.asarray(sentiment_to_class(batch.label, 3)))
  method = build(name, config, spec)
  params, state = method.init(jax.random.key(1), batch)
  corrupted = mask_time_steps(jax.random.key(2), batch, 0.5)
  keys = jax.random.split(jax.random.key(3), len(batch.modalities))
  noise = corrupted.replace(
      full_features={m: 5.0 * jax.random.normal(k, np.shape(x))
                     for k, (m, x) in zip(keys, corrupted.full_features.items())},
      full_step_mask={m: np.ones_like(x) for m, x in corrupted.full_step_mask.items()})
  predict = jax.jit(method.predict)
  np.testing.assert_array_equal(predict(params, state, corrupted), predict(params, state, noise))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(dataset, spec):
  """Each method after 8 epochs of Adam 1e-2 (batch 32): name -> (method, FitResult)."""
  config = default_train_config()
  config.update(dict(num_epochs=8, batch_size=32, learning_rate=1e-2, patience=0, progress=False))
  out = {}
  for name in METHODS:
    method = build(name, _model_config(name, hidden=32), spec)
    out[name] = method, fit(method, dataset, config, log=lambda line: None)
  return out


@pytest.mark.parametrize("name", METHODS)
def test_methods_learn(name, trained, dataset):
  method, result = trained[name]
  train_mean = float(np.mean(dataset.splits["train"].label))
  for split in ("valid", "test"):
    labels = dataset.splits[split].label
    baseline = float(np.mean(np.abs(labels - train_mean)))  # predict the training mean
    mae = evaluate(method, result.state, dataset.splits[split], dataset.task)["mae"]
    assert mae < 0.75 * baseline, (split, mae, baseline)


def test_euar_routes_to_several_experts(trained, dataset, spec):
  _, result = trained["euar"]
  model = EUARModel(spec.modalities, spec.output_dim, 32, NUM_EXPERTS, TOP_K)
  _, aux = model.apply({"params": result.state.params}, dataset.splits["test"], train=False)
  used = {m: len(np.unique(np.argmax(aux[m]["gates"], -1))) for m in spec.modalities}
  assert min(used.values()) > 1, used  # every modality routes to several experts
  for m in spec.modalities:  # k non-zero gates per sample, at most 1 in total (no renormalisation)
    gates = np.asarray(aux[m]["gates"])
    np.testing.assert_array_equal(np.sum(gates > 0, -1), TOP_K)
    assert np.all(gates.sum(-1) <= 1 + 1e-6)


def test_uloss_moves_gates_away_from_uncertain_expert(dataset, spec):
  """Controlled setting: expert 0 of every modality is made high-variance and favoured by its router
  bias, the head is zero, and only the routers train — so the task loss cannot move the gates (the
  load-balancing weight is 0 too). With the U-loss (lambda = 1) the gate mass leaves expert 0 for
  the low-variance experts; without it the gates do not move at all.
  """
  train, test = dataset.splits["train"], dataset.splits["test"]
  model = EUARModel(spec.modalities, spec.output_dim, HIDDEN, NUM_EXPERTS, TOP_K)

  def gate_mass(params):  # [N] mean gate of each expert over test samples and modalities
    _, aux = model.apply({"params": params}, test, train=False)
    return np.mean([np.asarray(aux[m]["gates"]).mean(0) for m in spec.modalities], axis=0)

  batches = list(iterate_batches(train, 16, key=jax.random.key(0)))[:8]
  masses = {}
  for use_uloss in (True, False):
    method = build("euar", _model_config(
        "euar", lambda_u=1.0, beta_balance=0.0, use_uloss=use_uloss), spec)
    params, method_state = method.init(jax.random.key(1), batches[0])
    for m in spec.modalities:
      moe = params[f"moe_{m}"]
      moe["log_var"]["bias"] = moe["log_var"]["bias"].at[0].set(2.0)  # sigma^2 ~ e^2 vs ~ 1
      moe["router"]["bias"] = moe["router"]["bias"].at[0].set(1.0)
    params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])
    labels = traverse_util.path_aware_map(
        lambda path, _: "router" if "router" in path else "frozen", params)
    optimizer = optax.multi_transform(
        {"router": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    step = jax.jit(make_train_step(method, optimizer))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), method_state=method_state,
                       key=jax.random.key_data(jax.random.key(2)))
    initial = gate_mass(params)
    for b in batches:
      state, _ = step(state, b)
    masses[use_uloss] = gate_mass(state.params)
  np.testing.assert_allclose(masses[False], initial, atol=1e-6)
  assert masses[True][0] < 0.7 * initial[0]
  assert np.argmax(initial - masses[True]) == 0  # expert 0 loses the most mass
  assert np.all(masses[True][1:] > initial[1:])  # ... to the low-variance experts


# ----------------------------------------------------------------------------- errors


def test_unknown_method_lists_available():
  for call in (lambda: build("nope", ml_collections.ConfigDict(), None),
               lambda: default_model_config("nope")):
    with pytest.raises(ValueError, match="nope") as info:
      call()
    for name in REGISTRY:
      assert name in str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (dict(top_k=0), "model.top_k"),
    (dict(expert_type="resnet"), "model.expert_type"),
    (dict(kl_reduction="max"), "model.kl_reduction"),
    (dict(balance_scale="gshard"), "model.balance_scale"),
])
def test_bad_euar_config(overrides, field, spec):
  with pytest.raises(ValueError, match=field):
    build("euar", _model_config("euar", **overrides), spec)
