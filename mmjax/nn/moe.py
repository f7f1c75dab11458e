"""Mixture of (Gaussian) experts with top-k routing: the MoE layer of EUAR (papers/001 §3.2-3.3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import top_k_gates


class ExpertLayer(nn.Module):
  """``N`` linear experts stacked as one ``[N, D_in, d]`` kernel.

  Dense evaluation runs every expert with one ``einsum``; with ``expert_index [B, k]`` only the routed
  experts are gathered and evaluated (the sparse variant, benchmarked in ``benchmarks/``).
  """

  num_experts: int
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal(batch_axis=(0,))
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, expert_index: jax.Array | None = None) -> jax.Array:
    """``x [B, D_in]`` -> ``[B, N, d]`` (dense) or ``[B, k, d]`` (``expert_index [B, k]``)."""
    kernel = self.param("kernel", self.kernel_init, (self.num_experts, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.num_experts, self.features))
    if expert_index is None:
      return jnp.einsum("bi,nio->bno", x, kernel) + bias
    return jnp.einsum("bi,bkio->bko", x, kernel[expert_index]) + bias[expert_index]


class MixtureOfExperts(nn.Module):
  """Top-k gated mixture of enhanced (Gaussian) experts, ``h = sum_j G_j(x) z_j`` (EUAR eq. 6).

  Expert ``j`` predicts ``mu_j(x)`` and ``log sigma_j^2(x)`` with two non-shared linear maps (eq. 2);
  in training ``z_j = mu_j + eps * sigma_j`` with ``eps ~ N(0, I)`` drawn from the ``"sample"`` RNG
  stream (eq. 3), at evaluation ``z_j = mu_j`` (Algorithm 2). ``gaussian=False`` gives the paper's
  "MLP experts" ablation (``z_j = mu_j``, no variance). Gates are ``top_k_gates(Linear(x), k)``
  without renormalisation (eq. 5).

  Returns ``(h [B, d], aux)`` with ``aux["gates"] [B, N]`` and, for Gaussian experts,
  ``aux["mean"]``/``aux["log_var"]`` of the evaluated experts (``[B, N, d]`` dense, ``[B, k, d]``
  sparse) and ``aux["routed_gates"]`` (the gates of those experts). ``h`` is the same either way;
  losses defined over all ``N`` experts (EUAR eq. 4, 10) need the dense outputs, so EUAR uses the
  sparse layer for prediction only.
  """

  num_experts: int = 8
  top_k: int = 3
  features: int = 128
  gaussian: bool = True
  sparse: bool = False
  log_var_init: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits = nn.Dense(self.num_experts, name="router")(x)
    gates, _ = top_k_gates(logits, self.top_k)  # Shape: [B, N]
    if self.sparse:
      routed_gates, index = jax.lax.top_k(gates, self.top_k)  # Shape: [B, k]
    else:
      routed_gates, index = gates, None
    mean = ExpertLayer(self.num_experts, self.features, name="mean")(x, index)
    aux = {"gates": gates, "routed_gates": routed_gates}
    z = mean
    if self.gaussian:
      log_var = ExpertLayer(self.num_experts, self.features,
                            bias_init=nn.initializers.constant(self.log_var_init),
                            name="log_var")(x, index)
      aux.update(mean=mean, log_var=log_var)
      if train:
        # Drawn in float32 whatever the compute dtype: a bfloat16 run sees the same draws.
        eps = jax.random.normal(self.make_rng("sample"), mean.shape).astype(mean.dtype)
        z = mean + eps * jnp.exp(0.5 * log_var)
    h = jnp.einsum("bn,bnd->bd", routed_gates.astype(z.dtype), z)
    return h, aux
