"""A 1-D convolution over time written as one matmul over stacked windows.

``y[b, t] = bias + sum_{i < k} x[b, t + i - left] @ kernel[i]`` with zero padding outside
``[0, T)`` (``left = (k - 1) // 2``, Flax's / XLA's ``'SAME'``): the same function, parameters and
initialisation as ``flax.linen.Conv(features, kernel_size=(k,), padding="SAME")``, computed as
``concat_i(x_padded[:, i:i + T]) @ kernel.reshape(k D, F)``.

Why not ``nn.Conv``: on CPU, inside a ``while`` body (the scanned epoch,
:func:`mmjax.train.compile_epoch`) XLA lays out the convolution of the kernel's gradient
differently from a bare step and runs it on a generic convolution kernel at ~1 GFLOP/s: SAM-LML's
audio and vision kernel gradients took 119 ms of a 241 ms scanned step (docs/performance.md).
A dot runs on the same matmul kernel inside and outside the loop. The ``[B, T, k D]`` window
stack is ``k`` times the input (``k = 3``: tens of KB a sample); a bare ``nn.Conv`` step is
10-20 % faster than this one in isolation (~1 ms at SAM-LML's shapes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TemporalConv(nn.Module):
  """``x [B, T, D]`` -> ``[B, T, features]``, kernel ``[k, D, features]`` (nn.Conv's layout).

  Attributes:
    features: output width ``F``.
    kernel_size: window length ``k`` (3 in SAM-LML eq. 31).
  """

  features: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, (_, steps, width) = self.kernel_size, x.shape
    kernel = self.param("kernel", nn.linear.default_kernel_init, (k, width, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.Conv with dtype=None
    left = (k - 1) // 2
    padded = jnp.pad(x, ((0, 0), (left, k - 1 - left), (0, 0)))
    windows = jnp.concatenate([padded[:, i:i + steps] for i in range(k)], axis=-1)  # [B, T, k D]
    return windows @ kernel.reshape(k * width, self.features) + bias
