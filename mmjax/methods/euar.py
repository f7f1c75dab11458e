"""EUAR: Enhanced experts with Uncertainty-Aware Routing (papers/001, supplement papers/000).

Per modality: :class:`~mmjax.nn.PooledEncoder` -> :class:`~mmjax.nn.MixtureOfExperts` of Gaussian
experts with top-k gates -> ``h_m``; the ``h_m`` are concatenated and a linear head predicts the score
or the class logits. Loss (eq. 12)::

  L = L_task + alpha * sum_m KL_m + beta * sum_m L_aux^m + lambda * sum_m L_u^m

Every regulariser of modality ``m`` averages over ``S_m``, the valid samples in which ``m`` is present
(``batch.valid & batch.present[:, i]``): an absent modality enters the encoder as zeros, and its
routing and variances must not train on that zero input.

* ``KL_m = mean_{b in S_m} (1/N) sum_j KL_bj`` with ``KL_bj = gaussian_kl_standard_normal(mu_bj,
  log_var_bj)`` summed over the ``d`` dimensions as eq. 4 writes it (``kl_reduction="sum"``, the
  default and the paper preset) or divided by ``d`` (``"mean"``, keeps ``alpha`` independent of the
  width). The paper writes one Gaussian per sample; with ``N`` experts we average over all of them.
* ``L_aux^m`` = :func:`mmjax.losses.load_balancing_loss` (eq. 7-9) over ``S_m`` of the global batch,
  ``scale=balance_scale``: ``"euar"`` (eq. 7, ``(1/N) sum_j R_j P_j``, default) or ``"switch"``
  (``N sum_j R_j P_j``).
* ``L_u^m`` = :func:`mmjax.losses.uncertainty_routing_loss` with ``sigma^2 = exp(log_var)`` over all
  ``N`` experts (eq. 10).

``sparse_experts`` is an evaluation path, not another model: eq. 4 and eq. 10 are defined over all
``N`` experts, so ``Method.loss`` (training and validation loss) always evaluates every expert, and
only ``Method.predict``, which needs ``h = sum_j G_j mu_j`` alone, gathers the ``k`` routed experts.
Dense and sparse give the same loss terms and predictions for the same parameters.

``top_k > num_experts`` (e.g. the paper's ``N = 2`` ablation with the default ``k = 3``) is clamped
to ``k = N`` with a warning; ``top_k < 1`` is an error.

Defaults follow the paper: ``alpha=1e-3, beta=1e-5, lambda=1e-3`` (supplement "x, y, z"), ``k=3``,
``N=8``; the paper gives no width or learning rate, we use ``hidden=128`` and Adam 1e-3 (configs).
Ablations: ``use_kl``, ``use_uloss``, ``expert_type="mlp"`` (deterministic experts: no KL, no U-loss),
``num_experts`` 2-32, ``top_k``. See ``docs/euar.md``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mmjax.data import Batch
from mmjax.losses import gaussian_kl_standard_normal, load_balancing_loss, uncertainty_routing_loss
from mmjax.losses._common import masked_mean
from mmjax.losses.routing import LOAD_BALANCING_SCALES
from mmjax.methods.base import Method, TaskSpec, flax_method
from mmjax.nn import MixtureOfExperts, encode_modalities

EXPERT_TYPES = ("gaussian", "mlp")
KL_REDUCTIONS = ("sum", "mean")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      hidden=128,
      num_experts=8,
      top_k=3,
      expert_type="gaussian",
      sparse_experts=False,  # predict gathers the k routed experts only (same outputs as dense)
      log_var_init=0.0,  # initial bias of the log-variance maps (sigma^2 = e^0 = 1, the prior's)
      alpha_kl=1e-3,
      beta_balance=1e-5,
      lambda_u=1e-3,
      kl_reduction="sum",  # eq. 4: KL summed over the d dimensions; "mean" divides it by d
      balance_scale="euar",  # eq. 7: (1/N) sum_j R_j P_j; "switch": N sum_j R_j P_j
      use_kl=True,
      use_uloss=True,
  ))


class EUARModel(nn.Module):
  """``batch -> (outputs [B, out], aux)`` with ``aux[m]`` the MoE outputs of modality ``m``."""

  modalities: tuple[str, ...]
  output_dim: int
  hidden: int = 128
  num_experts: int = 8
  top_k: int = 3
  gaussian: bool = True
  sparse: bool = False
  log_var_init: float = 0.0

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool):
    hs, aux = [], {}
    for m, x in zip(self.modalities, encode_modalities(batch, self.hidden)):
      h, aux[m] = MixtureOfExperts(
          self.num_experts, self.top_k, self.hidden, self.gaussian, self.sparse, self.log_var_init,
          name=f"moe_{m}")(
              x, train=train)
      hs.append(h)
    return nn.Dense(self.output_dim, name="head")(jnp.concatenate(hs, axis=-1)), aux


def routed_experts(top_k: int, num_experts: int) -> int:
  """The ``k`` of eq. 5: ``min(top_k, N)``, with a warning when ``top_k`` is clamped.

  Raises:
    ValueError: ``top_k < 1``.
  """
  if top_k < 1:
    raise ValueError(f"model.top_k: must be >= 1, got {top_k}")
  if top_k > num_experts:
    logging.warning("model.top_k=%d exceeds model.num_experts=%d: clamped to model.top_k=%d",
                    top_k, num_experts, num_experts)
  return min(top_k, num_experts)


def expert_kl(mean: jax.Array, log_var: jax.Array, reduction: str) -> jax.Array:
  """Per-expert ``KL(N(mu, sigma^2) || N(0, I))`` (eq. 4), ``[B, N, d] -> [B, N]``.

  ``"sum"``: ``sum_d -1/2 (1 + log sigma_d^2 - mu_d^2 - sigma_d^2)`` (eq. 4); ``"mean"``: that sum / d.
  """
  kl = gaussian_kl_standard_normal(mean, log_var)
  return kl if reduction == "sum" else kl / mean.shape[-1]


def modality_regularizers(aux: dict[str, jax.Array], where: jax.Array, *, kl_reduction: str,
                          balance_scale: str) -> dict[str, jax.Array]:
  """One modality's regularisers over the samples ``where``, every one a ``<float32>[]``.

  Args:
    aux: the MoE outputs of the modality, dense: ``gates [B, N]`` and, for Gaussian experts,
      ``mean [B, N, d]`` and ``log_var [B, N, d]`` of all ``N`` experts.
    where: ``<bool>[B]`` samples that count (valid and the modality present).
    kl_reduction: ``"sum"`` or ``"mean"`` over dimensions (:func:`expert_kl`).
    balance_scale: ``scale`` of :func:`mmjax.losses.load_balancing_loss`.

  Returns:
    ``{"balance": L_aux (eq. 7-9)}``, plus ``"kl"`` = ``mean_{b in where} (1/N) sum_j KL_bj`` (eq. 4)
    and ``"uloss"`` (eq. 10) for Gaussian experts.
  """
  terms = {"balance": load_balancing_loss(aux["gates"], scale=balance_scale, where=where)}
  if "log_var" in aux:
    per_expert = expert_kl(aux["mean"], aux["log_var"], kl_reduction)  # Shape: [B, N]
    terms["kl"] = masked_mean(jnp.mean(per_expert, axis=-1), where)
    terms["uloss"] = uncertainty_routing_loss(aux["gates"], jnp.exp(aux["log_var"]), where=where)
  return terms


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  for field, allowed in (("expert_type", EXPERT_TYPES), ("kl_reduction", KL_REDUCTIONS),
                         ("balance_scale", LOAD_BALANCING_SCALES)):
    if config[field] not in allowed:
      raise ValueError(f"model.{field}: expected one of {allowed}, got {config[field]!r}")
  top_k = routed_experts(config.top_k, config.num_experts)
  gaussian = config.expert_type == "gaussian"
  model = EUARModel(spec.modalities, spec.output_dim, config.hidden, config.num_experts, top_k,
                    gaussian=gaussian, log_var_init=config.log_var_init)
  weights = {"balance": config.beta_balance}
  if gaussian and config.use_kl:
    weights["kl"] = config.alpha_kl
  if gaussian and config.use_uloss:
    weights["uloss"] = config.lambda_u

  def regularizers(aux, batch):
    totals = dict.fromkeys(weights, 0.0)
    for i, m in enumerate(spec.modalities):
      terms = modality_regularizers(aux[m], batch.valid & batch.present[:, i],
                                    kl_reduction=config.kl_reduction,
                                    balance_scale=config.balance_scale)
      for term in weights:
        totals[term] += terms[term]
    return {term: (weights[term], totals[term]) for term in weights}

  method = flax_method("euar", model, spec, regularizers)
  if config.sparse_experts:
    sparse = flax_method("euar", model.clone(sparse=True), spec)
    method = dataclasses.replace(method, predict=sparse.predict)
  return method

