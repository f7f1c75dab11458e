"""Tests for EMMR (papers/002, SPEC §6.2): the two stages, reconstruction, the key-missing switch,
the ensemble weights, the loss terms, determinism and the encoder-decoder blocks.

Compilation dominates the run time: one two-stage :func:`mmjax.train.fit` (tiny widths, dropout 0,
one device) is shared by the training tests; the evaluation-mode internals
(:func:`emmr.diagnostics`) and the stage-2 loss are each jitted once.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.data import Batch, Dataset
from mmjax.flops import sub_jaxprs
from mmjax.methods import TaskSpec, build, default_model_config
from mmjax.methods import emmr
from mmjax.nn import MLPAutoencoder, apply_copy_per_row, apply_stacked, chunks_run, map_selected
from mmjax.train import data_mesh, default_train_config, fit

# lambda_backward = 1 (paper: 0.1) makes the reconstruction effect large within a few epochs.
SMALL = dict(hidden=8, num_heads=2, mlp_ratio=1, ae_hidden=(16, 8), num_residual_blocks=2,
             dropout=0.0, pretrain_epochs=2, lambda_backward=1.0)
MEMBERS = ("tf", "ae", "mmin")
MAIN_TERMS = ({"cls", "forward", "backward", "semantic", "key_missing", "missing", "loss"}
              | {f"{term}_{e}" for term in ("backward", "recovery") for e in MEMBERS})
MODALITIES = ("text", "audio", "vision")


def _config(**overrides):
  config = default_model_config("emmr")
  config.update(dict(SMALL, **overrides))
  return config


def _split(rng, n, weights, patterns):
  """``n`` samples of 3 classes: modality ``m`` at step ``t`` reads ``[2 onehot(y), z] W_m +
  pattern_m[t]`` plus step noise (``z`` 2-d, shared by the modalities): any two modalities predict
  the class and ``z`` of the third; every modality has a sample-independent profile over time."""
  y = rng.integers(0, 3, n)
  latent = np.concatenate([2.0 * np.eye(3)[y], rng.normal(size=(n, 2))], axis=1)
  features = {m: (latent @ w)[:, None, :] + pattern + 0.3 * rng.normal(size=(n,) + pattern.shape)
              for m, w, pattern in zip(MODALITIES, weights, patterns)}
  return Batch.create({m: x.astype(np.float32) for m, x in features.items()},
                      y.astype(np.int32), task="classification", num_classes=3)


@pytest.fixture(scope="module")
def dataset():
  """NumPy data (``make_synthetic`` would cost seconds of eager compiles): T = 4, D = 6, 5, 4."""
  rng = np.random.default_rng(0)
  weights = [rng.normal(size=(5, d)) / np.sqrt(5) for d in (6, 5, 4)]
  patterns = [2.0 * rng.normal(size=(4, d)) for d in (6, 5, 4)]
  return Dataset("toy", "classification", 3, {
      s: _split(rng, n, weights, patterns)
      for s, n in (("train", 192), ("valid", 64), ("test", 32))})


@pytest.fixture(scope="module")
def spec(dataset):
  return TaskSpec.from_dataset(dataset)


@pytest.fixture(scope="module")
def method(spec):
  return build("emmr", _config(), spec)


def _train_config():
  config = default_train_config()
  config.update(dict(num_epochs=8, batch_size=32, learning_rate=1e-2, patience=0, progress=False))
  return config


def _fit(method, dataset):
  return fit(method, dataset, _train_config(), mesh=data_mesh(jax.devices()[:1]),
             log=lambda line: None)


@pytest.fixture(scope="module")
def trained(method, dataset):
  """The FitResult of 2 pretrain + 8 main epochs."""
  return _fit(method, dataset)


@pytest.fixture(scope="module")
def pretrained_only(method, dataset):
  """Stage "pretrain" alone, same seed: the parameters stage "main" starts from."""
  return _fit(dataclasses.replace(method, stages=method.stages[:1]), dataset)


@pytest.fixture(scope="module")
def init_params(method, dataset):
  """The parameters ``fit`` starts from (``init`` with ``fold_in(PRNGKey(0), 0)``)."""
  example = dataset.splits["train"].take(np.arange(2))
  return method.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), example)[0]


@pytest.fixture(scope="module")
def diagnose(spec):
  """:func:`emmr.diagnostics`, compiled without backend optimisation (a few calls only)."""
  return jax.jit(lambda params, batch: emmr.diagnostics(params, batch, _config(), spec),
                 compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def corrupted(dataset):
  """The test split with sample ``i`` missing modality ``i % 4 - 1`` (none when ``i % 4 == 0``)."""
  split = dataset.splits["test"]
  drop = np.arange(split.batch_size) % 4 - 1
  present = np.arange(3)[None] != drop[:, None]
  features = {m: np.where(present[:, i, None, None], x, 0.0).astype(np.float32)
              for i, (m, x) in enumerate(split.features.items())}
  return split.replace(features=features, present=present)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_autoencoder(params, x):
  """Eq. 5 in NumPy: ReLU layers, the last decoder layer linear; returns (E, D)."""
  dense = lambda p, h: h @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  encoders = sorted((k for k in params if k.startswith("encoder_")), key=lambda k: int(k[8:]))
  decoders = sorted((k for k in params if k.startswith("decoder_")), key=lambda k: int(k[8:]))
  h = x
  for k in encoders:
    h = np.maximum(dense(params[k], h), 0.0)
  code = h
  for k in decoders[:-1]:
    h = np.maximum(dense(params[k], h), 0.0)
  return code, dense(params[decoders[-1]], h)


# ----------------------------------------------------------------------------- stages


def test_stage_one_parameters_are_frozen_in_stage_two(trained, pretrained_only, init_params):
  after_stage_one = pretrained_only.state.params
  final = trained.state.params
  pairs = list(zip(jax.tree.leaves(after_stage_one["pretrained"]),
                   jax.tree.leaves(final["pretrained"]),
                   jax.tree.leaves(init_params["pretrained"]), strict=True))
  assert all(np.array_equal(a, b) for a, b, _ in pairs)  # bit-identical after stage 2
  assert all(not np.array_equal(a, c) for a, _, c in pairs)  # but trained in stage 1
  # Stage 1 leaves the EMMR network at its initialisation ...
  for a, b in zip(jax.tree.leaves(after_stage_one["emmr"]), jax.tree.leaves(init_params["emmr"]),
                  strict=True):
    assert np.array_equal(a, b)
  # ... stage 2 trains every EMMR leaf except the unused MMIN encoder output (E^MMIN, eq. 6).
  for path, leaf in jax.tree_util.tree_leaves_with_path(final["emmr"]):
    unused = "encoder_decoders_mmin" in str(path) and "'code'" in str(path)
    initial = init_params["emmr"]
    for key in path:
      initial = initial[key.key]
    assert np.array_equal(leaf, initial) == unused, path


def test_stage_layout_and_ablation_without_forward(method, spec, init_params):
  assert [s.name for s in method.stages] == ["pretrain", "main"]
  assert method.stages[0].num_epochs == SMALL["pretrain_epochs"]
  assert method.stages[1].num_epochs is None
  for stage, trains_pretrained in zip(method.stages, (True, False)):
    mask = stage.trainable(init_params)
    assert set(jax.tree.leaves(mask["pretrained"])) == {trains_pretrained}
    assert set(jax.tree.leaves(mask["emmr"])) == {not trains_pretrained}
  # Without L_forward the pre-trained network is unused: no stage 1.
  assert [s.name for s in build("emmr", _config(use_forward=False), spec).stages] == ["main"]


# ----------------------------------------------------------------------------- reconstruction


def test_decoders_reduce_reconstruction_error_over_training(trained):
  """``recovery_<e>``: the divergence on the dropped segments; ``backward_<e>``: on every step.

  Every member's error on the dropped segments falls: TF attends to the other modalities, AE and
  MMIN reconstruct the utterance vectors across modalities (whether they beat a constant imputer
  is :func:`test_members_reconstruct_from_the_other_modalities`).
  """
  main = [r for r in trained.history if r["stage"] == "main"]
  first, last = main[0], main[-1]
  # Measured: TF and AE fall to ~0.6x of epoch 1, MMIN (near the identity at init) to ~0.77x.
  for member, factor in (("tf", 0.6), ("ae", 0.7), ("mmin", 0.85)):
    key = f"train/recovery_{member}"
    assert last[key] < factor * first[key], (member, first[key], last[key])


def test_diagnostics_recovery_error(trained, diagnose, corrupted):
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), diagnose(trained.state.params,
                                                                   corrupted))
  log_p = np.log(_softmax(out["decoded"]))  # [K, B, T, d]
  log_q = np.log(_softmax(out["x_full"]))[None]
  divergence = 0.5 * np.sum((np.exp(log_p) - np.exp(log_q)) * (log_p - log_q), -1)
  dropped = ~np.asarray(corrupted.present)[:, np.repeat(np.arange(3), 4)]  # [B, T]
  expected = (divergence * dropped).sum(-1) / np.maximum(dropped.sum(-1), 1)
  np.testing.assert_allclose(out["recovery_error"], expected, rtol=1e-4, atol=1e-6)
  # The recovered input keeps the present segments of X.
  assert np.allclose(out["x"][~dropped], out["x_full"][~dropped], atol=1e-5)


# ----------------------------------------------------------------------------- switch, ensemble


@pytest.mark.parametrize("which", ["init", "trained"])
def test_switch_routes_exactly_the_disagreeing_samples(which, trained, init_params, diagnose,
                                                       corrupted):
  params = init_params if which == "init" else trained.state.params
  out = jax.tree.map(np.asarray, diagnose(params, corrupted))
  present = np.asarray(corrupted.present)
  full = out["full_logits"][0].argmax(-1)  # member 0 = TF, the backbone
  pairs = out["loo_logits"][0].argmax(-1)  # [B, M]: the pair without modality k
  expected = np.array([any(full[b] != pairs[b, k] for k in range(3) if not present[b, k])
                       for b in range(len(full))])
  np.testing.assert_array_equal(out["key_missing"], expected)
  assert not expected[present.all(-1)].any()
  if which == "init":  # untrained classifiers disagree often: both branches are exercised
    assert 0 < expected.sum() < (~present.all(-1)).sum()
  routed = np.where(expected[:, None], out["ensemble_logits"], out["backbone_logits"])
  np.testing.assert_allclose(out["logits"], routed, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out["ensemble_logits"], out["backbone_logits"])


def test_ensemble_weights_follow_eq_10_to_12(trained, diagnose, corrupted):
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), diagnose(trained.state.params,
                                                                   corrupted))
  loo = out["loo_logits"]  # [K, B, M, C]
  alpha = _softmax(_softmax(loo).max(-1))
  np.testing.assert_allclose(out["alpha"], alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["alpha"].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["beta"].sum(-1), 1.0, rtol=1e-6)
  assert (out["beta"] > 0).all()
  e_key = (alpha[..., None] * loo).reshape(loo.shape[:2] + (-1,))
  np.testing.assert_allclose(out["e_key"], e_key, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["r"], np.einsum("bk,kbw->bw", out["beta"], e_key), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("fusion, expected", [
    ("max", [[3.0, 1.0]]),
    ("average", [[1.0, 0.0]]),
])
def test_fusion_alternatives(fusion, expected):
  e_key = jnp.array([[[3.0, -1.0]], [[-1.0, 1.0]]])  # [K=2, B=1, W=2]
  r, beta = emmr.fuse(e_key, fusion)
  np.testing.assert_allclose(r, expected)
  assert beta is None


def test_attention_fusion_weights():
  e_key = jnp.array([[[3.0, -1.0]], [[-1.0, 1.0]]])
  r, beta = emmr.fuse(e_key, "attention", jnp.array([[np.log(3.0)], [0.0]]))
  np.testing.assert_allclose(beta, [[0.75, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(r, [[0.75 * 3 - 0.25, -0.75 + 0.25]], rtol=1e-6)


# ----------------------------------------------------------------------------- losses, seeds


def test_every_loss_term_finite_and_reported(trained):
  weights = {"cls": 1.0, "forward": 0.1, "backward": SMALL["lambda_backward"], "semantic": 1.0}
  for record in trained.history:
    terms = MAIN_TERMS if record["stage"] == "main" else {"task", "loss"}
    train = {k[6:]: v for k, v in record.items() if k.startswith("train/")}
    assert set(train) == terms | {"grad_norm"}, record["stage"]
    assert all(np.isfinite(v) for v in train.values()), train
    if record["stage"] == "main":  # epoch means of a linear combination: the same combination
      np.testing.assert_allclose(train["loss"], sum(w * train[k] for k, w in weights.items()),
                                 rtol=1e-5)
      np.testing.assert_allclose(train["backward"],
                                 np.mean([train[f"backward_{e}"] for e in MEMBERS]), rtol=1e-5)
      # EMMR's train-time corruption (drop_one:0.5) on complete data: half the samples.
      assert abs(train["missing"] - 0.5) < 0.15
  main = [r for r in trained.history if r["stage"] == "main"]
  assert main[-1]["train/cls"] < 0.5 * main[0]["train/cls"]


def test_same_seed_same_metrics(trained, pretrained_only):
  """The stage-1 refit with the same seed repeats the first stage bit for bit."""
  without_time = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert without_time(pretrained_only.history) == without_time(
      [r for r in trained.history if r["stage"] == "pretrain"])


# ----------------------------------------------------------------------------- config, blocks


@pytest.mark.parametrize("level", [0.2, 0.5])
def test_matched_drop_one_never_drops_two(method, dataset, level):
  """EMMR's matched protocol (``--matched=drop_one``) replaces its own training regime: the
  corruption the trainer applies to every training batch is ``drop_one`` at the level alone, so
  a sample misses at most one modality and a fraction ``level`` misses one (counted over 40
  batches of 192)."""
  from mmjax import robustness  # pylint: disable=g-import-not-at-top
  from mmjax.train import train_corruption  # pylint: disable=g-import-not-at-top
  config = _train_config()
  config.train_corruption = robustness.matched_corruption(
      robustness.protocols(MODALITIES)["drop_one"], level)
  corrupt = jax.jit(train_corruption(method, dataset, config))
  missing = np.concatenate([
      (~np.asarray(corrupt(jax.random.key(k), dataset.splits["train"]).present)).sum(-1)
      for k in range(40)])
  assert missing.max() == 1
  np.testing.assert_allclose(np.mean(missing == 1), level, atol=0.02)


def test_paper_literal_teacher_and_backward(method, spec, trained, corrupted):
  """``teacher_input="corrupted"``: ``L_forward`` compares ``F`` with the frozen network's
  ``E_pre`` of the missing-modality input (§3.2); ``backward_members="tf"``: ``L_backward`` is
  the TF decoder's term alone; ``use_backward=False``: no ``L_backward``, and the classification
  term (TF's decoder then run only where a modality is missing) equals the full forward's. Each
  checked against a recomputation from the parts."""
  params, batch = trained.state.params, corrupted
  pretrained, _ = emmr.make_models(_config(), spec)
  present = np.asarray(batch.present)
  observed = {m: np.asarray(batch.step_mask[m]) & present[:, i, None]
              for i, m in enumerate(batch.modalities)}
  e_pre = {
      "clean": pretrained.apply({"params": params["pretrained"]}, batch.full_features,
                                batch.full_step_mask, np.ones_like(present), train=False)[1],
      "corrupted": pretrained.apply({"params": params["pretrained"]}, batch.features, observed,
                                    present, train=False)[1]}
  assert float(jnp.abs(e_pre["clean"] - e_pre["corrupted"]).max()) > 1e-3
  literal = build("emmr", _config(teacher_input="corrupted", backward_members="tf"), spec)
  loss = jax.jit(lambda m, p: m.loss(p, {}, batch, jax.random.key(0), False)[1][0],
                 static_argnums=0)
  for variant, teacher in ((method, "clean"), (literal, "corrupted")):
    metrics = loss(variant, params)
    pooled = emmr.diagnostics(params, batch, _config(), spec)["pooled_f"]
    from mmjax.losses import symmetric_kl  # pylint: disable=g-import-not-at-top
    np.testing.assert_allclose(metrics["forward"], np.mean(symmetric_kl(pooled, e_pre[teacher])),
                               rtol=1e-5)
    members = MEMBERS if teacher == "clean" else ("tf",)
    np.testing.assert_allclose(metrics["backward"],
                               np.mean([metrics[f"backward_{e}"] for e in members]), rtol=1e-6)
  metrics = loss(build("emmr", _config(use_backward=False), spec), params)
  logits = emmr.diagnostics(params, batch, _config(), spec)["logits"]
  assert "backward" not in metrics
  np.testing.assert_allclose(metrics["cls"], np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, np.asarray(batch.label))), rtol=1e-5)


def test_teacher_outputs_cached_once_per_training_sample(method, spec, dataset, trained,
                                                          monkeypatch):
  """Stage "main"'s ``prepare`` stores ``E_pre`` of every training sample's clean copy (here in
  chunks of 50 rows, the last one padded), ``fit`` keeps it in the method state, and a train step
  reading it by ``batch.index`` gives the loss of the step that runs the teacher."""
  params, train = trained.state.params, dataset.splits["train"]
  monkeypatch.setattr(emmr, "TEACHER_CHUNK", 50)
  table = method.stages[-1].prepare(params, {}, train)["teacher"]
  pretrained, _ = emmr.make_models(_config(), spec)
  e_pre = pretrained.apply({"params": params["pretrained"]}, train.full_features,
                           train.full_step_mask, np.ones_like(train.present), train=False)[1]
  assert table.shape == (train.batch_size, _config().hidden)
  np.testing.assert_allclose(table, e_pre, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(trained.state.method_state["teacher"], table, rtol=1e-6, atol=1e-7)
  batch = train.take(np.random.default_rng(0).permutation(train.batch_size)[:32])
  batch = batch.replace(present=np.arange(32)[:, None] % 3 != np.arange(3)[None])
  step = jax.jit(lambda state: method.loss(params, state, batch, jax.random.key(1), True)[1][0])
  cached, fresh = step({"teacher": table}), step({})
  assert cached.keys() == fresh.keys()
  for name in cached:
    np.testing.assert_allclose(cached[name], fresh[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert abs(float(step({"teacher": 0 * table})["forward"] - fresh["forward"])) > 1e-4  # read
  literal = build("emmr", _config(teacher_input="corrupted"), spec)
  assert literal.stages[-1].prepare(params, {}, train) == {}


def test_key_missing_report_by_hand():
  """The per-modality key-missing report (``benchmarks/emmr_key_missing.py``) on a hand-built case: 2 modalities,
  2 classes, 6 samples."""
  onehot = lambda *c: np.eye(2)[list(c)]
  # Clean copy: TF's L_full, L_{-a}, L_{-b}; a is key for samples 0, 1, 3, b for sample 4.
  clean = {"full_logits": onehot(0, 0, 0, 1, 1, 1)[None],
           "loo_logits": np.stack([onehot(1, 1, 0, 0, 1, 1), onehot(0, 0, 0, 1, 0, 1)], 1)[None]}
  truth = emmr.clean_disagreement(clean)
  np.testing.assert_array_equal(truth[:, 0], [1, 1, 0, 1, 0, 0])
  present = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [1, 1]], bool)
  labels = np.array([0, 1, 0, 1, 1, 0])
  out = {"key_missing": np.array([1, 0, 1, 1, 1, 0], bool),
         "backbone_logits": onehot(1, 1, 0, 1, 0, 0), "ensemble_logits": onehot(0, 1, 1, 1, 1, 0),
         "logits": onehot(0, 1, 1, 1, 1, 0)}
  rows = emmr.key_missing_by_modality(out, present, labels, truth, ("a", "b"))
  # Missing a: samples 0-2, flags (1, 0, 1) vs truth (1, 1, 0).
  assert rows["a"] == pytest.approx(dict(n=3, flagged=2 / 3, agreement=1 / 3, precision=1 / 2,
                                         recall=1 / 2, acc_backbone=1 / 2, acc_ensemble=1 / 2,
                                         acc_model=1 / 2))
  # Missing b: samples 3-4, both flagged, truth (0, 1).
  assert rows["b"] == pytest.approx(dict(n=2, flagged=1.0, agreement=1 / 2, precision=1 / 2,
                                         recall=1.0, acc_backbone=1 / 2, acc_ensemble=1.0,
                                         acc_model=1.0))


@pytest.mark.parametrize("overrides, match", [
    (dict(teacher_input="noisy"), "model.teacher_input"),
    (dict(backward_members="ae"), "model.backward_members"),
    (dict(members="ae,mmin"), "model.members"),
    (dict(members="tf,tf"), "model.members"),
    (dict(members="tf,vae"), "model.members"),
    (dict(fusion="sum"), "model.fusion"),
    (dict(num_heads=3), "model.num_heads"),
    (dict(pretrain_epochs=0), "model.pretrain_epochs"),
    (dict(lambda_backward=-1.0), "model.lambda_backward"),
])
def test_bad_config(overrides, match, spec):
  with pytest.raises(ValueError, match=match):
    build("emmr", _config(**overrides), spec)


def test_regression_data_is_rejected(spec):
  regression = TaskSpec("regression", None, spec.modalities, spec.feature_shapes)
  with pytest.raises(ValueError, match="task"):
    build("emmr", _config(), regression)


def test_autoencoder_widths_are_the_papers():
  """Eq. 5 at d = 300: FC layers [300, 256, 128, 64, 128, 256, 300], E = the 64-wide layer."""
  x = jax.ShapeDtypeStruct((2, 300), jnp.float32)
  params = jax.eval_shape(MLPAutoencoder().init, jax.random.key(0), x)["params"]
  kernels = [params[f"encoder_{i}"]["kernel"].shape for i in range(4)] + [
      params[f"decoder_{i}"]["kernel"].shape for i in range(3)]
  assert kernels == [(300, 300), (300, 256), (256, 128), (128, 64), (64, 128), (128, 256),
                     (256, 300)]
  code, decoded = jax.eval_shape(MLPAutoencoder().apply, {"params": params}, x)
  assert code.shape == (2, 64) and decoded.shape == (2, 300)


def _utterances(out, params, batch):
  """``[u_1 || ... || u_M]``: per modality the mean of ``X - P`` over its observed steps."""
  segment = np.repeat(np.arange(3), 4)
  present = np.asarray(batch.present)
  observed = np.concatenate([np.asarray(batch.step_mask[m]) for m in MODALITIES], 1) & present[
      :, segment]
  content = out["x"] - np.asarray(params["position"], np.float64)
  rows = [(content * (observed & (segment == k))[..., None]).sum(1)
          / np.maximum((observed & (segment == k)).sum(1), 1)[:, None] for k in range(3)]
  return np.concatenate(rows, -1), segment


def test_ae_and_mmin_decoders_follow_eq_5_and_6(trained, diagnose, corrupted):
  """The members' decoder outputs recomputed in NumPy from ``X`` and the trained parameters, across
  the modalities: ``u = [u_1 || u_2 || u_3]``; AE ``û = h_7(u)`` (eq. 5), MMIN ``û = u + sum_i u'_i``
  (block ``i`` reading ``u + sum_{j<i} u'_j``, eq. 6); step ``t`` of modality ``m`` decodes to
  ``û_m + P_t + R^e_t``."""
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), diagnose(trained.state.params,
                                                                   corrupted))
  params = trained.state.params["emmr"]
  u, segment = _utterances(out, params, corrupted)
  to_steps = lambda flat, e: (flat.reshape(len(u), 3, -1)[:, segment]
                              + np.asarray(params["position"], np.float64)
                              + np.asarray(params[f"step_profile_{e}"], np.float64))
  _, ae = _numpy_autoencoder(params["encoder_decoders_ae"], u)
  np.testing.assert_allclose(out["decoded"][1], to_steps(ae, "ae"), rtol=1e-4, atol=1e-4)
  h = u
  for i in range(SMALL["num_residual_blocks"]):
    block = jax.tree.map(lambda a, i=i: a[i], params["encoder_decoders_mmin"]["blocks"])
    h = h + _numpy_autoencoder(block, h)[1]
  np.testing.assert_allclose(out["decoded"][2], to_steps(h, "mmin"), rtol=1e-4, atol=1e-4)


def test_members_reconstruct_from_the_other_modalities(trained, diagnose, corrupted, dataset):
  """A dropped segment's reconstruction by AE and MMIN varies from sample to sample (it is read
  from the other modalities) and is closer to the clean copy than the best constant imputer, the
  train split's per-step mean of ``X^full`` (symmetric KL of eq. 16, mean over dropped steps)."""
  params = trained.state.params
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), diagnose(params, corrupted))
  train_full = np.asarray(diagnose(params, dataset.splits["train"])["x_full"], np.float64)
  constant = np.broadcast_to(train_full.mean(0), out["x_full"].shape)
  dropped = ~np.asarray(corrupted.present)[:, np.repeat(np.arange(3), 4)]  # [B, T]
  log_q = np.log(_softmax(out["x_full"]))
  error = lambda d: float((0.5 * np.sum((_softmax(d) - np.exp(log_q))
                                        * (np.log(_softmax(d)) - log_q), -1))[dropped].mean())
  for i, member in enumerate(MEMBERS):
    if member == "tf":
      continue
    spread = out["decoded"][i][dropped].reshape(-1, 8)  # every dropped step, d = 8
    assert spread.std(0).mean() > 1e-2, member
    assert error(out["decoded"][i]) < error(constant), (member, error(out["decoded"][i]),
                                                        error(constant))


