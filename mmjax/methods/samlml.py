"""SAM-LML: supervised attention for low-quality multimodal learning (papers/003).

SPEC §6.3; equation numbers are the paper's:

* **Missing modalities** (§3). An absent modality's input features ``Z_m`` are replaced by Gaussian
  noise ``N(0, 1)`` on its real steps (``step_mask``; padded steps stay 0), drawn per sample
  (:func:`sample_keys`): in training from the step key, at evaluation from the sample's row in
  its split (``Batch.index``, ``fold_in(PRNGKey(EVAL_NOISE_SEED), index_b)``). Evaluation is thus
  a deterministic function of the split — independent of the caller's key, of the batching and of
  a sample's position in its batch — and no metric hinges on one shared draw.
* **Representation-level noise** (eq. 35, App. A.14; ``representation_noise`` = NR > 0):
  ``U_m <- (1 - NR) U_m + NR N`` on every modality of every sample right after the unimodal
  networks, in training *and* evaluation, per-sample draws as above (``representation_noise_type
  = "laplace_erasing"``: Laplace mixing or random erasing per sample, Table 13). The Table 6 / 13
  protocols of ``experiments.robustness --noise_level=representation``; input-level noise (the
  ``mix`` / ``laplace_erasing`` protocols on the features) is the method-agnostic alternative.
* **Unimodal networks** (App. A.1 eq. 30-31). Modalities named in ``config.language`` (default
  ``("auto",)``: ``text`` if the data has it, else every utterance-level modality, so multi-view data
  runs too; :func:`language_modalities`):
  ``U = Dense(d)(Z)``. Others: ``U = Transformer(Conv1D(d, kernel 3, 'SAME')(Z))`` with
  :class:`~mmjax.nn.TransformerEncoder` (pre-LN, key-padding mask, no positional embedding: the
  convolution already sees the order).
* **Intra-modal attention** (eq. 1-2), single head, bias-free ``W_q, W_k, W_v``:
  ``A_m = U W_q (U W_k)^T / sqrt(d)``, ``X_m = LN(softmax(A_m) U W_v)``; padded keys are masked
  out of the softmax (``-1e9``).
* **Inter-modal attention** (eq. 16-17) for every ordered pair ``m1 != m2``, with weights owned
  by the query modality ``m1``: ``A_{m1,m2} = X_{m1} W_q^{m1} (X_{m2} W_k^{m1})^T / sqrt(d)``,
  ``X_{m1,m2} = LN(softmax(A) X_{m2} W_v^{m1})``. Eq. 18-19: ``X_{m1,M}`` = mean over ``m2`` of the
  masked time-mean of ``X_{m1,m2}`` over ``m1``'s real steps (= the mean over the concatenated
  ``T (|M|-1)`` steps). Eq. 20-22: a learnable query ``q [1, d]`` attends over the ``|M|`` vectors
  ``X_{m1,M}`` with the same attention block, giving ``X [B, d]``. Eq. 23-24: ``p = Pred(X)``,
  ``p_{m1} = Pred(X_{m1,M})`` with one shared ``Pred = Dense(d) -> GELU -> Dense(out)``.
* **Noise addition** (eq. 3-6), training only, for every intra- and inter-modal attention with
  queries ``q``, keys ``k`` (``U_m`` resp. ``X_{m2}``): ``N ~ N(0, I)`` shaped like ``k``,
  ``lambda ~ U(0, 1)`` per sample, ``A^n = logits(q, N)``, ``A^{n'} = logits(q, lambda k +
  (1 - lambda) N) = lambda A + (1 - lambda) A^n`` (``W_k`` is linear: computed so, with the
  queries projected once per attention); ``L^n = rank(A > A^n) + rank(A^{n'} > A^n)`` with
  :func:`mmjax.losses.margin_ranking_loss` (margin ``gamma_1``) averaged over the selected
  (query, key) pairs. Selected = valid sample, query and key both real steps, and the modalities
  involved present: a modality that *is* noise gives no meaningful ranking target.
* **Decomposition replacement** (eq. 7-13), training only, intra-modal: per modality
  ``Decom_m: U -> (K^de, U^de)`` (``Dense(d) -> GELU -> Dense(2d)``, halves) and
  ``Compo_m: [K^de || U^de] -> U_hat`` (``Dense(d) -> GELU -> Dense(d)``), per time step
  (:class:`Decomposition`). ``de = rank(A_m > A^de_m)`` with ``A^de = logits(U, sg(K^de))``
  (eq. 7-8; the ranking trains the attention, not the decomposition, which learns from its own
  losses). ``orth = mean_b ||U^de K^de^T||_F`` (eq. 9), ``mi = ||Pred(pool K^de) -
  sg(Pred(pool N))||^2 + alpha' max(r - epsilon, 0)`` (eq. 10, 12; ``r`` = squared distance of
  ``U`` and ``K^de`` relative to ``||U||^2``, so that ``epsilon`` does not depend on the feature
  scale; ``alpha'`` = ``mi_distance_weight``), ``recon = mean ||U - U_hat||^2 / d`` (eq. 11), see
  :func:`decomposition_terms`.
* **Modality mixing** (eq. 26-28), training only, inter-modal: ``K^mix = lambda X_m2 + (1 -
  lambda) X_m1``, ``lambda ~ U(0, 1)`` per sample, ``A^mix = logits(X_m1, K^mix)`` with the query
  modality's inter-modal block; ``mix = rank(diag A^mix > diag A)`` over the diagonal (same time
  slice). Only those diagonal entries are computed (:meth:`SAMLMLModel._mixing_record`).
  Unaligned sequences (``T_m1 != T_m2``, Table 11) are mixed on the query's time grid: step ``t``
  is paired with the key step ``s(t)`` that maps the query's observed extent linearly onto the
  key's (:func:`paired_steps`), and ``diag`` reads ``A[t, s(t)]``.
* **Variance constraint** (eq. 14) on every intra- and inter-modal attention
  (:func:`mmjax.losses.attention_variance_loss`, ``beta``) and **context constraint** (eq. 15) on
  every intra-modal attention (:func:`mmjax.losses.attention_context_loss`, ``gamma``, ``rho``),
  same selection.
* **Loss** (eq. 29 with eq. 13 and 25, :func:`total_loss`)::

    L = task + alpha_p aux + alpha (noise + de + alpha_de (orth + mi + recon))
        + alpha_mix mix + alpha_c (var + con)

  ``task = Loss(p, y)`` and ``aux = mean_{m1} Loss(p_{m1}, y)`` (so ``task + alpha_p aux`` is eq.
  25's ``L_p``) with ``Loss`` = MSE (regression) or cross-entropy (a 2-class softmax
  cross-entropy is BCE on the logit difference); the supervision terms are the *sums* over all
  attentions (eq. 29: "the sum of all intra- and inter-modal ... losses"). Metrics report every
  term; the supervision terms exist only in training (evaluation neither computes nor reports
  them). Ablations (Table 4): ``use_aux``, ``use_noise``, ``use_de``, ``use_mix``, ``use_var``,
  ``use_con`` each remove their terms (and the extra attention passes);
  ``supervise_intra=False`` / ``supervise_inter=False`` remove every supervision of the intra- /
  inter-modal attentions ("unsupervised intra-/inter-modal attention"); both off is "W/O
  supervised learning".

Not implemented: the HCF fourth modality and the Transformer-then-Conv unimodal variant of
MHD/MSD (eq. 32-33).

Defaults: Table 7, CMU-MOSI (``d = 120``, ``rho = 5``, ``beta = 0.1``, ``gamma = 0.5``,
``gamma_1 = 1``, ``alpha_p = 1``, ``alpha_de = 0.01``, ``alpha = 0.005``, ``alpha_mix = 0.01``,
``alpha_c = 0.005``; the paper trains with AdamW lr 1e-5, batch 48 — see
``experiments/configs/paper.py:samlml[/column]`` for every Table 7 column). Eq. 10's ``alpha``
and ``epsilon`` are not given: ``mi_distance_weight = 1``, ``mi_epsilon = 0.5``. Unimodal Transformer depth/heads are
not in the paper: 1 layer, 4 heads, MLP ratio 2.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.data import Batch
from mmjax.data.corruption import laplace_or_erase
from mmjax.losses import attention_context_loss, attention_variance_loss, margin_ranking_loss
from mmjax.losses._common import masked_mean
from mmjax.methods.base import Method, TaskSpec, head_output, task_loss
from mmjax.nn import TemporalConv, TransformerEncoder, masked_mean_pool

EVAL_NOISE_SEED = 0  # evaluation noise of sample b: fold_in(PRNGKey(EVAL_NOISE_SEED), index_b)
REPRESENTATION_NOISE_TYPES = ("gaussian", "laplace_erasing")  # eq. 35, App. A.14
# The input-level protocols (mmjax.data.protocols) whose representation-level twins these are.
REPRESENTATION_PROTOCOLS = {"mix": "gaussian", "laplace_erasing": "laplace_erasing"}
MASKED_LOGIT = -1e9  # logit of a padded key inside the softmax


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      hidden=120,  # shared dimensionality d (Table 7, MOSI)
      num_layers=1,
      num_heads=4,
      mlp_ratio=2,
      dropout=0.0,
      # Modalities whose unimodal network is a Dense projection (eq. 30): a tuple of names, or
      # ("auto",) = ("text",) when the data has a "text" modality, else every utterance-level
      # (T_m = 1) modality (multi-view data: a sequence network over one step has nothing to see).
      language=("auto",),
      rho=5,  # diagonal window of the context constraint
      beta=0.1,  # variance margin
      gamma=0.5,  # context margin
      gamma1=1.0,  # ranking margin
      alpha_p=1.0,  # weight of the auxiliary (per query modality) predictive losses
      alpha=0.005,  # weight of the noise-addition + decomposition-replacement losses (eq. 29)
      alpha_de=0.01,  # weight of the decomposition losses orth + mi + recon inside L^de (eq. 13)
      alpha_mix=0.01,  # weight of the modality-mixing loss (eq. 29)
      alpha_c=0.005,  # weight of the variance + context constraints
      mi_distance_weight=1.0,  # eq. 10's alpha on max(dist(U, K^de) - epsilon, 0)
      mi_epsilon=0.5,  # eq. 10's epsilon, on the relative squared distance (module docstring)
      use_aux=True,
      use_noise=True,  # noise addition (eq. 3-6), intra and inter
      use_de=True,  # decomposition replacement (eq. 7-13), intra
      use_mix=True,  # modality mixing (eq. 26-28), inter
      use_var=True,  # variance constraint (eq. 14), intra and inter
      use_con=True,  # context constraint (eq. 15), intra
      supervise_intra=True,  # False: no supervision of any intra-modal attention (Table 4)
      supervise_inter=True,  # False: no supervision of any inter-modal attention (Table 4)
      # Eq. 35 / App. A.14 at the representation level: U_m <- (1 - NR) U_m + NR N after the
      # unimodal networks, in training and evaluation (0 = off; Table 6 / 13 protocols).
      representation_noise=0.0,
      representation_noise_type="gaussian",  # or "laplace_erasing" (App. A.14, Table 13)
  ))


class Attended(NamedTuple):
  """One attention's results: ``output`` ``X [B, Q, d]``, ``logits`` ``A [B, Q, K]``, the masked
  softmax ``weights [B, Q, K]`` (0 on padded keys) and the projected, scaled queries
  ``queries W_q / sqrt(d)`` ``[B, Q, d]`` that further logits reuse."""

  output: jax.Array
  logits: jax.Array
  weights: jax.Array
  queries: jax.Array


class SupervisedAttention(nn.Module):
  """Single-head attention; its logits can be re-evaluated on other keys (eq. 1-2, 16-17, 21-22).

  The supervision passes reuse the projected queries of :meth:`__call__` (``Attended.queries``):
  ``logits(projected, keys) = projected (keys W_k)^T`` projects only the new keys.
  """

  hidden: int

  def setup(self):
    self.query = nn.Dense(self.hidden, use_bias=False)
    self.key = nn.Dense(self.hidden, use_bias=False)
    self.value = nn.Dense(self.hidden, use_bias=False)
    self.norm = nn.LayerNorm()

  def project_queries(self, queries: jax.Array) -> jax.Array:
    """``queries W_q / sqrt(d)``: ``[B, Q, d] -> [B, Q, d]``."""
    return self.query(queries) / math.sqrt(self.hidden)

  def logits(self, projected: jax.Array, keys: jax.Array) -> jax.Array:
    """``A = projected (keys W_k)^T`` for queries projected by :meth:`project_queries`:
    ``[B, Q, d], [B, K, d] -> [B, Q, K]``."""
    return jnp.einsum("bqd,bkd->bqk", projected, self.key(keys))

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array) -> Attended:
    """``X = LN(softmax(A) keys W_v)`` over the keys of ``key_mask [B, K]``."""
    return self.attend(self.project_queries(queries), keys, key_mask)

  def attend(self, projected: jax.Array, keys: jax.Array, key_mask: jax.Array) -> Attended:
    """:meth:`__call__` for queries already projected by :meth:`project_queries` (an inter-modal
    block attends from one query modality to several key modalities)."""
    logits = self.logits(projected, keys)  # Shape: [B, Q, K]
    weights = jax.nn.softmax(jnp.where(key_mask[:, None, :], logits, MASKED_LOGIT), axis=-1)
    output = self.norm(jnp.einsum("bqk,bkd->bqd", weights, self.value(keys)))
    return Attended(output, logits, weights, projected)


class UnimodalNetwork(nn.Module):
  """``Dense(d)`` (language, eq. 30) or ``Transformer(Conv1D(d, 3))`` (eq. 31).

  ``x [B, T, D]``, ``mask [B, T]`` -> ``U [B, T, d]``.
  """

  hidden: int
  language: bool
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    if self.language:
      return nn.Dense(self.hidden, name="project")(x)
    h = TemporalConv(self.hidden, 3, name="conv")(x)  # nn.Conv(..., "SAME") as one matmul
    return TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                              name="transformer")(h, mask, deterministic=not train)


class Decomposition(nn.Module):
  """``Decom_m`` and ``Compo_m`` of eq. 9 and 11 (App. Fig. 5), per time step.

  ``Decom: U [B, T, d] -> (K^de, U^de)``: ``Dense(d) -> GELU -> Dense(2d)``, split in halves.
  ``Compo: (K^de, U^de) -> U_hat``: ``Dense(d) -> GELU -> Dense(d)`` on ``[K^de || U^de]``.
  """

  hidden: int

  @nn.compact
  def __call__(self, units: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``K^de`` (label-irrelevant), ``U^de`` (label-relevant), ``U_hat``."""
    h = nn.Dense(2 * self.hidden, name="decom_out")(
        nn.gelu(nn.Dense(self.hidden, name="decom_hidden")(units)))
    irrelevant, relevant = jnp.split(h, 2, axis=-1)
    recomposed = nn.Dense(self.hidden, name="compo_out")(nn.gelu(nn.Dense(
        self.hidden, name="compo_hidden")(jnp.concatenate([irrelevant, relevant], axis=-1))))
    return irrelevant, relevant, recomposed


