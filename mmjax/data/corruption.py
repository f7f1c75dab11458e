"""Corruption protocols: missing modalities, missing time steps and feature noise (SPEC §4.2).

Every protocol is a pure function of an explicit PRNG key (first argument) and a :class:`Batch`,
and returns a NEW ``Batch``; ``batch.full_features`` (the clean copy) is passed through untouched.

==================================================  ===========================================
protocol                                            source
==================================================  ===========================================
``drop_modalities(key, batch, missing_rate)``       SAM-LML eq. 34 (random missing rate MR)
``drop_one_modality(key, batch, ratio)``            EMMR §3.1, Table 1 (missing ratio 0-0.5)
``keep_modalities(batch, subset)``                  EUAR Table 2, EASE Table 3 (fixed missing)
``mask_time_steps(key, batch, rate)``               EASE §4.3 (LNLN intra-modal protocol)
``gaussian_noise(key, batch, variance, ...)``       EUAR Table 3 / supplement
``salt_pepper_noise(key, batch, amount, ...)``      EUAR Table 3 / supplement
``samplewise_gaussian_noise(key, batch, std, ...)`` EUAR Fig. 1 sample-wise noise; TMC / QMF
``samplewise_salt_pepper_noise(key, batch, ...)``   the same with salt-and-pepper noise
``mix_noise(key, batch, rate, ...)``                SAM-LML eq. 35 (noisy rate NR)
``laplace_noise(key, batch, scale, ...)``           SAM-LML App. A.14
``random_erasing(key, batch, rate, ...)``           SAM-LML App. A.14
``laplace_or_erasing(key, batch, rate, ...)``       SAM-LML App. A.14 (one of the two per sample)
==================================================  ===========================================

Conventions (see ``docs/protocols.md`` for the reasoning):

* **Observed entries.** The value-level protocols (noise, erasing, time-step masking) act only on
  the observed entries: real samples (``valid``), of present modalities (``present``), at real time
  steps (``step_mask``). Padding and absent modalities keep their (zero) values.
* **Dropping a modality** zeroes its features and sets ``present[:, m]`` to False; its
  ``step_mask`` is left unchanged, so ``step_mask`` keeps describing the sequence layout and
  ``present`` alone carries inter-modal missingness (use ``step_mask[m] & present[:, i, None]``
  for "observed steps"). Drop protocols act on every row, padding rows included.
* **Randomness.** Per-modality draws use ``jax.random.fold_in(key, i)`` with ``i`` the modality's
  index in ``batch.modalities``, so a modality's noise does not depend on which other modalities
  are listed. Noise is drawn in float32 and the result cast back to the features' dtype.
  Same key -> same output.
* **Levels.** Strength arguments (rates, ``variance``, ``scale``, ``amount``, ``std``) are a
  scalar, a per-sample ``[B]`` array (the train-time corruption draws one level per sample,
  :mod:`mmjax.data.train_corruption`) or, for the value-level protocols, a per-sample-and-modality
  ``[B, M]`` array. A constant array gives exactly the scalar's output (the random draws do not
  depend on the level's shape), and level 0 is the identity for every protocol.
* **jit.** Strength arguments may be traced: one compiled function serves a whole sweep. ``modalities`` / ``subset`` are modality names and must
  be static, e.g. ``jax.jit(gaussian_noise, static_argnames="modalities")``.
* **Errors.** A strength outside its range, or of another shape than ``[]`` / ``[B]`` (/ ``[B, M]``),
  raises ``ValueError`` naming the argument when its value is concrete (Python number or concrete
  array; the range of traced values cannot be checked, their shape is). Unknown modality
  names raise ``ValueError`` naming ``modalities`` / ``subset``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.batch import Batch

Names = str | Sequence[str] | None


# ---------------------------------------------------------------------------------- helpers
def _check_level(name: str, value: Any, low: float, high: float | None, batch: Batch,
                 *, per_modality: bool = False) -> jax.Array:
  """``value`` as a float32 array of shape ``[]`` or ``[B]`` (or ``[B, M]`` if ``per_modality``).

  Raises ValueError naming ``name`` for another shape, or when a concrete ``value`` has an entry
  outside ``[low, high]``.
  """
  shapes = [(), (batch.batch_size,)] + ([(batch.batch_size, batch.num_modalities)]
                                        if per_modality else [])
  shape = tuple(np.shape(value))
  if shape not in shapes:
    raise ValueError(f"{name}: expected a scalar or an array of shape "
                     f"{' or '.join(str(list(s)) for s in shapes[1:])}, got shape {list(shape)}")
  if not isinstance(value, jax.core.Tracer):
    v = np.asarray(value)
    ok = low <= v if high is None else (low <= v) & (v <= high)
    if not np.all(ok):
      bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
      bad = value if v.ndim == 0 else float(v[~ok].flat[0])
      raise ValueError(f"{name}: expected a value {bounds}, got {bad!r}")
  return jnp.asarray(value, jnp.float32)


def _sample_level(level: jax.Array, i: int) -> jax.Array:
  """The level of modality ``i`` broadcastable against ``[B, T, D]``: ``[]`` or ``[B, 1, 1]``."""
  if level.ndim == 2:
    level = level[:, i]
  return level.reshape(level.shape + (1, 1)) if level.ndim else level


def _modality_indices(arg: str, batch: Batch, names: Names) -> tuple[int, ...]:
  """Indices of ``names`` in ``batch.modalities`` (``None`` = all); errors name ``arg``."""
  if names is None:
    return tuple(range(batch.num_modalities))
  names = (names,) if isinstance(names, str) else tuple(names)
  unknown = [n for n in names if n not in batch.modalities]
  if not names or unknown:
    raise ValueError(
        f"{arg}: expected a non-empty subset of {list(batch.modalities)}, got {list(names)}"
        + (f" (unknown {unknown})" if unknown else ""))
  return tuple(sorted({batch.modalities.index(n) for n in names}))


def _observed(batch: Batch, i: int) -> jax.Array:
  """``[B, T_m]`` bool: real steps of real samples where modality ``i`` is present."""
  m = batch.modalities[i]
  return (jnp.asarray(batch.step_mask[m]) & jnp.asarray(batch.present)[:, i, None]
          & jnp.asarray(batch.valid)[:, None])


def _random_count_and_order(key: jax.Array, present: jax.Array, expected: jax.Array, *,
                            absent_first: bool) -> tuple[jax.Array, jax.Array]:
  """``(k [B] int32, rank [B, M])``: a random count with ``E[k] = expected`` and a random order.

  ``k = ⌊e⌋ + Bernoulli(e − ⌊e⌋)`` (``expected``: ``[]`` or ``[B]``, from ``split(key)[0]``);
  ``rank`` is each row's position in a uniformly random order of its present modalities (from
  ``split(key)[1]``), with the absent modalities placed first or last. Shared by the protocols that
  pick a random ``k``-subset of modalities per sample.
  """
  b, num_mod = present.shape
  base = jnp.floor(expected)
  count_key, order_key = jax.random.split(key)
  k = base.astype(jnp.int32) + jax.random.bernoulli(count_key, expected - base, (b,))
  scores = jnp.where(present, jax.random.uniform(order_key, (b, num_mod)),
                     -1.0 if absent_first else 2.0)
  return k, jnp.argsort(jnp.argsort(scores, axis=1), axis=1)


def _with_presence(batch: Batch, present: jax.Array) -> Batch:
  """Sets ``present`` ([B, M] bool) and zeroes the features of every absent modality."""
  features = {
      m: jnp.where(present[:, i, None, None], batch.features[m], 0).astype(batch.features[m].dtype)
      for i, m in enumerate(batch.modalities)
  }
  return batch.replace(features=features, present=present)


def _perturb(
    key: jax.Array,
    batch: Batch,
    modalities: Names,
    fn: Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array],
) -> Batch:
  """Replaces observed entries of the listed modalities by ``fn(key_m, x, observed, i)``.

  ``x`` is ``[B, T, D]``, ``observed`` ``[B, T, 1]`` bool, ``i`` the modality's index;
  ``key_m = fold_in(key, i)``.
  """
  features = dict(batch.features)
  for i in _modality_indices("modalities", batch, modalities):
    m = batch.modalities[i]
    x = jnp.asarray(batch.features[m])
    observed = _observed(batch, i)[..., None]
    noisy = fn(jax.random.fold_in(key, i), x, observed, i)
    features[m] = jnp.where(observed, noisy, x).astype(x.dtype)
  return batch.replace(features=features)


# ---------------------------------------------------------------------------------- inter-modal
def drop_modalities(key: jax.Array, batch: Batch, missing_rate: Any) -> Batch:
  """Random inter-modal missingness at an expected missing rate (SAM-LML eq. 34).

  With ``M`` modalities and ``N`` samples the missing rate is
  ``MR = 1 − Σ_i M_i / (N·M)`` (``M_i`` = modalities sample ``i`` keeps). The target is
  ``r = min(missing_rate, (M−1)/M)`` — at least one modality is always kept, so MR cannot exceed
  ``(M−1)/M`` (SAM-LML: "MR = 0.7" with 3 modalities keeps exactly one). Per sample the number of
  dropped modalities is ``k = ⌊rM⌋ + Bernoulli(rM − ⌊rM⌋)``, so ``E[k]/M = r`` exactly, and the
  ``k`` dropped modalities are a uniformly random ``k``-subset. Modalities already absent in the
  input count towards ``k`` first (so composing protocols never drops a sample's last modality).

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``, ``present`` ``[B, M]``.
    missing_rate: scalar or per-sample ``[B]`` in [0, 1] (may be traced); values above
      ``(M−1)/M`` are clipped to it. 0 is the identity. A Python number or concrete array is
      checked even under ``jit``; a traced value cannot be: outside [0, 1] it acts as its clip to
      ``[0, (M−1)/M]`` (check it before tracing).

  Returns:
    A new batch: dropped modalities have ``present`` False and zero features; ``step_mask`` and
    ``full_features`` are unchanged.

  Raises:
    ValueError: ``missing_rate`` outside [0, 1] (when concrete).
  """
  missing_rate = _check_level("missing_rate", missing_rate, 0.0, 1.0, batch)
  num_mod = batch.num_modalities
  # Expected number of dropped modalities per sample, in [0, M − 1]; shape [] or [B].
  expected = jnp.minimum(missing_rate * num_mod, num_mod - 1)
  present = jnp.asarray(batch.present)
  # k <= M − 1 (expected − base = 0 at M − 1); absent modalities rank first, so count towards k.
  k, rank = _random_count_and_order(key, present, expected, absent_first=True)
  return _with_presence(batch, present & (rank >= k[:, None]))


def drop_one_modality(key: jax.Array, batch: Batch, ratio: Any) -> Batch:
  """A fraction ``ratio`` of samples loses exactly one modality (EMMR §3.1, Table 1).

  Each sample is selected independently with probability ``ratio``; a selected sample loses one
  modality chosen uniformly among its present ones. Samples with fewer than two present modalities
  are never selected (a sample keeps at least one modality).

  Args:
    key: PRNG key.
    batch: ``present`` ``[B, M]`` with ``M >= 2``.
    ratio: scalar or per-sample ``[B]`` selection probability in [0, 1] (may be traced); EMMR
      sweeps 0-0.5.

  Returns:
    A new batch: the dropped modality has ``present`` False and zero features; ``step_mask`` and
    ``full_features`` are unchanged.

  Raises:
    ValueError: ``ratio`` outside [0, 1] (when concrete), or ``batch.modalities`` has fewer than 2.
  """
  ratio = _check_level("ratio", ratio, 0.0, 1.0, batch)
  if batch.num_modalities < 2:
    raise ValueError(
        f"batch.modalities: drop_one_modality needs at least 2 modalities, got "
        f"{list(batch.modalities)}")
  select_key, which_key = jax.random.split(key)
  present = jnp.asarray(batch.present)
  b, num_mod = present.shape
  selected = jax.random.bernoulli(select_key, ratio, (b,)) & (present.sum(axis=1) >= 2)
  scores = jnp.where(present, jax.random.uniform(which_key, (b, num_mod)), -1.0)
  which = jax.nn.one_hot(jnp.argmax(scores, axis=1), num_mod, dtype=bool)  # Shape: [B, M]
  return _with_presence(batch, present & ~(which & selected[:, None]))


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
  """The ``2^M − 1`` non-empty subsets of ``modalities`` (fixed-missing conditions).

  Order: by size, then ``itertools.combinations`` order of the positions in ``modalities``. For
  ``("text", "audio", "vision")``: ``(t,), (a,), (v,), (t, a), (t, v), (a, v), (t, a, v)`` — the
  rows of EASE Table 3 ({l}/{a}/{v}/{l,a}/{l,v}/{a,v}) followed by the full set; EUAR Table 2 lists
  the same 7 for the order ``("text", "vision", "audio")``.

  Raises:
    ValueError: ``modalities`` empty or with duplicates.
  """
  modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
  if not modalities or len(set(modalities)) != len(modalities):
    raise ValueError(f"modalities: expected distinct names, got {list(modalities)}")
  return [
      subset for size in range(1, len(modalities) + 1)
      for subset in itertools.combinations(modalities, size)
  ]


def keep_modalities(batch: Batch, subset: str | Sequence[str]) -> Batch:
  """Fixed missing: every sample keeps only the modalities in ``subset`` (EUAR Table 2).

  Deterministic (no key). ``present[:, m]`` becomes ``present[:, m] & (m in subset)`` and the
  features of the other modalities are zeroed; ``step_mask`` and ``full_features`` are unchanged.

  Args:
    batch: the batch.
    subset: modality names to keep (a single name may be passed as a string); static under jit.

  Raises:
    ValueError: ``subset`` empty or naming a modality not in ``batch.modalities``.
  """
  keep = np.zeros(batch.num_modalities, bool)
  keep[list(_modality_indices("subset", batch, subset))] = True
  return _with_presence(batch, jnp.asarray(batch.present) & keep)


# ---------------------------------------------------------------------------------- intra-modal
def mask_time_steps(key: jax.Array, batch: Batch, rate: Any) -> Batch:
  """Intra-modal missingness: random time-step masking (EASE §4.3, the LNLN protocol).

  Every observed step (real sample, present modality, ``step_mask`` True) of every modality is
  masked independently with probability ``rate``: its features become 0 and its ``step_mask``
  False. The draw for modality ``i`` is ``bernoulli(fold_in(key, i), rate, [B, T_i])``.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``, ``step_mask[m]`` ``[B, T_m]``.
    rate: scalar or per-sample ``[B]`` in [0, 1] (may be traced); EASE sweeps 0, 0.1, …, 0.9;
      its training (LNLN) draws a per-sample rate from U(0, 1).

  Returns:
    A new batch with updated ``features`` and ``step_mask``.

  Raises:
    ValueError: ``rate`` outside [0, 1] (when concrete).
  """
  rate = _check_level("rate", rate, 0.0, 1.0, batch)
  rate = rate[:, None] if rate.ndim else rate  # Shape: [] or [B, 1]
  features, step_mask = dict(batch.features), dict(batch.step_mask)
  for i, m in enumerate(batch.modalities):
    x = jnp.asarray(batch.features[m])
    hit = jax.random.bernoulli(jax.random.fold_in(key, i), rate, x.shape[:2]) & _observed(batch, i)
    features[m] = jnp.where(hit[..., None], 0, x).astype(x.dtype)
    step_mask[m] = jnp.asarray(batch.step_mask[m]) & ~hit
  return batch.replace(features=features, step_mask=step_mask)


# ---------------------------------------------------------------------------------- noise
def gaussian_noise(
    key: jax.Array, batch: Batch, variance: Any, modalities: Names = None) -> Batch:
  """Additive Gaussian noise ``x + √variance · ε``, ``ε ~ N(0, 1)`` (EUAR Table 3).

  Applied to the observed entries of ``modalities``; ``ε`` for modality ``i`` is
  ``jax.random.normal(fold_in(key, i), [B, T_i, D_i])``.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    variance: ``>= 0``: scalar, per-sample ``[B]`` or per-sample-and-modality ``[B, M]`` (may be
      traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: negative ``variance`` (when concrete) or unknown ``modalities``.
  """
  std = jnp.sqrt(_check_level("variance", variance, 0.0, None, batch, per_modality=True))
  return _perturb(
      key, batch, modalities,
      lambda k, x, _, i: x + _sample_level(std, i) * jax.random.normal(k, x.shape, jnp.float32))


def salt_pepper_noise(
    key: jax.Array, batch: Batch, amount: Any, modalities: Names = None) -> Batch:
  """Salt-and-pepper noise: a fraction ``amount`` of entries set to the feature's min or max.

  For modality ``m`` and feature dimension ``d``, ``lo_d`` / ``hi_d`` are the min / max of
  ``features[m][..., d]`` over the batch's observed entries (computed from the input batch). With
  ``u ~ U[0, 1)`` per entry (``jax.random.uniform(fold_in(key, i), [B, T, D])``): ``u < amount/2``
  -> ``lo_d``, ``amount/2 <= u < amount`` -> ``hi_d``, otherwise unchanged (EUAR Table 3; the image
  version sets pixels to 0 / 255).

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    amount: in [0, 1]: scalar, per-sample ``[B]`` or per-sample-and-modality ``[B, M]`` (may be
      traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: ``amount`` outside [0, 1] (when concrete) or unknown ``modalities``.
  """
  amount = _check_level("amount", amount, 0.0, 1.0, batch, per_modality=True)

  def fn(k, x, observed, i):
    lo = jnp.min(jnp.where(observed, x, jnp.inf), axis=(0, 1))  # Shape: [D]
    hi = jnp.max(jnp.where(observed, x, -jnp.inf), axis=(0, 1))  # Shape: [D]
    u = jax.random.uniform(k, x.shape)
    a = _sample_level(amount, i)
    return jnp.where(u < a / 2, lo, jnp.where(u < a, hi, x))

  return _perturb(key, batch, modalities, fn)


def mix_noise(key: jax.Array, batch: Batch, rate: Any, modalities: Names = None) -> Batch:
  """Noise mixing ``(1 − NR) · U + NR · ε``, ``ε ~ N(0, 1)`` (SAM-LML eq. 35).

  ``ε`` for modality ``i`` is ``jax.random.normal(fold_in(key, i), [B, T_i, D_i])`` (the same draw
  as :func:`gaussian_noise`). SAM-LML applies it to all modalities of all samples, NR 0.1-0.7.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    rate: the noisy rate NR, scalar or per-sample ``[B]`` in [0, 1] (may be traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: ``rate`` outside [0, 1] (when concrete) or unknown ``modalities``.
  """
  rate = _check_level("rate", rate, 0.0, 1.0, batch)

  def fn(k, x, _, i):
    r = _sample_level(rate, i)
    return (1 - r) * x + r * jax.random.normal(k, x.shape, jnp.float32)

  return _perturb(key, batch, modalities, fn)


def laplace_noise(key: jax.Array, batch: Batch, scale: Any, modalities: Names = None) -> Batch:
  """Additive Laplace noise ``x + scale · ε``, ``ε ~ Laplace(0, 1)`` (SAM-LML App. A.14).

  The noise has variance ``2 · scale²`` and mean absolute value ``scale``; ``ε`` for modality
  ``i`` is ``jax.random.laplace(fold_in(key, i), [B, T_i, D_i])``.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    scale: scalar or per-sample ``[B]``, ``>= 0`` (may be traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: negative ``scale`` (when concrete) or unknown ``modalities``.
  """
  scale = _check_level("scale", scale, 0.0, None, batch)
  return _perturb(
      key, batch, modalities,
      lambda k, x, _, i: x + _sample_level(scale, i) * jax.random.laplace(k, x.shape, jnp.float32))


def random_erasing(key: jax.Array, batch: Batch, rate: Any, modalities: Names = None) -> Batch:
  """Random erasing: each observed entry is set to 0 with probability ``rate`` (SAM-LML App. A.14).

  Entries are single feature values (not whole steps; ``step_mask`` is unchanged — use
  :func:`mask_time_steps` for missing steps). The draw for modality ``i`` is
  ``bernoulli(fold_in(key, i), rate, [B, T_i, D_i])``.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    rate: scalar or per-sample ``[B]`` in [0, 1] (may be traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: ``rate`` outside [0, 1] (when concrete) or unknown ``modalities``.
  """
  rate = _check_level("rate", rate, 0.0, 1.0, batch)
  return _perturb(
      key, batch, modalities,
      lambda k, x, _, i: jnp.where(jax.random.bernoulli(k, _sample_level(rate, i), x.shape), 0, x))


def laplace_or_erasing(key: jax.Array, batch: Batch, rate: Any, modalities: Names = None) -> Batch:
  """SAM-LML App. A.14: each sample gets one noise type, Laplace or random erasing, equal odds.

  Laplace samples: ``(1 − NR) · x + NR · ε`` with ``ε ~ Laplace(0, 1/√2)`` (unit variance: eq. 35
  with Laplace instead of Gaussian noise). Erasing samples: each observed entry is zeroed with
  probability ``NR``. The per-sample choice is ``bernoulli(split(key)[0], 0.5, [B])`` (True =
  Laplace), shared by the sample's modalities; modality ``i`` draws from
  ``fold_in(split(key)[1], i)``.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    rate: the noisy rate NR, scalar or per-sample ``[B]`` in [0, 1] (may be traced).
    modalities: names to corrupt (``None`` = all); static under jit.

  Raises:
    ValueError: ``rate`` outside [0, 1] (when concrete) or unknown ``modalities``.
  """
  rate = _check_level("rate", rate, 0.0, 1.0, batch)
  choice_key, key = jax.random.split(key)
  laplace = jax.random.bernoulli(choice_key, 0.5, (batch.batch_size,))[:, None, None]

  def fn(k, x, _, i):
    return laplace_or_erase(k, x, _sample_level(rate, i), laplace)

  return _perturb(key, batch, modalities, fn)


def laplace_or_erase(key: jax.Array, x: jax.Array, rate: Any, laplace: Any) -> jax.Array:
  """The array form of :func:`laplace_or_erasing`: ``(1 − r) · x + r · ε``, ``ε ~ Laplace(0,
  1/√2)`` where ``laplace`` is True, else ``x`` with each entry zeroed with probability ``r``.

  ``key`` splits into the Laplace and the erasing draw (shape ``x.shape``); ``rate`` and
  ``laplace`` broadcast against ``x``. SAM-LML uses it on unimodal representations too (App. A.14).
  """
  noise_key, erase_key = jax.random.split(key)
  noise = jax.random.laplace(noise_key, x.shape, jnp.float32) / np.sqrt(2.0)
  erased = jnp.where(jax.random.bernoulli(erase_key, rate, x.shape), 0, x)
  return jnp.where(laplace, (1 - rate) * x + rate * noise, erased)


# ---------------------------------------------------------------------------------- sample-wise
def noisy_views(key: jax.Array, batch: Batch, fraction: Any = 0.5) -> jax.Array:
  """``[B, M]`` bool: a uniformly random subset of each sample's present modalities.

  Sample ``b`` with ``n_b`` present modalities gets
  ``k_b = min(⌊fM⌋ + Bernoulli(fM − ⌊fM⌋), n_b)`` of them (``f = fraction``, ``M`` modalities), so ``E[k_b] = fM`` when nothing is absent: with
  ``f = 0.5`` exactly half of the views for even ``M`` (3 of 6 Handwritten views, 1 of 2 CUB
  views), 1 or 2 of 3 with equal odds. The subset is uniform among the present modalities; the
  count and the order use ``split(key)``.

  Args:
    key: PRNG key.
    batch: supplies ``present [B, M]``.
    fraction: scalar in [0, 1] (may be traced).

  Raises:
    ValueError: ``fraction`` outside [0, 1] (when concrete).
  """
  fraction = _check_level("fraction", fraction, 0.0, 1.0, batch)
  present = jnp.asarray(batch.present)
  # Absent modalities rank last: the first k of the order are present ones (k capped by present).
  k, rank = _random_count_and_order(key, present, fraction * batch.num_modalities,
                                    absent_first=False)
  return present & (rank < k[:, None])


def samplewise_gaussian_noise(key: jax.Array, batch: Batch, std: Any, fraction: Any = 0.5
                              ) -> Batch:
  """Sample-wise Gaussian noise: ``x + std · ε`` on a random subset of each sample's modalities.

  EUAR Fig. 1's "sample-wise noise" and the multi-view benchmarks of TMC / QMF / RCML (Gaussian
  noise of strength ``std`` on part of the views, in standardised units): the noisy views of each
  sample are :func:`noisy_views` ``(split(key)[0], batch, fraction)``; the noise is
  :func:`gaussian_noise` with key ``split(key)[1]`` and per-sample-and-modality variance
  ``std² · noisy``, so the other modalities are left bit-identical.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    std: noise strength (standard deviation) ``>= 0``, scalar or per-sample ``[B]`` (may be traced).
    fraction: share of the modalities made noisy per sample (see :func:`noisy_views`).

  Raises:
    ValueError: negative ``std`` or ``fraction`` outside [0, 1] (when concrete).
  """
  std = _check_level("std", std, 0.0, None, batch)
  view_key, noise_key = jax.random.split(key)
  noisy = noisy_views(view_key, batch, fraction)
  std = std[:, None] if std.ndim else std
  return gaussian_noise(noise_key, batch, jnp.square(std) * noisy)


def samplewise_salt_pepper_noise(key: jax.Array, batch: Batch, amount: Any, fraction: Any = 0.5
                                 ) -> Batch:
  """Sample-wise salt-and-pepper noise: :func:`salt_pepper_noise` on a random subset of modalities.

  The noisy views are :func:`noisy_views` ``(split(key)[0], batch, fraction)``; on them a fraction
  ``amount`` of the entries is set to the feature's batch min or max (key ``split(key)[1]``); the
  other modalities are left bit-identical.

  Args:
    key: PRNG key.
    batch: ``features[m]`` ``[B, T_m, D_m]``.
    amount: scalar or per-sample ``[B]`` in [0, 1] (may be traced).
    fraction: share of the modalities made noisy per sample (see :func:`noisy_views`).

  Raises:
    ValueError: ``amount`` or ``fraction`` outside [0, 1] (when concrete).
  """
  amount = _check_level("amount", amount, 0.0, 1.0, batch)
  view_key, noise_key = jax.random.split(key)
  noisy = noisy_views(view_key, batch, fraction)
  amount = amount[:, None] if amount.ndim else amount
  return salt_pepper_noise(noise_key, batch, amount * noisy)
