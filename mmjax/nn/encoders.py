"""Modality encoders that turn a padded sequence ``[B, T, D]`` into one vector per sample."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def masked_mean_pool(x: jax.Array, step_mask: jax.Array) -> jax.Array:
  """Mean of ``x [B, T, D]`` over the valid steps of ``step_mask [B, T]``; all-masked rows give 0."""
  weights = step_mask.astype(x.dtype)
  total = jnp.einsum("btd,bt->bd", x, weights)
  return total / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)


class PooledEncoder(nn.Module):
  """``act(Dense(masked_mean_pool(x)))``: the encoder backbone of EUAR and the baselines (SPEC §6.1).

  A modality marked absent (``present = False``) enters as a zero vector, so the output is
  ``act(bias)``: the model sees "no information" the same way for every absent sample.
  """

  features: int
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, step_mask: jax.Array, present: jax.Array) -> jax.Array:
    """``x [B, T, D]``, ``step_mask [B, T]``, ``present [B]`` -> ``[B, features]``."""
    pooled = masked_mean_pool(x, step_mask) * present[:, None].astype(x.dtype)
    return self.activation(nn.Dense(self.features, dtype=self.dtype, name="proj")(pooled))


def encode_modalities(batch, features: int) -> list[jax.Array]:
  """One :class:`PooledEncoder` per modality (named ``encoder_<m>``), in ``batch.modalities`` order.

  Call it inside a parent module's ``nn.compact`` method; returns ``[B, features]`` per modality.
  """
  return [PooledEncoder(features, name=f"encoder_{m}")(
      batch.features[m], batch.step_mask[m], batch.present[:, i])
          for i, m in enumerate(batch.modalities)]
