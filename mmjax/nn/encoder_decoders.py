"""Encoder-decoders over a token sequence ``x [B, T, d]``: the three members of EMMR's ensemble
(papers/002 §3.5, eq. 4-7).

Every module maps ``x`` to ``(E, D)`` (eq. 4: ``x -phi-> F``, ``F -psi-> x'``): ``E`` the encoder
output, ``D`` the decoder output (the reconstruction ``x'``), ``D`` of ``x``'s shape.

* :class:`MLPAutoencoder` (AE, eq. 5) and :class:`CascadeResidualAutoencoder` (MMIN / CRA, eq. 6)
  act on every time step on its own (no mixing over time).
* :class:`TransformerEncoderDecoder` (TF, eq. 7) mixes the steps with self-attention;
  :func:`apply_half` runs its encoder or its decoder alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.transformer import TransformerEncoder


class MLPAutoencoder(nn.Module):
  """Fully connected autoencoder applied per time step (EMMR eq. 5).

  ``h_0 = x``, ``h_i = ReLU(FC_i(h_{i-1}))``; the layer widths are ``[d, *hidden,
  *reversed(hidden[:-1]), d]`` — ``hidden = (256, 128, 64)`` and ``d = 300`` give the paper's
  ``[300, 256, 128, 64, 128, 256, 300]``. ``E = h_{len(hidden) + 1}`` (the bottleneck, width
  ``hidden[-1]``), ``D`` = the last layer. The last layer is linear (no ReLU), unlike eq. 5: the
  reconstruction target (LayerNorm outputs) has negative entries that a ReLU could not produce.

  Attributes:
    hidden: widths after the first layer, the bottleneck last; non-empty.
  """

  hidden: tuple[int, ...] = (256, 128, 64)

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., d]`` -> ``E [..., hidden[-1]]``, ``D [..., d]``."""
    if not self.hidden:
      raise ValueError("hidden: expected at least one width (the bottleneck)")
    d = x.shape[-1]
    h = x
    for i, width in enumerate((d, *self.hidden)):
      h = nn.relu(nn.Dense(width, name=f"encoder_{i}")(h))
    code = h
    decoder_widths = (*reversed(self.hidden[:-1]), d)
    for i, width in enumerate(decoder_widths[:-1]):
      h = nn.relu(nn.Dense(width, name=f"decoder_{i}")(h))
    return code, nn.Dense(d, name=f"decoder_{len(decoder_widths) - 1}")(h)


class CascadeResidualAutoencoder(nn.Module):
  """A cascade of residual :class:`MLPAutoencoder` s (MMIN's CRA, Tran et al. 2017; EMMR eq. 6).

  Block ``i`` reads ``x_{i-1} = x + sum_{j < i} x'_j`` and outputs ``(F_i, x'_i)``;
  ``D = x + sum_i x'_i`` and ``E = FC([F_1 || ... || F_n])`` (width ``features``, default ``d``).
  The blocks run as one ``nn.scan`` (parameters ``blocks`` stacked on a leading axis of size
  ``num_blocks``), so the compiled program holds one block whatever ``num_blocks`` is.

  Attributes:
    num_blocks: ``n`` residual autoencoders (5 in the paper).
    hidden: their widths (see :class:`MLPAutoencoder`).
    features: width of ``E``; ``None`` = ``d``.
  """

  num_blocks: int = 5
  hidden: tuple[int, ...] = (256, 128, 64)
  features: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., d]`` -> ``E [..., features]``, ``D [..., d]``."""
    if self.num_blocks < 1:
      raise ValueError(f"num_blocks: expected >= 1, got {self.num_blocks}")

    def block(mdl, h, _):
      code, residual = mdl(h)
      return h + residual, code

    cascade = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.num_blocks)
    decoded, codes = cascade(MLPAutoencoder(self.hidden, name="blocks"), x, None)
    codes = jnp.moveaxis(codes, 0, -2).reshape(x.shape[:-1] + (-1,))  # [F_1 || ... || F_n]
    features = x.shape[-1] if self.features is None else self.features
    return nn.Dense(features, name="code")(codes), decoded


class TransformerEncoderDecoder(nn.Module):
  """``E = FFN(MHA(x, x, x))``, ``D = FFN(MHA(E, E, E))`` (EMMR eq. 7).

  Encoder and decoder are each a :class:`~mmjax.nn.TransformerEncoder` of ``num_layers`` pre-LN
  blocks (self-attention + GELU MLP, residuals, final LayerNorm) — the house block, where eq. 7 has
  a ReLU FFN without normalisation.

  Attributes:
    num_heads: attention heads (divide ``d``).
    mlp_dim: hidden width of the MLPs.
    num_layers: blocks in the encoder and in the decoder (1 in the paper).
    dropout_rate: see :class:`~mmjax.nn.TransformerEncoder`.
  """

  num_heads: int
  mlp_dim: int
  num_layers: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, encoder_mask: jax.Array, decoder_mask: jax.Array, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """``x [B, T, d]`` -> ``E, D [B, T, d]``.

    ``encoder_mask`` / ``decoder_mask`` ``[B, T]`` bool: the keys the encoder / decoder attend to
    (every query gets an output, so steps hidden from the encoder's keys — e.g. a missing modality
    — are still encoded from the others and reconstructed by the decoder).

    Encoder and decoder have the same architecture, so they are the two iterations of one
    ``nn.scan`` (parameters stacked on a leading axis of size 2: index 0 the encoder, 1 the
    decoder), unrolled: a differentiated loop would stack each iteration's activations (the
    ``[B, heads, T, T]`` attention weights among them) and read them back, 145 MB a step at EMMR's
    MOSI shapes; unrolled, EMMR's step ran 7 % faster for 6 % more compile time
    (docs/performance.md#emmr-the-chunked-views-recomputed).
    """
    layers = nn.scan(lambda mdl, h, mask: (mdl(h, mask, deterministic=deterministic),) * 2,
                     variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=0, out_axes=0, length=2, unroll=2)
    encoder_decoder = TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim,
                                         self.dropout_rate, name="encoder_decoder")
    _, (encoded, decoded) = layers(encoder_decoder, x, jnp.stack([encoder_mask, decoder_mask]))
    return encoded, decoded


def apply_half(module: TransformerEncoderDecoder, params, half: int, x: jax.Array,
               mask: jax.Array, *, deterministic: bool = True,
               key: jax.Array | None = None) -> jax.Array:
  """The encoder (``half = 0``) or the decoder (``half = 1``) of ``module`` alone.

  ``params``: ``module``'s parameters (the scan's, stacked on the leading axis, sliced at
  ``half``); ``x [n, T, d]`` and ``mask [n, T]`` (that half's key mask) -> ``[n, T, d]``, equal to
  that iteration of :meth:`TransformerEncoderDecoder.__call__` (tested). Lets a caller run one half
  on fewer rows than the other (EMMR's inference decodes only the samples with a missing
  modality); ``key``: the dropout key when not ``deterministic``.
  """
  layer = TransformerEncoder(module.num_layers, module.num_heads, module.mlp_dim,
                             module.dropout_rate)
  sliced = jax.tree.map(lambda p: p[half], params["encoder_decoder"])
  return layer.apply({"params": sliced}, x, mask, deterministic=deterministic,
                     rngs={} if key is None else {"dropout": key})
