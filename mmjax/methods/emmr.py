"""EMMR: Ensemble-based Missing Modality Reconstruction (papers/002, SPEC §6.2).

Notation: ``M`` modalities (the paper's v, a, t), ``T = sum_m T_m`` steps after concatenation,
``d`` the width (``hidden``), ``C`` classes, ``K`` ensemble members (TF, AE, MMIN).

Model
-----
* **Encoders** (eq. 1-2). Per modality ``E_m = TransformerEncoder(Dense(d)(x_m))`` with keys
  ``step_mask & present`` (one pre-LN block: MHA + MLP, house block of :mod:`mmjax.nn`; the ``M``
  blocks run as one stacked program, :class:`ModalityEncoders`; no dropout, so that ``X`` and its
  clean copy, the reconstruction target, are the same function). A missing modality's ``E_m`` is
  set to zeros, then ``X = [E_1 || ... || E_M] + P`` along time, ``[B, T, d]``, with ``P [T, d]`` a
  learned position/segment embedding (our addition, initialised ``N(0, 0.02^2)``: it tells the
  decoders which step and modality a zero step stands for).
* **Pre-trained full-modality network** (eq. 3): its own encoders (same architecture) on the clean
  copy (``full_features``) -> ``E_pre`` = masked mean over the real steps of ``[E_1 || ... || E_M]``
  ``[B, d]`` -> ``Dropout`` -> ``Dense(C)``. Trained alone by cross-entropy in the stage
  ``"pretrain"`` (``model.pretrain_epochs`` epochs), frozen in the stage ``"main"``; its parameters
  are ``params["pretrained"]``, everything else ``params["emmr"]``.
* **Encoder-decoders** (eq. 4-7) on ``X``: TF (:class:`~mmjax.nn.TransformerEncoderDecoder`; encoder
  keys = observed steps, decoder keys = all real steps; every query is encoded, so the steps of a
  missing modality are filled from the others), AE (:class:`~mmjax.nn.MLPAutoencoder`, widths
  ``[M d, M d, *ae_hidden, ..., M d]``) and MMIN (:class:`~mmjax.nn.CascadeResidualAutoencoder`,
  ``num_residual_blocks`` blocks). TF is the backbone: ``F`` = masked mean of its encoder output
  over the real steps ``[B, d]``. AE and MMIN work across the modalities, as MMIN's own paper
  (Zhao et al. 2021) does: their input is ``[u_1 || ... || u_M]`` ``[B, M d]``, ``u_m`` the mean
  of ``E_m`` over its observed steps (0 for a missing modality; :meth:`EMMRNetwork.
  utterance_vectors`), their output its reconstruction, and their decoded step ``t`` of modality
  ``m`` is ``û_m + P_t + R^e_t`` (``R^e [T, d]`` a learned per-step profile of member ``e``,
  initialised 0: the time course an utterance vector cannot carry). So a dropped modality is filled from the others, sample by sample
  (per-step members that read the dropped segment's ``0 + P_t`` alone can only emit a constant
  per position: before issue 14 their reconstruction had spread 0.0 across samples). The encoder
  outputs of AE and MMIN are not used by EMMR (eq. 13 and eq. 15 use the backbone's ``F`` only;
  the MMIN ``code`` layer gets no gradient).
* **Recovered input** (§3.6): ``I^e = X`` with every missing modality's segment replaced by member
  ``e``'s decoder output. **Views** (eq. 8-9): ``L_full = FC(pool(MHA(I)))`` and, for every modality
  ``k``, ``L_{-k} = FC(pool(MHA(I without k)))`` — the leave-one-out subsets, which are the paper's
  pairs va / vt / at for ``M = 3``. Each view has its own Transformer block (MHA + MLP) and
  classifier, shared by the members; "without k" runs on the concatenation of the other segments
  (gathered, :meth:`EMMRNetwork.loo_steps`; before issue 14 it masked ``k``'s steps out of a
  full-length pass, the same outputs for ``T_k / T`` more tokens). The loss and ``predict`` compute
  only the views whose value they use (:func:`needed_forward`: AE's / MMIN's views only where
  their input differs from TF's, and without ``lambda_sem`` only on flagged samples; the selected
  samples in chunks of ``model.row_chunk``); :meth:`EMMRNetwork.forward`, which
  :func:`diagnostics` runs, computes all of them.
* **Key-missing check** (§3.6, eq. 13): on the TF member (the backbone, Fig. 3b), sample ``b`` is
  flagged when some missing modality ``k`` has ``argmax L_full != argmax L_{-k}``. With one missing
  modality this is the paper's rule ``L_vat != L_{{v,a,t} - {k}}``; samples with no missing
  modality are never flagged; with several missing modalities any disagreement flags.
* **Ensemble** (eq. 10-12): per member ``alpha_k = softmax_k(max_c softmax(L_{-k})_c)`` and
  ``E_key = [alpha_1 L_{-1} || ... || alpha_M L_{-M}]`` ``[B, M*C]`` (``L`` = logits, as eq. 9
  defines them); ``H = [E_key^TF, E_key^AE, E_key^MMIN]``, ``beta = softmax_e(w^T tanh(H_e))``,
  ``r = sum_e beta_e H_e`` ``[B, M*C]``. ``fusion="max"`` / ``"average"`` replace ``beta`` by an
  element-wise max / mean over the members (Table 3).
* **Switch and head** (eq. 13, 17). ``r`` is ``M*C`` wide and ``F`` is ``d`` wide, so the widths of
  eq. 13's two branches differ: both are projected to ``d`` by their own linear map,
  ``R = Dense_key(r)`` for flagged samples and ``R = Dense_backbone(F)`` otherwise, then
  ``logits = Dense(C)(Dropout(R))``.

Loss (eq. 14-18) of the stage ``"main"``
----------------------------------------
``L = L_cls + lambda_1 L_forward + lambda_2 L_backward + lambda_sem L_sem``, every term reported:

* ``cls``: cross-entropy of the logits (eq. 17-18).
* ``forward`` (eq. 15): ``symmetric_kl(F, sg(E_pre))`` of the softmax-normalised pooled vectors,
  ``E_pre`` from the frozen network (evaluation mode, no dropout) on the clean copy
  (``teacher_input="clean"``, default) or on the missing-modality input itself
  (``"corrupted"``: §3.2 and the authors' code; the paper preset). On the clean copy ``E_pre`` of a
  training sample is the same in every step, so the stage's ``prepare`` computes it once per
  training sample (``method_state["teacher"] [N, d]``) and the train steps read it by
  ``batch.index``; any other call of the loss (``train=False``, or without the table) runs the
  teacher.
* ``backward`` (eq. 16): per member ``e``, ``backward_<e>`` = mean over valid samples and real steps
  of ``symmetric_kl(D^e_t, sg(X^full_t))``, softmax over the ``d`` features of each step;
  ``backward`` is their mean over the members (``backward_members="all"``, default) or the TF
  decoder's alone (``"tf"``: the authors' code applies it to the TF decoder; the paper preset). ``X^full`` is ``X`` of the clean copy (all
  modalities present; same encoders, evaluation mode, no gradient), so the decoders learn to
  reconstruct the dropped segments, not the zeros that replaced them.
* ``semantic`` (our addition, ``lambda_sem``, default 1): mean cross-entropy of every view's logits
  (all members, ``L_full`` and the ``L_{-k}``). Eq. 8-9 read the views as "sentiment labels", but
  nothing in eq. 14 trains them (``L_full`` would receive no gradient at all, and the key-missing
  check would compare untrained classifiers); ``lambda_sem = 0`` gives eq. 14 exactly (the paper
  preset, ``experiments/configs/paper.py:emmr``).
* Monitoring (not in the total): ``recovery_<e>`` (``backward_<e>``'s divergence over the steps of
  the missing modalities only: the reconstruction error of the dropped segments), ``key_missing``
  (fraction of valid samples flagged), ``missing`` (fraction with a missing modality).

**Missing modalities in training** come from the trainer's train-time corruption
(``config.train_corruption``, :mod:`mmjax.data.train_corruption`). EMMR's own regime
(``"method"``) is :data:`TRAIN_CORRUPTION`: :func:`mmjax.data.drop_one_modality` at ratio 0.5 (the
top of the paper's 0-0.5 sweep) on every training batch; stage 1 reads only the clean copy, so it
is unaffected. Evaluation uses ``batch.present``.

Ablations (Tables 2-3): ``members`` (``"tf"``, ``"tf,ae"``, ``"tf,mmin"``, default
``"tf,ae,mmin"``; TF is required: it is the backbone), ``fusion`` (``attention`` / ``max`` /
``average``), ``use_forward=False`` (no ``L_forward``; then the pre-trained network is unused and
its stage is skipped), ``use_backward=False``.

Paper settings (Table 7) are the defaults: ``d = 300``, dropout 0.3, ``lambda_1 = lambda_2 = 0.1``;
batch 32, 20 epochs, Adam lr 1e-3 are in ``experiments/configs/paper.py``. Classification only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.data import Batch, iterate_batches
from mmjax.losses import symmetric_kl
from mmjax.losses._common import masked_mean
from mmjax.methods.base import Method, Stage, TaskSpec, task_loss
from mmjax.nn import (
    CascadeResidualAutoencoder, MLPAutoencoder, TransformerEncoder, TransformerEncoderDecoder,
    apply_copy_per_row, apply_half, apply_stacked, map_selected, masked_mean_pool)

MEMBERS = ("tf", "ae", "mmin")
FUSIONS = ("attention", "max", "average")
TEACHER_INPUTS = ("clean", "corrupted")
BACKWARD_MEMBERS = ("all", "tf")


# EMMR's training regime (config.train_corruption = "method"): half of the training samples lose
# one modality (mmjax.data.drop_one_modality at ratio 0.5).
TRAIN_CORRUPTION = "drop_one:0.5"


# Training samples per call when the main stage caches the teacher's outputs (prepare_main).
TEACHER_CHUNK = 256


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      hidden=300,
      num_heads=4,
      mlp_ratio=4,
      dropout=0.3,
      ae_hidden=(256, 128, 64),
      num_residual_blocks=5,
      members="tf,ae,mmin",
      fusion="attention",
      lambda_forward=0.1,
      lambda_backward=0.1,
      lambda_semantic=1.0,
      # What the frozen teacher (eq. 3) reads in L_forward: "clean" (the clean copy, mmjax's
      # default: the full-modality representation the paper motivates) or "corrupted" (the
      # missing-modality input, as §3.2 and the authors' code feed it; the paper preset).
      teacher_input="clean",
      # Decoders L_backward trains (eq. 16): "all" (mean over the members) or "tf" (the TF
      # decoder only, as the authors' code; the paper preset).
      backward_members="all",
      use_forward=True,
      use_backward=True,
      pretrain_epochs=20,
      # Samples per chunk where EMMR computes for selected samples only (the views of
      # needed_forward, the re-encoded samples of encode_observed_and_clean): changes the cost,
      # never the values.
      row_chunk=8,
  ))


def parse_members(members: str) -> tuple[str, ...]:
  """``"tf,ae,mmin"`` (or ``"tf+ae+mmin"``, which a comma-separated ``--methods`` list can hold) ->
  ``("tf", "ae", "mmin")`` (order kept); ``ValueError`` naming the field."""
  names = tuple(m.strip() for m in members.replace("+", ",").split(",") if m.strip())
  unknown = sorted(set(names) - set(MEMBERS))
  if unknown or "tf" not in names or len(set(names)) != len(names):
    raise ValueError(f"model.members: expected distinct names from {MEMBERS} including 'tf' (the "
                     f"backbone), got {members!r}")
  return names


def key_representation(loo_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 10-11: confidence weights of the leave-one-out views and ``E_key``.

  Args:
    loo_logits: ``[..., M, C]``, the logits ``L_{-k}`` of the ``M`` leave-one-out views.

  Returns:
    ``alpha [..., M] = softmax_k(max_c softmax(L_{-k})_c)`` and
    ``E_key [..., M*C] = [alpha_1 L_{-1} || ... || alpha_M L_{-M}]``.
  """
  confidence = jnp.max(jax.nn.softmax(loo_logits, axis=-1), axis=-1)
  alpha = jax.nn.softmax(confidence, axis=-1)
  e_key = alpha[..., None] * loo_logits
  return alpha, e_key.reshape(e_key.shape[:-2] + (-1,))


