"""Train-time corruption: every training batch corrupted from the step key, identically for any method.

``config.train_corruption`` is a string naming protocols of :mod:`mmjax.data.protocols` and the
distribution of their levels; the trainer (:func:`mmjax.train.make_train_step`) applies it to each
training batch with ``fold_in(step_key, TRAIN_CORRUPTION_STREAM)`` before the method's loss, so
every method trained with one spec sees the same corrupted training data (for a given seed and
batch order), and evaluation (``predict``) never sees it. Grammar::

  spec  := "" | "none" | "method" | "fair" | term ("+" term)*
  term  := <protocol> ":" <level>                 constant level
         | <protocol> ":" <low> ":" <high>        per-sample level ~ U(low, high)
         | "clean:" <fraction>                    per-sample probability of no corruption at all

Terms apply in order (e.g. ``missing_rate:0:0.5+sample_gaussian:0:4+clean:0.5``). Every sample
draws its own level per term; a *clean* sample (probability ``fraction``) gets level 0 in every
term, which is the identity. ``"method"`` is the method's own paper regime
(``mmjax.methods.default_train_corruption``: EASE drops modalities at rate 0.5, EMMR one modality
for half the samples, the others nothing); ``"fair"`` is :data:`FAIR_RECIPE`, the one regime the
fair comparisons of ``docs/results.md`` give every method. See ``docs/protocols.md``.

Randomness: with ``k = fold_in(step_key, TRAIN_CORRUPTION_STREAM)``, the clean draw uses
``fold_in(k, 0)``, term ``j``'s levels ``fold_in(k, 2 j + 1)`` and its protocol
``fold_in(k, 2 j + 2)``; same step key, same corruption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.data.batch import Batch
from mmjax.data.protocols import Protocol

# fold_in constant separating the corruption's randomness from the method's (which gets the step
# key itself), so a method's own draws are the same with and without train-time corruption.
TRAIN_CORRUPTION_STREAM = 0x7C0
NO_CORRUPTION = ("", "none")
# The fair-comparison regime: half the samples clean; the other half miss modalities at a rate
# ~ U(0, 0.5) and carry Gaussian noise of std ~ U(0, 4) on a random half of their views.
FAIR_RECIPE = "missing_rate:0:0.5+sample_gaussian:0:4+clean:0.5"


@dataclasses.dataclass(frozen=True)
class Term:
  """One protocol with per-sample levels ~ U(low, high) (constant when ``low == high``)."""

  protocol: Protocol
  low: float
  high: float


@dataclasses.dataclass(frozen=True)
class TrainCorruption:
  """A parsed ``config.train_corruption``: ``corruption(key, batch) -> batch`` (see module doc)."""

  spec: str
  terms: tuple[Term, ...]
  clean_fraction: float = 0.0

  def levels(self, key: jax.Array, batch_size: int) -> tuple[jax.Array, list[jax.Array]]:
    """``(clean [B] bool, [levels [B] float32 per term])``: what :meth:`__call__` applies.

    A clean sample's level is 0 in every term.
    """
    clean = jax.random.bernoulli(jax.random.fold_in(key, 0), self.clean_fraction, (batch_size,))
    levels = []
    for j, term in enumerate(self.terms):
      if term.low == term.high:
        level = jnp.full((batch_size,), term.low, jnp.float32)
      else:
        level = jax.random.uniform(jax.random.fold_in(key, 2 * j + 1), (batch_size,),
                                   minval=term.low, maxval=term.high)
      levels.append(jnp.where(clean, 0.0, level))
    return clean, levels

  def __call__(self, key: jax.Array, batch: Batch) -> Batch:
    """``batch`` with every term applied in order at its per-sample levels."""
    _, levels = self.levels(key, batch.batch_size)
    for j, (term, level) in enumerate(zip(self.terms, levels)):
      batch = term.protocol.apply(jax.random.fold_in(key, 2 * j + 2), batch, level)
    return batch


def parse_train_corruption(spec: str, available: Mapping[str, Protocol],
                           field: str = "config.train_corruption") -> TrainCorruption | None:
  """The :class:`TrainCorruption` of ``spec`` (``None`` for no corruption).

  ``"method"`` must be resolved by the caller first; ``"fair"`` means :data:`FAIR_RECIPE`.

  Raises:
    ValueError: naming ``field``, for an unknown protocol, a protocol without numeric levels, a
      malformed term, or levels outside the protocol's range.
  """
  if not isinstance(spec, str):
    raise ValueError(f"{field}: expected a string, got {spec!r}")
  text = FAIR_RECIPE if spec.strip() == "fair" else spec.strip()
  if text == "method":
    raise ValueError(f"{field}: 'method' must be resolved to the method's default first")
  if text in NO_CORRUPTION:
    return None
  terms, clean = [], 0.0
  for raw in text.split("+"):
    name, *args = [part.strip() for part in raw.split(":")]
    try:
      values = [float(a) for a in args]
    except ValueError:
      values = []
    if not 1 <= len(values) <= (1 if name == "clean" else 2):
      raise ValueError(f"{field}: cannot read the term {raw!r}; expected <protocol>:<level>, "
                       f"<protocol>:<low>:<high> or clean:<fraction> (spec {spec!r})")
    if name == "clean":
      if not 0.0 <= values[0] <= 1.0:
        raise ValueError(f"{field}: clean fraction must lie in [0, 1], got {values[0]}")
      clean = values[0]
      continue
    if name not in available:
      raise ValueError(f"{field}: unknown protocol {name!r}; available: "
                       f"{sorted(n for n, p in available.items() if p.numeric)}")
    protocol = available[name]
    if not protocol.numeric:
      raise ValueError(f"{field}: {name!r} has no numeric levels to draw training levels from")
    low, high = values[0], values[-1]
    upper = float("inf") if protocol.high is None else protocol.high
    if not 0.0 <= low <= high <= upper:
      raise ValueError(f"{field}: {name} levels must satisfy 0 <= low <= high <= {upper:g}, "
                       f"got {low:g}:{high:g}")
    terms.append(Term(protocol, low, high))
  if not terms:
    raise ValueError(f"{field}: {spec!r} names no protocol")
  return TrainCorruption(spec=text, terms=tuple(terms), clean_fraction=clean)


def describe(corruption: TrainCorruption | None) -> str:
  """One log line: what the training batches go through."""
  if corruption is None:
    return "train-time corruption: none"
  parts = [f"{t.protocol.name} "
           + (f"{t.low:g}" if t.low == t.high else f"~U({t.low:g}, {t.high:g})")
           for t in corruption.terms]
  clean = (f", {corruption.clean_fraction:g} of the samples clean"
           if corruption.clean_fraction else "")
  return "train-time corruption: " + " then ".join(parts) + " per sample" + clean