class SAMLMLModel(nn.Module):
  """The SAM-LML network (see the module docstring).

  ``intra_ops`` / ``inter_ops`` name the training-time operations that need extra model passes:
  ``"noise"`` (eq. 3-6) and ``"de"`` (eq. 7-13) for intra-modal attention, ``"noise"`` and
  ``"mix"`` (eq. 26-28) for inter-modal attention. ``representation_noise`` is eq. 35's NR on
  ``U_m`` (training and evaluation), of type ``representation_noise_type`` (``"gaussian"``: eq.
  35; ``"laplace_erasing"``: App. A.14).
  """

  modalities: tuple[str, ...]
  language: tuple[str, ...]
  output_dim: int
  hidden: int = 120
  num_layers: int = 1
  num_heads: int = 4
  mlp_ratio: int = 2
  dropout: float = 0.0
  intra_ops: tuple[str, ...] = ("noise", "de")
  inter_ops: tuple[str, ...] = ("noise", "mix")
  representation_noise: float = 0.0
  representation_noise_type: str = "gaussian"

  def setup(self):
    self.unimodal = [
        UnimodalNetwork(self.hidden, m in self.language, self.num_layers, self.num_heads,
                        self.mlp_ratio * self.hidden, self.dropout) for m in self.modalities]
    self.intra = [SupervisedAttention(self.hidden) for _ in self.modalities]
    self.inter = [SupervisedAttention(self.hidden) for _ in self.modalities]  # owned by the query
    if "de" in self.intra_ops:
      self.decompositions = [Decomposition(self.hidden) for _ in self.modalities]
    self.pool_query = self.param("pool_query", nn.initializers.normal(1.0), (1, self.hidden))
    self.pool = SupervisedAttention(self.hidden)
    self.predictor_hidden = nn.Dense(self.hidden)
    self.predictor_out = nn.Dense(self.output_dim)

  def encode(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
             present: jax.Array, index: jax.Array, key: jax.Array | None, *, train: bool
             ) -> dict[str, jax.Array]:
    """Unimodal representations ``U_m [B, T_m, d]``: absent modalities read Gaussian noise, and
    ``U_m`` carries the representation-level noise when ``representation_noise > 0``.

    Every draw is per sample (:func:`sample_keys`): from ``key`` in training, from the sample's
    ``index [B]`` at evaluation. Modality ``i``'s missing-modality noise uses ``fold_in(k_b, 2 i)``,
    its representation noise ``fold_in(k_b, 2 i + 1)``; the sample's App. A.14 noise type
    ``fold_in(k_b, 2 M)``.
    """
    keys = sample_keys(key, index, train=train)
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    # App. A.14: one noise type per sample, shared by its modalities (True = Laplace).
    laplace = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(fold(keys, 2 * len(self.modalities)))
    out = {}
    for i, (m, net) in enumerate(zip(self.modalities, self.unimodal)):
      x, mask = features[m], masks[m]

      def with_noise(x=x, mask=mask, i=i):
        draw = lambda k: jax.random.normal(k, x.shape[1:]).astype(x.dtype)
        noise = jax.vmap(draw)(fold(keys, 2 * i))
        return jnp.where(present[:, i, None, None], x, noise * mask[..., None].astype(x.dtype))

      # A batch in which every sample has modality i draws no noise for it (same values).
      x = jax.lax.cond(jnp.all(present[:, i]), lambda x=x: x, with_noise)
      units = net(x, mask, train=train)
      if self.representation_noise:
        units = noisy_representation(fold(keys, 2 * i + 1), units, self.representation_noise,
                                     self.representation_noise_type, laplace)
      out[m] = units
    return out

  def predict(self, x: jax.Array) -> jax.Array:
    """Eq. 23-24 predictor ``[..., d] -> [..., out]``."""
    return self.predictor_out(nn.gelu(self.predictor_hidden(x)))

  def __call__(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
               present: jax.Array, index: jax.Array, key: jax.Array | None, *, train: bool
               ) -> tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]:
    """Returns ``p [B, out]``, ``p_m [B, M, out]`` and one record per attention.

    Records are keyed ``"m"`` (intra) and ``"m1->m2"`` (inter); each holds ``logits`` and
    ``weights`` (the masked softmax), and in training the entries of :meth:`_noise_record`,
    :meth:`_decomposition_record` and :meth:`_mixing_record` for the operations in ``intra_ops`` /
    ``inter_ops``.
    """
    encode_key, supervision_key = jax.random.split(key) if train else (None, None)
    units = self.encode(features, masks, present, index, encode_key, train=train)
    num = len(self.modalities)
    # Record i (intra) and M (i + 1) + j (inter i -> j) draw from fold_in(supervision_key, index).
    records, xs = {}, {}
    for i, m in enumerate(self.modalities):
      attended = self.intra[i](units[m], units[m], masks[m])  # eq. 1-2
      xs[m] = attended.output
      records[m] = {"logits": attended.logits, "weights": attended.weights}
      if train:
        noise_key, de_key = jax.random.split(jax.random.fold_in(supervision_key, i))
        if "noise" in self.intra_ops:
          records[m].update(self._noise_record(self.intra[i], attended, units[m], units[m],
                                               noise_key))
        if "de" in self.intra_ops:
          records[m].update(self._decomposition_record(i, attended, units[m], masks[m], de_key))
    pooled = []
    for i, m1 in enumerate(self.modalities):
      per_key = []
      projected = self.inter[i].project_queries(xs[m1])  # shared by m1's |M| - 1 attentions
      if train and "mix" in self.inter_ops:  # q_t . (X_m1[t] W_k), shared likewise
        own_logits = jnp.einsum("btd,btd->bt", projected, self.inter[i].key(xs[m1]))
      for j, m2 in enumerate(self.modalities):
        if i == j:
          continue
        attended = self.inter[i].attend(projected, xs[m2], masks[m2])  # eq. 16-17
        record = records[f"{m1}->{m2}"] = {"logits": attended.logits, "weights": attended.weights}
        if train:
          noise_key, mix_key = jax.random.split(
              jax.random.fold_in(supervision_key, num * (i + 1) + j))
          if "noise" in self.inter_ops:
            record.update(self._noise_record(self.inter[i], attended, xs[m1], xs[m2], noise_key))
          if "mix" in self.inter_ops:
            record.update(self._mixing_record(attended, own_logits, xs[m1], xs[m2], masks[m1],
                                              masks[m2], mix_key))
        per_key.append(masked_mean_pool(attended.output, masks[m1]))
      pooled.append(jnp.mean(jnp.stack(per_key), axis=0))  # eq. 18-19
    stacked = jnp.stack(pooled, axis=1)  # Shape: [B, M, d]
    query = jnp.broadcast_to(self.pool_query[None], (stacked.shape[0], 1, self.hidden))
    fused = self.pool(query, stacked, jnp.ones(stacked.shape[:2], bool)).output  # eq. 20-22
    return self.predict(fused[:, 0]), self.predict(stacked), records

  def initialize(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
                 present: jax.Array, index: jax.Array) -> jax.Array:
    """The evaluation pass plus the decomposition networks: creates every parameter (``init``)
    without tracing the training-only supervision passes."""
    outputs, _, _ = self(features, masks, present, index, None, train=False)
    if "de" in self.intra_ops:
      units = self.encode(features, masks, present, index, None, train=False)
      for decomposition, m in zip(self.decompositions, self.modalities):
        decomposition(units[m])
    return outputs

  def _noise_record(self, attention: SupervisedAttention, attended: Attended, queries: jax.Array,
                    keys: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Eq. 3 and 5: ``noise_logits`` ``A^n`` against keys ``N ~ N(0, I)`` shaped like ``keys``,
    ``noisy_logits`` ``A^{n'}`` against ``lambda keys + (1 - lambda) N``, ``lambda ~ U(0, 1)``
    per sample (``noise_weight [B, 1, 1]``).

    ``W_k`` is linear and bias-free, so ``A^{n'} = lambda A + (1 - lambda) A^n`` exactly: one
    extra logit matrix per attention, not two (``queries``/``keys`` are recorded for tests).
    """
    noise_key, weight_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, keys.shape).astype(keys.dtype)
    weight = jax.random.uniform(weight_key, (keys.shape[0], 1, 1)).astype(keys.dtype)
    noise_logits = attention.logits(attended.queries, noise)
    return {"queries": queries, "keys": keys, "noise": noise, "noise_weight": weight,
            "noise_logits": noise_logits,
            "noisy_logits": weight * attended.logits + (1.0 - weight) * noise_logits}

  def _decomposition_record(self, index: int, attended: Attended, units: jax.Array,
                            mask: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Eq. 7, 9, 11, 12 for modality ``index``.

    ``de_logits`` ``A^de = logits(U, stop_gradient(K^de))`` (the ranking trains the attention,
    not the decomposition); ``irrelevant`` ``K^de``, ``relevant`` ``U^de``, ``recomposed``
    ``U_hat`` (all ``[B, T, d]``), ``units`` ``U``; ``irrelevant_prediction``
    ``Pred(pool K^de)`` and ``noise_prediction`` ``stop_gradient(Pred(N))`` ``[B, out]`` with
    ``pool`` the masked time mean and ``pred_noise`` ``N ~ N(0, I)`` drawn in the predictor's input
    space ``[B, d]`` as eq. 12 writes it (a ``[B, T, d]`` draw pooled over time would have std
    ``1 / sqrt(T)``, nearly ``Pred(0)``).
    """
    irrelevant, relevant, recomposed = self.decompositions[index](units)
    noise = jax.random.normal(key, (units.shape[0], units.shape[-1])).astype(units.dtype)
    return {"units": units, "irrelevant": irrelevant, "relevant": relevant,
            "recomposed": recomposed,
            "de_logits": self.intra[index].logits(attended.queries,
                                                  jax.lax.stop_gradient(irrelevant)),
            "irrelevant_prediction": self.predict(masked_mean_pool(irrelevant, mask)),
            "pred_noise": noise,
            "noise_prediction": jax.lax.stop_gradient(self.predict(noise))}

  def _mixing_record(self, attended: Attended, own_logits: jax.Array, queries: jax.Array,
                     keys: jax.Array, query_mask: jax.Array, key_mask: jax.Array, key: jax.Array
                     ) -> dict[str, jax.Array]:
    """Eq. 26-27 on the query's time grid: query step ``t`` is paired with key step ``s(t)``
    (:func:`paired_steps`; ``s(t) = t`` for aligned sequences), ``K^mix_t = lambda X_m2[s(t)] +
    (1 - lambda) X_m1[t]``, ``lambda ~ U(0, 1)`` per sample (``mix_weight [B, 1, 1]``).

    Only the pairs ``(t, s(t))`` enter eq. 28, so only they are computed: ``mix_logits [B, T_m1]``
    ``= A^mix[t, t] = lambda A[t, s(t)] + (1 - lambda) q_t . (X_m1[t] W_k)`` (``W_k`` linear;
    ``own_logits [B, T_m1]`` is the second dot product) and ``mix_reference [B, T_m1] =
    A[t, s(t)]``; ``mix_steps [B, T_m1]`` is ``s``.
    """
    weight = jax.random.uniform(key, (keys.shape[0], 1, 1)).astype(keys.dtype)
    steps = paired_steps(query_mask, key_mask)  # Shape: [B, T_m1]
    reference = jnp.take_along_axis(attended.logits, steps[..., None], axis=-1)[..., 0]
    return {"mix_queries": queries, "mix_keys": keys, "mix_weight": weight, "mix_steps": steps,
            "mix_reference": reference,
            "mix_logits": weight[..., 0] * reference + (1.0 - weight[..., 0]) * own_logits}


def sample_keys(key: jax.Array | None, index: jax.Array, *, train: bool) -> jax.Array:
  """``[B]`` keys, one per sample: ``split(key, B)`` in training; at evaluation
  ``fold_in(PRNGKey(EVAL_NOISE_SEED), index_b)``, so a sample's evaluation noise depends on its
  row in the split only — not on the caller's key, its batch or its position there — and
  differs from sample to sample."""
  if train:
    return jax.random.split(key, index.shape[0])
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(EVAL_NOISE_SEED),
                                                        index)


def noisy_representation(keys: jax.Array, units: jax.Array, rate: float, kind: str,
                         laplace: jax.Array) -> jax.Array:
  """Eq. 35 on ``U_m [B, T, d]`` with per-sample ``keys [B]``.

  ``"gaussian"``: ``(1 - NR) U + NR N``, ``N ~ N(0, 1)`` from ``k_b``. ``"laplace_erasing"`` (App.
  A.14): Laplace mixing (unit variance) where ``laplace [B]`` is True, else random erasing of each
  entry with probability ``NR``, as :func:`mmjax.data.corruption.laplace_or_erase`.
  """
  if kind == "gaussian":
    noise = jax.vmap(lambda k: jax.random.normal(k, units.shape[1:]).astype(units.dtype))(keys)
    return (1.0 - rate) * units + rate * noise
  return jax.vmap(laplace_or_erase, in_axes=(0, 0, None, 0))(keys, units, rate, laplace
                                                             ).astype(units.dtype)


def paired_steps(query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
  """``s [B, T_q]`` int: the key step paired with each query step by modality mixing (eq. 26-28).

  Aligned sequences (``T_q == T_k``): ``s(t) = t``, the paper's diagonal. Unaligned ones: the
  query's observed extent ``[f_q, l_q]`` (first to last real step) is mapped linearly onto the
  key's ``[f_k, l_k]``, ``s(t) = f_k + floor((t - f_q) (l_k - f_k + 1) / (l_q - f_q + 1))``,
  clipped to the key's range (a common time grid; steps outside the query's extent are not
  selected by the loss anyway).
  """
  t_q, t_k = query_mask.shape[-1], key_mask.shape[-1]
  steps = jnp.broadcast_to(jnp.arange(t_q, dtype=jnp.int32), query_mask.shape)
  if t_q == t_k:
    return steps

  def extent(mask):
    position = jnp.arange(mask.shape[-1])
    first = jnp.min(jnp.where(mask, position, mask.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(mask, position, -1), axis=-1)
    first = jnp.where(last >= 0, first, 0)
    return first[:, None], jnp.maximum(last - first + 1, 1)[:, None]

  (first_q, length_q), (first_k, length_k) = extent(query_mask), extent(key_mask)
  mapped = first_k + ((steps - first_q) * length_k) // length_q
  return jnp.clip(mapped, 0, t_k - 1).astype(jnp.int32)


def supervised_operations(config: ml_collections.ConfigDict
                          ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(intra_ops, inter_ops)``: the extra-pass operations the config switches on."""
  intra = tuple(op for op, on in (("noise", config.use_noise), ("de", config.use_de)) if on)
  inter = tuple(op for op, on in (("noise", config.use_noise), ("mix", config.use_mix)) if on)
  return (intra if config.supervise_intra else ()), (inter if config.supervise_inter else ())


def make_model(config: ml_collections.ConfigDict, spec: TaskSpec) -> SAMLMLModel:
  intra_ops, inter_ops = supervised_operations(config)
  return SAMLMLModel(spec.modalities, language_modalities(config, spec), spec.output_dim,
                     config.hidden, config.num_layers, config.num_heads, config.mlp_ratio,
                     config.dropout, intra_ops, inter_ops, float(config.representation_noise),
                     config.representation_noise_type)


def attention_selection(batch: Batch, query: str, key: str) -> jax.Array:
  """``[B, T_query, T_key]`` bool: the (query, key) pairs a supervision term averages over.

  Valid sample, both modalities present, query and key real steps.
  """
  present = jnp.asarray(batch.present)
  sample = (jnp.asarray(batch.valid) & present[:, batch.modality_index(query)]
            & present[:, batch.modality_index(key)])
  return (sample[:, None, None] & jnp.asarray(batch.step_mask[query])[:, :, None]
          & jnp.asarray(batch.step_mask[key])[:, None, :])


def term_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The supervision terms a training step reports under ``config`` (module docstring)."""
  intra, inter = config.supervise_intra, config.supervise_inter
  on = {"noise": config.use_noise and (intra or inter),
        "de": config.use_de and intra, "orth": config.use_de and intra,
        "mi": config.use_de and intra, "recon": config.use_de and intra,
        "mix": config.use_mix and inter,
        "var": config.use_var and (intra or inter), "con": config.use_con and intra}
  return tuple(name for name, enabled in on.items() if enabled)


def _frobenius(x: jax.Array) -> jax.Array:
  """``||x||_F`` over the last two axes with a finite gradient at 0."""
  squared = jnp.sum(jnp.square(x), axis=(-2, -1))
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def decomposition_terms(record: dict[str, jax.Array], steps: jax.Array,
                        config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """``orth``, ``mi``, ``recon`` of one modality (eq. 9-12) over the selected ``steps [B, T]``.

  * ``orth = mean_b ||U^de_b (K^de_b)^T||_F`` over the selected steps (eq. 9's ``L^or``);
  * ``mi = mean_b ||Pred(pool K^de) - Pred(pool N)||^2 + alpha' max(r_b - epsilon, 0)`` with the
    relative distance ``r_b = sum_t ||U - K^de||^2 / sum_t ||U||^2`` (eq. 10, 12; ``alpha'`` =
    ``config.mi_distance_weight``, the target's norm not differentiated);
  * ``recon = mean ||U - U_hat||^2 / d`` over selected steps (eq. 11's ``L^re``).

  Samples count when at least one step is selected.
  """
  units, irrelevant = record["units"], record["irrelevant"]
  weights = steps[..., None].astype(units.dtype)
  sample = jnp.any(steps, axis=-1)
  orth = _frobenius(jnp.einsum("btd,bsd->bts", record["relevant"] * weights, irrelevant * weights))
  gap = jnp.sum(jnp.square(record["irrelevant_prediction"] - record["noise_prediction"]), axis=-1)
  distance = (jnp.sum(jnp.square(units - irrelevant) * weights, axis=(1, 2))
              / jax.lax.stop_gradient(jnp.maximum(
                  jnp.sum(jnp.square(units) * weights, axis=(1, 2)), 1e-12)))
  mi = gap + config.mi_distance_weight * jnp.maximum(distance - config.mi_epsilon, 0.0)
  recon = jnp.mean(jnp.square(units - record["recomposed"]), axis=-1)
  return {"orth": masked_mean(orth, sample), "mi": masked_mean(mi, sample),
          "recon": masked_mean(recon, steps)}


def supervision_terms(records: dict[str, dict[str, jax.Array]], batch: Batch,
                      config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The enabled supervision terms (:func:`term_names`), each summed over attentions.

  Per intra-modal attention of modality ``m``: ``noise`` (eq. 3-6), ``de`` = rank(A > A^de)
  (eq. 8) and ``orth``/``mi``/``recon`` (:func:`decomposition_terms`), ``var`` (eq. 14), ``con``
  (eq. 15). Per inter-modal attention ``m1 -> m2``: ``noise``, ``mix`` = rank(diag A^mix >
  A[t, s(t)]) (eq. 28, over the pairs of :func:`paired_steps`, the diagonal when aligned), ``var``.
  Every term averages over :func:`attention_selection` (``mix`` over its pairs; the decomposition
  terms over the steps of valid samples where ``m`` is present).

  Args:
    records: the model's per-attention records (training mode), keyed ``"m"`` or ``"m1->m2"``.
    batch: supplies ``valid``, ``present`` and ``step_mask``.
    config: the model config (margins, switches).

  Returns:
    ``{term: <float32>[]}``.
  """
  names = term_names(config)
  terms = {name: jnp.zeros((), jnp.float32) for name in names}
  rank = functools.partial(margin_ranking_loss, margin=config.gamma1)
  for name, record in records.items():
    query, _, key = name.partition("->")
    if not (config.supervise_inter if key else config.supervise_intra):
      continue
    where = attention_selection(batch, query, key or query)
    logits = record["logits"]
    if "noise" in names:
      terms["noise"] += (rank(logits, record["noise_logits"], where=where)
                         + rank(record["noisy_logits"], record["noise_logits"], where=where))
    if "var" in names:
      terms["var"] += attention_variance_loss(logits, beta=config.beta, where=where,
                                              probs=record["weights"])
    if key:
      if "mix" in names:
        paired = jnp.take_along_axis(where, record["mix_steps"][..., None], axis=-1)[..., 0]
        terms["mix"] += rank(record["mix_logits"], record["mix_reference"], where=paired)
      continue
    if "con" in names:
      terms["con"] += attention_context_loss(logits, gamma=config.gamma, rho=config.rho,
                                             where=where)
    if "de" in names:
      terms["de"] += rank(logits, record["de_logits"], where=where)
      steps = jnp.any(where, axis=-1)  # Shape: [B, T]: valid sample, m present, real step
      for term, value in decomposition_terms(record, steps, config).items():
        terms[term] += value
  return terms


def total_loss(metrics: dict[str, jax.Array], config: ml_collections.ConfigDict) -> jax.Array:
  """Eq. 25 + 29 + 13: ``task + alpha_p aux + alpha (noise + de + alpha_de (orth + mi + recon))
  + alpha_mix mix + alpha_c (var + con)``; absent terms count 0."""
  get = lambda name: metrics.get(name, 0.0)
  return (get("task") + config.alpha_p * get("aux")
          + config.alpha * (get("noise") + get("de")
                            + config.alpha_de * (get("orth") + get("mi") + get("recon")))
          + config.alpha_mix * get("mix") + config.alpha_c * (get("var") + get("con")))


def forward(model: SAMLMLModel, params, batch: Batch, key: jax.Array | None, *, train: bool
            ) -> tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]:
  """The model on ``batch``: ``key`` feeds the noise (and dropout) in training, unused otherwise."""
  if train:
    key, dropout_key = jax.random.split(key)
    rngs = {"dropout": dropout_key}
  else:
    key, rngs = None, {}
  return model.apply({"params": params}, batch.features, batch.step_mask,
                     jnp.asarray(batch.present), jnp.asarray(batch.index), key, train=train,
                     rngs=rngs)


def check_config(config: ml_collections.ConfigDict, spec: TaskSpec) -> None:
  """Raises ``ValueError`` naming the field for configs no run could use."""
  if config.hidden % config.num_heads:
    raise ValueError(
        f"model.num_heads: {config.num_heads} does not divide model.hidden={config.hidden}")
  if len(spec.modalities) < 2:
    raise ValueError(f"modalities: SAM-LML needs >= 2 modalities, got {spec.modalities}")
  unknown = sorted(set(language_modalities(config, spec)) - set(spec.modalities))
  if unknown:
    raise ValueError(f"model.language: {unknown} are not modalities of the data "
                     f"{spec.modalities}")
  if isinstance(config.rho, bool) or not isinstance(config.rho, int) or config.rho < 1:
    raise ValueError(f"model.rho: expected an int >= 1, got {config.rho!r}")
  rate = config.representation_noise
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
    raise ValueError(f"model.representation_noise: expected a noisy rate in [0, 1], got {rate!r}")
  if config.representation_noise_type not in REPRESENTATION_NOISE_TYPES:
    raise ValueError(f"model.representation_noise_type: expected one of "
                     f"{REPRESENTATION_NOISE_TYPES}, got {config.representation_noise_type!r}")


def language_modalities(config: ml_collections.ConfigDict, spec: TaskSpec) -> tuple[str, ...]:
  """``config.language`` resolved: ``("auto",)`` = ``("text",)`` if the data has it, else the
  utterance-level modalities (``T_m = 1``); otherwise the names given."""
  if tuple(config.language) != ("auto",):
    return tuple(config.language)
  if "text" in spec.modalities:
    return ("text",)
  return tuple(m for m in spec.modalities if spec.feature_shapes[m][0] == 1)


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  """SAM-LML as a :class:`~mmjax.methods.base.Method` (see the module docstring)."""
  check_config(config, spec)
  model = make_model(config, spec)

  @jax.jit
  def init(key, batch):
    return model.init(key, batch.features, batch.step_mask, jnp.asarray(batch.present),
                      jnp.asarray(batch.index), method=SAMLMLModel.initialize)["params"], {}

  def loss(params, state, batch, key, train):
    outputs, modality_outputs, records = forward(model, params, batch, key, train=train)
    predictions = head_output(outputs, spec)
    metrics = {"task": task_loss(predictions, batch, spec)}
    if config.use_aux:
      modality_predictions = head_output(modality_outputs, spec)  # [B, M] or [B, M, C]
      metrics["aux"] = jnp.mean(jnp.stack([
          task_loss(modality_predictions[:, i], batch, spec)
          for i in range(len(spec.modalities))]))
    if train:
      metrics.update(supervision_terms(records, batch, config))
    metrics["loss"] = total_loss(metrics, config)
    return metrics["loss"], (metrics, state, predictions)

  def predict(params, state, batch):
    del state
    return head_output(forward(model, params, batch, None, train=False)[0], spec)

  return Method(name="samlml", init=init, loss=loss, predict=predict)
