"""Data parallelism: a 1-D ``'data'`` mesh, batches sharded on their leading axis, state replicated.

This is the semantics of a ``pmap`` training loop written with ``jax.jit`` + ``NamedSharding``: the
compiled step sees the global batch, so batch statistics (e.g. the load-balancing loss) are exact.
Under multi-process runs (``jax.distributed``) every process builds the same global batch and
contributes the rows of its own devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def is_main_process() -> bool:
  """Process 0 of a (multi-process) run: the one that writes logs, metrics and results."""
  return jax.process_index() == 0


def on_main_process(log: Callable[[str], None]) -> Callable[[str], None]:
  """``log`` on process 0; a no-op on the others (every process runs the same loop)."""
  return log if is_main_process() else (lambda line: None)


def put_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host (NumPy) global batch on the mesh, sharded along its leading axis."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  index, count = jax.process_index(), jax.process_count()

  def local_rows(x):
    rows = x.shape[0] // count
    return jax.make_array_from_process_local_data(
        sharding, x[index * rows:(index + 1) * rows], x.shape)

  return jax.tree.map(local_rows, batch)


def put_replicated(x: Any, mesh: Mesh) -> Any:
  """Places host arrays (a pytree; the same on every process) on every device of ``mesh``."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_callback(
      np.shape(a), sharding, lambda index: np.asarray(a)[index]), x)


def to_host(x: Any) -> Any:
  """Gathers (possibly multi-process) arrays to NumPy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(x, tiled=True)
