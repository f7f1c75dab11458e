"""A small pre-LN Transformer encoder with a key-padding mask (Vaswani 2017; Xiong et al. 2020).

Used by EASE (SPEC §6.4) as the per-modality backbone and reusable by any method::

  x = x + Dropout(MHA(LN(x), mask))          # pre-LN self-attention, padded keys masked out
  x = x + Dropout(MLP(LN(x)))                # Dense(mlp_dim) -> GELU -> Dense(d)
  ... num_layers times, then a final LN

The mask is a *key*-padding mask: every query (padded ones included) attends only to the real steps
of its row. A row whose steps are all masked (an absent modality) attends uniformly over its padding
— finite values that a masked pooling discards.

The attention itself (:func:`fused_attention`) is :func:`jax.nn.dot_product_attention` on
accelerators (its cuDNN kernel on a GPU where the shapes allow); on CPU, and with attention-weight
dropout active in training (which that function does not implement), Flax's
:func:`flax.linen.dot_product_attention`, whose XLA program ran 1.4x faster forward + backward on CPU
(docs/performance.md). Both compute ``softmax(q k^T / sqrt(d_head) masked) v`` (equal to float
rounding, tested); the parameters are Flax's ``MultiHeadDotProductAttention``'s either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Backends on which fused_attention uses Flax's attention (faster there than jax.nn's XLA path).
FLAX_ATTENTION_BACKENDS = ("cpu",)


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    mask: jax.Array | None = None, dropout_rng: jax.Array | None = None,
                    dropout_rate: float = 0.0, broadcast_dropout: bool = True,
                    deterministic: bool = True) -> jax.Array:
  """``attention_fn`` of ``nn.MultiHeadDotProductAttention``: ``[B, T, N, H]`` queries, ``[B, S, N,
  H]`` keys / values, ``mask`` broadcastable to ``[B, N, T, S]`` -> ``[B, T, N, H]``.

  :func:`jax.nn.dot_product_attention`; Flax's on :data:`FLAX_ATTENTION_BACKENDS` or with dropout
  on the weights (``dropout_rate > 0`` and not ``deterministic``).
  """
  if (dropout_rate > 0.0 and not deterministic) or jax.default_backend() in FLAX_ATTENTION_BACKENDS:
    return nn.dot_product_attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                                    dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
                                    deterministic=deterministic, force_fp32_for_softmax=True)
  return jax.nn.dot_product_attention(query, key, value,
                                     mask=None if mask is None else mask.astype(bool))


class TransformerBlock(nn.Module):
  """One pre-LN encoder block: ``[B, T, d]``, ``mask [B, T]`` -> ``[B, T, d]``."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
    d = x.shape[-1]
    # Shape: [B, 1, T(query), T(key)]; queries are never masked, keys are.
    attention_mask = nn.make_attention_mask(jnp.ones_like(mask), mask)
    h = nn.LayerNorm(name="ln_attention")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate, deterministic=deterministic,
        attention_fn=fused_attention, name="attention")(h, h, mask=attention_mask)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(h)))
    return x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class TransformerEncoder(nn.Module):
  """``num_layers`` :class:`TransformerBlock` s and a final LayerNorm.

  Attributes:
    num_layers: number of blocks ``L``.
    num_heads: attention heads (must divide the model width ``d``).
    mlp_dim: hidden width of each block's MLP.
    dropout_rate: dropout on attention weights and residual branches (the ``"dropout"`` RNG
      stream; off when ``deterministic``).
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """``x [B, T, d]``, ``mask [B, T]`` bool (True = real step) -> ``[B, T, d]``."""
    if x.ndim != 3 or mask.shape != x.shape[:2]:
      raise ValueError(
          f"expected x [B, T, d] and mask [B, T], got x{list(x.shape)}, mask{list(mask.shape)}")
    if x.shape[-1] % self.num_heads:
      raise ValueError(f"num_heads: {self.num_heads} does not divide the width {x.shape[-1]}")
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block_{i}")(
          x, mask, deterministic=deterministic)
    return nn.LayerNorm(name="ln_final")(x)
