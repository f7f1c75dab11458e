"""EUAR: Enhanced experts with Uncertainty-Aware Routing (papers/001, supplement papers/000).

Per modality: :class:`~mmjax.nn.PooledEncoder` -> :class:`~mmjax.nn.MixtureOfExperts` of Gaussian
experts with top-k gates -> ``h_m``; the ``h_m`` are concatenated and a linear head predicts the score
or the class logits. Loss (eq. 12)::

  L = L_task + alpha * sum_m KL_m + beta * sum_m L_aux^m + lambda * sum_m L_u^m

* ``KL_m`` = mean over valid samples and experts of ``gaussian_kl_standard_normal(mu_j, log_var_j) / d``
  (eq. 4 averaged over the ``d`` dimensions instead of summed — our choice, which keeps ``alpha``
  independent of the width; SPEC §6.1). With ``sparse_experts`` only the routed experts are
  evaluated, so the KL averages over them.
* ``L_aux^m`` = :func:`mmjax.losses.load_balancing_loss` (eq. 7-9, ``scale="euar"``) on the global batch.
* ``L_u^m`` = :func:`mmjax.losses.uncertainty_routing_loss` with ``sigma^2 = exp(log_var)`` (eq. 10).

Defaults follow the paper: ``alpha=1e-3, beta=1e-5, lambda=1e-3`` (supplement "x, y, z"), ``k=3``,
``N=8``; the paper gives no width or learning rate, we use ``hidden=128`` and Adam 1e-3 (configs).
Ablations: ``use_kl``, ``use_uloss``, ``expert_type="mlp"`` (deterministic experts: no KL, no U-loss),
``num_experts`` 2-32, ``top_k``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmjax.data import Batch
from mmjax.losses import gaussian_kl_standard_normal, load_balancing_loss, uncertainty_routing_loss
from mmjax.losses._common import masked_mean
from mmjax.methods.base import Method, TaskSpec, flax_method
from mmjax.nn import MixtureOfExperts, encode_modalities

EXPERT_TYPES = ("gaussian", "mlp")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      hidden=128,
      num_experts=8,
      top_k=3,
      expert_type="gaussian",
      sparse_experts=False,
      log_var_init=0.0,  # initial bias of the log-variance maps (sigma^2 = e^0 = 1, the prior's)
      alpha_kl=1e-3,
      beta_balance=1e-5,
      lambda_u=1e-3,
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


def build(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  if config.expert_type not in EXPERT_TYPES:
    raise ValueError(f"model.expert_type: expected one of {EXPERT_TYPES}, got {config.expert_type!r}")
  if not 1 <= config.top_k <= config.num_experts:
    raise ValueError(
        f"model.top_k: must lie in [1, model.num_experts={config.num_experts}], got {config.top_k}")
  gaussian = config.expert_type == "gaussian"
  model = EUARModel(spec.modalities, spec.output_dim, config.hidden, config.num_experts,
                    config.top_k, gaussian, config.sparse_experts, config.log_var_init)

  def regularizers(aux, batch):
    kl = balance = uloss = 0.0
    for m in spec.modalities:
      a = aux[m]
      balance += load_balancing_loss(a["gates"], where=batch.valid)
      if gaussian:
        per_expert = gaussian_kl_standard_normal(a["mean"], a["log_var"]) / config.hidden
        kl += masked_mean(jnp.mean(per_expert, axis=-1), batch.valid)
        uloss += uncertainty_routing_loss(
            _all_expert_gates(a, config), jnp.exp(a["log_var"]), where=batch.valid)
    terms = {"balance": (config.beta_balance, jnp.asarray(balance))}
    if gaussian and config.use_kl:
      terms["kl"] = (config.alpha_kl, kl)
    if gaussian and config.use_uloss:
      terms["uloss"] = (config.lambda_u, uloss)
    return terms

  return flax_method("euar", model, spec, regularizers)


def _all_expert_gates(aux, config):
  """U-loss weights for the evaluated experts; sparse mode rescales ``1/k`` to eq. 10's ``1/N``."""
  if not config.sparse_experts:
    return aux["gates"]
  return aux["routed_gates"] * (config.top_k / config.num_experts)
