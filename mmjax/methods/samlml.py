"""SAM-LML: supervised attention for low-quality multimodal learning (papers/003) — first slice.

Implemented (SPEC §6.3; equation numbers are the paper's):

* **Missing modalities** (§3). An absent modality's input features ``Z_m`` are replaced by Gaussian
  noise ``N(0, 1)`` on its real steps (``step_mask``; padded steps stay 0). In training the noise is
  drawn per sample from the step key. At evaluation it comes from a fixed key
  (``fold_in(PRNGKey(EVAL_NOISE_SEED), m)``) and has shape ``[1, T_m, D_m]``, broadcast over the
  batch: evaluation is a deterministic function of the batch, independent of the caller's key and
  of a sample's position in its batch.
* **Unimodal networks** (App. A.1 eq. 30-31). Modalities named in ``config.language``:
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
  (1 - lambda) N)``; ``L^n = rank(A > A^n) + rank(A^{n'} > A^n)`` with
  :func:`mmjax.losses.margin_ranking_loss` (margin ``gamma_1``) averaged over the selected
  (query, key) pairs. Selected = valid sample, query and key both real steps, and the modalities
  involved present: a modality that *is* noise gives no meaningful ranking target.
* **Variance constraint** (eq. 14) on every intra- and inter-modal attention
  (:func:`mmjax.losses.attention_variance_loss`, ``beta``) and **context constraint** (eq. 15) on
  every intra-modal attention (:func:`mmjax.losses.attention_context_loss`, ``gamma``, ``rho``),
  same selection.
* **Loss** (eq. 25 and eq. 29 without ``L^de`` and ``L^mix``)::

    L = task + alpha_p * aux + alpha * noise + alpha_c * (var + con)

  ``task = Loss(p, y)`` and ``aux = mean_{m1} Loss(p_{m1}, y)`` (so ``task + alpha_p aux`` is eq.
  25's ``L_p``) with ``Loss`` = MSE (regression) or cross-entropy; ``noise``, ``var``, ``con`` are
  the *sums* over all attentions (eq. 29: "the sum of all intra- and inter-modal ... losses").
  Metrics report every term; ``noise``, ``var``, ``con`` exist only in training (evaluation does
  not compute them). Ablations ``use_aux``, ``use_noise``, ``use_var``, ``use_con`` each remove one
  term (and, for ``use_noise``, its extra attention passes).

NOT implemented yet: modality decomposition replacement ``L^de`` (eq. 7-13, Decom/Compo networks,
``alpha_de``), modality mixing ``L^mix`` (eq. 26-28, ``alpha_mix``), the HCF fourth modality and the
Transformer-then-Conv unimodal variant of MHD/MSD (eq. 32-33).

Defaults: Table 7, CMU-MOSI (``d = 120``, ``rho = 5``, ``beta = 0.1``, ``gamma = 0.5``,
``gamma_1 = 1``, ``alpha_p = 1``, ``alpha = 0.005``, ``alpha_c = 0.005``; the paper trains with
AdamW lr 1e-5, batch 48 — a training config, not set here). Unimodal Transformer depth/heads are
not in the paper: 1 layer, 4 heads, MLP ratio 2.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.data import Batch
from mmjax.losses import attention_context_loss, attention_variance_loss, margin_ranking_loss
from mmjax.methods.base import Method, TaskSpec, head_output, task_loss
from mmjax.nn import TransformerEncoder, masked_mean_pool

EVAL_NOISE_SEED = 0  # the fixed key of the missing-modality noise at evaluation
MASKED_LOGIT = -1e9  # logit of a padded key inside the softmax


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      hidden=120,  # shared dimensionality d (Table 7, MOSI)
      num_layers=1,
      num_heads=4,
      mlp_ratio=2,
      dropout=0.0,
      language=("text",),  # modalities whose unimodal network is a Dense projection (eq. 30)
      rho=5,  # diagonal window of the context constraint
      beta=0.1,  # variance margin
      gamma=0.5,  # context margin
      gamma1=1.0,  # ranking margin
      alpha_p=1.0,  # weight of the auxiliary (per query modality) predictive losses
      alpha=0.005,  # weight of the noise-addition losses
      alpha_c=0.005,  # weight of the variance + context constraints
      use_aux=True,
      use_noise=True,
      use_var=True,
      use_con=True,
  ))


class SupervisedAttention(nn.Module):
  """Single-head attention; its logits can be re-evaluated on other keys (eq. 1-2, 16-17, 21-22)."""

  hidden: int

  def setup(self):
    self.query = nn.Dense(self.hidden, use_bias=False)
    self.key = nn.Dense(self.hidden, use_bias=False)
    self.value = nn.Dense(self.hidden, use_bias=False)
    self.norm = nn.LayerNorm()

  def logits(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
    """``A = queries W_q (keys W_k)^T / sqrt(d)``: ``[B, Q, d], [B, K, d] -> [B, Q, K]``."""
    return jnp.einsum("bqd,bkd->bqk", self.query(queries), self.key(keys)) / math.sqrt(self.hidden)

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """``X = LN(softmax(A) keys W_v)`` over the keys of ``key_mask [B, K]``; returns ``X, A``."""
    logits = self.logits(queries, keys)  # Shape: [B, Q, K]
    weights = jax.nn.softmax(jnp.where(key_mask[:, None, :], logits, MASKED_LOGIT), axis=-1)
    return self.norm(jnp.einsum("bqk,bkd->bqd", weights, self.value(keys))), logits


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
    h = nn.Conv(self.hidden, kernel_size=(3,), padding="SAME", name="conv")(x)
    return TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                              name="transformer")(h, mask, deterministic=not train)


class SAMLMLModel(nn.Module):
  """The SAM-LML network (see the module docstring)."""

  modalities: tuple[str, ...]
  language: tuple[str, ...]
  output_dim: int
  hidden: int = 120
  num_layers: int = 1
  num_heads: int = 4
  mlp_ratio: int = 2
  dropout: float = 0.0
  noise_supervision: bool = True

  def setup(self):
    self.unimodal = [
        UnimodalNetwork(self.hidden, m in self.language, self.num_layers, self.num_heads,
                        self.mlp_ratio * self.hidden, self.dropout) for m in self.modalities]
    self.intra = [SupervisedAttention(self.hidden) for _ in self.modalities]
    self.inter = [SupervisedAttention(self.hidden) for _ in self.modalities]  # owned by the query
    self.pool_query = self.param("pool_query", nn.initializers.normal(1.0), (1, self.hidden))
    self.pool = SupervisedAttention(self.hidden)
    self.predictor_hidden = nn.Dense(self.hidden)
    self.predictor_out = nn.Dense(self.output_dim)

  def encode(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
             present: jax.Array, key: jax.Array | None, *, train: bool) -> dict[str, jax.Array]:
    """Unimodal representations ``U_m [B, T_m, d]``; absent modalities read Gaussian noise.

    ``key`` draws the training noise (per sample); evaluation ignores it (module docstring).
    """
    out = {}
    for i, (m, net) in enumerate(zip(self.modalities, self.unimodal)):
      x, mask = features[m], masks[m]
      if train:
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      else:
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(EVAL_NOISE_SEED), i),
                                  (1,) + x.shape[1:], x.dtype)
      noise = noise * mask[..., None].astype(x.dtype)
      x = jnp.where(present[:, i, None, None], x, noise)
      out[m] = net(x, mask, train=train)
    return out

  def attend_intra(self, units: dict[str, jax.Array], masks: dict[str, jax.Array]
                   ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Eq. 1-2 per modality: ``X_m [B, T, d]`` and logits ``A_m [B, T, T]``."""
    outputs, logits = {}, {}
    for m, attention in zip(self.modalities, self.intra):
      outputs[m], logits[m] = attention(units[m], units[m], masks[m])
    return outputs, logits

  def predict(self, x: jax.Array) -> jax.Array:
    """Eq. 23-24 predictor ``[..., d] -> [..., out]``."""
    return self.predictor_out(nn.gelu(self.predictor_hidden(x)))

  def __call__(self, features: dict[str, jax.Array], masks: dict[str, jax.Array],
               present: jax.Array, key: jax.Array | None, *, train: bool
               ) -> tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]:
    """Returns ``p [B, out]``, ``p_m [B, M, out]`` and one record per attention.

    Records are keyed ``"m"`` (intra) and ``"m1->m2"`` (inter); each holds ``logits``, and in
    training with noise supervision also ``queries``, ``keys``, ``noise`` (``N``), ``mix_weight``
    (``lambda [B, 1, 1]``), ``noise_logits`` (``A^n``) and ``mixed_logits`` (``A^{n'}``).
    """
    encode_key, noise_key = jax.random.split(key) if train else (None, None)
    units = self.encode(features, masks, present, encode_key, train=train)
    xs, intra_logits = self.attend_intra(units, masks)
    # Record i (intra) and M (i + 1) + j (inter i -> j) draw from fold_in(noise_key, index).
    records = {m: self._record(self.intra[i], units[m], units[m], intra_logits[m], noise_key, i,
                               train) for i, m in enumerate(self.modalities)}
    pooled = []
    for i, m1 in enumerate(self.modalities):
      per_key = []
      for j, m2 in enumerate(self.modalities):
        if i == j:
          continue
        x12, logits = self.inter[i](xs[m1], xs[m2], masks[m2])
        records[f"{m1}->{m2}"] = self._record(
            self.inter[i], xs[m1], xs[m2], logits, noise_key,
            len(self.modalities) * (i + 1) + j, train)
        per_key.append(masked_mean_pool(x12, masks[m1]))
      pooled.append(jnp.mean(jnp.stack(per_key), axis=0))  # eq. 18-19
    stacked = jnp.stack(pooled, axis=1)  # Shape: [B, M, d]
    query = jnp.broadcast_to(self.pool_query[None], (stacked.shape[0], 1, self.hidden))
    fused, _ = self.pool(query, stacked, jnp.ones(stacked.shape[:2], bool))  # eq. 20-22
    return self.predict(fused[:, 0]), self.predict(stacked), records

  def _record(self, attention: SupervisedAttention, queries: jax.Array, keys: jax.Array,
              logits: jax.Array, key: jax.Array | None, index: int, train: bool
              ) -> dict[str, jax.Array]:
    """Eq. 3 and 5: logits against pure noise keys and against ``lambda k + (1 - lambda) N``."""
    if not (train and self.noise_supervision):
      return {"logits": logits}
    noise_key, mix_key = jax.random.split(jax.random.fold_in(key, index))
    noise = jax.random.normal(noise_key, keys.shape, keys.dtype)
    mix_weight = jax.random.uniform(mix_key, (keys.shape[0], 1, 1), keys.dtype)
    return {"logits": logits, "queries": queries, "keys": keys, "noise": noise,
            "mix_weight": mix_weight, "noise_logits": attention.logits(queries, noise),
            "mixed_logits": attention.logits(
                queries, mix_weight * keys + (1.0 - mix_weight) * noise)}