def test_leave_one_out_views_on_gathered_steps_equal_masking(trained, spec, diagnose, corrupted):
  """``L_{-k}`` runs on the gathered steps of the other modalities; the same views on the full
  sequence with ``k``'s steps masked out of the keys and the pooling give the same logits."""
  params = trained.state.params["emmr"]
  _, main = emmr.make_models(_config(), spec)
  out = diagnose(trained.state.params, corrupted)
  segment = np.repeat(np.arange(3), 4)
  missing = ~np.asarray(corrupted.present)[:, segment]
  recovered = np.where(missing[None, ..., None], np.asarray(out["decoded"]),
                       np.asarray(out["x"])[None])  # [K, B, T, d]
  flat = recovered.reshape((-1,) + recovered.shape[2:])
  masks = np.stack([np.ones(flat.shape[:2], bool) & (segment != k) for k in range(3)])
  masked = main.apply({"params": params}, jnp.asarray(flat), jnp.asarray(masks), method=(
      lambda mdl, x, m: apply_stacked(mdl.loo_views, 3, jnp.broadcast_to(x, (3,) + x.shape), m,
                                      deterministic=True)))
  expected = np.asarray(masked).reshape(3, len(MEMBERS), -1, 3).transpose(1, 2, 0, 3)
  np.testing.assert_allclose(np.asarray(out["loo_logits"]), expected, rtol=1e-5, atol=1e-5)


