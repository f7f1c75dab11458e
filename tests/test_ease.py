"""Tests for EASE (papers/004, SPEC §6.4): anchors, stop-gradients, views, ablations, training.

Compilation dominates the run time, so one jitted loss (and one Jacobian of every loss term) is
shared by most tests; the training tests share one :func:`mmjax.train.fit` run.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import make_synthetic, mask_time_steps, sentiment_to_class, standardize
from mmjax.data.synthetic import ModalitySpec
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods import ease
from mmjax.nn import TransformerEncoder
from mmjax.train import default_train_config, evaluate, fit

SMALL = dict(hidden=16, num_heads=2)
ALL_TERMS = {"task", "task_bins", "var_missing", "ucmi", "uada", "anchor", "align", "cons", "asym",
             "consist", "loss"}


def _config(**overrides):
  config = default_model_config("ease")
  config.update(dict(SMALL, **overrides))
  return config


@pytest.fixture(scope="module")
def dataset():
  """Three equally noisy readings of the sentiment (``r_m = s + eps_m``) and little nuisance: two
  observed modalities pin down ``s``, hence the third one, better than one (variance test)."""
  modality = ModalitySpec(seq_len=4, dim=8, signal=1.0, intensity=0.0, reading_noise=1.0,
                          bias=0.0, bias_visibility=0.0, nuisance=0.5)
  return standardize(make_synthetic(
      jax.random.key(0), n_train=320, n_valid=96, n_test=16,
      modalities={m: modality for m in ("text", "audio", "vision")}))


@pytest.fixture(scope="module")
def spec(dataset):
  return TaskSpec.from_dataset(dataset)


@pytest.fixture(scope="module")
def batch(dataset):
  """12 samples, the last 2 padding (``valid`` False); modality 1 absent in rows 0-2."""
  batch = dataset.splits["train"].take(np.arange(12))
  present = np.ones((12, 3), bool)
  present[:3, 1] = False
  valid = np.arange(12) < 10
  return batch.replace(present=present, valid=valid)


@pytest.fixture(scope="module")
def setup(spec, batch):
  """(method, params, state, jitted loss) for the default (small) configuration."""
  method = build("ease", _config(), spec)
  params, state = method.init(jax.random.key(0), batch)
  return method, params, state, jax.jit(method.loss, static_argnums=4)


# ----------------------------------------------------------------------------- transformer


def test_transformer_ignores_padded_keys():
  encoder = TransformerEncoder(num_layers=2, num_heads=2, mlp_dim=16)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  params = encoder.init(jax.random.key(1), x, mask)
  out = encoder.apply(params, x, mask)
  noise = jax.random.normal(jax.random.key(2), x.shape) * ~mask[..., None]
  out_noisy = encoder.apply(params, x + 10.0 * noise, mask)
  np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(out_noisy)[mask], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # the all-padding row stays finite
  # Without the mask the padded values do leak into the real steps.
  leaked = encoder.apply(params, x + 10.0 * noise, np.ones_like(mask))
  assert not np.allclose(np.asarray(leaked)[0, :3], np.asarray(out)[0, :3], atol=1e-3)


# ----------------------------------------------------------------------------- anchors (EMA)


def _numpy_anchor_ema(moments, z, classes, valid, momentum=0.9):
  """One EMA step of the per-class ``E[z]``, ``E[z^2]`` (``[M, K, d]`` each) in NumPy float64."""
  mean, second = (np.array(m, np.float64) for m in moments)
  for k in range(mean.shape[1]):
    rows = z[(classes == k) & valid]
    if len(rows):
      mean[:, k] = momentum * mean[:, k] + (1 - momentum) * rows.mean(0)
      second[:, k] = momentum * second[:, k] + (1 - momentum) * np.square(rows).mean(0)
  return mean, second


def test_anchors_follow_the_ema_formula(setup, spec, batch):
  method, params, state, loss = setup
  model = ease.make_model(_config(), spec)
  z_gt = np.asarray(model.apply({"params": params}, batch.full_features, batch.full_step_mask,
                                train=False, method="encode"), np.float64)
  classes = np.asarray(sentiment_to_class(batch.label, 3))
  valid = np.asarray(batch.valid)
  assert len(set(classes[valid])) == 3, classes  # every class present in the first batch
  prior = (np.zeros_like(state["mean"]), np.ones_like(state["second"]))
  mean1, second1 = _numpy_anchor_ema(prior, z_gt, classes, valid)

  # First update: the EMA from the prior N(0, I) -- not the batch statistics themselves.
  _, (_, state1, _) = loss(params, state, batch, jax.random.key(1), True)
  np.testing.assert_allclose(state1["mean"], mean1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state1["second"], second1, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(state1["seen"], True)
  np.testing.assert_allclose(ease.anchor_variance(state1), second1 - mean1 ** 2 + 1e-6,
                             rtol=1e-4, atol=1e-5)

  # Second update on a batch without class 1 (relabelled): EMA for classes 0, 2; class 1 kept.
  relabelled = np.where(classes == 1, 2.0, np.asarray(batch.label)).astype(np.float32)
  batch2 = batch.replace(label=relabelled)
  classes2 = np.asarray(sentiment_to_class(relabelled, 3))
  mean2, second2 = _numpy_anchor_ema((mean1, second1), z_gt, classes2, valid)
  _, (_, state2, _) = loss(params, state1, batch2, jax.random.key(2), True)
  np.testing.assert_allclose(state2["mean"], mean2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state2["second"], second2, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(state2["mean"][:, 1], state1["mean"][:, 1])

  # Evaluation mode leaves the anchors alone.
  _, (_, state_eval, _) = loss(params, state1, batch, jax.random.key(3), False)
  jax.tree.map(np.testing.assert_array_equal, state_eval, state1)


def test_anchor_variance_counts_the_spread_between_batches():
  """A class seen once per batch: the batch variance is 0, but E[z^2] - E[z]^2 over batches is
  the spread of the samples (never the 1e-6 floor); a class seen in one batch keeps the prior's."""
  anchors = ease.init_anchors(1, 2, 1)
  values = np.array([-1.0, 1.0] * 50)
  for v in values:  # class 0 gets one sample per batch
    anchors = ease.update_anchors(anchors, jnp.full((1, 1, 1), v), jnp.array([0]),
                                  jnp.array([True]), 0.9)
  var = np.asarray(ease.anchor_variance(anchors))[0, :, 0]
  assert var[0] == pytest.approx(1.0, abs=0.06)  # the +-1 samples' variance
  anchors = ease.update_anchors(anchors, jnp.full((1, 1, 1), 3.0), jnp.array([1]),
                                jnp.array([True]), 0.9)
  # Class 1, seen once: 0.9 * (1 - 0) + 0.1 * 9 - (0.1 * 3)^2 = 1.71.
  assert float(ease.anchor_variance(anchors)[0, 1, 0]) == pytest.approx(1.71, rel=1e-5)


