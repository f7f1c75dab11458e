"""The embedded default dataset: a documented generative model of multimodal sentiment data.

Every sample ``i`` has a latent sentiment score ``s_i ∈ [-3, 3]`` and a shared nuisance ``ν_i``
(a speaker / context bias). Each modality ``m`` (``text``, ``audio``, ``vision`` in this order)
reads the sentiment through its own noisy, biased channel and writes it, together with
sentiment-free nuisance, into a padded sequence of feature vectors:

    s_i      = 0 with probability ``zero_fraction``, else clip(±1.2 + N(0, 1), -3, 3)  (equal odds)
    ν_i      ~ N(0, 1)                                    shared by all modalities of sample i
    r_{m,i}  = s_i + ρ_m ν_i + σ_m ε_{m,i},  ε ~ N(0, 1)  the modality's reading of the sentiment
    z_{m,i}  = [a_m r_{m,i},  b_m |r_{m,i}|,  λ_m ν_i,  κ_m ξ_{m,i}],  ξ ~ N(0, I_K)   [3 + K]
    x_{m,i,t} = g_{i,t} W_m z_{m,i} + σ_step η_{m,i,t},  η ~ N(0, I_D)   for t < L_{m,i}   [D_m]
    x_{m,i,t} = 0                                                         for t >= L_{m,i}

``W_m`` is a fixed random projection ``[D_m, 3 + K]`` (entries N(0, 1/D_m), so columns have unit
norm in expectation) shared by all splits; ``g_{i,t} = 1 + 0.5 sin(2π t / L_{m,i} + φ_i)`` is a
time-varying gain whose mean over the ``L_{m,i}`` valid steps is exactly 1 (``g = 1`` when
``L = 1``), so masked mean-pooling recovers ``W_m z_{m,i}`` up to averaged step noise. The
utterance length is drawn once per sample as a fraction ``f_i ~ U(min_length_fraction, 1)`` of
every modality's ``T_m`` (``L_{m,i} = ceil(f_i T_m)``), so sequences with equal ``T_m`` are
aligned; ``T_m = 1`` gives utterance-level features.

Why it is hard in the right ways:

* **Different informativeness.** Text reads the sentiment with little private noise and a strong
  gain; audio with more noise, plus an intensity cue ``|r|`` (arousal) that a linear model cannot
  use; vision with the most noise. Single-modality prediction is imperfect, text is best.
* **Shared nuisance.** ``ν`` biases the text and audio readings (``ρ_m``), and vision displays it
  on its own (``λ_v``): fusion can subtract the bias that no single modality can, so all modalities
  together beat text alone and even the weakest modality has a job.
* **Noise sensitivity.** The private nuisance ``ξ`` (``K = 4`` dims, strong ``κ_m``) inflates every
  feature's variance; a linear model can project it out, but after standardisation a unit-variance
  perturbation is large compared with the sentiment signal, so additive noise hurts.
* **Variable lengths.** Short utterances average fewer steps and are noisier (heteroscedastic).

Labels: regression ``y_i = clip(s_i + label_noise · N(0, 1), -3, 3)`` (float32); classification
``y_i = sentiment_to_class(s_i + label_noise · N(0, 1), num_classes)`` (int32). Modality
parameters ``(a, b, σ, ρ, λ, κ)`` are in :data:`DEFAULT_MODALITIES`; ``docs/synthetic.md`` has the
table and the measured difficulty.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.batch import TASKS, Batch
from mmjax.data.dataset import SPLITS, Dataset

NUISANCE_DIM = 4  # K: dimension of each modality's private nuisance ξ.
GAIN_AMPLITUDE = 0.5  # amplitude of the time-varying gain g_{i,t}.
SENTIMENT_MODE = 1.2  # the two mixture components of s sit at ±SENTIMENT_MODE.
CLASS_BINS = (2, 3, 7)  # supported num_classes for task="classification".
CHUNK = 256  # samples drawn per call of the one compiled generator.


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """How one modality reads and displays the latent sentiment (see the module docstring).

  Attributes:
    seq_len: padded sequence length ``T_m``.
    dim: feature dimension ``D_m``.
    signal: ``a_m``, gain of the sentiment reading ``r`` in the features.
    intensity: ``b_m``, gain of the intensity cue ``|r|``.
    reading_noise: ``σ_m``, std of the private per-sample reading noise.
    bias: ``ρ_m``, loading of the shared nuisance ``ν`` on the reading.
    bias_visibility: ``λ_m``, gain with which ``ν`` appears on its own in the features.
    nuisance: ``κ_m``, gain of the private sentiment-free nuisance ``ξ``.
  """

  seq_len: int
  dim: int
  signal: float
  intensity: float
  reading_noise: float
  bias: float
  bias_visibility: float
  nuisance: float


DEFAULT_MODALITIES: dict[str, ModalitySpec] = {
    "text": ModalitySpec(seq_len=20, dim=32, signal=1.0, intensity=0.0, reading_noise=0.6,
                         bias=0.45, bias_visibility=0.0, nuisance=3.0),
    "audio": ModalitySpec(seq_len=20, dim=16, signal=0.6, intensity=0.6, reading_noise=0.9,
                          bias=0.45, bias_visibility=0.0, nuisance=3.0),
    "vision": ModalitySpec(seq_len=20, dim=16, signal=0.5, intensity=0.0, reading_noise=1.5,
                           bias=0.0, bias_visibility=1.0, nuisance=3.0),
}


def sentiment_to_class(score: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
  """Bins sentiment scores into classes.

  ``num_classes=2``: 0 negative (``s < 0``), 1 non-negative (``s >= 0``, the ``acc2_has0``
  convention). ``num_classes=3``: 0 negative (``s < -0.5``), 1 neutral (``-0.5 <= s <= 0.5``),
  2 positive (``s > 0.5``). ``num_classes=7``: ``round(clip(s, -3, 3)) + 3`` with
  round-half-to-even, the ``acc7`` bins.

  Args:
    score: ``[...]`` float sentiment scores.
    num_classes: one of :data:`CLASS_BINS`.

  Returns:
    ``[...]`` int32 class indices in ``[0, num_classes)``.

  Raises:
    ValueError: if ``num_classes`` is not supported.
  """
  score = jnp.asarray(score)
  if num_classes == 2:
    label = score >= 0
  elif num_classes == 3:
    label = (score >= -0.5).astype(jnp.int32) + (score > 0.5).astype(jnp.int32)
  elif num_classes == 7:
    label = jnp.round(jnp.clip(score, -3, 3)) + 3
  else:
    raise ValueError(f"num_classes: expected one of {CLASS_BINS}, got {num_classes!r}")
  return label.astype(jnp.int32)


def make_synthetic(
    key: jax.Array,
    n_train: int = 1200,
    n_valid: int = 300,
    n_test: int = 300,
    *,
    task: str = "regression",
    num_classes: int = 3,
    seq_len: int | Mapping[str, int] | None = None,
    dims: int | Mapping[str, int] | None = None,
    label_noise: float = 0.0,
    step_noise: float = 1.0,
    min_length_fraction: float = 0.5,
    zero_fraction: float = 0.05,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> Dataset:
  """Draws the synthetic MSA dataset described in the module docstring.

  The projections ``W_m`` come from ``fold_in(key, 0)`` and sample ``i`` of split ``j`` (train,
  valid, test) from ``fold_in(fold_in(key, j + 1), i)``: the same key and arguments give
  bit-identical arrays, changing ``n_test`` leaves the training samples unchanged, and a smaller
  split is a prefix of a larger one.

  Args:
    key: a ``jax.random`` key.
    n_train: training samples (>= 1).
    n_valid: validation samples (>= 0).
    n_test: test samples (>= 0).
    task: ``"regression"`` (float labels in ``[-3, 3]``) or ``"classification"``.
    num_classes: classes for classification, one of :data:`CLASS_BINS` (see
      :func:`sentiment_to_class`); ignored for regression.
    seq_len: padded length ``T_m``: one int for every modality or a mapping overriding some.
    dims: feature dimension ``D_m``: one int or a mapping overriding some.
    label_noise: std of Gaussian noise added to ``s`` before it becomes the label.
    step_noise: ``σ_step``, std of the per-step feature noise.
    min_length_fraction: lower end of the utterance-length fraction ``f_i``, in ``(0, 1]``.
    zero_fraction: probability that a sample's sentiment is exactly 0.
    modalities: name -> :class:`ModalitySpec`; defaults to :data:`DEFAULT_MODALITIES`
      (``text``, ``audio``, ``vision``). Its order is the dataset's modality order.

  Returns:
    ``Dataset`` named ``"synthetic"`` whose splits are NumPy ``Batch`` es with float32
    ``features [N, T_m, D_m]`` (zero at padded steps), ``step_mask [N, T_m]``,
    ``full_features = features``, all-true ``present`` and ``valid``, and ``label [N]``.

  Raises:
    ValueError: naming the argument that is out of range.
  """
  specs = _resolve_specs(modalities, seq_len, dims)
  sizes = {"train": n_train, "valid": n_valid, "test": n_test}
  for split, n in sizes.items():
    if not isinstance(n, (int, np.integer)) or n < (1 if split == "train" else 0):
      raise ValueError(f"n_{split}: expected an int >= {1 if split == 'train' else 0}, got {n!r}")
  if task not in TASKS:
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
  if task == "classification" and num_classes not in CLASS_BINS:
    raise ValueError(f"num_classes: expected one of {CLASS_BINS}, got {num_classes!r}")
  for name, value, ok, bound in (
      ("label_noise", label_noise, label_noise >= 0, ">= 0"),
      ("step_noise", step_noise, step_noise >= 0, ">= 0"),
      ("min_length_fraction", min_length_fraction, 0 < min_length_fraction <= 1, "in (0, 1]"),
      ("zero_fraction", zero_fraction, 0 <= zero_fraction <= 1, "in [0, 1]"),
  ):
    if not ok:
      raise ValueError(f"{name}: expected a value {bound}, got {value!r}")

  spec_items = tuple(specs.items())
  num_bins = num_classes if task == "classification" else None
  splits = {}
  for j, split in enumerate(SPLITS):
    n = sizes[split]
    chunks = [
        _draw_chunk(key, j, start, spec_items, num_classes=num_bins, label_noise=label_noise,
                    step_noise=step_noise, min_length_fraction=min_length_fraction,
                    zero_fraction=zero_fraction)
        for start in range(0, max(n, 1), CHUNK)  # >= 1 chunk, so an empty split keeps its dtypes
    ]
    features, step_mask, label = jax.tree.map(
        lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:n], *chunks)
    splits[split] = Batch.create(features, label, modalities=tuple(specs), step_mask=step_mask,
                                 task=task, num_classes=num_bins)
  return Dataset(name="synthetic", task=task, num_classes=num_bins, splits=splits)


@functools.partial(jax.jit, static_argnames=("specs", "num_classes"))
def _draw_chunk(
    key: jax.Array,
    split_index: int,
    start: int,
    specs: tuple[tuple[str, ModalitySpec], ...],
    *,
    num_classes: int | None,
    label_noise: float,
    step_noise: float,
    min_length_fraction: float,
    zero_fraction: float,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
  """Samples ``start .. start + CHUNK - 1`` of one split.

  Sample ``i`` of split ``j`` uses the key ``fold_in(fold_in(key, j + 1), i)`` and the projections
  come from ``fold_in(key, 0)``, so a sample does not depend on the split sizes (a smaller
  ``n_train`` gives a prefix of a larger one) and one compiled program serves every split.

  Returns:
    features ``m -> [CHUNK, T_m, D_m]``, step masks ``m -> [CHUNK, T_m]``, labels ``[CHUNK]``
    (float32 in ``[-3, 3]`` when ``num_classes`` is None, else int32 classes).
  """
  projections = tuple(
      jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), i),
                        (spec.dim, 3 + NUISANCE_DIM)) / math.sqrt(spec.dim)
      for i, (_, spec) in enumerate(specs))
  split_key = jax.random.fold_in(key, split_index + 1)
  keys = jax.vmap(lambda i: jax.random.fold_in(split_key, i))(start + jnp.arange(CHUNK))
  # Gaussians per sample: ε of s, ν, then per modality (ε_m [1], ξ_m [K], η_m [T_m D_m]), label.
  sizes = [1, 1, *(n for _, spec in specs for n in (1, NUISANCE_DIM, spec.seq_len * spec.dim)), 1]

  def draw_sample(sample_key):
    # Two PRNG calls per sample (uniforms, Gaussians), sliced in a fixed order: few threefry
    # invocations keep the compile short.
    k_uniform, k_normal = jax.random.split(sample_key)
    u_zero, u_sign, fraction, u_phase = jax.random.uniform(k_uniform, (4,))
    gauss = iter(jnp.split(jax.random.normal(k_normal, (sum(sizes),)), np.cumsum(sizes)[:-1]))
    sign = jnp.where(u_sign < 0.5, 1.0, -1.0)
    score = jnp.clip(sign * SENTIMENT_MODE + next(gauss)[0], -3.0, 3.0)
    score = jnp.where(u_zero < zero_fraction, 0.0, score)  # s
    bias = next(gauss)[0]  # ν
    fraction = min_length_fraction + (1.0 - min_length_fraction) * fraction  # f
    phase = 2 * jnp.pi * u_phase  # φ
    features, step_mask = {}, {}
    for (m, spec), projection in zip(specs, projections):
      reading = score + spec.bias * bias + spec.reading_noise * next(gauss)[0]  # r
      latent = jnp.concatenate([
          jnp.stack([spec.signal * reading, spec.intensity * jnp.abs(reading),
                     spec.bias_visibility * bias]),
          spec.nuisance * next(gauss),
      ])  # z, Shape: [3 + K]
      length = jnp.clip(jnp.ceil(fraction * spec.seq_len), 1, spec.seq_len)  # L
      t = jnp.arange(spec.seq_len)
      # Σ_{t<L} sin(2πt/L + φ) = 0 for L >= 2, so the gain averages to 1 over the valid steps.
      amplitude = jnp.where(length > 1, GAIN_AMPLITUDE, 0.0)
      gain = 1 + amplitude * jnp.sin(2 * jnp.pi * t / length + phase)  # g, Shape: [T]
      x = (gain[:, None] * (projection @ latent)[None, :]
           + step_noise * next(gauss).reshape(spec.seq_len, spec.dim))  # Shape: [T, D]
      step_mask[m] = t < length  # Shape: [T]
      features[m] = jnp.where(step_mask[m][:, None], x, 0.0)
    noisy = score + label_noise * next(gauss)[0]
    if num_classes is None:
      label = jnp.clip(noisy, -3.0, 3.0)
    else:
      label = sentiment_to_class(noisy, num_classes)
    return features, step_mask, label

  return jax.vmap(draw_sample)(keys)


def _resolve_specs(
    modalities: Mapping[str, ModalitySpec] | None,
    seq_len: int | Mapping[str, int] | None,
    dims: int | Mapping[str, int] | None,
) -> dict[str, ModalitySpec]:
  """Applies the ``seq_len`` / ``dims`` overrides to the modality specs, validating them."""
  specs = dict(DEFAULT_MODALITIES if modalities is None else modalities)
  if not specs:
    raise ValueError("modalities: at least one modality is required")
  for field, name, override in (("seq_len", "seq_len", seq_len), ("dim", "dims", dims)):
    if override is None:
      continue
    if not isinstance(override, Mapping):
      override = dict.fromkeys(specs, override)
    unknown = sorted(set(override) - set(specs))
    if unknown:
      raise ValueError(f"{name}: unknown modalities {unknown}, expected some of {list(specs)}")
    for m, value in override.items():
      specs[m] = dataclasses.replace(specs[m], **{field: value})
  for m, spec in specs.items():
    for field in ("seq_len", "dim"):
      value = getattr(spec, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field}[{m!r}]: expected a positive int, got {value!r}")
  return specs
