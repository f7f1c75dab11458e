"""Independent copies of one module evaluated as a single vmapped program.

``S`` modules of the same architecture (EMMR's per-modality encoders, its ``M + 1`` view
classifiers) are usually written as ``S`` calls; XLA then compiles ``S`` copies of the same graph.
:func:`apply_stacked` keeps their parameters stacked on a leading axis of size ``S`` and compiles
the body once, with the same arithmetic per copy. :func:`apply_copy_per_row` runs each row of a
batch through a copy of its own (rows that need different copies, selected together).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def apply_copy_per_row(module: nn.Module, stacked_params: Any, copy: jax.Array, *args: jax.Array,
                       key: jax.Array | None = None, **kwargs: Any) -> Any:
  """Row ``i`` of ``args`` through copy ``copy[i]`` of ``module``: ``module_{copy[i]}(args[i])``.

  ``module``: unbound, the architecture of the copies; ``stacked_params``: their parameters as
  :func:`apply_stacked` stacks them (leading axis ``S``); ``copy [n]`` int in ``[0, S)``; every
  ``args[i]`` ``[n, ...]``, passed to ``module`` as a batch of one row; ``kwargs`` static and
  shared; ``key``: the ``"dropout"`` key (split per row) or ``None``. Returns ``module``'s output
  with leading axis ``n``. The same arithmetic as :func:`apply_stacked` on those rows (tested);
  the gathered parameters are per row (``n`` copies in memory, their gradient summed back).
  """
  keys = None if key is None else jax.random.split(key, copy.shape[0])

  def one(c, row, k):
    params = jax.tree.map(lambda p: jnp.asarray(p)[c], stacked_params)  # NumPy params too
    out = module.apply({"params": params}, *[a[None] for a in row],
                       rngs={} if k is None else {"dropout": k}, **kwargs)
    return jax.tree.map(lambda y: y[0], out)

  return jax.vmap(one)(copy, args, keys)
