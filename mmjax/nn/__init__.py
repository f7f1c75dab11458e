"""Shared Flax building blocks: pooling, modality encoders, a temporal convolution, mixtures of
(Gaussian) experts, a pre-LN Transformer encoder, the encoder-decoders of EMMR's ensemble."""

from mmjax.nn.conv import TemporalConv
from mmjax.nn.encoder_decoders import (
    CascadeResidualAutoencoder, MLPAutoencoder, TransformerEncoderDecoder, apply_half)
from mmjax.nn.encoders import PooledEncoder, encode_modalities, masked_mean_pool
from mmjax.nn.moe import ExpertLayer, MixtureOfExperts
from mmjax.nn.selected import chunks_run, map_selected
from mmjax.nn.stacked import apply_copy_per_row, apply_stacked
from mmjax.nn.transformer import TransformerBlock, TransformerEncoder
