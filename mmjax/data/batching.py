"""Host-side batching: feature standardisation and fixed-shape epoch iterators.

Both operate on whole-split :class:`~mmjax.data.batch.Batch` es of NumPy arrays (a
:class:`~mmjax.data.dataset.Dataset`'s splits) and return NumPy-backed batches; the trainer puts
them on devices. Every batch an iterator yields has exactly ``batch_size`` rows, so one compiled
step serves the whole epoch: a last partial batch is padded with all-zero rows whose ``valid``,
``present`` and ``step_mask`` are False (label 0), unless ``drop_remainder``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from mmjax.data.batch import Batch
from mmjax.data.dataset import Dataset

STD_FLOOR = 1e-6  # lower bound on a fitted std, so constant features map to 0, not inf.


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Per-feature statistics of one split, for :func:`apply_standardizer`.

  Attributes:
    mean: modality -> ``[D_m]`` float32 mean over the fitted entries.
    std: modality -> ``[D_m]`` float32 population std (ddof 0), floored at :data:`STD_FLOOR`.
  """

  mean: dict[str, np.ndarray]
  std: dict[str, np.ndarray]


def fit_standardizer(batch: Batch, *, std_floor: float = STD_FLOOR) -> FeatureStats:
  """Fits per-feature (last-axis) mean and std over the real time steps of ``batch``.

  An entry ``features[m][b, t]`` counts iff ``valid[b] & present[b, m] & step_mask[m][b, t]``:
  padding, dropped modalities and padded rows never enter the statistics. Accumulated in float64.

  Args:
    batch: usually the training split, ``features[m]`` ``[N, T_m, D_m]``.
    std_floor: lower bound of the returned std.

  Returns:
    :class:`FeatureStats` with ``mean[m]``, ``std[m]`` of shape ``[D_m]``.

  Raises:
    ValueError: if a modality has no counted time step, or ``std_floor`` is not positive.
  """
  if not std_floor > 0:
    raise ValueError(f"std_floor: expected a positive value, got {std_floor!r}")
  mean, std = {}, {}
  for m in batch.modalities:
    entries = np.asarray(batch.features[m], np.float64)[_counted(batch, m)]  # Shape: [n, D]
    if entries.shape[0] == 0:
      raise ValueError(f"features[{m!r}]: no valid time step to fit the standardizer on")
    mean[m] = entries.mean(axis=0).astype(np.float32)
    std[m] = np.maximum(entries.std(axis=0), std_floor).astype(np.float32)
  return FeatureStats(mean=mean, std=std)


def apply_standardizer(batch: Batch, stats: FeatureStats) -> Batch:
  """``(x - mean) / std`` on the counted entries of ``features`` and ``full_features``; 0 elsewhere.

  ``features[m][b, t]`` is transformed where ``step_mask[m][b, t] & present[b, m]`` and
  ``full_features[m][b, t]`` where ``full_step_mask[m][b, t]``; every other entry is set to 0, so
  padding and dropped modalities stay zero. Standardise right after loading, before any
  corruption protocol (the statistics should describe clean data).

  Args:
    batch: NumPy batch with modalities ``stats`` knows, ``features[m]`` ``[B, T_m, D_m]``.
    stats: from :func:`fit_standardizer`.

  Returns:
    A new batch, same shapes and dtypes.

  Raises:
    ValueError: if a modality or feature dimension does not match ``stats``.
  """
  for m in batch.modalities:
    if m not in stats.mean:
      raise ValueError(f"features[{m!r}]: no statistics for this modality; stats has "
                       f"{sorted(stats.mean)}")
    dim = batch.features[m].shape[-1]
    if stats.mean[m].shape != (dim,):
      raise ValueError(f"features[{m!r}]: feature dimension {dim} differs from the stats' "
                       f"{stats.mean[m].shape[0]}")

  def transform(x, where, m):
    x = np.asarray(x)
    z = (x.astype(np.float64) - stats.mean[m]) / stats.std[m]
    return np.where(where[..., None], z, 0.0).astype(x.dtype)

  present = np.asarray(batch.present)
  features, full_features = {}, {}
  for i, m in enumerate(batch.modalities):
    step_mask = np.asarray(batch.step_mask[m])
    features[m] = transform(batch.features[m], step_mask & present[:, i:i + 1], m)
    full_features[m] = transform(batch.full_features[m], np.asarray(batch.full_step_mask[m]), m)
  return batch.replace(features=features, full_features=full_features)


