"""EUAR's loss as written (papers/001 eq. 4-12) and its switches (``docs/euar.md``).

Each regulariser is recomputed in NumPy (float64) from the model's own gates, means and
log-variances (the forward pass itself is pinned against NumPy in ``tests/test_methods.py``), on
parameters perturbed away from their initialisation so that gates and variances are uneven.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import Batch, Dataset
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods.euar import EUARModel, modality_regularizers, routed_experts
from mmjax.train import data_mesh, default_train_config, fit

HIDDEN, NUM_EXPERTS, TOP_K = 8, 4, 2
TERMS = ("kl", "balance", "uloss")
AUDIO = 1  # index of the modality made absent in the hand-built batch


def _split(rng, n):
  """``n`` regression samples of three random sequence modalities, 4 steps, some padded."""
  dims = {"text": 6, "audio": 5, "vision": 3}
  lengths = rng.integers(1, 5, size=n)
  step_mask = {m: np.arange(4) < lengths[:, None] for m in dims}
  features = {m: rng.normal(size=(n, 4, d)).astype(np.float32) * step_mask[m][..., None]
              for m, d in dims.items()}
  label = rng.uniform(-3, 3, size=n).astype(np.float32)
  return Batch.create(features, label, step_mask=step_mask, task="regression")


@pytest.fixture(scope="module")
def dataset():
  rng = np.random.default_rng(0)
  return Dataset("random", "regression", None,
                 {"train": _split(rng, 32), "valid": _split(rng, 16), "test": _split(rng, 16)})


@pytest.fixture(scope="module")
def spec(dataset):
  return TaskSpec.from_dataset(dataset)


@pytest.fixture(scope="module")
def batch(dataset):
  """12 test samples; audio absent in rows 1, 4, 6, 9, text in row 4; rows 10-11 padding."""
  batch = dataset.splits["test"].take(np.arange(12))
  present = np.ones((12, 3), bool)
  present[[1, 4, 6, 9], AUDIO] = False
  present[4, 0] = False
  return batch.replace(present=present, valid=np.arange(12) < 10)


def _config(**overrides):
  config = default_model_config("euar")
  config.update(dict(hidden=HIDDEN, num_experts=NUM_EXPERTS, top_k=TOP_K,
                     alpha_kl=0.3, beta_balance=0.2, lambda_u=0.1))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def params(spec, batch):
  """Initial parameters plus N(0, 0.3^2) noise on every entry."""
  params, _ = jax.jit(build("euar", _config(), spec).init)(jax.random.key(1), batch)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return treedef.unflatten(
      [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _aux(params, spec, batch):
  """The dense MoE outputs ``{m: {"gates", "mean", "log_var"}}`` as float64 NumPy arrays."""
  model = EUARModel(spec.modalities, spec.output_dim, HIDDEN, NUM_EXPERTS, TOP_K)
  _, aux = model.apply({"params": params}, batch, train=False)
  return {m: {k: np.asarray(v, np.float64) for k, v in a.items()} for m, a in aux.items()}


def _metrics(params, spec, batch, train=False, **overrides):
  method = build("euar", _config(**overrides), spec)
  _, (metrics, _, predictions) = method.loss(params, {}, batch, jax.random.key(2), train)
  return {k: float(v) for k, v in metrics.items()}, np.asarray(predictions)


def _np_terms(a, where, kl_reduction="sum", balance_scale="euar"):
  """One modality's eq. 4 (mean over samples and experts), eq. 7-9 and eq. 10 over ``where``."""
  gates, mean, log_var = a["gates"][where], a["mean"][where], a["log_var"][where]
  n, d = gates.shape[1], mean.shape[-1]
  kl = 0.5 * np.sum(np.exp(log_var) + mean**2 - 1.0 - log_var, -1)  # [B, N], eq. 4
  if kl_reduction == "mean":
    kl = kl / d
  r = np.eye(n)[gates.argmax(-1)].mean(0)  # eq. 8
  p = gates.mean(0)  # eq. 9
  return dict(kl=kl.mean(), balance=(1 / n if balance_scale == "euar" else n) * np.sum(r * p),
              uloss=np.mean(gates * np.exp(log_var).mean(-1)))


def _np_totals(aux, batch, **options):
  """Sums over modalities of :func:`_np_terms`, each modality over its valid, present samples."""
  totals = dict.fromkeys(TERMS, 0.0)
  for i, a in enumerate(aux.values()):
    where = np.asarray(batch.valid) & np.asarray(batch.present)[:, i]
    for term, value in _np_terms(a, where, **options).items():
      totals[term] += value
  return totals


# ----------------------------------------------------------------------------- eq. 4: KL reduction


@pytest.mark.parametrize("kl_reduction", ["sum", "mean"])
def test_regularizers_match_numpy(kl_reduction, params, spec, batch):
  metrics, _ = _metrics(params, spec, batch, kl_reduction=kl_reduction)
  expected = _np_totals(_aux(params, spec, batch), batch, kl_reduction=kl_reduction)
  for term in TERMS:
    assert metrics[term] == pytest.approx(expected[term], rel=1e-5), term
  assert metrics["loss"] == pytest.approx(
      metrics["task"] + 0.3 * metrics["kl"] + 0.2 * metrics["balance"] + 0.1 * metrics["uloss"],
      rel=1e-6)


def test_kl_sum_is_d_times_mean(params, spec, batch):
  summed, _ = _metrics(params, spec, batch, kl_reduction="sum")
  averaged, _ = _metrics(params, spec, batch, kl_reduction="mean")
  assert summed["kl"] == pytest.approx(HIDDEN * averaged["kl"], rel=1e-6)
  for term in ("task", "balance", "uloss"):
    assert summed[term] == averaged[term], term