def fuse(e_key: jax.Array, fusion: str, scores: jax.Array | None = None
         ) -> tuple[jax.Array, jax.Array | None]:
  """Eq. 12 and the Table 3 alternatives: ``H = e_key [K, B, W]`` (``K`` members) -> ``r [B, W]``.

  ``"attention"``: ``beta = softmax_e(scores_e)`` with ``scores = w^T tanh(H)`` ``[K, B]`` (computed
  by the caller, who owns ``w``), ``r = sum_e beta_e H_e``; returns ``(r, beta [B, K])``.
  ``"max"`` / ``"average"``: element-wise max / mean over the members; returns ``(r, None)``.
  """
  if fusion == "attention":
    beta = jax.nn.softmax(scores.T, axis=-1)
    return jnp.einsum("bk,kbw->bw", beta, e_key), beta
  if fusion == "max":
    return jnp.max(e_key, axis=0), None
  if fusion == "average":
    return jnp.mean(e_key, axis=0), None
  raise ValueError(f"model.fusion: expected one of {FUSIONS}, got {fusion!r}")


def key_missing_flags(full_logits: jax.Array, loo_logits: jax.Array,
                      present: jax.Array) -> jax.Array:
  """The condition of eq. 13: ``[B]`` True where a missing modality ``k`` has
  ``argmax L_full != argmax L_{-k}``.

  Args:
    full_logits: ``[B, C]`` ``L_full`` (all modalities, recovered input).
    loo_logits: ``[B, M, C]`` ``L_{-k}`` per modality ``k``.
    present: ``[B, M]`` bool; samples with every modality present are never flagged.
  """
  disagree = jnp.argmax(full_logits, -1)[:, None] != jnp.argmax(loo_logits, -1)  # [B, M]
  return jnp.any(disagree & ~present, axis=-1)


