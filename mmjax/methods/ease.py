"""EASE: uncertainty-aware imputation, elastic alignment and predictive consistency (papers/004).

Model (SPEC §6.4; widths are ours, the paper's 768-d backbones are not needed on CPU):

* **Encoders.** Per modality ``m``: ``Dense(d)`` + learned positional embedding ``[T_m, d]`` ->
  :class:`~mmjax.nn.TransformerEncoder` (pre-LN, ``L`` layers, key-padding mask) -> masked mean
  pool -> ``z_m [B, d]``. The corrupted input uses the mask ``step_mask & present`` (an absent or
  fully masked modality pools to 0). ``z^gt``, the encoding of the clean copy (``full_features``,
  ``full_step_mask``), is only a stop-gradient target (:func:`clean_encoding`): ``sg(z)`` itself
  when the batch is uncorrupted, otherwise one forward-only pass — never back-propagated.
* **Which modalities are completed** (:func:`availability`): a modality is *available* when it is
  present and at least ``min_observed_steps`` (default 1) of its steps are observed. Every other one
  — absent (inter-modal missingness, Table 3) or degraded (intra-modal missingness, Tables 1-2:
  ``mask_time_steps`` can mask every step) — is completed, so a fully masked modality is exactly an
  absent one. A partially masked modality is encoded from its observed steps.
* **UCMI** (eq. 1-4). For every target ``B``: ``h_ctx = GELU(Dense([mean_{A avail, A != B} P_A z_A ;
  c_B]))`` with ``P_A`` a per-source projection and ``c_B [M]`` the 0/1 indicator of the context
  modalities (our addition: the mean alone cannot tell one source from two, and the variance should
  know how much context it has). ``mu_B = F_mu^B(h_ctx)``, ``var_B = softplus(F_sigma^B(h_ctx)) +
  1e-6``. The completed feature ``z_hat_B`` is ``mu_B`` at evaluation and ``mu_B + sigma_B * eps``
  in training (key split from the step key). Every unavailable ``z_B`` is replaced by ``z_hat_B``.
  ``L_ucmi = gaussian_nll(sg(z_B^gt), mu_B, var_B)`` averaged over the (valid sample, unavailable
  modality) pairs; eq. 4 sums the NLL over the ``d`` dimensions (``ucmi_reduction="sum"``), the
  default ``"mean"`` divides it by ``d`` so that ``lambda_1`` does not grow with the width.
* **Corruption in training.** The loss completes whatever is unavailable in the batch it gets;
  the corruption of training comes from the trainer's train-time corruption
  (``config.train_corruption``, :mod:`mmjax.data.train_corruption`). EASE's own regime
  (``"method"``) is :data:`TRAIN_CORRUPTION`, the LNLN protocol EASE follows (App. A.3): per sample
  a time-step masking rate drawn from U(0, 1), half of the samples clean. Whole-modality dropping
  (``missing_rate:0.5``) is an option. Evaluation: the availability of the test batch.
* **Fusion / heads.** ``concat_m z_m -> Dense(d) -> GELU`` then a class head (logits over the task's
  classes, or over the 3 sentiment bins of :func:`class_labels` for regression — MOSI's ±0.5, or
  CH-SIMS's ±0.1 for labels in [-1, 1])
  and, for regression, a second head for the score. ``L_task`` = MSE of the score (regression) or
  cross-entropy (classification); for regression the bin head is also trained with cross-entropy on
  the binned labels (reported as ``task_bins``, weight 1, part of ``L_task``): without it the logits
  MIPC compares would carry no supervised meaning.
* **UCSA** (eq. 5-9). ``L_uada`` = per modality ``B``, :func:`mmjax.losses.kernel_cs_divergence`
  between the real ``z_B`` of the samples where ``B`` is available and the completed ``z_hat_B``
  where it is not (``y_uncertainty`` = mean over ``d`` of ``var_B``, ``x_uncertainty`` = 0,
  bandwidth ``tau = kernel_bandwidth * sqrt(d)`` so the kernel tracks the feature norm, ``alpha``),
  averaged over the modalities that have both sets. With ``uada_normalize`` (default) every kernel
  carries its Gaussian normalisation ``psi^(-d/2)``: ``L_uada`` is then the CS divergence of two
  Gaussian mixtures, ``>= 0`` and not lowered by inflating ``var`` (eq. 5-7 as written fall below 0
  as ``u`` grows, which the model could exploit); ``uada_normalize=False`` is eq. 5-7 literally.
  ``L_anchor`` = mean over missing pairs of :func:`mmjax.losses.gaussian_cs_divergence`
  ``(z_hat_B, var_B, mu_{B,y}, Sigma_{B,y})`` to the anchor of modality ``B`` and the sample's class
  ``y`` (bins for regression); pairs whose class was never seen are skipped.
  ``L_align = L_uada + beta_1 L_anchor``.
* **Anchors** (App. B.2 eq. 28-29) are ``method_state``: per modality and class the exponential
  moving averages (``momentum``) of ``E[z]`` and ``E[z^2]`` of ``sg(z^gt)`` over the batch's valid
  samples of that class, starting from the prior ``N(0, I)``; ``Sigma = E[z^2] - E[z]^2 + 1e-6``
  (:func:`anchor_variance`), so the spread between batches counts and a class seen once keeps most
  of the prior's variance (never a 1e-6 variance from one sample). Classes absent from a batch keep
  their moments. Updated only in training; the loss reads the pre-update anchors through
  ``stop_gradient``.
* **MIPC** (eq. 10-12). ``num_views`` views, each a uniformly random non-empty modality subset per
  sample drawn from the step key, applied as ``available & subset`` (a sample whose intersection
  is empty keeps its availability); each view completes its missing modalities with UCMI. The full
  view is the clean copy (``z^gt``, all modalities). ``L_consist =
  predictive_consistency_loss(views) + anchored_consistency_loss(views, full)`` on the class logits
  (the full view gets no gradient).
* **Total** (eq. 13): ``L_task + lambda_1 L_ucmi + lambda_2 L_align + lambda_3 L_consist`` with
  ``0.5, 0.2, 0.5`` and ``beta_1 = 0.02`` (App. A.3). Ablations (Table 4): ``use_ucmi=False`` is
  "w/o UCMI": no imputation at all — unavailable modalities enter the head as ``z = 0``, no
  ``L_ucmi``, and no ``L_uada`` / ``L_anchor`` (there is no completed feature to align);
  ``use_ucsa``, ``use_mipc`` remove their module's loss terms (MIPC also its extra forward passes);
  ``use_uada``, ``use_anchor``, ``use_cons``, ``use_asym`` remove a single loss. "w/o ALL" is all
  three modules off.

Metrics: ``task`` (+ ``task_bins``), ``ucmi``, ``uada``, ``anchor``, ``align``, ``cons``, ``asym``,
``consist`` (those enabled), ``var_missing`` (mean predicted variance over missing pairs, monitoring
only, with UCMI) and ``loss``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax.data import Batch, sentiment_to_class
from mmjax.losses import (
    anchored_consistency_loss, gaussian_cs_divergence, gaussian_nll, kernel_cs_divergence,
    predictive_consistency_loss)
from mmjax.losses._common import masked_mean
from mmjax.metrics import SIMS_BIN_EDGES
from mmjax.methods.base import Method, TaskSpec
from mmjax.nn import TransformerEncoder, masked_mean_pool

REGRESSION_BINS = 3  # sentiment bins used as classes (anchors, MIPC) for regression data
MIN_VAR = 1e-6  # epsilon of eq. 2 and eq. 29


# EASE's training regime (config.train_corruption = "method"), App. A.3 following LNLN: per sample
# a time-step masking rate ~ U(0, 1) (mmjax.data.mask_time_steps), half of the samples clean.
# Whole-modality dropping instead: --config.train_corruption=missing_rate:0.5.
TRAIN_CORRUPTION = "time_mask:0:1+clean:0.5"


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # 128 as concat / EUAR: at 32, EASE (and concat) lose 10-15 points with 40 classes
      # (docs/ease.md, "Many classes").
      hidden=128,
      num_layers=1,
      num_heads=4,
      mlp_ratio=2,
      dropout=0.0,
      num_views=2,
      # A modality with fewer observed steps (step_mask & present) is completed like an absent one.
      min_observed_steps=1,
      kernel_bandwidth=1.0,  # tau / sqrt(hidden)
      kernel_alpha=1.0,  # alpha of eq. 6 (not given in the paper)
      # Gaussian normalisation psi^(-d/2) of the eq. 5 kernel (L_uada >= 0, not lowered by
      # inflating the variances); False = eq. 5-7 as written.
      uada_normalize=True,
      anchor_momentum=0.9,
      # L_ucmi over the d feature dimensions: "mean" (default; keeps lambda_1 independent of the
      # width -- with "sum" at d = 128 the NLL dominates training, docs/ease.md) or "sum" (eq. 4).
      ucmi_reduction="mean",
      lambda_ucmi=0.5,
      lambda_align=0.2,
      lambda_consist=0.5,
      beta_anchor=0.02,
      use_ucmi=True,
      use_ucsa=True,
      use_mipc=True,
      # Per-loss ablations of Table 4 (lower half): w/o L_uada, L_anchor, L_cons, L_asym.
      use_uada=True,
      use_anchor=True,
      use_cons=True,
      use_asym=True,
  ))


class ModalityEncoder(nn.Module):
  """``Dense(d)`` + positional embedding -> Transformer -> masked mean pool.

  ``x [B, T, D]``, ``mask [B, T]`` -> ``[B, d]``.
  """

  hidden: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    h = nn.Dense(self.hidden, name="embed")(x)
    h = h + self.param("position", nn.initializers.normal(0.02), (x.shape[1], self.hidden))
    h = TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                           name="transformer")(h, mask, deterministic=not train)
    return masked_mean_pool(h, mask)


class EASEModel(nn.Module):
  """The EASE network; its methods are called one by one by the loss (see the module docstring)."""

  modalities: tuple[str, ...]
  num_classes: int
  regression: bool
  hidden: int = 128
  num_layers: int = 1
  num_heads: int = 4
  mlp_ratio: int = 2
  dropout: float = 0.0

  def setup(self):
    self.encoders = [
        ModalityEncoder(self.hidden, self.num_layers, self.num_heads, self.mlp_ratio * self.hidden,
                        self.dropout) for _ in self.modalities]
    self.source_proj = [nn.Dense(self.hidden) for _ in self.modalities]  # P_A
    self.context_proj = nn.Dense(self.hidden)
    self.mu_heads = [nn.Dense(self.hidden) for _ in self.modalities]  # F_mu^B
    self.sigma_heads = [nn.Dense(self.hidden) for _ in self.modalities]  # F_sigma^B
    self.fusion = nn.Dense(self.hidden)
    self.class_head = nn.Dense(self.num_classes)
    self.score_head = nn.Dense(1) if self.regression else None

  def encode(self, features: dict[str, jax.Array], masks: dict[str, jax.Array], *,
             train: bool) -> jax.Array:
    """Modality -> ``[B, T_m, D_m]`` features and ``[B, T_m]`` masks -> ``z [B, M, d]``."""
    return jnp.stack([enc(features[m], masks[m], train=train)
                      for enc, m in zip(self.encoders, self.modalities)], axis=1)

  def complete(self, z: jax.Array, available: jax.Array) -> tuple[jax.Array, jax.Array]:
    """UCMI (eq. 1-2): ``z [B, M, d]``, ``available [B, M]`` -> ``mu, var [B, M(target), d]``."""
    num_mod = len(self.modalities)
    projected = jnp.stack([p(z[:, a]) for a, p in enumerate(self.source_proj)], axis=1)
    # Shape: [B, M(target), M(source)]: available sources other than the target.
    context = available[:, None, :] & ~jnp.eye(num_mod, dtype=bool)[None]
    weights = context.astype(z.dtype)
    mean = jnp.einsum("bts,bsd->btd", weights, projected) / jnp.maximum(
        weights.sum(-1, keepdims=True), 1.0)
    h_ctx = nn.gelu(self.context_proj(jnp.concatenate([mean, weights], axis=-1)))
    mu = jnp.stack([f(h_ctx[:, t]) for t, f in enumerate(self.mu_heads)], axis=1)
    var = jnp.stack([jax.nn.softplus(f(h_ctx[:, t])) + MIN_VAR
                     for t, f in enumerate(self.sigma_heads)], axis=1)
    return mu, var

  def __call__(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
               available: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Initialisation pass over every sub-module: encode, complete with ``mu``, predict."""
    z = self.encode(features, masks, train=False)
    mu, _ = self.complete(z, available)
    return self.head(jnp.where(available[..., None], z, mu))

  def head(self, z: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``z [B, M, d]`` -> class logits ``[B, C]`` and (regression) scores ``[B]``."""
    h = nn.gelu(self.fusion(z.reshape(z.shape[0], -1)))
    score = self.score_head(h)[:, 0] if self.regression else None
    return self.class_head(h), score


def make_model(config: ml_collections.ConfigDict, spec: TaskSpec) -> EASEModel:
  """The :class:`EASEModel` for ``spec`` (classes: the task's, or the sentiment bins)."""
  regression = spec.task == "regression"
  return EASEModel(spec.modalities, REGRESSION_BINS if regression else int(spec.num_classes),
                   regression, config.hidden, config.num_layers, config.num_heads,
                   config.mlp_ratio, config.dropout)


def sample_views(key: jax.Array, num_views: int, batch_size: int, num_modalities: int) -> jax.Array:
  """``[V, B, M]`` bool: a uniformly random non-empty modality subset per view and sample."""
  # Subset codes 1 .. 2^M - 1; bit i of the code keeps modality i.
  codes = jax.random.randint(key, (num_views, batch_size), 1, 2 ** num_modalities)
  return (codes[..., None] >> jnp.arange(num_modalities)) & 1 == 1


def class_labels(batch: Batch, spec: TaskSpec) -> jax.Array:
  """``[B]`` int classes: the labels, or for regression their 3 sentiment bins on the data's scale.

  MOSI / MOSEI (``spec.scoring == "regression"``): :func:`mmjax.data.sentiment_to_class` (negative
  ``< -0.5``, neutral, positive ``> 0.5``); CH-SIMS (``"sims_regression"``): the ``acc3`` bins of
  :data:`mmjax.metrics.SIMS_BIN_EDGES` (``(-1, -0.1]``, ``(-0.1, 0.1]``, ``(0.1, 1]``).
  """
  if spec.task != "regression":
    return jnp.asarray(batch.label, jnp.int32)
  if spec.scoring == "sims_regression":
    inner = jnp.asarray(SIMS_BIN_EDGES[REGRESSION_BINS][1:-1])
    label = jnp.clip(jnp.asarray(batch.label), -1.0, 1.0)
    return jnp.sum(label[:, None] > inner, axis=-1).astype(jnp.int32)
  return sentiment_to_class(batch.label, REGRESSION_BINS)


def availability(observed: dict[str, jax.Array], present: jax.Array,
                 min_observed_steps: int) -> jax.Array:
  """``[B, M]`` bool: present modalities with at least ``min_observed_steps`` observed steps.

  ``observed`` holds the ``[B, T_m]`` steps the encoder sees (``step_mask & present``), in the
  modality order of ``present``. The other modalities — absent, or degraded by intra-modal
  missingness (``mask_time_steps`` at rate 1 masks every step) — are completed by UCMI; with the
  default 1 a fully masked modality is exactly an absent one (its encoding, the context of the
  others and the losses are the same).
  """
  counts = jnp.stack([jnp.sum(mask, axis=-1) for mask in observed.values()], axis=1)
  return present & (counts >= min_observed_steps)


def encode_input(model: EASEModel, params, batch: Batch, min_observed_steps: int, *, train: bool,
                 rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """``z [B, M, d]``, the encoding of the (corrupted) input from its observed steps, and the
  ``available [B, M]`` modalities of :func:`availability`; every other one is completed."""
  present = jnp.asarray(batch.present)
  observed = _observed_masks(batch, present)
  z = model.apply({"params": params}, batch.features, observed, train=train, method="encode",
                  rngs=rngs or {})
  return z, availability(observed, present, min_observed_steps)


def init_anchors(num_modalities: int, num_classes: int, hidden: int) -> dict[str, jax.Array]:
  """Anchors before any data: the prior ``N(0, I)`` (``E[z] = 0``, ``E[z^2] = 1``), ``seen`` False."""
  return {"mean": jnp.zeros((num_modalities, num_classes, hidden)),
          "second": jnp.ones((num_modalities, num_classes, hidden)),
          "seen": jnp.zeros((num_classes,), bool)}


def anchor_variance(anchors: dict[str, jax.Array]) -> jax.Array:
  """``Sigma_k = max(E[z^2] - E[z]^2, 0) + 1e-6`` (eq. 29's diagonal covariance), ``[M, K, d]``."""
  return jnp.maximum(anchors["second"] - jnp.square(anchors["mean"]), 0.0) + MIN_VAR


def update_anchors(anchors: dict[str, jax.Array], z_gt: jax.Array, classes: jax.Array,
                   valid: jax.Array, momentum: float) -> dict[str, jax.Array]:
  """EMA of the per-class moments ``E[z]``, ``E[z^2]`` of ``sg(z_gt) [B, M, d]`` (App. B.2, eq. 28-29).

  For modality ``m`` and class ``k`` with ``n_k > 0`` valid samples in the batch:
  ``E[z] <- momentum E[z] + (1 - momentum) mean_k(z)`` and the same for ``E[z^2]`` with
  ``mean_k(z^2)``; classes absent from the batch keep theirs. Both moments start from the prior of
  :func:`init_anchors`, so the variance of :func:`anchor_variance` includes the spread between
  batches and never collapses to ``1e-6`` for a class seen once (a single sample per batch, or a
  class met in one batch only, keeps most of the prior's unit variance for a while).
  """
  z = jax.lax.stop_gradient(z_gt)
  num_classes = anchors["seen"].shape[0]
  onehot = jax.nn.one_hot(classes, num_classes, dtype=z.dtype) * valid[:, None]  # [B, K]
  count = onehot.sum(0)  # [K]
  denom = jnp.maximum(count, 1.0)[None, :, None]
  mean = jnp.einsum("bk,bmd->mkd", onehot, z) / denom  # [M, K, d]
  second = jnp.einsum("bk,bmd->mkd", onehot, jnp.square(z)) / denom
  has = (count > 0)[None, :, None]

  def blend(old, new):
    return jnp.where(has, momentum * old + (1.0 - momentum) * new, old)

  return {"mean": blend(anchors["mean"], mean), "second": blend(anchors["second"], second),
          "seen": anchors["seen"] | (count > 0)}


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  """EASE as a :class:`~mmjax.methods.base.Method` (see the module docstring)."""
  if config.hidden % config.num_heads:
    raise ValueError(
        f"model.num_heads: {config.num_heads} does not divide model.hidden={config.hidden}")
  if not 0.0 <= config.anchor_momentum < 1.0:
    raise ValueError(f"model.anchor_momentum: expected a value in [0, 1), got "
                     f"{config.anchor_momentum}")
  if config.num_views < 2:
    raise ValueError(f"model.num_views: expected >= 2, got {config.num_views}")
  if config.ucmi_reduction not in ("mean", "sum"):
    raise ValueError(f"model.ucmi_reduction: expected 'mean' or 'sum', got "
                     f"{config.ucmi_reduction!r}")
  if config.min_observed_steps < 1:
    raise ValueError(f"model.min_observed_steps: expected >= 1, got {config.min_observed_steps}")
  model = make_model(config, spec)
  regression = spec.task == "regression"
  bandwidth = config.kernel_bandwidth * math.sqrt(config.hidden)

  @jax.jit
  def init(key, batch):
    params = model.init(key, batch.features, batch.step_mask, jnp.asarray(batch.present))["params"]
    return params, init_anchors(len(spec.modalities), model.num_classes, config.hidden)

  def forward(params, available, z, key, train):
    """Completes the unavailable modalities and predicts: logits, score, mu, var, z_hat.

    Without UCMI (``use_ucmi=False``, Table 4 "w/o UCMI") nothing is completed: an unavailable
    modality enters the head as ``z = 0`` and ``mu``, ``var``, ``z_hat`` are ``None``.
    """
    if not config.use_ucmi:
      logits, score = model.apply(
          {"params": params}, jnp.where(available[..., None], z, 0.0), method="head")
      return logits, score, None, None, None
    mu, var = model.apply({"params": params}, z, available, method="complete")
    z_hat = mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape) if train else mu
    logits, score = model.apply(
        {"params": params}, jnp.where(available[..., None], z, z_hat), method="head")
    return logits, score, mu, var, z_hat

  def loss(params, state, batch, key, train):
    sample_key, view_key, dropout_key = jax.random.split(key, 3)
    rngs = {"dropout": dropout_key} if train else {}
    valid = jnp.asarray(batch.valid)
    z, available = encode_input(model, params, batch, config.min_observed_steps, train=train,
                                rngs=rngs)
    z_gt = clean_encoding(model, params, batch, z, train=train, rngs=rngs)
    logits, score, mu, var, z_hat = forward(
        params, available, z, jax.random.fold_in(sample_key, 0), train)
    predictions = score if regression else logits
    classes = class_labels(batch, spec)
    missing = ~available & valid[:, None]  # [B, M]

    metrics = {}
    if regression:
      metrics["task"] = masked_mean(jnp.square(score - batch.label), valid)
      metrics["task_bins"] = _cross_entropy(logits, classes, valid)
    else:
      metrics["task"] = _cross_entropy(logits, classes, valid)
    total = metrics["task"] + metrics.get("task_bins", 0.0)

    if config.use_ucmi:
      metrics["var_missing"] = masked_mean(jnp.mean(var, -1), missing)
      nll = gaussian_nll(z_gt, mu, var)  # [B, M], summed over d (eq. 4)
      if config.ucmi_reduction == "mean":
        nll = nll / config.hidden
      metrics["ucmi"] = masked_mean(nll, missing)
      total = total + config.lambda_ucmi * metrics["ucmi"]

    if config.use_ucmi and config.use_ucsa and (config.use_uada or config.use_anchor):
      metrics["align"] = 0.0
      if config.use_uada:
        real = (available & valid[:, None]).T  # [M, B]
        uada = kernel_cs_divergence(
            z.transpose(1, 0, 2), z_hat.transpose(1, 0, 2), bandwidth=bandwidth,
            y_uncertainty=jnp.mean(var, -1).T, alpha=config.kernel_alpha, x_where=real,
            y_where=missing.T, normalize=config.uada_normalize)  # [M]
        metrics["uada"] = masked_mean(uada, real.any(-1) & missing.T.any(-1))
        metrics["align"] = metrics["align"] + metrics["uada"]
      if config.use_anchor:
        anchors = jax.lax.stop_gradient(state)
        anchor_mean = anchors["mean"][:, classes].transpose(1, 0, 2)  # [B, M, d]
        anchor_var = anchor_variance(anchors)[:, classes].transpose(1, 0, 2)
        anchor = gaussian_cs_divergence(z_hat, var, anchor_mean, anchor_var)  # [B, M]
        metrics["anchor"] = masked_mean(anchor, missing & anchors["seen"][classes][:, None])
        metrics["align"] = metrics["align"] + config.beta_anchor * metrics["anchor"]
      total = total + config.lambda_align * metrics["align"]

    if config.use_mipc and (config.use_cons or config.use_asym):
      subsets = sample_views(view_key, config.num_views, batch.batch_size, len(spec.modalities))
      view_logits = []
      for v in range(config.num_views):
        view = available & subsets[v]
        view = jnp.where(view.any(-1, keepdims=True), view, available)
        view_logits.append(forward(
            params, view, z, jax.random.fold_in(sample_key, v + 1), train)[0])
      view_logits = jnp.stack(view_logits)  # [V, B, C]
      metrics["consist"] = 0.0
      if config.use_cons:
        metrics["cons"] = predictive_consistency_loss(view_logits, where=valid)
        metrics["consist"] = metrics["consist"] + metrics["cons"]
      if config.use_asym:
        full_logits, _ = model.apply({"params": params}, z_gt, method="head")
        metrics["asym"] = anchored_consistency_loss(view_logits, full_logits, where=valid)
        metrics["consist"] = metrics["consist"] + metrics["asym"]
      total = total + config.lambda_consist * metrics["consist"]

    metrics["loss"] = total
    new_state = update_anchors(state, z_gt, classes, valid, config.anchor_momentum) if train \
        else state
    return total, (metrics, new_state, predictions)

  def predict(params, state, batch):
    del state
    z, available = encode_input(model, params, batch, config.min_observed_steps, train=False)
    logits, score, *_ = forward(params, available, z, None, False)
    return score if regression else logits

  return Method(name="ease", init=init, loss=loss, predict=predict)


def clean_encoding(model: EASEModel, params, batch: Batch, z: jax.Array, *, train: bool,
                   rngs: dict[str, jax.Array]) -> jax.Array:
  """``sg(z^gt) [B, M, d]``, the encoding of the clean copy, never back-propagated.

  If the batch is uncorrupted (``features``, ``step_mask`` equal to ``full_features``,
  ``full_step_mask`` and every modality present) the encoding ``z`` of the input is ``z^gt``
  already and is reused; otherwise a forward-only pass encodes the clean copy (``lax.cond``: only
  the branch taken runs). Either way no gradient flows through ``z^gt`` — every loss reads it
  through a stop-gradient (eq. 4, the anchors, the full view of eq. 11).
  """
  uncorrupted = jnp.all(jnp.asarray(batch.present))
  for m in model.modalities:
    uncorrupted &= jnp.array_equal(batch.features[m], batch.full_features[m])
    uncorrupted &= jnp.array_equal(batch.step_mask[m], batch.full_step_mask[m])

  def encode_clean(z, frozen, clean):
    del z
    return model.apply({"params": frozen}, clean, batch.full_step_mask, train=train,
                       method="encode", rngs=rngs)

  operands = jax.lax.stop_gradient((z, params, dict(batch.full_features)))
  return jax.lax.cond(uncorrupted, lambda z, *_: z, encode_clean, *operands)


def imputation_moments(params, batch: Batch, config: ml_collections.ConfigDict, spec: TaskSpec
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """UCMI's prediction and its target on ``batch`` (evaluation pass, availability ``present``).

  Args:
    params: EASE parameters (``TrainState.params``).
    batch: a corrupted batch (e.g. from :func:`mmjax.data.drop_modalities`); the completed
      modalities are those of :func:`availability`; ``full_features`` is the clean copy.
    config: the EASE model config the parameters were trained with.
    spec: the task of the data.

  Returns:
    ``z_gt, mu, var`` ``[B, M, d]`` (the clean encoding, the target of eq. 4, and eq. 1-2 for every
    target modality) and ``pairs [B, M]`` bool, the (valid sample, missing modality) pairs
    ``valid & ~available`` where the imputation is used.
  """
  model = make_model(config, spec)
  z, available = encode_input(model, params, batch, config.min_observed_steps, train=False)
  z_gt = clean_encoding(model, params, batch, z, train=False, rngs={})
  mu, var = model.apply({"params": params}, z, available, method="complete")
  return z_gt, mu, var, ~available & jnp.asarray(batch.valid)[:, None]


def imputation_residuals(params, batch: Batch, config: ml_collections.ConfigDict,
                         spec: TaskSpec) -> tuple[jax.Array, jax.Array]:
  """Standardised residuals of the UCMI imputation on ``batch`` (EASE §4.5, uncertainty check).

  ``r_B = (z_B^gt - mu_B) / sqrt(var_B)`` per dimension, from :func:`imputation_moments` (same
  arguments). Calibrated variances give ``r ~ N(0, 1)``; compare with
  :func:`mmjax.stats.ks_distance_to_standard_normal` on ``residuals[pairs]``.

  Returns:
    ``residuals [B, M, d]`` (every target; only the pairs are meaningful) and ``pairs [B, M]``.
  """
  z_gt, mu, var, pairs = imputation_moments(params, batch, config, spec)
  return (z_gt - mu) / jnp.sqrt(var), pairs


def _observed_masks(batch: Batch, present: jax.Array) -> dict[str, jax.Array]:
  """``step_mask[m] & present[:, m]``: the steps the encoder of the corrupted input may see."""
  return {m: jnp.asarray(batch.step_mask[m]) & present[:, i, None]
          for i, m in enumerate(batch.modalities)}


def _cross_entropy(logits: jax.Array, classes: jax.Array, valid: jax.Array) -> jax.Array:
  return masked_mean(
      optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), classes), valid)

