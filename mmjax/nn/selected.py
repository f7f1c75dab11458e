"""Row-wise work on the selected rows of a batch only, at static shapes.

A method often needs an expensive row-wise function on a data-dependent subset of the batch (EMMR:
the ensemble's views only for samples with a missing modality, or only for flagged ones).
:func:`map_selected` sorts the selected rows first and runs ``fn`` on consecutive chunks of
``chunk`` rows in a ``lax.scan``; a chunk without a selected row is skipped by ``lax.cond``. The
work done is ``ceil(count / chunk)`` chunks whatever the batch size, every selected row is
computed exactly (no capacity to overflow), and the program is differentiable. XLA's cost
analysis counts the scan body (one chunk) once: multiply by the chunks that run
(:func:`chunks_run`).

Differentiated, a ``lax.scan`` stacks every intermediate its backward pass reads, one slot per
chunk, and reads them back: for a Transformer on a chunk that is its attention weights
``[chunk, heads, T, T]`` and every activation, copied twice per chunk (on CPU, EMMR's stacking
copies were 120 of a 333 ms step). A chunk (its ``lax.cond`` and ``fn``) therefore runs under
:func:`jax.checkpoint` by default (``remat``): the scan keeps nothing per chunk but the rows it
scans over (``fn``'s closure is loop-invariant) and the backward pass recomputes the chunk's
forward — more FLOPs (one more forward per chunk that runs), far fewer bytes. The rows are
gathered in chunk order once before the loop and the outputs put back in row order once after it
(docs/performance.md#emmr-the-chunked-views-recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def chunks_run(selected: Any, chunk: int) -> int:
  """Chunks :func:`map_selected` runs for ``selected [G, N]``: ``ceil(max_g count_g / chunk)``."""
  return int(-(-int(np.asarray(selected).sum(-1).max()) // chunk))


def map_selected(fn: Callable[..., Any], selected: jax.Array, chunk: int, *operands: jax.Array,
                 key: jax.Array | None = None, remat: bool = True) -> Any:
  """``fn`` on the selected rows of every group, zeros elsewhere.

  Args:
    fn: ``fn(*rows, key)`` with every ``rows[i]`` ``[G, chunk, ...]`` (the gathered rows of
      ``operands[i]``) and ``key`` a PRNG key (``None`` when ``key`` is) -> a pytree of
      ``[G, chunk, ...]`` arrays. Row-wise: a row's output may depend on that row alone.
    selected: ``[G, N]`` bool, the rows of each of ``G`` groups to compute.
    chunk: rows per group per chunk (static).
    *operands: ``[G, N, ...]`` arrays.
    key: split per chunk (``fold_in`` of the chunk index), e.g. for dropout.
    remat: recompute ``fn``'s forward in the backward pass instead of stacking its intermediates
      per chunk (see the module docstring); the same values and gradients.

  Returns:
    ``fn``'s pytree with ``[G, N, ...]`` leaves: row ``n`` of group ``g`` holds ``fn``'s output for
    it where ``selected[g, n]``, zeros elsewhere.
  """
  num_groups, n = selected.shape
  for i, x in enumerate(operands):
    if x.shape[:2] != (num_groups, n):
      raise ValueError(f"map_selected: operands[{i}] has shape {list(x.shape)}, expected leading "
                       f"[{num_groups}, {n}] as selected")
  num_chunks = -(-n // chunk)
  # Selected rows first (stable), then padded to whole chunks with invalid entries.
  order = jnp.argsort(~selected, axis=-1, stable=True).astype(jnp.int32)
  order = jnp.pad(order, [(0, 0), (0, num_chunks * chunk - n)])
  valid = jnp.pad(jnp.take_along_axis(selected, order[:, :n], axis=-1),
                  [(0, 0), (0, num_chunks * chunk - n)])
  # Shapes: [G, chunks * chunk, ...] -> [chunks, G, chunk, ...] and back.
  split = lambda x: x.reshape((num_groups, num_chunks, chunk) + x.shape[2:]).swapaxes(0, 1)
  merge = lambda y: y.swapaxes(0, 1).reshape((num_groups, num_chunks * chunk) + y.shape[3:])
  # The rows in chunk order, gathered once: a gather inside the loop would, differentiated, build a
  # zero cotangent of the whole operand in every chunk.
  rows = [split(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1))
          for x in operands]
  out_shapes = jax.eval_shape(
      fn, *[jax.ShapeDtypeStruct((num_groups, chunk) + x.shape[2:], x.dtype) for x in operands],
      None if key is None else jax.ShapeDtypeStruct(key.shape, key.dtype))
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)

  def run_chunk(ok, chunk_key, *chunk_rows):
    out = jax.lax.cond(jnp.any(ok), lambda: fn(*chunk_rows, chunk_key), zeros)
    return jax.tree.map(lambda y: jnp.where(ok.reshape(ok.shape + (1,) * (y.ndim - 2)), y, 0), out)

  if remat:  # keeps its inputs (the scanned rows, fn's loop-invariant closure): nothing stacked
    run_chunk = jax.checkpoint(run_chunk, prevent_cse=False)  # no CSE to prevent in a scan

  def body(_, xs):
    j, ok, chunk_rows = xs
    return None, run_chunk(ok, None if key is None else jax.random.fold_in(key, j), *chunk_rows)

  _, out = jax.lax.scan(body, None, (jnp.arange(num_chunks), split(valid), rows))
  # Back to row order, once: padding entries (index 0) add zeros.
  unsort = jax.vmap(lambda i, v: jnp.zeros((n,) + v.shape[1:], v.dtype).at[i].add(v))
  return jax.tree.map(lambda y: unsort(order, merge(y)), out)