def standardize(dataset: Dataset, stats: FeatureStats | None = None) -> Dataset:
  """Standardises every split of ``dataset`` with statistics of its TRAIN split (or ``stats``).

  Valid and test data never influence the transform. See :func:`fit_standardizer` and
  :func:`apply_standardizer`.

  Args:
    dataset: a dataset of NumPy splits.
    stats: precomputed statistics; default ``fit_standardizer(dataset.splits["train"])``.

  Returns:
    A new :class:`Dataset` with the same name, task and shapes.
  """
  if stats is None:
    stats = fit_standardizer(dataset.splits["train"])
  return dataclasses.replace(
      dataset,
      splits={name: apply_standardizer(split, stats) for name, split in dataset.splits.items()})


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch: ``floor(n / batch_size)`` with ``drop_remainder``, else ``ceil``."""
  _check_positive_int("batch_size", batch_size)
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n: expected a non-negative int, got {n!r}")
  return n // batch_size if drop_remainder else -(-n // batch_size)


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """Raises ``ValueError`` unless ``batch_size`` splits evenly over ``num_devices`` devices."""
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("num_devices", num_devices)
  if batch_size % num_devices:
    raise ValueError(f"batch_size: {batch_size} is not divisible by the number of devices "
                     f"{num_devices}; use a multiple of {num_devices}")


def iterate_batches(
    split: Batch,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
    num_devices: int = 1,
) -> Iterator[Batch]:
  """One epoch over ``split`` in fixed-shape batches.

  The order is ``jax.random.permutation(key, N)`` when a key is given, else ``0 .. N-1``; the same
  key gives the same order. Without ``drop_remainder`` every sample appears exactly once and the
  last batch is padded to ``batch_size`` with zero rows (``valid``, ``present``, ``step_mask``
  False, label 0); with it the last partial batch is dropped. Arguments are checked when the
  function is called, not at the first ``next``.

  Args:
    split: a whole split, ``[N, ...]`` NumPy arrays.
    batch_size: rows per yielded batch (global batch under data parallelism).
    key: optional ``jax.random`` key for shuffling.
    drop_remainder: drop the last partial batch instead of padding it.
    num_devices: devices the batch will be sharded over; ``batch_size`` must be divisible by it.

  Returns:
    An iterator of ``num_batches(N, batch_size, drop_remainder)`` NumPy-backed batches of
    ``batch_size`` rows each.

  Raises:
    ValueError: naming ``batch_size`` / ``num_devices`` when they are invalid or indivisible.
  """
  check_batch_size(batch_size, num_devices)
  n = split.batch_size
  if key is None:
    order = np.arange(n)
  else:
    order = np.asarray(jax.random.permutation(key, n))
  host = jax.tree.map(np.asarray, split)
  return _epoch(host, order, batch_size, num_batches(n, batch_size, drop_remainder))


def _epoch(split: Batch, order: np.ndarray, batch_size: int, count: int) -> Iterator[Batch]:
  for i in range(count):
    batch = split.take(order[i * batch_size:(i + 1) * batch_size])
    pad = batch_size - batch.batch_size
    if pad:
      batch = jax.tree.map(
          lambda x: np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]), batch)
    yield batch


def _counted(batch: Batch, m: str) -> np.ndarray:
  """``[B, T_m]`` bool: time steps of modality ``m`` that are real, present and in valid rows."""
  i = batch.modality_index(m)
  return (np.asarray(batch.step_mask[m]) & np.asarray(batch.present)[:, i:i + 1]
          & np.asarray(batch.valid)[:, None])


def _check_positive_int(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")