# ----------------------------------------------------------------------------- stop-gradients


@pytest.fixture(scope="module")
def jacobians(setup, batch):
  """d(every loss term, sum of new anchors) / d(params, anchors, full_features, features)."""
  method, params, state, _ = setup
  _, (_, state1, _) = setup[3](params, state, batch, jax.random.key(1), True)

  def outputs(params, anchors, full_features, features):
    b = batch.replace(full_features=full_features, features=features)
    _, (metrics, new_state, _) = method.loss(
        params, dict(state1, **anchors), b, jax.random.key(4), True)
    return dict(metrics, new_anchors=new_state["mean"].sum() + new_state["second"].sum())

  anchors = {"mean": state1["mean"], "second": state1["second"]}
  args = (params, anchors, dict(batch.full_features), dict(batch.features))
  return jax.jit(jax.jacrev(outputs, argnums=(0, 1, 2, 3)))(*args)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("term, wrt, zero", [
    ("loss", 1, True),  # no gradient reaches the anchors from any term
    ("anchor", 1, True),
    ("new_anchors", 0, True),  # the EMA update is gradient-free
    ("ucmi", 2, True),  # the NLL target z^gt = sg(encoder(full_features))
    ("asym", 2, True),  # the full view is a stop-gradient teacher
    ("loss", 2, True),  # the clean copy only feeds stop-gradient targets
    ("ucmi", 0, False),  # ... while the terms themselves are trained
    ("asym", 0, False),
    ("cons", 0, False),
    ("uada", 0, False),
    ("anchor", 0, False),
    ("task", 3, False),
])
def test_gradient_paths(jacobians, term, wrt, zero):
  norm = _norm(jacobians[term][wrt])
  assert (norm == 0.0) if zero else (norm > 0.0), (term, wrt, norm)


