"""The training state pytree."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree.

  Attributes:
    step: ``int32[]`` optimiser steps taken.
    params: model parameters.
    opt_state: optax state.
    method_state: method-owned state outside gradients (e.g. EASE's class anchors); ``{}`` if none.
    key: raw ``uint32[2]`` PRNG key; step ``s`` uses ``fold_in(key, s)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any
  key: jax.Array
