"""Shared Flax building blocks: pooling, modality encoders, mixtures of (Gaussian) experts,
a pre-LN Transformer encoder."""

from mmjax.nn.encoders import PooledEncoder, encode_modalities, masked_mean_pool
from mmjax.nn.moe import ExpertLayer, MixtureOfExperts
from mmjax.nn.transformer import TransformerBlock, TransformerEncoder