def test_nll_target_changes_the_value(setup, batch):
  """The clean copy matters for the value of L_ucmi (only its gradient is stopped)."""
  _, params, state, loss = setup
  shifted = batch.replace(full_features={m: x + 1.0 for m, x in batch.full_features.items()})
  ucmi = [float(loss(params, state, b, jax.random.key(1), True)[1][0]["ucmi"])
          for b in (batch, shifted)]
  assert abs(ucmi[0] - ucmi[1]) > 1e-3, ucmi


# ----------------------------------------------------------------------------- randomness


def test_views_are_drawn_from_the_key():
  draw = jax.jit(ease.sample_views, static_argnums=(1, 2, 3))
  a, b, c = (np.asarray(draw(jax.random.key(k), 4, 4096, 3)) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.any(-1).all()  # non-empty subsets
  codes = (a * (1 << np.arange(3))).sum(-1)  # uniform over the 7 non-empty subsets
  freq = np.bincount(codes.ravel(), minlength=8)[1:] / codes.size
  np.testing.assert_allclose(freq, 1 / 7, atol=0.01)


def test_randomness_only_in_training(setup, batch):
  method, params, state, loss = setup
  out = {(k, train): loss(params, state, batch, jax.random.key(k), train)
         for k, train in itertools.product((1, 2), (True, False))}
  eval_predictions = np.asarray(out[1, False][1][2])
  np.testing.assert_array_equal(eval_predictions, out[2, False][1][2])
  np.testing.assert_allclose(method.predict(params, state, batch), eval_predictions, atol=1e-5)
  # Training draws missing modalities, completions and views from the key.
  assert not np.allclose(out[1, True][1][2], out[2, True][1][2])
  assert float(out[1, True][1][0]["cons"]) != float(out[2, True][1][0]["cons"])
  for k in ("loss", "cons"):  # same key -> same numbers
    again = loss(params, state, batch, jax.random.key(1), True)[1][0][k]
    assert float(again) == float(out[1, True][1][0][k])


# ----------------------------------------------------------------------------- degraded modalities


def _zero_mu_heads(params):
  return {k: (jax.tree.map(jnp.zeros_like, v) if k.startswith("mu_heads") else v)
          for k, v in params.items()}


@pytest.mark.parametrize("rate, changes", [(0.0, False), (0.9, True)])
def test_imputation_acts_under_time_step_masking(setup, batch, rate, changes):
  """Intra-modal missingness (EASE Tables 1-2): fully masked modalities are completed, so zeroing
  the mean heads changes the predictions -- only where something is masked."""
  method, params, state, _ = setup
  full = batch.replace(present=np.ones_like(batch.present))
  masked = mask_time_steps(jax.random.key(5), full, rate)
  counts = np.stack([np.asarray(masked.step_mask[m]).sum(-1) for m in masked.modalities], 1)
  assert ((counts == 0).any() if changes else (counts > 0).all())
  predict = jax.jit(method.predict)
  before, after = predict(params, state, masked), predict(_zero_mu_heads(params), state, masked)
  assert (not np.allclose(before, after)) == changes


def test_fully_masked_modality_is_an_absent_one(setup, batch):
  """Every step of a modality masked = the modality marked absent: same predictions, same loss."""
  method, params, state, loss = setup
  full = batch.replace(present=np.ones_like(batch.present))
  rows = np.arange(12) < 6
  audio = full.modalities.index("audio")
  masked = full.replace(
      features=dict(full.features, audio=np.where(rows[:, None, None], 0.0,
                                                  full.features["audio"])),
      step_mask=dict(full.step_mask, audio=np.asarray(full.step_mask["audio"]) & ~rows[:, None]))
  absent = full.replace(present=np.asarray(full.present) & ~(rows[:, None] & (np.arange(3) == audio)))
  np.testing.assert_allclose(method.predict(params, state, masked),
                             method.predict(params, state, absent), rtol=1e-6, atol=1e-6)
  for train in (False, True):
    got = loss(params, state, masked, jax.random.key(6), train)[1][0]
    want = loss(params, state, absent, jax.random.key(6), train)[1][0]
    assert float(got["ucmi"]) > 0  # the masked pairs are UCMI targets
    for term in want:
      np.testing.assert_allclose(got[term], want[term], rtol=1e-5, atol=1e-6, err_msg=term)


def _stacked_clean_encoding(model, params, batch, z, *, train, rngs):
  """The former two-copy encoder pass: ``[corrupted; clean]`` on the batch axis, clean half kept."""
  del z
  present = jnp.asarray(batch.present)
  observed = {m: jnp.asarray(batch.step_mask[m]) & present[:, i, None]
              for i, m in enumerate(batch.modalities)}
  stacked = model.apply(
      {"params": params},
      {m: jnp.concatenate([batch.features[m], batch.full_features[m]]) for m in model.modalities},
      {m: jnp.concatenate([observed[m], batch.full_step_mask[m]]) for m in model.modalities},
      train=train, method="encode", rngs=rngs)
  return jax.lax.stop_gradient(jnp.split(stacked, 2)[1])


@pytest.mark.parametrize("corrupted", [False, True])
def test_one_encoder_pass_equals_the_stacked_pass(setup, batch, corrupted, monkeypatch):
  """Loss terms and gradients of the one-pass step (``sg(z)`` on an uncorrupted batch, a
  forward-only clean pass otherwise) equal those of the stacked two-copy pass."""
  method, params, state, _ = setup
  b = batch.replace(present=np.ones_like(batch.present))
  if corrupted:
    b = mask_time_steps(jax.random.key(7), b, 0.6)

  def value_and_grad():
    fn = lambda p: method.loss(p, state, b, jax.random.key(8), True)
    (_, (metrics, _, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return metrics, grads

  got = value_and_grad()
  monkeypatch.setattr(ease, "clean_encoding", _stacked_clean_encoding)
  want = value_and_grad()
  for term in want[0]:
    np.testing.assert_allclose(got[0][term], want[0][term], rtol=1e-5, atol=1e-6, err_msg=term)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), *got[1:],
               *want[1:])


def test_ucmi_reduction_mean_is_the_sum_over_d(setup, spec, batch):
  """eq. 4 sums the NLL over the d dimensions; the default "mean" divides it by d."""
  _, params, state, loss = setup
  summed = build("ease", _config(ucmi_reduction="sum"), spec)
  got = loss(params, state, batch, jax.random.key(9), False)[1][0]["ucmi"]
  want = summed.loss(params, state, batch, jax.random.key(9), False)[1][0]["ucmi"]
  assert float(got) == pytest.approx(float(want) / SMALL["hidden"], rel=1e-5)


def test_sims_labels_use_the_sims_bins(batch):
  """Regression bins on the data's scale: MOSI +-0.5, CH-SIMS (labels in [-1, 1]) +-0.1."""
  labels = np.array([-1.0, -0.3, -0.1, 0.0, 0.1, 0.2, 0.6, 1.0], np.float32)
  b = batch.take(np.arange(8)).replace(label=labels)
  spec = TaskSpec("regression", None, b.modalities, {}, "sims_regression")
  np.testing.assert_array_equal(ease.class_labels(b, spec), [0, 0, 0, 1, 1, 2, 2, 2])
  mosi = TaskSpec("regression", None, b.modalities, {})
  np.testing.assert_array_equal(ease.class_labels(b, mosi), [0, 1, 1, 1, 1, 1, 2, 2])


# ----------------------------------------------------------------------------- terms / ablations


@pytest.mark.parametrize("overrides, removed", [
    ({}, set()),
    # w/o UCMI: no completion at all, so nothing to align either (Table 4).
    ({"use_ucmi": False}, {"ucmi", "var_missing", "uada", "anchor", "align"}),
    ({"use_ucsa": False}, {"uada", "anchor", "align"}),
    ({"use_mipc": False}, {"cons", "asym", "consist"}),
    ({"use_uada": False}, {"uada"}),
    ({"use_anchor": False}, {"anchor"}),
    ({"use_cons": False}, {"cons"}),
    ({"use_asym": False}, {"asym"}),
])
def test_terms_finite_reported_and_ablated(overrides, removed, setup, spec, batch):
  config = _config(**overrides)
  if overrides:
    method = build("ease", config, spec)
    params, state = method.init(jax.random.key(0), batch)
    loss = jax.jit(method.loss, static_argnums=4)
  else:
    _, params, state, loss = setup
  _, (_, state1, _) = loss(params, state, batch, jax.random.key(1), True)  # fill the anchors
  total, (metrics, _, _) = loss(params, state1, batch, jax.random.key(2), True)
  assert set(metrics) == ALL_TERMS - removed
  for name, value in metrics.items():
    assert np.isfinite(float(value)), name
  m = {k: float(v) for k, v in metrics.items()}
  if "anchor" in m:
    assert m["anchor"] > 0  # the anchors were filled by the first step, so the term is active
  align = m.get("uada", 0.0) + config.beta_anchor * m.get("anchor", 0.0)
  expected = (m["task"] + m["task_bins"] + config.lambda_ucmi * m.get("ucmi", 0.0)
              + config.lambda_align * align
              + config.lambda_consist * (m.get("cons", 0.0) + m.get("asym", 0.0)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)


def test_classification_uses_the_task_classes(dataset):
  """Classification: logits over the task's classes, task = cross-entropy, anchors per class."""
  labels = np.arange(12) % 2
  batch = dataset.splits["train"].take(np.arange(12)).replace(label=labels.astype(np.int32))
  spec = TaskSpec("classification", 2, batch.modalities, dataset.feature_shapes())
  method = build("ease", _config(), spec)
  params, state = method.init(jax.random.key(0), batch)
  _, (metrics, new_state, logits) = jax.jit(method.loss, static_argnums=4)(
      params, state, batch, jax.random.key(1), True)
  assert logits.shape == (12, 2) and "task_bins" not in metrics
  x = np.asarray(logits, np.float64)
  log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
  np.testing.assert_allclose(metrics["task"], -log_p[np.arange(12), labels].mean(), rtol=1e-5)
  assert new_state["mean"].shape == (3, 2, SMALL["hidden"])


@pytest.mark.parametrize("overrides, field", [
    ({"num_heads": 3}, "num_heads"),
    ({"anchor_momentum": 1.0}, "anchor_momentum"),
    ({"num_views": 1}, "num_views"),
    ({"ucmi_reduction": "median"}, "ucmi_reduction"),
    ({"min_observed_steps": 0}, "min_observed_steps"),
])
def test_bad_config(overrides, field, spec):
  with pytest.raises(ValueError, match=field):
    build("ease", _config(**overrides), spec)


# ----------------------------------------------------------------------------- training


def _train_config(num_epochs):
  """Whole modalities dropped at rate 0.5 (not EASE's LNLN default): the variance test needs
  targets completed from one and from two context modalities, which step masking of 4-step
  sequences rarely produces."""
  config = default_train_config()
  config.update(dict(num_epochs=num_epochs, batch_size=32, learning_rate=3e-3, patience=0,
                     progress=False, train_corruption="missing_rate:0.5"))
  return config


@pytest.fixture(scope="module")
def trained(dataset, spec):
  """20 epochs with L_ucmi at eq. 4's scale (summed over d): at d = 16 the per-dimension mean is too
  weak a signal for the variance heads to separate one context modality from two in 20 epochs."""
  method = build("ease", _config(ucmi_reduction="sum"), spec)
  return method, fit(method, dataset, _train_config(20), log=lambda line: None)


def test_fit_learns(trained, dataset):
  method, result = trained
  labels = dataset.splits["valid"].label
  baseline = float(np.mean(np.abs(labels - np.mean(dataset.splits["train"].label))))
  mae = evaluate(method, result.state, dataset.splits["valid"], dataset.task)["mae"]
  assert mae < 0.6 * baseline, (mae, baseline)


def test_imputation_nll_decreases(trained):
  history = trained[1].history
  assert history[-1]["train/ucmi"] < history[0]["train/ucmi"] - 1.0, [
      h["train/ucmi"] for h in history]


def test_variance_grows_with_missing_modalities(trained, dataset, spec):
  """Controlled: each target completed from both other modalities vs from either one alone."""
  _, result = trained
  model = ease.make_model(_config(), spec)
  params = result.state.params
  split = dataset.splits["valid"]
  z = model.apply({"params": params}, split.full_features, split.full_step_mask, train=False,
                  method="encode")

  def mean_var(target, available):
    available = np.broadcast_to(np.asarray(available), (split.batch_size, 3))
    _, var = model.apply({"params": params}, z, available, method="complete")
    return float(var[:, target].mean())

  for target in range(3):
    others = [a for a in range(3) if a != target]
    one_missing = mean_var(target, [a != target for a in range(3)])
    for a in others:
      two_missing = mean_var(target, [b == a for b in range(3)])
      assert two_missing > one_missing, (target, a, one_missing, two_missing)


def test_same_seed_same_metrics(trained, dataset, spec):
  method = build("ease", _config(ucmi_reduction="sum"), spec)  # the config of `trained`
  again = fit(method, dataset, _train_config(1), log=lambda line: None).history[0]
  first = trained[1].history[0]
  for key, value in first.items():
    if key != "seconds":
      assert again[key] == value, key
