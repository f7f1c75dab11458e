"""The batch schema every mmjax method, protocol and trainer consumes.

A :class:`Batch` is a pytree (``flax.struct`` dataclass) with static shapes:

====================  ===========================  =============================================
field                 shape / dtype                meaning
====================  ===========================  =============================================
``features[m]``       ``[B, T_m, D_m]`` float      (possibly corrupted) inputs of modality ``m``
``step_mask[m]``      ``[B, T_m]`` bool            real time steps (padding / intra-modal missing)
``present``           ``[B, M]`` bool              which modalities are available (inter-modal)
``label``             ``[B]`` float or int         regression score or class index
``full_features[m]``  ``[B, T_m, D_m]`` float      the clean copy; corruption never touches it
``full_step_mask[m]`` ``[B, T_m]`` bool            real steps of the clean copy (never corrupted)
``valid``             ``[B]`` bool                 real samples (False = padding of a last batch)
``index``             ``[B]`` int32                the sample's row in its split (padding: 0)
``modalities``        static ``tuple[str, ...]``   modality order of ``present``'s last axis
====================  ===========================  =============================================

Utterance-level data (one vector per sample) uses ``T_m = 1``. A whole split is stored as one
``Batch`` of NumPy arrays; :mod:`mmjax.data.batching` slices it into fixed-shape batches.

:meth:`Batch.create` validates eagerly (outside ``jit``) and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

TASKS = ("regression", "classification")


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


@struct.dataclass
class Batch:
  """A batch (or a whole split) of multimodal samples. See the module docstring."""

  features: dict[str, Any]
  step_mask: dict[str, Any]
  present: Any
  label: Any
  full_features: dict[str, Any]
  full_step_mask: dict[str, Any]
  valid: Any
  index: Any
  modalities: tuple[str, ...] = struct.field(pytree_node=False)

  # ------------------------------------------------------------------ construction
  @classmethod
  def create(
      cls,
      features: Mapping[str, Any],
      label: Any,
      *,
      modalities: Sequence[str] | None = None,
      step_mask: Mapping[str, Any] | None = None,
      present: Any = None,
      full_features: Mapping[str, Any] | None = None,
      full_step_mask: Mapping[str, Any] | None = None,
      valid: Any = None,
      index: Any = None,
      task: str | None = None,
      num_classes: int | None = None,
  ) -> Batch:
    """Builds a validated batch; missing masks default to all-true, ``full_features`` to ``features``.

    Args:
      features: modality name -> ``[B, T, D]`` float array (NumPy or JAX).
      label: ``[B]`` labels; float for ``task='regression'``, integer in ``[0, num_classes)`` for
        ``task='classification'``.
      modalities: modality order; defaults to the insertion order of ``features``.
      step_mask: modality -> ``[B, T]`` bool; default all true.
      present: ``[B, M]`` bool; default all true.
      full_features: the clean copy; default ``features`` itself.
      full_step_mask: real steps of the clean copy; default ``step_mask``.
      valid: ``[B]`` bool; default all true.
      index: ``[B]`` int32, the sample's row in its split; default ``arange(B)`` (a split built
        by ``create`` numbers its rows; batches sliced from it keep them). Methods key
        per-sample evaluation randomness on it (SAM-LML's missing-modality noise).
      task: if given, the label dtype/range is checked against it.
      num_classes: required for ``task='classification'`` range checks.

    Raises:
      ValueError: naming the field whose shape, dtype, values or keys are wrong.
    """
    if modalities is None:
      modalities = tuple(features)
    modalities = tuple(modalities)
    if not modalities:
      raise ValueError("features: at least one modality is required")
    if len(set(modalities)) != len(modalities):
      raise ValueError(f"modalities: duplicate names in {modalities}")
    for m in modalities:
      if not isinstance(m, str) or not m:
        raise ValueError(f"modalities: names must be non-empty strings, got {m!r}")
    if set(features) != set(modalities):
      raise ValueError(
          f"features: keys {sorted(features)} do not match modalities {list(modalities)}")
    xp = _array_module(features[modalities[0]])
    features = {m: features[m] for m in modalities}
    batch_size = None
    for m, x in features.items():
      if x.ndim != 3:
        raise ValueError(f"features[{m!r}]: expected [B, T, D], got shape {tuple(x.shape)}")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"features[{m!r}]: expected a float dtype, got {x.dtype}")
      if batch_size is None:
        batch_size = x.shape[0]
      elif x.shape[0] != batch_size:
        raise ValueError(
            f"features[{m!r}]: batch size {x.shape[0]} differs from {batch_size} "
            f"of features[{modalities[0]!r}]")
    if step_mask is None:
      step_mask = {m: xp.ones(features[m].shape[:2], bool) for m in modalities}
    if full_features is None:
      full_features = features
    if full_step_mask is None:
      full_step_mask = step_mask
    if present is None:
      present = xp.ones((batch_size, len(modalities)), bool)
    if valid is None:
      valid = xp.ones((batch_size,), bool)
    if index is None:
      index = xp.arange(batch_size, dtype=np.int32)
    batch = cls(
        features=dict(features),
        step_mask={m: step_mask[m] for m in _check_keys("step_mask", step_mask, modalities)},
        present=present,
        label=label,
        full_features={
            m: full_features[m] for m in _check_keys("full_features", full_features, modalities)
        },
        full_step_mask={
            m: full_step_mask[m]
            for m in _check_keys("full_step_mask", full_step_mask, modalities)
        },
        valid=valid,
        index=index,
        modalities=modalities,
    )
    batch.validate(task=task, num_classes=num_classes)
    return batch

  def validate(self, *, task: str | None = None, num_classes: int | None = None) -> None:
    """Checks shapes and dtypes (always) and values (when arrays are concrete).

    Raises:
      ValueError: naming the offending field.
    """
    if task is not None and task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    b = self.batch_size
    for m in self.modalities:
      x = self.features[m]
      t = x.shape[1]
      for field, mask in (("step_mask", self.step_mask[m]),
                          ("full_step_mask", self.full_step_mask[m])):
        if mask.shape != (b, t):
          raise ValueError(f"{field}[{m!r}]: expected shape {(b, t)}, got {tuple(mask.shape)}")
        if mask.dtype != bool:
          raise ValueError(f"{field}[{m!r}]: expected bool, got {mask.dtype}")
      if self.full_features[m].shape != x.shape:
        raise ValueError(
            f"full_features[{m!r}]: shape {tuple(self.full_features[m].shape)} differs from "
            f"features[{m!r}] {tuple(x.shape)}")
      for field, arr in (("features", x), ("full_features", self.full_features[m])):
        if _is_concrete(arr) and not bool(np.isfinite(np.asarray(arr)).all()):
          raise ValueError(f"{field}[{m!r}]: contains NaN or inf")
    if self.present.shape != (b, len(self.modalities)) or self.present.dtype != bool:
      raise ValueError(
          f"present: expected bool [B, M] = {(b, len(self.modalities))}, got "
          f"{self.present.dtype}{list(self.present.shape)}")
    if self.valid.shape != (b,) or self.valid.dtype != bool:
      raise ValueError(
          f"valid: expected bool [B] = {(b,)}, got {self.valid.dtype}{list(self.valid.shape)}")
    if self.index.shape != (b,) or not jnp.issubdtype(self.index.dtype, jnp.integer):
      raise ValueError(
          f"index: expected int [B] = {(b,)}, got {self.index.dtype}{list(self.index.shape)}")
    if self.label.shape != (b,):
      raise ValueError(f"label: expected shape {(b,)}, got {tuple(self.label.shape)}")
    if not (jnp.issubdtype(self.label.dtype, jnp.number) or self.label.dtype == bool):
      raise ValueError(f"label: expected numeric labels, got dtype {self.label.dtype}")
    if (jnp.issubdtype(self.label.dtype, jnp.floating) and _is_concrete(self.label)
        and not bool(np.isfinite(np.asarray(self.label)).all())):
      raise ValueError("label: contains NaN or inf")
    if task == "regression":
      if not jnp.issubdtype(self.label.dtype, jnp.floating):
        raise ValueError(f"label: regression needs float labels, got {self.label.dtype}")
    elif task == "classification":
      if not jnp.issubdtype(self.label.dtype, jnp.integer):
        raise ValueError(f"label: classification needs integer labels, got {self.label.dtype}")
      if num_classes is None or num_classes < 2:
        raise ValueError(f"num_classes: classification needs num_classes >= 2, got {num_classes}")
      if _is_concrete(self.label) and b:
        lab = np.asarray(self.label)
        if lab.min() < 0 or lab.max() >= num_classes:
          raise ValueError(
              f"label: values must lie in [0, {num_classes}), got range [{lab.min()}, {lab.max()}]")

  # ------------------------------------------------------------------ accessors
  @property
  def batch_size(self) -> int:
    return int(self.present.shape[0])

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)

  def modality_index(self, name: str) -> int:
    try:
      return self.modalities.index(name)
    except ValueError:
      raise ValueError(f"modality {name!r} not in {list(self.modalities)}") from None

  def take(self, index: Any) -> Batch:
    """Rows ``index`` of every per-sample array (NumPy fancy indexing; host side)."""
    return jax.tree.map(lambda x: x[index], self)

  def replace(self, **changes: Any) -> Batch:  # typed passthrough of struct's replace
    return dataclasses.replace(self, **changes)


def _check_keys(field: str, mapping: Mapping[str, Any], modalities: tuple[str, ...]):
  if set(mapping) != set(modalities):
    raise ValueError(f"{field}: keys {sorted(mapping)} do not match modalities {list(modalities)}")
  return modalities


def _array_module(x: Any):
  return np if isinstance(x, np.ndarray) else jnp