def make_model(config: ml_collections.ConfigDict, spec: TaskSpec) -> SAMLMLModel:
  return SAMLMLModel(spec.modalities, tuple(config.language), spec.output_dim, config.hidden,
                     config.num_layers, config.num_heads, config.mlp_ratio, config.dropout,
                     bool(config.use_noise))


def attention_selection(batch: Batch, query: str, key: str) -> jax.Array:
  """``[B, T_query, T_key]`` bool: the (query, key) pairs a supervision term averages over.

  Valid sample, both modalities present, query and key real steps.
  """
  present = jnp.asarray(batch.present)
  sample = (jnp.asarray(batch.valid) & present[:, batch.modality_index(query)]
            & present[:, batch.modality_index(key)])
  return (sample[:, None, None] & jnp.asarray(batch.step_mask[query])[:, :, None]
          & jnp.asarray(batch.step_mask[key])[:, None, :])


def supervision_terms(records: dict[str, dict[str, jax.Array]], batch: Batch,
                      config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The enabled ``noise`` (eq. 3-6), ``var`` (eq. 14), ``con`` (eq. 15), summed over attentions.

  Args:
    records: the model's per-attention records (training mode), keyed ``"m"`` or ``"m1->m2"``.
    batch: supplies ``valid``, ``present`` and ``step_mask`` for :func:`attention_selection`.
    config: the model config (margins, switches).

  Returns:
    ``{term: <float32>[]}``.
  """
  terms = {}
  if config.use_noise:
    terms["noise"] = 0.0
  if config.use_var:
    terms["var"] = 0.0
  if config.use_con:
    terms["con"] = 0.0
  for name, record in records.items():
    query, _, key = name.partition("->")
    where = attention_selection(batch, query, key or query)
    if config.use_noise:
      terms["noise"] += (
          margin_ranking_loss(record["logits"], record["noise_logits"], margin=config.gamma1,
                              where=where)
          + margin_ranking_loss(record["mixed_logits"], record["noise_logits"],
                                margin=config.gamma1, where=where))
    if config.use_var:
      terms["var"] += attention_variance_loss(record["logits"], beta=config.beta, where=where)
    if config.use_con and not key:
      terms["con"] += attention_context_loss(record["logits"], gamma=config.gamma,
                                             rho=config.rho, where=where)
  return terms


def forward(model: SAMLMLModel, params, batch: Batch, key: jax.Array | None, *, train: bool
            ) -> tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]:
  """The model on ``batch``: ``key`` feeds the noise (and dropout) in training, unused otherwise."""
  if train:
    key, dropout_key = jax.random.split(key)
    rngs = {"dropout": dropout_key}
  else:
    key, rngs = None, {}
  return model.apply({"params": params}, batch.features, batch.step_mask,
                     jnp.asarray(batch.present), key, train=train, rngs=rngs)


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  """SAM-LML as a :class:`~mmjax.methods.base.Method` (see the module docstring)."""
  if config.hidden % config.num_heads:
    raise ValueError(
        f"model.num_heads: {config.num_heads} does not divide model.hidden={config.hidden}")
  if len(spec.modalities) < 2:
    raise ValueError(f"modalities: SAM-LML needs >= 2 modalities, got {spec.modalities}")
  unknown = sorted(set(config.language) - set(spec.modalities))
  if unknown:
    raise ValueError(f"model.language: {unknown} are not modalities of the data "
                     f"{spec.modalities}")
  if isinstance(config.rho, bool) or not isinstance(config.rho, int) or config.rho < 1:
    raise ValueError(f"model.rho: expected an int >= 1, got {config.rho!r}")
  model = make_model(config, spec)

  @jax.jit
  def init(key, batch):
    params = model.init(key, batch.features, batch.step_mask, jnp.asarray(batch.present), None,
                        train=False)["params"]
    return params, {}

  def loss(params, state, batch, key, train):
    outputs, modality_outputs, records = forward(model, params, batch, key, train=train)
    predictions = head_output(outputs, spec)
    metrics = {"task": task_loss(predictions, batch, spec)}
    total = metrics["task"]
    if config.use_aux:
      modality_predictions = head_output(modality_outputs, spec)  # [B, M] or [B, M, C]
      metrics["aux"] = jnp.mean(jnp.stack([
          task_loss(modality_predictions[:, i], batch, spec)
          for i in range(len(spec.modalities))]))
      total = total + config.alpha_p * metrics["aux"]
    if train:
      terms = supervision_terms(records, batch, config)
      metrics.update(terms)
      total = total + config.alpha * terms.get("noise", 0.0) + config.alpha_c * (
          terms.get("var", 0.0) + terms.get("con", 0.0))
    metrics["loss"] = total
    return total, (metrics, state, predictions)

  def predict(params, state, batch):
    del state
    return head_output(forward(model, params, batch, None, train=False)[0], spec)

  return Method(name="samlml", init=init, loss=loss, predict=predict)
