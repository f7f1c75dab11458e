"""The named, leveled corruption protocols that test sweeps and train-time corruption share.

A :class:`Protocol` is one corruption function of :mod:`mmjax.data.corruption` with the levels the
papers sweep. ``apply(key, batch, level)`` takes a scalar level, or (numeric protocols) a per-sample
``[B]`` array of levels — which is how :mod:`mmjax.data.train_corruption` gives every training
sample its own level. Level 0 is the identity for every numeric protocol.

========================  =============================================  =========================
protocol                  levels (default)                               source
========================  =============================================  =========================
``missing_rate``          ``drop_modalities`` MR 0.0 ... 0.7             SAM-LML eq. 34, App. A.5
``fixed_subsets``         ``keep_modalities``: the 2^M - 1 subsets       EUAR Table 2, EASE Table 3
``drop_one``              ``drop_one_modality`` ratio 0.0 ... 0.5        EMMR Table 1
``time_mask``             ``mask_time_steps`` rate 0.0 ... 0.9           EASE §4.3
``gaussian``              ``gaussian_noise`` variance 0 ... 4            EUAR Table 3
``salt_pepper``           ``salt_pepper_noise`` amount 0 ... 0.4         EUAR Table 3
``mix``                   ``mix_noise`` NR 0.0 ... 0.7                   SAM-LML eq. 35
``laplace_erasing``       ``laplace_or_erasing`` NR 0.0 ... 0.7          SAM-LML App. A.14
``sample_gaussian``       ``samplewise_gaussian_noise`` std 0 ... 10     EUAR Fig. 1; TMC / QMF
``sample_salt_pepper``    ``samplewise_salt_pepper_noise`` 0 ... 0.5     EUAR Fig. 1
========================  =============================================  =========================

``gaussian`` ... ``laplace_erasing`` hit every sample's ``noise_modalities`` (default: all);
``sample_*`` hit a random ``view_fraction`` of each sample's modalities (default half,
:func:`mmjax.data.noisy_views`), with Gaussian strength as a standard deviation in standardised units
(the convention of the multi-view benchmarks), where ``gaussian`` follows EUAR Table 3's variance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from mmjax.data import corruption
from mmjax.data.batch import Batch

NOISE_VARIANCES = (0.0, 0.5, 1.0, 2.0, 4.0)
SALT_PEPPER_AMOUNTS = (0.0, 0.05, 0.1, 0.2, 0.4)
NOISE_STRENGTHS = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0)
SAMPLE_SALT_PEPPER_AMOUNTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
RATES_07 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
RATES_09 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RATIOS_05 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """``apply(key, batch, level) -> batch`` swept over ``levels``; ``axis`` labels the plot.

  ``high`` is the largest level ``apply`` accepts (``None``: unbounded), for numeric protocols.
  """

  name: str
  levels: tuple[Any, ...]
  apply: Callable[[jax.Array, Batch, Any], Batch]
  axis: str
  high: float | None = 1.0

  @property
  def numeric(self) -> bool:
    """Whether the levels are numbers (a train-time distribution can be drawn over them)."""
    return not isinstance(self.levels[0], tuple)

  @property
  def clean_level(self) -> Any:
    """The uncorrupted level: 0 for numeric protocols, the full modality set for subsets."""
    return self.levels[0] if self.numeric else max(self.levels, key=len)

  @property
  def averaged_levels(self) -> tuple[Any, ...]:
    """The levels a table's "mean" averages: every level of a numeric protocol (EASE Tables 1-2
    average the rates 0 ... 0.9), every incomplete subset of ``fixed_subsets`` (EASE Table 3
    averages {l}/{a}/{v}/{l,a}/{l,v}/{a,v}, the full set excluded)."""
    if self.numeric:
      return self.levels
    return tuple(level for level in self.levels if level != self.clean_level)


def protocols(modalities: Sequence[str], noise_modalities: Sequence[str] | None = None,
              view_fraction: float = 0.5) -> dict[str, Protocol]:
  """Every protocol of the module table for data with ``modalities``.

  Args:
    modalities: the data's modality names (the ``fixed_subsets`` levels).
    noise_modalities: modalities the all-sample noises hit (default: all).
    view_fraction: share of each sample's modalities the ``sample_*`` noises hit.
  """
  noisy = tuple(noise_modalities) if noise_modalities else None
  table = [
      Protocol("missing_rate", RATES_07, corruption.drop_modalities, "missing rate"),
      Protocol("fixed_subsets", tuple(corruption.modality_subsets(modalities)),
               lambda key, b, subset: corruption.keep_modalities(b, subset),
               "available modalities"),
      Protocol("drop_one", RATIOS_05, corruption.drop_one_modality, "missing ratio"),
      Protocol("time_mask", RATES_09, corruption.mask_time_steps, "masked time-step rate"),
      Protocol("gaussian", NOISE_VARIANCES,
               lambda key, b, v: corruption.gaussian_noise(key, b, v, noisy), "noise variance",
               high=None),
      Protocol("salt_pepper", SALT_PEPPER_AMOUNTS,
               lambda key, b, a: corruption.salt_pepper_noise(key, b, a, noisy),
               "corrupted fraction"),
      Protocol("mix", RATES_07, lambda key, b, r: corruption.mix_noise(key, b, r, noisy),
               "noise rate"),
      Protocol("laplace_erasing", RATES_07,
               lambda key, b, r: corruption.laplace_or_erasing(key, b, r, noisy), "noise rate"),
      Protocol("sample_gaussian", NOISE_STRENGTHS,
               lambda key, b, s: corruption.samplewise_gaussian_noise(key, b, s, view_fraction),
               f"noise std on {view_fraction:g} of the views", high=None),
      Protocol("sample_salt_pepper", SAMPLE_SALT_PEPPER_AMOUNTS,
               lambda key, b, a: corruption.samplewise_salt_pepper_noise(key, b, a, view_fraction),
               f"corrupted fraction on {view_fraction:g} of the views"),
  ]
  return {p.name: p for p in table}


def select(names: Sequence[str], available: dict[str, Protocol]) -> list[Protocol]:
  """``available[name]`` for each name; unknown names raise ``ValueError`` listing the known."""
  unknown = [n for n in names if n not in available]
  if unknown:
    raise ValueError(f"protocols: unknown {unknown}; available: {sorted(available)}")
  return [available[n] for n in names]


def level_name(level: Any) -> str:
  return "+".join(level) if isinstance(level, tuple) else f"{level:g}"
