"""Differentiable losses of EUAR, EMMR, SAM-LML and EASE as pure JAX functions.

============================================  =====================================  ================
function                                      what                                   source
============================================  =====================================  ================
:func:`top_k_gates`                           top-k softmax gates                    EUAR eq. 5
:func:`load_balancing_loss`                   expert load balancing                  EUAR eq. 7-9
:func:`uncertainty_routing_loss`              U-loss (variance-weighted gates)       EUAR eq. 10
:func:`gaussian_kl_standard_normal`           KL(N(mu, sigma^2) || N(0, I))          EUAR eq. 4
:func:`gaussian_nll`                          Gaussian negative log-likelihood       EASE eq. 4
:func:`categorical_kl`, :func:`symmetric_kl`  KLs between softmax distributions      EASE 10-11, EMMR 15-16
:func:`gaussian_cs_divergence`                closed-form CS divergence (diagonal)   EASE eq. 8
:func:`gaussian_cs_divergence_full`           closed-form CS divergence (full cov.)  EASE App. B.2
:func:`kernel_cs_divergence`                  sample CS divergence, adaptive kernel  EASE eq. 5-7
:func:`margin_ranking_loss`                   hinge ranking                          SAM-LML eq. 4-8
:func:`attention_variance_loss`               attention row-spread constraint        SAM-LML eq. 14
:func:`attention_context_loss`                near-diagonal attention constraint     SAM-LML eq. 15
:func:`predictive_consistency_loss`           KL across modality views               EASE eq. 10
:func:`anchored_consistency_loss`             KL to stop-gradient full view          EASE eq. 11
============================================  =====================================  ================
"""

from mmjax.losses.attention import (
    attention_context_loss, attention_variance_loss, margin_ranking_loss)
from mmjax.losses.categorical import (
    anchored_consistency_loss, categorical_kl, predictive_consistency_loss, symmetric_kl)
from mmjax.losses.gaussian import (
    gaussian_cs_divergence, gaussian_cs_divergence_full, gaussian_kl_standard_normal, gaussian_nll)
from mmjax.losses.kernel import kernel_cs_divergence
from mmjax.losses.routing import load_balancing_loss, top_k_gates, uncertainty_routing_loss

__all__ = [
    "anchored_consistency_loss",
    "attention_context_loss",
    "attention_variance_loss",
    "categorical_kl",
    "gaussian_cs_divergence",
    "gaussian_cs_divergence_full",
    "gaussian_kl_standard_normal",
    "gaussian_nll",
    "kernel_cs_divergence",
    "load_balancing_loss",
    "margin_ranking_loss",
    "predictive_consistency_loss",
    "symmetric_kl",
    "top_k_gates",
    "uncertainty_routing_loss",
]