def test_default_and_paper_preset_follow_the_paper():
  from experiments.configs import paper  # pylint: disable=g-import-not-at-top
  for config in (default_model_config("euar"), paper.get_config("euar").model):
    assert (config.kl_reduction, config.balance_scale) == ("sum", "euar")
    assert (config.num_experts, config.top_k) == (8, 3)


# ----------------------------------------------------------------------------- eq. 7: balance scale


def test_switch_balance_scale_is_n_squared_times_euar(params, spec, batch):
  euar, _ = _metrics(params, spec, batch, balance_scale="euar")
  switch, _ = _metrics(params, spec, batch, balance_scale="switch")
  assert switch["balance"] == pytest.approx(NUM_EXPERTS**2 * euar["balance"], rel=1e-6)
  expected = _np_totals(_aux(params, spec, batch), batch, balance_scale="switch")["balance"]
  assert switch["balance"] == pytest.approx(expected, rel=1e-5)
  assert switch["loss"] - euar["loss"] == pytest.approx(
      0.2 * (switch["balance"] - euar["balance"]), rel=1e-4)


# ----------------------------------------------------------------------------- sparse == dense


@pytest.mark.parametrize("train", [False, True])
def test_sparse_experts_is_the_same_objective(train, params, spec, batch):
  dense, dense_predictions = _metrics(params, spec, batch, train, sparse_experts=False)
  sparse, sparse_predictions = _metrics(params, spec, batch, train, sparse_experts=True)
  assert set(dense) == set(sparse) == {"task", "loss", *TERMS}
  assert sparse == dense  # every term, same key: the training loss always evaluates all N experts
  np.testing.assert_array_equal(sparse_predictions, dense_predictions)


def test_sparse_experts_predicts_like_dense_with_a_gather(params, spec, batch):
  dense = build("euar", _config(sparse_experts=False), spec)
  sparse = build("euar", _config(sparse_experts=True), spec)
  np.testing.assert_allclose(sparse.predict(params, {}, batch), dense.predict(params, {}, batch),
                             rtol=1e-5, atol=1e-6)
  jaxpr = lambda method: str(jax.make_jaxpr(method.predict)(params, {}, batch))
  assert "top_k" in jaxpr(sparse) and "top_k" not in jaxpr(dense)  # only sparse picks k experts


# ----------------------------------------------------------------------------- absent modalities


def test_absent_modality_counts_like_the_restricted_batch(params, spec, batch):
  """Audio's terms on the batch with absent rows == its terms on the batch of its present rows."""
  where = np.asarray(batch.valid) & np.asarray(batch.present)[:, AUDIO]
  restricted = batch.take(np.flatnonzero(where))
  m = spec.modalities[AUDIO]
  options = dict(kl_reduction="sum", balance_scale="euar")
  full = _aux(params, spec, batch)[m]
  got = modality_regularizers(full, where, **options)
  want = modality_regularizers(_aux(params, spec, restricted)[m], restricted.valid, **options)
  with_absent = modality_regularizers(full, np.asarray(batch.valid), **options)
  for term in TERMS:
    assert float(got[term]) == pytest.approx(float(want[term]), rel=1e-6), term
    assert float(got[term]) == pytest.approx(_np_terms(full, where)[term], rel=1e-6), term
    assert float(with_absent[term]) != pytest.approx(float(got[term]), rel=1e-3), term


def test_absent_rows_get_no_regularizer_gradient(params, spec, batch):
  m = spec.modalities[AUDIO]
  aux = {k: jnp.asarray(v, jnp.float32) for k, v in _aux(params, spec, batch)[m].items()}
  where = np.asarray(batch.valid) & np.asarray(batch.present)[:, AUDIO]

  def total(a):
    terms = modality_regularizers(a, where, kl_reduction="sum", balance_scale="euar")
    return sum(terms.values())

  grads = jax.grad(total)(aux)
  for name in ("gates", "mean", "log_var"):
    grad = np.asarray(grads[name])
    assert np.all(grad[~where] == 0), name
    assert np.any(grad[where] != 0), name


# ----------------------------------------------------------------------------- k clamped to N


def test_routed_experts_clamps_top_k_with_one_warning(caplog):
  assert routed_experts(3, 8) == 3
  assert not caplog.records
  assert routed_experts(3, 2) == 2
  assert [r.getMessage() for r in caplog.records] == [
      "model.top_k=3 exceeds model.num_experts=2: clamped to model.top_k=2"]
  with pytest.raises(ValueError, match="model.top_k: must be >= 1, got 0"):
    routed_experts(0, 2)


def test_two_experts_with_default_top_k_train(dataset, spec, caplog):
  """The paper's N = 2 ablation with the default k = 3: k = 2 (both experts), two finite steps."""
  config = _config(num_experts=2, top_k=3)
  method = build("euar", config, spec)
  assert any("clamped to model.top_k=2" in r.getMessage() for r in caplog.records)
  train_config = default_train_config()
  train_config.update(dict(num_epochs=1, batch_size=16, patience=0, progress=False))
  result = fit(method, dataset, train_config, mesh=data_mesh(jax.devices()[:1]), log=lambda _: None)
  [record] = result.history
  assert record["step"] == 2 and np.isfinite(record["train/loss"]), record
  params, test = result.state.params, dataset.splits["test"]
  model = EUARModel(spec.modalities, spec.output_dim, HIDDEN, 2, 2)
  outputs, aux = model.apply({"params": params}, test, train=False)
  for a in aux.values():  # k = N = 2: both gates non-zero, the full softmax
    np.testing.assert_allclose(np.sum(np.asarray(a["gates"]), -1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(method.predict(params, {}, test), outputs[:, 0], rtol=1e-6)