def test_apply_stacked_equals_separate_modules():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return apply_stacked(nn.Dense(2, name="dense"), 3, x)

  x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  out, params = jax.jit(lambda x: Stack().init_with_output(jax.random.key(1), x))(x)
  params = params["params"]["dense"]
  for s in range(3):
    np.testing.assert_allclose(out[s], x[s] @ params["kernel"][s] + params["bias"][s], rtol=1e-5,
                               atol=1e-6)
  assert not np.allclose(params["kernel"][0], params["kernel"][1])  # independent copies
  # One copy per row: row i of x[0] through copy (2, 0, 1, 2)[i].
  copy = np.array([2, 0, 1, 2])
  per_row = apply_copy_per_row(nn.Dense(2), params, jnp.asarray(copy), jnp.asarray(x[0]))
  np.testing.assert_allclose(per_row, [x[0, i] @ params["kernel"][c] + params["bias"][c]
                                       for i, c in enumerate(copy)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("semantic", [True, False])
def test_needed_views_equal_the_full_forward(semantic, init_params, spec, corrupted):
  """``needed_forward`` (views only where their value is used, in chunks of 3 samples) equals the
  full ``forward`` on everything the loss and the prediction read, values and gradients; at the
  initial parameters some samples with a missing modality are flagged and some not. Without
  ``semantic`` as ``predict`` runs it (no ``reconstruct``: TF's decoder on the incomplete samples
  only, ``nn.apply_half``), where ``decoded`` is read on the missing steps only."""
  _, main = emmr.make_models(_config(), spec)
  two_missing = np.arange(corrupted.batch_size) % 8 == 1  # these miss modalities 0 and 1
  batch = corrupted.replace(present=np.asarray(corrupted.present) & ~(
      two_missing[:, None] & (np.arange(3) == 1)))
  present = jnp.asarray(batch.present)
  real = jnp.ones((batch.batch_size, 12), bool)
  x = emmr.encode_observed_and_clean(main, init_params, batch, 8)[0]
  weights = jax.random.normal(jax.random.key(0), (2, len(MEMBERS), 4, 3))
  read = np.ones((batch.batch_size, 12), bool) if semantic else ~np.asarray(
      batch.present)[:, main.segment]  # the steps of `decoded` that are read
  # AE's / MMIN's L_{-k} computed where k is not the only missing modality: M - 1 or M per sample.
  selected = np.asarray(emmr.member_loo_selection(jnp.ones(batch.batch_size, bool), present, 2))
  expected = np.where(np.asarray(present).all(-1), 0, np.where(two_missing, 3, 2))
  np.testing.assert_array_equal(selected.sum(-1), np.stack([expected] * 2))

  def run(params, fast):
    variables = {"params": params}
    if fast:
      out = emmr.needed_forward(main, variables, x, real, present, train=False, key=None,
                                semantic=semantic, chunk=3, reconstruct=semantic)
    else:
      out = main.apply(variables, x, real, present, train=False, method="forward")
    views = jnp.concatenate([out["full_logits"][:, :, None], out["loo_logits"]], 2)  # [K,B,4,C]
    used = jnp.sum(out["logits"] * weights[0, 0, 0]) + jnp.sum(
        jnp.where(read[..., None], out["decoded"], 0) ** 2)
    if semantic:  # every view is trained
      used = used + jnp.sum(views * weights[1][:, None])
    return used, out

  both = jax.jit(lambda p: [jax.value_and_grad(run, has_aux=True)(p, fast) for fast in (0, 1)],
                 compiler_options={"xla_backend_optimization_level": 0})
  ((ref_value, ref), ref_grad), ((value, out), grad) = both(init_params["emmr"])
  flagged, incomplete = np.asarray(ref["key_missing"]), ~np.asarray(present).all(-1)
  assert 0 < flagged.sum() < incomplete.sum() < len(incomplete)
  for name in ("logits", "key_missing", "pooled_f", "backbone_logits"):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(out["decoded"][:, read], ref["decoded"][:, read], rtol=1e-5,
                             atol=1e-5)  # the decoder on 3-sample chunks: other float blocking
  rows = np.ones_like(incomplete) if semantic else incomplete  # TF's views, then the others'
  for k, needed in enumerate([rows] + [incomplete if semantic else flagged] * 2):
    # Without semantic the ensemble reads only AE's / MMIN's leave-one-out views.
    for name in ("full_logits", "loo_logits") if semantic or k == 0 else ("loo_logits",):
      np.testing.assert_allclose(out[name][k][needed], ref[name][k][needed], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{name} member {k}")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), grad,
               ref_grad)


def test_encode_once_equals_two_passes(init_params, spec, corrupted):
  """``X`` derived from the clean pass where only modalities were dropped, re-encoded where a
  present modality is noisy: the values and gradients of two plain encoder passes."""
  _, main = emmr.make_models(_config(), spec)
  noisy = np.arange(corrupted.batch_size) % 3 == 0
  features = dict(corrupted.features)
  features["text"] = features["text"] + np.where(noisy[:, None, None], 0.5, 0.0).astype(np.float32)
  batch = corrupted.replace(features=features)
  assert np.array_equal(emmr.changed_rows(batch), noisy & np.asarray(batch.present)[:, 0])
  weights = jax.random.normal(jax.random.key(1), (2, batch.batch_size, 12, 8))

  def both(params):
    x, x_full = emmr.encode_observed_and_clean(main, params, batch, 3)
    present = jnp.asarray(batch.present)
    plain = main.apply({"params": params["emmr"]}, batch.features, emmr._observed(batch, present),
                       present, method="encode")
    plain_full = main.apply({"params": params["emmr"]}, batch.full_features,
                            batch.full_step_mask, jnp.ones_like(present), method="encode")
    return (jnp.sum(x * weights[0]) + jnp.sum(x_full * weights[1]),
            jnp.sum(plain * weights[0]) + jnp.sum(jax.lax.stop_gradient(plain_full) * weights[1]))

  (fast, plain), (grad_fast, grad_plain) = jax.jit(lambda p: (
      both(p), (jax.grad(lambda q: both(q)[0])(p), jax.grad(lambda q: both(q)[1])(p))))(
          init_params)
  np.testing.assert_allclose(fast, plain, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad_fast,
               grad_plain)


@pytest.mark.parametrize("chunk", [1, 4, 13, 20])
def test_map_selected_computes_exactly_the_selected_rows(chunk):
  """Values, gradients and per-chunk keys on the selected rows, zeros elsewhere; the chunks without
  a selected row do not run (counted by a callback in ``fn``)."""
  rng = np.random.default_rng(chunk)
  x = jnp.asarray(rng.normal(size=(2, 13, 3)), jnp.float32)
  selected = rng.random((2, 13)) < 0.4
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  calls = []

  def fn(rows, key):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.tanh(rows @ w), jax.random.uniform(key, rows.shape[:2], minval=1.0, maxval=2.0)

  out, draws = jax.jit(lambda x: map_selected(fn, jnp.asarray(selected), chunk, x,
                                              key=jax.random.key(3)))(x)
  np.testing.assert_allclose(out, np.where(selected[..., None], np.tanh(np.asarray(x @ w)), 0.0),
                             rtol=1e-5, atol=1e-6)
  assert (np.asarray(draws)[~selected] == 0).all() and (np.asarray(draws)[selected] >= 1).all()
  assert len(calls) == chunks_run(selected, chunk) == -(-selected.sum(-1).max() // chunk)
  expected = jax.grad(lambda x: jnp.sum((jnp.tanh(x @ w) * selected[..., None]) ** 2))(x)
  for remat in (True, False):  # the chunk's forward recomputed in the backward pass, or stacked
    grad = jax.grad(lambda x: jnp.sum(map_selected(  # pylint: disable=cell-var-from-loop
        lambda r, k: jnp.tanh(r @ w), jnp.asarray(selected), chunk, x, remat=remat) ** 2))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_map_selected_remat_stacks_no_activation_per_chunk():
  """Differentiated, the chunk scans stack per chunk only the outputs (forward) and the rows'
  cotangents (backward) with ``remat``; without it also ``fn``'s activations and even its
  closed-over weight (through the ``lax.cond``)."""
  x = jax.random.normal(jax.random.key(0), (1, 64, 16))
  w = jax.random.normal(jax.random.key(1), (16, 128))
  selected = jnp.asarray(np.random.default_rng(0).random((1, 64)) < 0.5)

  def stacked_float_bytes(remat):
    f = lambda x, w: jnp.sum(map_selected(lambda r, k: jnp.tanh(jnp.tanh(r @ w) @ w.T), selected,
                                          8, x, remat=remat))
    stacked, jaxprs = 0, [jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr]
    while jaxprs:
      for eqn in jaxprs.pop().eqns:
        if eqn.primitive.name == "scan":  # per-iteration outputs: [chunks, ...]
          stacked += sum(v.aval.size * v.aval.dtype.itemsize for v in
                         eqn.outvars[eqn.params["num_carry"]:] if v.aval.dtype == jnp.float32)
        jaxprs += [j for value in eqn.params.values() for j in sub_jaxprs(value)]
    return stacked

  rows = 8 * 8 * 16 * 4  # [chunks, G, chunk, 16] float32
  assert stacked_float_bytes(True) == 2 * rows
  assert stacked_float_bytes(False) >= 2 * rows + 8 * (16 * 128 + 8 * 128) * 4  # + w, an activation
