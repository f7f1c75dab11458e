"""Independent copies of one module evaluated as a single vmapped program.

``S`` modules of the same architecture (EMMR's per-modality encoders, its ``M + 1`` view
classifiers) are usually written as ``S`` calls; XLA then compiles ``S`` copies of the same graph.
:func:`apply_stacked` keeps their parameters stacked on a leading axis of size ``S`` and compiles
the body once, with the same arithmetic per copy.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn


def apply_stacked(module: nn.Module, num: int, *args: Any, **kwargs: Any) -> Any:
  """``[module_s(*args[s], **kwargs) for s < num]`` stacked on axis 0, one parameter set per ``s``.

  Call it inside a parent module (``setup``- or ``compact``-defined ``module``). Every positional
  argument (and every output) has the leading axis ``num``; keyword arguments are shared by all
  copies and must be static (e.g. ``deterministic=``). Parameters get the leading axis ``num``
  and are initialised independently; the ``"dropout"`` stream is split per copy.
  """
  return nn.vmap(lambda mdl, *a: mdl(*a, **kwargs), in_axes=0, out_axes=0,
                 variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 axis_size=num)(module, *args)
