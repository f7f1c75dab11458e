"""Reference fusion baselines (SPEC §6.5): early fusion by concatenation, and late fusion.

* ``concat``: pooled per-modality encoders, concatenated, then an MLP head (EUAR Tables 1-3 "Concat").
* ``late_fusion``: one encoder + head per modality; the outputs (scores or logits) are averaged over
  the modalities present for each sample ("Late fusion").
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmjax.data import Batch
from mmjax.methods.base import Method, TaskSpec, flax_method
from mmjax.nn import encode_modalities


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(hidden=128, dropout=0.0))


class ConcatModel(nn.Module):
  output_dim: int
  hidden: int = 128
  dropout: float = 0.0

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool):
    hs = encode_modalities(batch, self.hidden)
    h = nn.Dropout(self.dropout, deterministic=not train)(jnp.concatenate(hs, axis=-1))
    h = nn.relu(nn.Dense(self.hidden, name="fusion")(h))
    return nn.Dense(self.output_dim, name="head")(h), {}


class LateFusionModel(nn.Module):
  output_dim: int
  hidden: int = 128
  dropout: float = 0.0

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool):
    outs = []
    for m, h in zip(batch.modalities, encode_modalities(batch, self.hidden)):
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      outs.append(nn.Dense(self.output_dim, name=f"head_{m}")(h))
    weights = batch.present.astype(outs[0].dtype)  # Shape: [B, M]
    stacked = jnp.stack(outs, axis=1)  # Shape: [B, M, out]
    fused = jnp.einsum("bm,bmo->bo", weights, stacked) / jnp.maximum(
        jnp.sum(weights, axis=1, keepdims=True), 1.0)
    return fused, {}


def build_concat(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  model = ConcatModel(spec.output_dim, config.hidden, config.dropout)
  return flax_method("concat", model, spec)


def build_late_fusion(config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  model = LateFusionModel(spec.output_dim, config.hidden, config.dropout)
  return flax_method("late_fusion", model, spec)
