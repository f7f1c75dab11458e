"""Shared plumbing of the loss library: input checks, dtype promotion and masked means.

Every loss computes in at least float32 (bfloat16 / float16 inputs are upcast, float64 stays float64),
so low-precision callers get finite values and gradients; gradients flow back to the input dtype
through the cast.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_float(name: str, x: Any) -> jax.Array:
  """``x`` as a JAX array of dtype ``promote(x.dtype, float32)``; non-numeric input is an error."""
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
          or x.dtype == bool):
    raise ValueError(f"{name}: expected a real array, got dtype {x.dtype}")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_rank(name: str, x: jax.Array, min_rank: int, layout: str) -> None:
  if x.ndim < min_rank:
    raise ValueError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")


def check_same_shape(**arrays: jax.Array) -> None:
  """Raises ``ValueError`` listing every shape unless all arrays have the same shape."""
  shapes = {name: tuple(x.shape) for name, x in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError("shape mismatch: " + ", ".join(f"{n}{list(s)}" for n, s in shapes.items()))


def broadcast_shapes(**arrays: Any) -> tuple[int, ...]:
  """The broadcast shape of the (non-``None``) arrays, or ``ValueError`` naming every shape."""
  shapes = {name: tuple(np.shape(x)) for name, x in arrays.items() if x is not None}
  try:
    return tuple(np.broadcast_shapes(*shapes.values()))
  except ValueError:
    raise ValueError(
        "shapes do not broadcast: " + ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
    ) from None


def check_nonnegative(name: str, value: Any) -> None:
  """Eager check of a Python/NumPy scalar hyper-parameter; traced values pass through."""
  if isinstance(value, (int, float, np.number)) and value < 0:
    raise ValueError(f"{name}: must be >= 0, got {value}")


def masked_mean(values: jax.Array, where: jax.Array | None, axis: int | None = None) -> jax.Array:
  """Mean of ``values`` over ``axis`` (all axes when ``None``) restricted to ``where``.

  An empty selection gives 0 with zero (not NaN) gradients.
  """
  if where is None:
    return jnp.mean(values, axis=axis)
  where = jnp.broadcast_to(jnp.asarray(where, bool), values.shape)
  count = jnp.sum(where, axis=axis)
  total = jnp.sum(jnp.where(where, values, 0.0), axis=axis)
  return total / jnp.maximum(count, 1).astype(values.dtype)


def where_mask(name: str, where: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """``where`` as a bool array broadcast to ``shape`` (``None`` stays ``None``)."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != bool:
    raise ValueError(f"{name}: expected a bool mask, got dtype {where.dtype}")
  try:
    return jnp.broadcast_to(where, shape)
  except ValueError:
    raise ValueError(
        f"{name}: mask shape {tuple(where.shape)} does not broadcast to {tuple(shape)}") from None