def without_modality(x: jax.Array, real: jax.Array, index: jax.Array, kept: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """The input of a leave-one-out view: ``x [..., T, d]`` at the steps ``index [..., L]`` (a row of
  :meth:`EMMRNetwork.loo_steps`; leading axes broadcast) and their mask ``real [..., T]`` at
  ``index`` and ``kept [..., L]``: ``([..., L, d], [..., L])``."""
  shape = jnp.broadcast_shapes(x.shape[:-2], index.shape[:-1])
  index = jnp.broadcast_to(index, shape + index.shape[-1:])
  return (jnp.take_along_axis(jnp.broadcast_to(x, shape + x.shape[-2:]), index[..., None], -2),
          jnp.take_along_axis(jnp.broadcast_to(real, shape + real.shape[-1:]), index, -1) & kept)


def recover(x: jax.Array, decoded: jax.Array, present: jax.Array, segment: np.ndarray
            ) -> jax.Array:
  """§3.6: ``I^e [K, B, T, d]`` = ``X [B, T, d]`` with the steps of every missing modality (``present
  [B, M]``, ``segment [T]`` the modality of each step) taken from ``decoded [K, B, T, d]``."""
  return jnp.where(~present[:, segment][None, ..., None], decoded, x[None])


class ModalityEncoders(nn.Module):
  """Eq. 1-2: per modality ``E_m = TransformerEncoder(Dense(d)(x_m))``, then ``[E_1 || ... || E_M]``
  along time.

  The ``M`` Transformer blocks (one pre-LN block each, own parameters, no dropout) run as one
  program (:func:`~mmjax.nn.apply_stacked`) on the segments zero-padded to ``max_m T_m``; the
  padding is masked out of the keys and cut off again. An absent modality's segment is zeroed.
  """

  seq_lens: tuple[int, ...]
  hidden: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, features: list[jax.Array], masks: list[jax.Array],
               present: jax.Array) -> jax.Array:
    """``features[i] [B, T_i, D_i]``, ``masks[i] [B, T_i]`` (keys), ``present [B, M]``.

    Returns ``[B, T, d]``.
    """
    longest = max(self.seq_lens)
    pad = lambda a, t: jnp.pad(a, [(0, 0), (0, longest - t)] + [(0, 0)] * (a.ndim - 2))
    embedded = jnp.stack([pad(nn.Dense(self.hidden, name=f"embed_{i}")(x), t)
                          for i, (x, t) in enumerate(zip(features, self.seq_lens))])
    keys = jnp.stack([pad(jnp.asarray(mask), t) for mask, t in zip(masks, self.seq_lens)])
    encoder = TransformerEncoder(1, self.num_heads, self.mlp_dim, name="attention")
    encoded = apply_stacked(encoder, len(self.seq_lens), embedded, keys, deterministic=True)
    return jnp.concatenate([
        encoded[i, :, :t] * present[:, i, None, None].astype(encoded.dtype)
        for i, t in enumerate(self.seq_lens)], axis=1)


class ViewClassifier(nn.Module):
  """``FC(pool(MHA(I)))`` of eq. 8-9: a pre-LN Transformer block, masked mean pool, ``Dense(C)``."""

  num_classes: int
  num_heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
    """``x [B, T, d]``, ``mask [B, T]`` (the view's steps) -> logits ``[B, C]``."""
    h = TransformerEncoder(1, self.num_heads, self.mlp_dim, self.dropout, name="attention")(
        x, mask, deterministic=deterministic)
    return nn.Dense(self.num_classes, name="head")(masked_mean_pool(h, mask))


class PretrainedNetwork(nn.Module):
  """The full-modality network of eq. 3: ``(logits [B, C], E_pre [B, d])``."""

  modalities: tuple[str, ...]
  seq_lens: tuple[int, ...]
  num_classes: int
  hidden: int
  num_heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
               present: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """``features[m] [B, T_m, D_m]``, ``masks[m] [B, T_m]`` (observed steps), ``present [B, M]``."""
    sequence = ModalityEncoders(self.seq_lens, self.hidden, self.num_heads, self.mlp_dim,
                                name="encoders")(
        [features[m] for m in self.modalities], [masks[m] for m in self.modalities], present)
    e_pre = masked_mean_pool(sequence, jnp.concatenate([masks[m] for m in self.modalities], 1))
    head = nn.Dense(self.num_classes, name="head")
    return head(nn.Dropout(self.dropout)(e_pre, deterministic=not train)), e_pre


