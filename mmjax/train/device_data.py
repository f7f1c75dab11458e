"""A training split held on the devices, and the batches of an epoch gathered from it on device.

The streaming path (:func:`mmjax.data.iterate_batches` + :func:`~mmjax.train.sharding.put_batch`)
slices every batch on the host and copies it to the devices each step. When the split fits in
device memory (every data set of the four papers does), :func:`place_split` copies it once and an
epoch becomes a matrix of row indices, :func:`epoch_rows` (``[steps, B]``, ``-1`` = a padding
row); :func:`gather_batch`, inside the compiled epoch (:func:`mmjax.train.steps.compile_epoch`),
builds each batch from it, equal to the host path's batch value for value: one gather per distinct
array (equal arrays are one), padding rows from an appended zero row (no masking pass).

Placement: the split is *replicated* on every device of the mesh, and each gathered batch is
constrained to the ``'data'`` sharding, so every device gathers its own rows locally. A split
sharded over ``'data'`` would need an all-to-all per step (a random permutation's rows live on
every device); replicating costs the split's bytes per device, which :func:`place_split` checks
against a budget (:func:`memory_budget`). Arrays of the split that are equal are placed once and shared (the clean copy
``full_features`` of a clean training split is ``features`` itself), so a method that reads the
clean copy and one that does not see the same batch, at no extra device memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from mmjax.data import Batch, num_batches
from mmjax.train.sharding import batch_sharding, put_replicated

# Share of a device's memory a replicated split may take (the rest: parameters, activations).
DEVICE_MEMORY_SHARE = 0.25
# Budget when the device reports no memory limit (the CPU backend).
DEFAULT_BUDGET_BYTES = 4 << 30


def memory_budget(mesh: Mesh) -> float:
  """Bytes a replicated split may take: :data:`DEVICE_MEMORY_SHARE` of the smallest memory of this
  process's devices in ``mesh`` (:data:`DEFAULT_BUDGET_BYTES` where they report no limit).
  Processes of one run hold equal devices, so they agree."""
  limits = []
  for device in mesh.devices.flat:
    if device.process_index != jax.process_index():
      continue  # memory_stats() answers for this process's devices only
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      limits.append(DEVICE_MEMORY_SHARE * stats["bytes_limit"])
  return min(limits) if limits else DEFAULT_BUDGET_BYTES


@struct.dataclass
class DeviceSplit:
  """A split on the devices: each distinct array of its :class:`~mmjax.data.Batch` once, with one
  all-zero row appended (row ``num_rows``, what a padding row gathers).

  Attributes:
    arrays: the distinct leaves, each ``[num_rows + 1, ...]``, replicated over the mesh.
    sources: static; for each leaf of the batch (tree order), the index of its array.
    treedef: static; the batch's tree structure.
    num_rows: static; ``N``, the split's samples.
  """

  arrays: tuple[jax.Array, ...]
  sources: tuple[int, ...] = struct.field(pytree_node=False)
  treedef: Any = struct.field(pytree_node=False)
  num_rows: int = struct.field(pytree_node=False)


def place_split(split: Batch, mesh: Mesh, budget: float | None = None) -> DeviceSplit | None:
  """``split`` (NumPy, ``[N, ...]``) replicated on every device of ``mesh``, equal arrays once;
  ``None`` (nothing placed) when those distinct arrays take more than ``budget`` bytes (e.g.
  :func:`memory_budget`; ``None``: no limit).

  Works under several processes (each holds the same split; every process places its devices'
  copies)."""
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, split))
  representative = _representatives(leaves)
  distinct = sorted(set(representative))
  if budget is not None and sum(leaves[i].nbytes for i in distinct) > budget:
    return None
  arrays = tuple(
      put_replicated(np.concatenate([leaves[i], np.zeros((1, *leaves[i].shape[1:]),
                                                         leaves[i].dtype)]), mesh)
      for i in distinct)
  return DeviceSplit(arrays=arrays, sources=tuple(distinct.index(i) for i in representative),
                     treedef=treedef, num_rows=split.batch_size)


def epoch_rows(n: int, batch_size: int, key: jax.Array | None,
               drop_remainder: bool = False) -> np.ndarray:
  """``[steps, batch_size]`` int32: the split rows of each batch of one epoch, ``-1`` = padding.

  The order of :func:`mmjax.data.iterate_batches` with the same arguments:
  ``jax.random.permutation(key, n)`` (``0 .. n-1`` without a key), cut into batches; the last
  partial batch is padded (or dropped with ``drop_remainder``)."""
  order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
  steps = num_batches(n, batch_size, drop_remainder)
  rows = np.full(steps * batch_size, -1, np.int32)
  used = min(n, steps * batch_size)
  rows[:used] = order[:used]
  return rows.reshape(steps, batch_size)


def gather_batch(split: DeviceSplit, rows: jax.Array, mesh: Mesh | None = None) -> Batch:
  """The batch of ``rows`` (``[B]`` int32, ``-1`` = padding) of an on-device ``split``; jittable.

  One gather per distinct array; a padding row reads the appended zero row, so it is all zeros
  (``valid``, ``present``, ``step_mask`` False, label 0, index 0), as the host path pads. With
  ``mesh`` the batch is constrained to the ``'data'`` sharding."""
  rows = jnp.where(rows >= 0, rows, split.num_rows)  # in [0, N]: every index is in bounds
  # Rows of the arrays flattened to 2-D, without bounds handling: on CPU 10x faster than a
  # clipped gather of the [N, T, D] array.
  picked = [x.reshape(x.shape[0], -1).at[rows].get(mode="promise_in_bounds")
            .reshape(rows.shape[0], *x.shape[1:]) for x in split.arrays]
  batch = jax.tree.unflatten(split.treedef, [picked[i] for i in split.sources])
  if mesh is not None:
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))
  return batch


def _representatives(leaves: list[np.ndarray]) -> list[int]:
  """For each leaf, the index of the first leaf equal to it (same shape, dtype and values)."""
  first, distinct = [], []
  for i, x in enumerate(leaves):
    match = next((j for j in distinct if leaves[j].shape == x.shape
                  and leaves[j].dtype == x.dtype and np.array_equal(leaves[j], x)), None)
    if match is None:
      distinct.append(i)
    first.append(i if match is None else match)
  return first