class EMMRNetwork(nn.Module):
  """Encoders, the member encoder-decoders, the views, the ensemble and the head (module docstring).

  ``segment [T]``: the modality index of every step of the concatenated sequence.
  """

  modalities: tuple[str, ...]
  seq_lens: tuple[int, ...]
  num_classes: int
  hidden: int
  num_heads: int
  mlp_dim: int
  dropout: float
  ae_hidden: tuple[int, ...]
  num_residual_blocks: int
  members: tuple[str, ...]
  fusion: str

  @property
  def segment(self) -> np.ndarray:
    return np.repeat(np.arange(len(self.modalities)), self.seq_lens)

  def setup(self):
    self.encoders = ModalityEncoders(self.seq_lens, self.hidden, self.num_heads, self.mlp_dim)
    self.position = self.param("position", nn.initializers.normal(0.02),
                               (sum(self.seq_lens), self.hidden))
    builders = {
        "tf": lambda: TransformerEncoderDecoder(self.num_heads, self.mlp_dim, 1, self.dropout),
        "ae": lambda: MLPAutoencoder(tuple(self.ae_hidden)),
        "mmin": lambda: CascadeResidualAutoencoder(self.num_residual_blocks,
                                                   tuple(self.ae_hidden)),
    }
    self.encoder_decoders = {e: builders[e]() for e in self.members}
    # Per-step profiles R^e [T, d] of the utterance-level members (decoded step = û_m + P_t + R^e_t).
    self.step_profiles = {e: self.param(f"step_profile_{e}", nn.initializers.zeros,
                                        (sum(self.seq_lens), self.hidden))
                          for e in self.members if e != "tf"}
    # L_full (eq. 8) on all steps; the M leave-one-out views L_{-k} (eq. 9), stacked, each on the
    # steps of the other modalities only (gathered, see loo_steps).
    self.full_view = ViewClassifier(self.num_classes, self.num_heads, self.mlp_dim, self.dropout)
    self.loo_views = ViewClassifier(self.num_classes, self.num_heads, self.mlp_dim, self.dropout)
    self.ensemble_w = nn.Dense(1, use_bias=False)  # w of eq. 12
    self.key_proj = nn.Dense(self.hidden)  # r [M*C] -> d
    self.backbone_proj = nn.Dense(self.hidden)  # F [d] -> d
    self.head = nn.Dense(self.num_classes)
    self.drop = nn.Dropout(self.dropout)

  def encode(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
             present: jax.Array) -> jax.Array:
    """``X [B, T, d]`` (eq. 1-2 plus the position embedding ``P``); ``masks``: observed steps."""
    return self.encoders([features[m] for m in self.modalities],
                         [masks[m] for m in self.modalities], present) + self.position

  def decode(self, x: jax.Array, real: jax.Array, present: jax.Array, *, train: bool,
             tf_outputs: tuple[jax.Array, jax.Array] | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """The members' encoder-decoders (eq. 4-7) on ``X [B, T, d]``: ``(f_seq [B, T, d], decoded
    [K, B, T, d])``, ``f_seq`` the TF encoder's output (the backbone), ``decoded`` every member's
    reconstruction of every step. ``tf_outputs``: the TF member's ``(f_seq, decoded)`` when the
    caller computed them (:func:`decode_tf_where_missing`)."""
    observed = real & present[:, self.segment]
    decoded, f_seq = [], None
    if set(self.members) - {"tf"}:
      utterances = self.utterance_vectors(x, observed)  # [B, M, d], missing rows 0
    for e in self.members:
      if e == "tf" and tf_outputs is not None:
        f_seq, d = tf_outputs
      elif e == "tf":
        f_seq, d = self.encoder_decoders[e](x, observed, real, deterministic=not train)
      else:  # eq. 5-6 across the modalities: [u_1 || ... || u_M] -> its reconstruction
        _, flat = self.encoder_decoders[e](utterances.reshape(utterances.shape[0], -1))
        d = flat.reshape(utterances.shape)[:, self.segment] + self.position + self.step_profiles[e]
      decoded.append(d)
    return f_seq, jnp.stack(decoded)

  def view_logits(self, recovered: jax.Array, real: jax.Array, *, train: bool,
                  full: bool = True, loo: bool = True
                  ) -> tuple[jax.Array | None, jax.Array | None]:
    """Eq. 8-9 on recovered inputs ``I [n, T, d]`` with real steps ``[n, T]``: ``L_full [n, C]``
    (``None`` without ``full``) and ``L_{-k}`` ``[n, M, C]`` (each on the gathered steps of the
    other modalities; ``None`` without ``loo``)."""
    full = self.full_view(recovered, real, deterministic=not train) if full else None
    if not loo:
      return full, None
    index, kept = self.loo_steps()  # [M, L]
    x, mask = without_modality(recovered[:, None], real[:, None], index[None], kept[None])
    loo = apply_stacked(self.loo_views, len(self.modalities), jnp.moveaxis(x, 1, 0),
                        jnp.moveaxis(mask, 1, 0), deterministic=not train)  # [M, n, C]
    return full, jnp.moveaxis(loo, 0, 1)

  def combine(self, full_logits: jax.Array, loo_logits: jax.Array, f_seq: jax.Array,
              real: jax.Array, present: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Eq. 10-13 and 17 from the views ``full_logits [K, B, C]``, ``loo_logits [K, B, M, C]`` and
    the backbone's ``f_seq [B, T, d]``; the dict of :meth:`forward` without ``decoded``."""
    alpha, e_key = key_representation(loo_logits)  # [K, B, M], [K, B, M*C]
    scores = self.ensemble_w(jnp.tanh(e_key))[..., 0] if self.fusion == "attention" else None
    r, beta = fuse(e_key, self.fusion, scores)
    out = {} if beta is None else {"beta": beta}
    tf = self.members.index("tf")
    key_missing = key_missing_flags(full_logits[tf], loo_logits[tf], present)
    pooled_f = masked_mean_pool(f_seq, real)
    ensemble_r, backbone_r = self.key_proj(r), self.backbone_proj(pooled_f)
    chosen = jnp.where(key_missing[:, None], ensemble_r, backbone_r)  # eq. 13
    out.update(
        logits=self.head(self.drop(chosen, deterministic=not train)),
        backbone_logits=self.head(backbone_r), ensemble_logits=self.head(ensemble_r),
        key_missing=key_missing, pooled_f=pooled_f, full_logits=full_logits,
        loo_logits=loo_logits, alpha=alpha, e_key=e_key, r=r)
    return out

  def forward(self, x: jax.Array, real: jax.Array, present: jax.Array, *,
              train: bool) -> dict[str, jax.Array]:
    """Everything after eq. 2, from ``X [B, T, d]``, ``real [B, T]`` (real steps) and ``present``,
    every view of every member on every sample (the reference; :func:`needed_forward` computes
    only the views whose value is used).

    Returns a dict: ``logits [B, C]``; ``backbone_logits`` / ``ensemble_logits [B, C]`` (the head
    on either branch of eq. 13, without dropout); ``key_missing [B]``; ``decoded [K, B, T, d]``;
    ``pooled_f [B, d]``; ``full_logits [K, B, C]``; ``loo_logits [K, B, M, C]``;
    ``alpha [K, B, M]``; ``e_key [K, B, M*C]``; ``beta [B, K]`` (``attention`` fusion only);
    ``r [B, M*C]``.
    """
    f_seq, decoded = self.decode(x, real, present, train=train)
    recovered = recover(x, decoded, present, self.segment)  # [K, B, T, d]
    k_members, b = decoded.shape[:2]
    full, loo = self.view_logits(recovered.reshape((k_members * b,) + recovered.shape[2:]),
                                 jnp.tile(real, (k_members, 1)), train=train)
    out = self.combine(full.reshape(k_members, b, -1), loo.reshape((k_members, b) + loo.shape[1:]),
                       f_seq, real, present, train=train)
    out["decoded"] = decoded
    return out

  def loo_steps(self) -> tuple[np.ndarray, np.ndarray]:
    """``index [M, L]``, ``kept [M, L]``: row ``k`` lists the steps of every modality but ``k``
    (``L = T - min_k T_k``; shorter rows padded with step 0, ``kept`` False). The view ``L_{-k}``
    runs on those steps only: the same as masking ``k``'s steps out of the keys and the pooling of
    a full-length pass (tested), with ``(T - T_k) / T`` of its tokens."""
    segment = self.segment
    rows = [np.flatnonzero(segment != k) for k in range(len(self.modalities))]
    length = max(len(r) for r in rows)
    index = np.zeros((len(rows), length), np.int32)
    kept = np.zeros((len(rows), length), bool)
    for k, r in enumerate(rows):
      index[k, :len(r)], kept[k, :len(r)] = r, True
    return index, kept

  def utterance_vectors(self, x: jax.Array, observed: jax.Array) -> jax.Array:
    """``u [B, M, d]``: per modality the mean of ``E_m = X - P`` over its observed steps (0 for a
    missing modality) — the utterance-level input of the AE and MMIN members."""
    content = x - self.position
    rows = np.arange(len(self.modalities))[:, None] == self.segment[None]  # [M, T]
    weights = (observed[:, None, :] & rows[None]).astype(x.dtype)  # [B, M, T]
    return jnp.einsum("bmt,btd->bmd", weights, content) / jnp.maximum(
        weights.sum(-1, keepdims=True), 1.0)

  def __call__(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
               present: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """``encode`` then ``forward``; ``masks[m]`` are the real steps (``step_mask``)."""
    observed = {m: masks[m] & present[:, i, None] for i, m in enumerate(self.modalities)}
    x = self.encode(features, observed, present)
    real = jnp.concatenate([masks[m] for m in self.modalities], axis=1)
    return self.forward(x, real, present, train=train)


def make_models(config: ml_collections.ConfigDict, spec: TaskSpec
                ) -> tuple[PretrainedNetwork, EMMRNetwork]:
  """The two networks for ``spec`` (``config`` checked by :func:`build`)."""
  mlp_dim = config.mlp_ratio * config.hidden
  seq_lens = tuple(spec.feature_shapes[m][0] for m in spec.modalities)
  pretrained = PretrainedNetwork(spec.modalities, seq_lens, int(spec.num_classes), config.hidden,
                                 config.num_heads, mlp_dim, config.dropout)
  main = EMMRNetwork(spec.modalities, seq_lens,
                     int(spec.num_classes), config.hidden, config.num_heads, mlp_dim,
                     config.dropout, tuple(config.ae_hidden), config.num_residual_blocks,
                     parse_members(config.members), config.fusion)
  return pretrained, main


def decode_tf_where_missing(main: EMMRNetwork, variables, x: jax.Array, real: jax.Array,
                            present: jax.Array, *, train: bool, key: jax.Array | None,
                            chunk: int) -> tuple[jax.Array, jax.Array]:
  """The TF member's ``(f_seq [B, T, d], decoded [B, T, d])`` with its decoder run only on the
  samples with a missing modality (chunks of ``chunk``, :func:`mmjax.nn.map_selected`): the
  recovered input (eq. 7 then :func:`recover`) reads the decoder only on missing steps. ``decoded``
  is 0 on the complete samples; the encoder (the backbone ``f_seq``) runs on all."""
  tf = main.bind(variables).encoder_decoders["tf"]
  params = tf.variables["params"]
  encoder_key, decoder_key = (None, None) if key is None else jax.random.split(key)
  observed = real & present[:, main.segment]
  f_seq = apply_half(tf, params, 0, x, observed, deterministic=not train, key=encoder_key)
  decode = lambda rows, steps, k: apply_half(tf, params, 1, rows[0], steps[0],
                                             deterministic=not train, key=k)[None]
  decoded = map_selected(decode, jnp.any(~present, axis=-1)[None], chunk, f_seq[None], real[None],
                         key=decoder_key)[0]
  return f_seq, decoded


def member_loo_selection(need: jax.Array, present: jax.Array, num_members: int) -> jax.Array:
  """``[K', B, M]`` bool, ``K' = num_members`` members other than TF: ``(e, b, k)`` is selected
  when sample ``b`` is ``need`` ed ``[B]`` and member ``e``'s recovered input without ``k``
  differs from TF's, i.e. some modality other than ``k`` is missing (``present [B, M]``).
  Without ``k`` every member's recovered input is ``X`` without ``k`` when ``k`` is the only
  missing modality: that view is TF's for every member (one missing modality: ``M - 1`` of the
  ``M`` leave-one-out views per sample differ)."""
  missing = ~present
  others_missing = jnp.sum(missing, -1, keepdims=True) - missing  # [B, M]: missing besides k
  return jnp.broadcast_to(need[:, None] & (others_missing > 0), (num_members,) + present.shape)


def needed_forward(main: EMMRNetwork, variables, x: jax.Array, real: jax.Array,
                   present: jax.Array, *, train: bool, key: jax.Array | None, semantic: bool,
                   chunk: int, reconstruct: bool = True) -> dict[str, jax.Array]:
  """:meth:`EMMRNetwork.forward` computing only the views (eq. 8-9) whose value is used, and,
  unless ``reconstruct`` (``decoded`` read on every step: the backward loss), TF's decoder only
  where its value is used (:func:`decode_tf_where_missing`).

  The views are ``(1 + M) K`` Transformer passes per sample, most of the step. Which are needed:

  * A member's recovered input differs from ``X`` only on missing steps, so on a sample with every
    modality present all ``K`` members' views equal the TF member's: AE's and MMIN's views are
    computed only for samples with a missing modality and taken from TF's elsewhere (the same
    values; in training the members share TF's dropout draw there). For the same reason their
    ``L_{-k}`` equals TF's where ``k`` is the only missing modality: it is computed
    on the (member, sample, view) rows of :func:`member_loo_selection` only, chunked together
    (:func:`mmjax.nn.apply_copy_per_row`).
  * With ``semantic`` (``lambda_sem > 0``: every view is trained) TF's views run on every sample.
    Without it (eq. 14 exactly, and every evaluation) a view reaches the output and the gradient
    only through the key-missing check and the ensemble (eq. 10-13): TF's views run on the samples
    with a missing modality (the others are never flagged) and AE's / MMIN's on the flagged ones,
    their leave-one-out views only (the check reads TF's ``L_full``, the ensemble no member's).

  Selected samples run in chunks of ``chunk`` (:func:`mmjax.nn.map_selected`), so the work grows
  with their number, never with a capacity. Outputs as :meth:`EMMRNetwork.forward`'s, equal on
  every value the loss and the prediction read; the view logits (and ``alpha``, ``e_key``,
  ``r``, ``ensemble_logits``, ``beta``) of samples whose views are not needed, and without
  ``reconstruct`` TF's ``decoded`` of the complete samples, are placeholders (zeros or TF's):
  :func:`diagnostics` runs the full ``forward``.
  """
  keys = list(jax.random.split(key, 6)) if train else [None] * 6
  rngs = lambda k: {} if k is None else {"dropout": k}
  tf_outputs = None if reconstruct else decode_tf_where_missing(
      main, variables, x, real, present, train=train, key=keys[4], chunk=chunk)
  f_seq, decoded = main.apply(variables, x, real, present, train=train, tf_outputs=tf_outputs,
                              method="decode", rngs=rngs(keys[0]))
  recovered = recover(x, decoded, present, main.segment)  # [K, B, T, d]
  b, t = real.shape

  def views(rows, steps, k, loo=True):  # [G, c, T, d], [G, c, T] -> [G, c, C], [G, c, M, C]
    g, c = steps.shape[:2]
    full, loo = main.apply(variables, rows.reshape((g * c,) + rows.shape[2:]),
                           steps.reshape(g * c, t), train=train, loo=loo, method="view_logits",
                           rngs=rngs(k))
    return full.reshape(g, c, -1), None if loo is None else loo.reshape((g, c) + loo.shape[1:])

  incomplete = jnp.any(~present, axis=-1)  # [B]
  tf = main.members.index("tf")
  if semantic:  # every sample: no selection
    full_tf, loo_tf = views(recovered[tf, None], real[None], keys[1])
  else:
    full_tf, loo_tf = map_selected(views, incomplete[None], chunk, recovered[tf, None], real[None],
                                   key=keys[1])
  others = np.array([i for i, e in enumerate(main.members) if e != "tf"], int)
  full = jnp.broadcast_to(full_tf, (len(main.members),) + full_tf.shape[1:])
  loo = jnp.broadcast_to(loo_tf, (len(main.members),) + loo_tf.shape[1:])
  if len(others):  # without semantic only their leave-one-out views are read (eq. 10-12)
    need = incomplete if semantic else key_missing_flags(full_tf[0], loo_tf[0], present)
    if semantic:
      full_o, _ = map_selected(functools.partial(views, loo=False),
                               jnp.broadcast_to(need, (len(others), b)), chunk, recovered[others],
                               jnp.broadcast_to(real, (len(others), b, t)), key=keys[2])
      full = full.at[others].set(jnp.where(need[None, :, None], full_o, full_tf))
    # L_{-k}: the (member, sample, view k) rows whose input without k differs from TF's, chunked
    # together whatever their k (each through its view's parameters).
    selected = member_loo_selection(need, present, len(others))  # [K', B, M]
    index, kept = map(jnp.asarray, main.loo_steps())
    view = ViewClassifier(main.num_classes, main.num_heads, main.mlp_dim, main.dropout)
    view_params = variables["params"]["loo_views"]
    member_rows = recovered[others]  # [K', B, T, d]

    def loo_rows(pairs, k):  # pairs [1, c]: flat indices into [K', B, M]
      e, row, v = jnp.unravel_index(pairs[0], selected.shape)
      x, mask = without_modality(member_rows[e, row], real[row], index[v], kept[v])
      return apply_copy_per_row(view, view_params, v, x, mask, key=k,
                                deterministic=not train)[None]

    loo_o = map_selected(loo_rows, selected.reshape(1, -1), chunk,
                         jnp.arange(selected.size)[None], key=keys[5])[0]
    loo = loo.at[others].set(jnp.where(selected[..., None], loo_o.reshape(
        selected.shape + loo_o.shape[-1:]), loo_tf))
  out = main.apply(variables, full, loo, f_seq, real, present, train=train, method="combine",
                   rngs=rngs(keys[3]))
  out["decoded"] = decoded
  return out


def _check_config(config: ml_collections.ConfigDict, spec: TaskSpec) -> None:
  if spec.task != "classification":
    raise ValueError(
        f"task: EMMR classifies (3-class MOSI / 2-class IEMOCAP sentiment), got {spec.task!r} "
        "data; use a classification dataset, e.g. synthetic:classification")
  if len(spec.modalities) < 2:
    raise ValueError(f"modalities: EMMR needs at least 2, got {list(spec.modalities)}")
  if config.hidden % config.num_heads:
    raise ValueError(
        f"model.num_heads: {config.num_heads} does not divide model.hidden={config.hidden}")
  parse_members(config.members)
  if config.fusion not in FUSIONS:
    raise ValueError(f"model.fusion: expected one of {FUSIONS}, got {config.fusion!r}")
  if not config.ae_hidden or any(int(w) < 1 for w in config.ae_hidden):
    raise ValueError(f"model.ae_hidden: expected positive widths, got {config.ae_hidden!r}")
  if config.num_residual_blocks < 1:
    raise ValueError(
        f"model.num_residual_blocks: expected >= 1, got {config.num_residual_blocks}")
  if not isinstance(config.row_chunk, int) or config.row_chunk < 1:
    raise ValueError(f"model.row_chunk: expected an int >= 1, got {config.row_chunk!r}")
  if not isinstance(config.pretrain_epochs, int) or config.pretrain_epochs < 1:
    raise ValueError(f"model.pretrain_epochs: expected an int >= 1, got {config.pretrain_epochs!r}")
  for field, allowed in (("teacher_input", TEACHER_INPUTS), ("backward_members", BACKWARD_MEMBERS)):
    if config[field] not in allowed:
      raise ValueError(f"model.{field}: expected one of {allowed}, got {config[field]!r}")
  for field in ("lambda_forward", "lambda_backward", "lambda_semantic"):
    if config[field] < 0:
      raise ValueError(f"model.{field}: must be >= 0, got {config[field]}")


def _observed(batch: Batch, present: jax.Array) -> dict[str, jax.Array]:
  return {m: jnp.asarray(batch.step_mask[m]) & present[:, i, None]
          for i, m in enumerate(batch.modalities)}


def _real_steps(masks: dict[str, jax.Array], modalities: tuple[str, ...]) -> jax.Array:
  return jnp.concatenate([jnp.asarray(masks[m]) for m in modalities], axis=1)


def changed_rows(batch: Batch) -> jax.Array:
  """``[B]`` bool: samples with a present modality whose features or steps differ from the clean
  copy (noise, masked steps); dropping a modality alone changes nothing here."""
  present = jnp.asarray(batch.present)
  changed = jnp.zeros(batch.batch_size, bool)
  for i, m in enumerate(batch.modalities):
    differs = jnp.any(jnp.asarray(batch.features[m]) != jnp.asarray(batch.full_features[m]),
                      axis=(1, 2)) | jnp.any(jnp.asarray(batch.step_mask[m])
                                             != jnp.asarray(batch.full_step_mask[m]), axis=1)
    changed = changed | (present[:, i] & differs)
  return changed


def encode_observed_and_clean(main: EMMRNetwork, params, batch: Batch, chunk: int
                              ) -> tuple[jax.Array, jax.Array]:
  """``X`` of the batch (steps ``step_mask & present``) and ``X^full = sg(X)`` of its clean copy,
  two ``[B, T, d]`` arrays, encoding each sample once where that is enough.

  Eq. 1-2 encode every modality on its own and zero an absent one, so where the corruption only
  removed modalities (EMMR's ``drop_one``), ``X`` is ``X^full`` with the absent segments set to
  ``P``: the clean pass (with gradient) gives both. The samples of :func:`changed_rows` are also
  encoded from their own input (:func:`mmjax.nn.map_selected`, chunks of ``chunk``). Same values
  as two full passes; no backward pass runs through a pass whose output gets no gradient.
  """
  present = jnp.asarray(batch.present)
  variables = {"params": params["emmr"]}
  clean = main.apply(variables, batch.full_features, batch.full_step_mask, jnp.ones_like(present),
                     method="encode")
  observed = _observed(batch, present)
  num_mod = len(main.modalities)

  def encode_rows(*rows_and_key):  # [1, c, ...] per modality's features, masks; present
    rows = [r[0] for r in rows_and_key[:-1]]
    x = main.apply(variables, dict(zip(main.modalities, rows[:num_mod])),
                   dict(zip(main.modalities, rows[num_mod:-1])), rows[-1], method="encode")
    return x[None]

  changed = changed_rows(batch)
  own = map_selected(encode_rows, changed[None], chunk,
                     *[jnp.asarray(batch.features[m])[None] for m in main.modalities],
                     *[observed[m][None] for m in main.modalities], present[None])[0]
  derived = jnp.where(present[:, main.segment, None], clean, main.apply(
      variables, method=lambda mdl: mdl.position))
  x = jnp.where(changed[:, None, None], own, derived)
  return x, jax.lax.stop_gradient(clean)


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  """EMMR as a two-stage :class:`~mmjax.methods.base.Method` (see the module docstring)."""
  _check_config(config, spec)
  pretrained, main = make_models(config, spec)
  members = main.members
  all_present = lambda batch: jnp.ones((batch.batch_size, len(spec.modalities)), bool)

  # Runs once: compiled without backend optimisation (about 2.5x faster to compile on CPU).
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def init(key, batch):
    pre_key, main_key = jax.random.split(key)
    present = jnp.asarray(batch.present)
    params = {
        "pretrained": pretrained.init(pre_key, batch.full_features, batch.full_step_mask,
                                      all_present(batch), train=False)["params"],
        "emmr": main.init(main_key, batch.features, batch.step_mask, present,
                          train=False)["params"],
    }
    return params, {}

  def pretrain_loss(params, state, batch, key, train):
    rngs = {"dropout": key} if train else {}
    logits, _ = pretrained.apply({"params": params["pretrained"]}, batch.full_features,
                                 batch.full_step_mask, all_present(batch), train=train, rngs=rngs)
    metrics = {"task": task_loss(logits, batch, spec)}
    metrics["loss"] = metrics["task"]
    return metrics["loss"], (metrics, state, logits)

  def pretrain_predict(params, state, batch):
    del state
    present = jnp.asarray(batch.present)
    logits, _ = pretrained.apply({"params": params["pretrained"]}, batch.features,
                                 _observed(batch, present), present, train=False)
    return logits

  semantic = config.lambda_semantic > 0  # every view trained: all of them needed in the loss

  def forward(variables, x, real, present, train, key, semantic, reconstruct):
    return needed_forward(main, variables, x, real, present, train=train,
                          key=key if train else None, semantic=semantic, chunk=config.row_chunk,
                          reconstruct=reconstruct)

  def teacher(params, features, step_mask, present):  # E_pre [B, d] of eq. 3 and 15
    return pretrained.apply({"params": params["pretrained"]}, features, step_mask, present,
                            train=False)[1]

  cached_teacher = config.use_forward and config.teacher_input == "clean"

  def prepare_main(params, state, split):
    """Adds ``state["teacher"]``: ``[N, d]`` ``E_pre`` of each training sample's clean copy,
    computed once (the teacher is frozen in this stage and its input never changes)."""
    if not cached_teacher:
      return state
    run = jax.jit(lambda p, b: teacher(p, b.full_features, b.full_step_mask, all_present(b)))
    table = np.zeros((split.batch_size, config.hidden), np.float32)
    for batch in iterate_batches(split, min(TEACHER_CHUNK, split.batch_size)):
      rows = np.asarray(batch.valid)
      table[np.asarray(batch.index)[rows]] = np.asarray(run(params, batch))[rows]
    return {**state, "teacher": table}  # NumPy: the trainer places the state on its mesh

  def loss(params, state, batch, key, train):
    present = jnp.asarray(batch.present)
    valid = jnp.asarray(batch.valid)
    real = _real_steps(batch.step_mask, spec.modalities)
    variables = {"params": params["emmr"]}
    if config.use_backward:
      x, x_full = encode_observed_and_clean(main, params, batch, config.row_chunk)
    else:
      x = main.apply(variables, batch.features, _observed(batch, present), present,
                     method="encode")
    out = forward(variables, x, real, present, train, key, semantic, config.use_backward)

    metrics = {"cls": task_loss(out["logits"], batch, spec)}
    total = metrics["cls"]
    if config.use_forward:
      if train and cached_teacher and "teacher" in state:  # the training split's rows
        e_pre = jnp.asarray(state["teacher"])[jnp.asarray(batch.index)]
      elif config.teacher_input == "clean":
        e_pre = teacher(params, batch.full_features, batch.full_step_mask, all_present(batch))
      else:
        e_pre = teacher(params, batch.features, _observed(batch, present), present)
      metrics["forward"] = masked_mean(
          symmetric_kl(out["pooled_f"], jax.lax.stop_gradient(e_pre)), valid)
      total = total + config.lambda_forward * metrics["forward"]
    if config.use_backward:
      steps = valid[:, None] & _real_steps(batch.full_step_mask, spec.modalities)
      target = jnp.broadcast_to(jax.lax.stop_gradient(x_full), out["decoded"].shape)
      divergence = symmetric_kl(out["decoded"], target)  # [K, B, T]
      for i, e in enumerate(members):
        metrics[f"backward_{e}"] = masked_mean(divergence[i], steps)
        metrics[f"recovery_{e}"] = masked_mean(divergence[i], steps & ~present[:, main.segment])
      trained = members if config.backward_members == "all" else ("tf",)
      metrics["backward"] = sum(metrics[f"backward_{e}"] for e in trained) / len(trained)
      total = total + config.lambda_backward * metrics["backward"]
    if semantic:
      views = jnp.concatenate([out["full_logits"][:, :, None], out["loo_logits"]], axis=2)
      labels = jnp.broadcast_to(jnp.asarray(batch.label)[None, :, None], views.shape[:-1])
      metrics["semantic"] = masked_mean(
          optax.softmax_cross_entropy_with_integer_labels(views.astype(jnp.float32), labels),
          valid[None, :, None])
      total = total + config.lambda_semantic * metrics["semantic"]
    metrics["key_missing"] = masked_mean(out["key_missing"].astype(jnp.float32), valid)
    metrics["missing"] = masked_mean(jnp.any(~present, -1).astype(jnp.float32), valid)
    metrics["loss"] = total
    return total, (metrics, state, out["logits"])

  def predict(params, state, batch):
    del state
    present = jnp.asarray(batch.present)
    variables = {"params": params["emmr"]}
    x = main.apply(variables, batch.features, _observed(batch, present), present, method="encode")
    return forward(variables, x, _real_steps(batch.step_mask, spec.modalities), present, False,
                   None, False, False)["logits"]

  def trainable_in(stage):
    def trainable(params):
      return {k: jax.tree.map(lambda _, k=k: (k == "pretrained") == (stage == "pretrain"), v)
              for k, v in params.items()}
    return trainable

  stages = (Stage("pretrain", pretrain_loss, pretrain_predict, trainable_in("pretrain"),
                  config.pretrain_epochs),) if config.use_forward else ()
  stages += (Stage("main", loss, predict, trainable_in("main"), prepare=prepare_main),)
  return Method(name="emmr", init=init, loss=loss, predict=predict, stages=stages)


def diagnostics(params, batch: Batch, config: ml_collections.ConfigDict, spec: TaskSpec
                ) -> dict[str, jax.Array]:
  """Evaluation-mode internals of EMMR on ``batch`` (availability ``batch.present``).

  Returns :meth:`EMMRNetwork.forward`'s dict (``key_missing [B]``, ``alpha``, ``beta``, the view
  logits, both branches' logits, ...) plus ``x``, ``x_full [B, T, d]`` (``X`` of the batch and of
  its clean copy) and
  ``recovery_error [K, B]``: per member and sample, the mean over the real steps of the missing
  modalities of ``symmetric_kl(D_t, X^full_t)`` (0 for samples without a missing modality).
  """
  _check_config(config, spec)
  _, main = make_models(config, spec)
  present = jnp.asarray(batch.present)
  x, x_full = encode_observed_and_clean(main, params, batch, config.row_chunk)
  out = main.apply({"params": params["emmr"]}, x, _real_steps(batch.step_mask, spec.modalities),
                   present, train=False, method="forward")
  dropped = _real_steps(batch.step_mask, spec.modalities) & ~present[:, main.segment]
  out["x"], out["x_full"] = x, x_full
  out["recovery_error"] = masked_mean(
      symmetric_kl(out["decoded"], jnp.broadcast_to(x_full, out["decoded"].shape)), dropped[None],
      axis=-1)
  return out


def clean_disagreement(out: dict[str, np.ndarray]) -> np.ndarray:
  """``[N, M]`` bool: on the complete samples (``out`` = diagnostics of the clean split), whether
  the TF member's ``L_full`` and ``L_{-k}`` disagree — modality ``k`` is key in the paper's sense."""
  full, loo = np.asarray(out["full_logits"])[0], np.asarray(out["loo_logits"])[0]
  return full.argmax(-1)[:, None] != loo.argmax(-1)


def key_missing_by_modality(out: dict[str, np.ndarray], present: np.ndarray, labels: np.ndarray,
                 truth: np.ndarray, modalities: Sequence[str]) -> dict[str, dict[str, float]]:
  """Is the key-missing flag right? One row per modality ``k`` from one corrupted split
  (``benchmarks/emmr_key_missing.py``): samples missing ``k`` alone, the flagged share, agreement of
  the flag with :func:`clean_disagreement`, its precision and recall, and on the flagged samples
  the accuracy of each branch of eq. 13 and of the model.

  Args:
    out: :func:`mmjax.methods.emmr.diagnostics` of the corrupted split (``key_missing``,
      ``backbone_logits``, ``ensemble_logits``, ``logits``).
    present: ``[N, M]`` its availability; a sample counts for ``k`` when ``k`` alone is missing.
    labels: ``[N]``.
    truth: ``[N, M]`` :func:`clean_disagreement` of the same samples.
    modalities: the ``M`` names.
  Returns:
    ``{modality: {"n", "flagged", "agreement", "precision", "recall", "acc_backbone",
    "acc_ensemble", "acc_model"}}`` (counts as floats; ``nan`` where a ratio has no sample).
  """
  flagged = np.asarray(out["key_missing"]).astype(bool)
  right = {branch: np.asarray(out[f"{branch}logits"]).argmax(-1) == labels
           for branch in ("backbone_", "ensemble_", "")}
  mean_where = lambda x, where: float(x[where].mean()) if where.any() else float("nan")
  rows = {}
  for k, m in enumerate(modalities):
    alone = ~present[:, k] & (present.sum(-1) == present.shape[1] - 1)
    key = truth[:, k]
    rows[m] = dict(n=float(alone.sum()), flagged=mean_where(flagged, alone),
                   agreement=mean_where(flagged == key, alone),
                   precision=mean_where(key, alone & flagged),
                   recall=mean_where(flagged, alone & key),
                   acc_backbone=mean_where(right["backbone_"], alone & flagged),
                   acc_ensemble=mean_where(right["ensemble_"], alone & flagged),
                   acc_model=mean_where(right[""], alone & flagged))
  return rows
