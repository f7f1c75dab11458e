"""Loaders for the on-disk formats of real multimodal data sets; each returns a :class:`Dataset`.

* :func:`load_mmsa_pickle` (``mmsa:``): MMSA toolkit ``aligned_50.pkl`` / ``unaligned_50.pkl``
  (MOSI, MOSEI) and SIMS ``unaligned_39.pkl``.
* :func:`load_sdk_pickle` (``sdk:``): CMU-MultimodalSDK pickle of MulT-family code
  (``mosi_data.pkl``).
* :func:`load_multiview_mat` (``multiview:``): multi-view MATLAB v5 ``.mat`` (TMC / QMF benchmarks).
* :func:`load_npz` (``npz:``): the generic ``.npz`` format for user data.

:func:`load_dataset` dispatches a ``"<source>:<path>"`` string through :data:`LOADERS`.
Every loader validates its file eagerly and raises ``FileNotFoundError`` for a missing path and
``ValueError`` naming the split / key / shape that is wrong. Features come out as float32 NumPy
arrays ``[N, T, D]`` with padded steps zeroed and ``step_mask`` false on them. The formats and every
convention taken here are written up in ``docs/datasets.md``.

Pickles execute code when loaded: only load files from a source you trust.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mmjax.data.batch import Batch
from mmjax.data.dataset import SPLITS, Dataset
from mmjax.data.synthetic import make_synthetic

PathLike = str | os.PathLike

SEQUENCE_MODALITIES = ("text", "audio", "vision")
NPZ_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}

# One split before batching: (features [N, T, D], step_mask [N, T], labels [N]).
_Part = tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]


# ==================================================================== MMSA toolkit pickles
def load_mmsa_pickle(
    path: PathLike, *, task: str = "regression", num_classes: int | None = None
) -> Dataset:
  """Loads an MMSA toolkit pickle (MOSI / MOSEI ``aligned_50.pkl``, ``unaligned_50.pkl``, SIMS
  ``unaligned_39.pkl``).

  File layout: ``{"train" | "valid" | "test": split}``, each split a dict with ``text``
  ``[N, L, D_t]`` (BERT features), optional ``text_bert`` ``[N, 3, L]`` (token ids / attention
  mask / segment ids), ``audio`` ``[N, T_a, D_a]``, ``vision`` ``[N, T_v, D_v]``,
  ``regression_labels`` ``[N]``, optional ``audio_lengths`` / ``vision_lengths`` ``[N]``
  (unaligned files) and ``classification_labels`` ``[N]``; ``id``, ``raw_text`` and SIMS's
  unimodal ``regression_labels_{T,A,V}`` are not used.

  Conversions:
    * ``-inf`` in ``audio`` and ``vision`` becomes 0 (as the MMSA toolkit's ``MMDataset``); any
      other NaN / inf is an error.
    * ``step_mask['text']`` = ``text_bert[:, 1, :] == 1`` (all true without ``text_bert``).
    * ``step_mask['audio' | 'vision']``: the first ``min(length, T)`` steps from
      ``<m>_lengths`` when present; otherwise (aligned files) the text mask when ``T == L`` —
      MMSA's models use the text lengths for aligned audio/vision — and all true when ``T != L``.
    * padded steps (mask false) are zeroed.
    * ``task='classification'``: ``classification_labels`` when present (``num_classes`` defaults
      to its maximum + 1), else the regression score s is binned: 3 classes (default, MMSA's
      negative / neutral / positive) ``[s < 0, s == 0, s > 0]``; 2 classes ``[s < 0, s >= 0]``.

  Args:
    path: the ``.pkl`` file.
    task: ``"regression"`` (float32 labels) or ``"classification"`` (int32 labels).
    num_classes: classification only: 2 or 3 for binned scores; default see above.

  Returns:
    A :class:`Dataset` with modalities ``("text", "audio", "vision")``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: unreadable pickle, missing split / key, wrong shape, mismatched sample counts,
      NaN or +inf features, bad lengths or labels.
  """
  path = _check_file(path)
  _check_task(task, num_classes)
  data = _read_split_pickle(path, split_aliases={})
  parts, raw_classes = {}, {}
  for split in SPLITS:
    where = f"{path.name}[{split!r}]"
    entry = data[split]
    _require_keys(entry, (*SEQUENCE_MODALITIES, "regression_labels"), where)
    score = _labels_1d(entry["regression_labels"], f"{where}['regression_labels']")
    score = score.astype(np.float32)
    n = score.shape[0]
    features = {
        m: _feature_array(entry[m], f"{where}[{m!r}]", n, "regression_labels", ndim=3)
        for m in SEQUENCE_MODALITIES
    }
    for m in ("audio", "vision"):
      features[m][features[m] == -np.inf] = 0.0
    for m, x in features.items():
      _check_finite(x, f"{where}[{m!r}]")
    text_mask = _text_mask(entry, features["text"].shape[1], n, where)
    step_mask = {"text": text_mask}
    for m in ("audio", "vision"):
      t = features[m].shape[1]
      if f"{m}_lengths" in entry:
        step_mask[m] = _prefix_mask(entry[f"{m}_lengths"], t, n, f"{where}['{m}_lengths']")
      elif t == text_mask.shape[1]:
        step_mask[m] = text_mask
      else:
        step_mask[m] = np.ones((n, t), bool)
    features = {m: np.where(step_mask[m][..., None], x, 0.0) for m, x in features.items()}
    parts[split] = (features, step_mask, score)
    if "classification_labels" in entry:
      raw_classes[split] = entry["classification_labels"]
  parts = _apply_task(parts, raw_classes, task, num_classes, path.name)
  return _make_dataset(f"mmsa:{path}", task, parts, num_classes)


# ==================================================================== MulT-style SDK pickles
def load_sdk_pickle(
    path: PathLike, *, task: str = "regression", num_classes: int | None = None
) -> Dataset:
  """Loads a CMU-MultimodalSDK-style pickle as used by MulT-family code (``mosi_data.pkl``).

  File layout: ``{"train" | "valid" | "test": split}`` (``"dev"`` is accepted for ``"valid"``),
  each split a dict with ``text`` ``[N, T, D_t]``, ``audio`` ``[N, T, D_a]``, ``vision``
  ``[N, T, D_v]``, ``labels`` ``[N, 1, 1]``, ``[N, 1]`` or ``[N]`` (squeezed) and ``id`` (unused).

  NaN and ``-inf`` in ``audio`` / ``vision`` become 0 (as MulT's loader does); any other NaN / inf
  is an error. All steps are valid. ``task='classification'`` bins the score like
  :func:`load_mmsa_pickle` (3 classes ``[s < 0, s == 0, s > 0]`` by default, 2 classes
  ``[s < 0, s >= 0]``). IEMOCAP's emotion labels ``[N, 4, 2]`` (MulT's ``iemocap_data.pkl``) become
  classes by :func:`iemocap_classes`: 4 emotions (default) or, with ``num_classes=2``, EMMR's
  negative / positive (neutral samples left out).

  Args:
    path: the ``.pkl`` file.
    task: ``"regression"`` (float32 labels) or ``"classification"`` (int32 labels).
    num_classes: classification only: 2 or 3 (default 3); for IEMOCAP labels 4 (default) or 2.

  Returns:
    A :class:`Dataset` with modalities ``("text", "audio", "vision")``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: unreadable pickle, missing split / key, wrong shape, mismatched sample counts,
      non-finite text or labels, IEMOCAP labels with ``task='regression'``.
  """
  path = _check_file(path)
  _check_task(task, num_classes)
  data = _read_split_pickle(path, split_aliases={"valid": "dev"})
  parts, layouts = {}, set()
  for split in SPLITS:
    where = f"{path.name}[{split!r}]"
    entry = data[split]
    _require_keys(entry, (*SEQUENCE_MODALITIES, "labels"), where)
    emotions = np.ndim(entry["labels"]) == 3 and np.shape(entry["labels"])[1:] == (4, 2)
    layouts.add(emotions)
    if len(layouts) > 1:
      raise ValueError(f"{where}['labels']: IEMOCAP emotion labels [N, 4, 2] in some splits and "
                       "scores in others")
    if emotions:
      if task != "classification":
        raise ValueError(f"{where}['labels']: IEMOCAP emotion labels [N, 4, 2] need "
                         "task='classification' (num_classes 4 or 2, see iemocap_classes)")
      score = iemocap_classes(entry["labels"], num_classes or 4, f"{where}['labels']")
    else:
      score = _labels_1d(entry["labels"], f"{where}['labels']").astype(np.float32)
    n = score.shape[0]
    features = {
        m: _feature_array(entry[m], f"{where}[{m!r}]", n, "labels", ndim=3)
        for m in SEQUENCE_MODALITIES
    }
    if emotions:  # rows without a class (neutral in the 2-class mapping) are left out
      features, score = {m: x[score >= 0] for m, x in features.items()}, score[score >= 0]
    for m in ("audio", "vision"):
      x = features[m]
      x[np.isnan(x) | (x == -np.inf)] = 0.0
    for m, x in features.items():
      _check_finite(x, f"{where}[{m!r}]")
    step_mask = {m: np.ones(x.shape[:2], bool) for m, x in features.items()}
    parts[split] = (features, step_mask, score)
  if emotions:
    num_classes = num_classes or 4
  else:
    parts = _apply_task(parts, {}, task, num_classes, path.name)
  return _make_dataset(f"sdk:{path}", task, parts, num_classes)


# MulT's IEMOCAP pickle: labels [N, 4, 2], emotion e of sample n is labels[n, e, 1] == 1.
IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")


def iemocap_classes(labels: Any, num_classes: int, where: str) -> np.ndarray:
  """Class indices ``[N]`` int32 from IEMOCAP emotion labels ``[N, 4, 2]`` (MulT's layout,
  emotions :data:`IEMOCAP_EMOTIONS`, each sample exactly one).

  ``num_classes=4``: the emotion's index (neutral 0, happy 1, sad 2, angry 3). ``num_classes=2``:
  EMMR's two classes (papers/002 §4.1: negative = frustration, angry, sad, fear, disappointment;
  positive = happy, excited): sad / angry -> 0, happy -> 1, neutral -> -1 (left out by the
  loader); MulT's file holds only these four emotions, so the other negatives and "excited" are not
  in it (for them, convert the full IEMOCAP labels to ``.npz``).
  """
  y = np.asarray(labels)
  if not np.isin(y, (0, 1)).all():
    raise ValueError(f"{where}: IEMOCAP emotion labels must be 0/1 one-hot, got values "
                     f"{np.unique(y)[:5]}")
  one_hot = y[:, :, 1].astype(bool)
  counts = one_hot.sum(1)
  if (counts != 1).any():
    bad = np.flatnonzero(counts != 1)
    raise ValueError(f"{where}: each sample needs exactly one of {IEMOCAP_EMOTIONS}; samples "
                     f"{bad[:5].tolist()} have {counts[bad[:5]].tolist()}")
  emotion = one_hot.argmax(1)
  if num_classes == 4:
    return emotion.astype(np.int32)
  if num_classes == 2:
    return np.array([-1, 1, 0, 0], np.int32)[emotion]
  raise ValueError(f"num_classes: IEMOCAP emotion labels map to 4 classes (the emotions) or 2 "
                   f"(EMMR's negative / positive), got {num_classes}")


# ==================================================================== multi-view .mat
def load_multiview_mat(
    path: PathLike,
    *,
    train_idx: PathLike | Sequence[int] | np.ndarray | None = None,
    test_idx: PathLike | Sequence[int] | np.ndarray | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    view_names: Sequence[str] | None = None,
    samples_axis: int | None = None,
) -> Dataset:
  """Loads a multi-view classification ``.mat`` file (MATLAB v5, the TMC / QMF benchmark format).

  Layouts:
    (a) pre-split: ``x1_train … xK_train``, ``x1_test … xK_test``, ``gt_train``, ``gt_test``.
    (b) one pool: ``X`` a 1×K or K×1 cell of view matrices, labels ``gt`` (or ``Y`` when there is
        no ``gt``). Split rows come from ``train_idx`` / ``test_idx`` (0-based row indices: paths
        to ``.npy`` files or arrays), else from ``<stem>_train_idx.npy`` / ``<stem>_test_idx.npy``
        beside the file, else a stratified 80/20 split drawn with ``seed``. Rows in neither index
        set are left out.

  Views may be stored ``[N, D]`` or transposed ``[D, N]``: the axis whose length equals the label
  count is the sample axis. A square ``[N, N]`` view (``D == N``, e.g. MSRC-v1's 210 × 210 kernel
  view) takes the orientation of the file's other views; where they do not settle it,
  ``samples_axis`` does. Labels ``[N, 1]``, ``[1, N]`` or
  ``[N]`` become their index among the sorted distinct labels, i.e. the usual 1-based ``1..C`` are
  shifted to ``0..C-1``; ``num_classes`` is the number of distinct labels. ``valid`` is a stratified
  ``valid_fraction`` of the train rows (per class ``round(fraction · n_c)``, at least one row of
  each class kept in train), drawn with ``numpy.random.default_rng(seed)``. Features are the raw
  values as float32 ``[N, 1, D_k]`` (no normalisation).

  Args:
    path: the ``.mat`` file.
    train_idx: layout (b) only: train rows, a ``.npy`` path or an integer array.
    test_idx: layout (b) only: test rows; given together with ``train_idx``.
    valid_fraction: fraction of each class's train rows moved to ``valid``, in ``[0, 1)``.
    seed: seed of the stratified splits (same seed, same split).
    view_names: modality names, default ``view0 … view{K-1}``.
    samples_axis: 0 (every view stored ``[N, D]``) or 1 (``[D, N]``); default: per view, the axis
      of length ``N``.

  Returns:
    A classification :class:`Dataset`, one utterance-level modality per view.

  Raises:
    FileNotFoundError: ``path`` or an index file does not exist.
    ValueError: unreadable file, unrecognised layout (lists the keys found and the layouts
      supported), inconsistent shapes, a square view the other views do not orient (and no
      ``samples_axis``), non-integer labels, bad indices.
  """
  path = _check_file(path)
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"valid_fraction: expected a value in [0, 1), got {valid_fraction}")
  mat = _read_mat(path)
  keys = sorted(k for k in mat if not k.startswith("__"))
  rng = np.random.default_rng(seed)
  n_views_presplit = _presplit_view_count(keys, path.name)
  if n_views_presplit:
    if train_idx is not None or test_idx is not None:
      raise ValueError(
          f"{path.name}: train_idx / test_idx do not apply to a pre-split file (keys {keys})")
    raw_labels = [_mat_labels(mat[f"gt_{split}"], f"{path.name}['gt_{split}']")
                  for split in ("train", "test")]
    oriented = _oriented_views(
        [(mat[f"x{k}_{split}"], y.shape[0], f"{path.name}['x{k}_{split}']")
         for split, y in zip(("train", "test"), raw_labels)
         for k in range(1, n_views_presplit + 1)], samples_axis)
    views = [oriented[:n_views_presplit], oriented[n_views_presplit:]]
    for k, (a, b) in enumerate(zip(*views), start=1):
      if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{path.name}: x{k}_train has {a.shape[1]} features but x{k}_test has {b.shape[1]}")
    n_train = raw_labels[0].shape[0]
    views = [np.concatenate(pair) for pair in zip(*views)]
    raw_labels = np.concatenate(raw_labels)
    train_rows = np.arange(n_train)
    test_rows = np.arange(n_train, raw_labels.shape[0])
  elif "X" in mat and ("gt" in mat or "Y" in mat):
    label_key = "gt" if "gt" in mat else "Y"
    raw_labels = _mat_labels(mat[label_key], f"{path.name}[{label_key!r}]")
    n = raw_labels.shape[0]
    views = _oriented_views(
        [(v, n, f"{path.name}['X'][{k}]")
         for k, v in enumerate(_cell_entries(mat["X"], f"{path.name}['X']"))], samples_axis)
    train_rows, test_rows = _pool_split(path, train_idx, test_idx, raw_labels, rng)
  else:
    raise ValueError(
        f"{path.name}: unrecognised multi-view layout; keys found: {keys}. Supported layouts: "
        "(a) pre-split 'x1_train'..'xK_train', 'x1_test'..'xK_test', 'gt_train', 'gt_test'; "
        "(b) 'X' (a 1xK or Kx1 cell of [N, D] or [D, N] view matrices) with labels 'gt' or 'Y'")
  classes, labels = np.unique(raw_labels, return_inverse=True)
  labels = labels.astype(np.int32)
  if classes.size < 2:
    raise ValueError(f"{path.name}: labels: need at least 2 distinct classes, got {classes}")
  names = _view_names(view_names, len(views))
  for name, x in zip(names, views):
    _check_finite(x, f"{path.name}: view {name!r}")
  valid_held = _stratified_holdout(labels[train_rows], valid_fraction, rng)
  rows = {
      "train": train_rows[~valid_held], "valid": train_rows[valid_held], "test": test_rows}
  parts = {}
  for split, r in rows.items():
    features = {name: x[r][:, None, :] for name, x in zip(names, views)}
    parts[split] = (features, {m: np.ones((len(r), 1), bool) for m in names}, labels[r])
  return _make_dataset(f"multiview:{path}", "classification", parts, int(classes.size))


# ==================================================================== generic .npz
def load_npz(
    path: PathLike, *, task: str | None = None, num_classes: int | None = None
) -> Dataset:
  """Loads the generic ``.npz`` user format (``np.savez``; no pickled object arrays).

  Arrays:
    * ``<modality>``: ``[N, T, D]`` or ``[N, D]`` (becomes ``T = 1``) numeric.
    * ``<modality>_mask`` (optional): ``[N, T]`` bool or 0/1; default all true. Masked steps are
      zeroed.
    * ``label``: ``[N]`` float (regression) or integer (classification, ``0..C-1``).
    * ``split``: ``[N]`` strings ``"train" / "valid" / "test"`` or ints ``0 / 1 / 2``.
    * ``modalities`` (optional): names giving the modality order. Without it the modalities are the
      sorted names of the 2-D / 3-D float arrays other than ``label``, ``split`` and ``*_mask``.

  Args:
    path: the ``.npz`` file.
    task: ``"regression"`` or ``"classification"``; default from the label dtype (float ->
      regression, integer / bool -> classification).
    num_classes: classification only; default ``max(label) + 1``.

  Returns:
    A :class:`Dataset` (a split with no rows is an empty ``Batch``; ``train`` must have rows).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: unreadable archive, missing array, wrong shape, mismatched sample counts, NaN / inf,
      bad mask / split / label values.
  """
  path = _check_file(path)
  try:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError("it holds a single array, not an archive of named arrays")
    with archive:
      arrays = {k: archive[k] for k in archive.files}
  except Exception as e:  # not a zip, truncated, pickled object arrays, ...
    raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
  _require_keys(arrays, ("label", "split"), path.name)
  label = _labels_1d(arrays["label"], f"{path.name}['label']")
  n = label.shape[0]
  if task is None:
    task = "regression" if np.issubdtype(arrays["label"].dtype, np.floating) else "classification"
  _check_task(task, num_classes)
  if task == "regression":
    label = label.astype(np.float32)
  else:
    label = _integer_labels(label, f"{path.name}['label']")
  split_code = _npz_split_codes(arrays["split"], n, f"{path.name}['split']")
  modalities = _npz_modalities(arrays, path.name)
  features, step_mask = {}, {}
  for m in modalities:
    x = arrays[m]
    if x.ndim == 2:
      x = x[:, None, :]
    x = _feature_array(x, f"{path.name}[{m!r}]", n, "label", ndim=3)
    _check_finite(x, f"{path.name}[{m!r}]")
    mask = np.ones(x.shape[:2], bool)
    if f"{m}_mask" in arrays:
      mask = _binary_mask(arrays[f"{m}_mask"], x.shape[:2], f"{path.name}['{m}_mask']")
    features[m] = np.where(mask[..., None], x, 0.0).astype(np.float32)
    step_mask[m] = mask
  if not (split_code == NPZ_SPLIT_CODES["train"]).any():
    raise ValueError(f"{path.name}['split']: no sample is in 'train'")
  parts = {}
  for split, code in NPZ_SPLIT_CODES.items():
    rows = np.flatnonzero(split_code == code)
    parts[split] = (
        {m: x[rows] for m, x in features.items()},
        {m: k[rows] for m, k in step_mask.items()},
        label[rows],
    )
  return _make_dataset(f"npz:{path}", task, parts, num_classes)


# ==================================================================== dispatch
# Source name -> (loader called as loader(<text after "name:">, **kwargs), usage shown in errors).
# Adding a source is one line here.
def _synthetic(argument: str, *, seed: int = 0, **kwargs: Any) -> Dataset:
  """``synthetic`` / ``synthetic:regression`` / ``synthetic:classification``, drawn from ``key(seed)``;
  ``synthetic:sims`` is the regression set with its labels divided by 3, into CH-SIMS's [-1, 1]
  (scored with the SIMS metrics, ``Dataset.scoring == "sims_regression"``)."""
  if argument != "sims":
    return make_synthetic(jax.random.key(seed), task=argument or "regression", **kwargs)
  dataset = make_synthetic(jax.random.key(seed), task="regression", **kwargs)
  return dataclasses.replace(dataset, splits={
      name: split.replace(label=np.asarray(split.label) / 3.0)
      for name, split in dataset.splits.items()})


LOADERS: dict[str, tuple[Callable[..., Dataset], str]] = {
    "synthetic": (_synthetic, "synthetic[:regression|classification|sims] (embedded default)"),
    "mmsa": (load_mmsa_pickle, "mmsa:<path to aligned_50.pkl | unaligned_50.pkl | "
             "unaligned_39.pkl>"),
    "sdk": (load_sdk_pickle, "sdk:<path to a MulT-style mosi_data.pkl>"),
    "multiview": (load_multiview_mat, "multiview:<path to a multi-view .mat>"),
    "npz": (load_npz, "npz:<path to an .npz>"),
}


def load_dataset(spec: str, **kwargs: Any) -> Dataset:
  """Loads a data set from a ``"<source>:<argument>"`` string, e.g. ``"mmsa:/data/aligned_50.pkl"``.

  Args:
    spec: source name from :data:`LOADERS` and its argument (a path for the file formats).
    **kwargs: keyword options of that source's loader (e.g. ``task=``, ``seed=``).

  Raises:
    ValueError: unknown source (the message lists the accepted forms), or the loader's errors.
  """
  source, _, argument = spec.partition(":")
  if source not in LOADERS:
    forms = "; ".join(usage for _, usage in LOADERS.values())
    raise ValueError(f"dataset spec {spec!r}: unknown source {source!r}; accepted forms: {forms}")
  loader, _ = LOADERS[source]
  return loader(argument, **kwargs)


# ==================================================================== file reading
def _check_file(path: PathLike) -> Path:
  if not str(path):
    raise ValueError("path: empty; give the data file's path")
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such file")
  if not p.is_file():
    raise ValueError(f"{p}: not a regular file")
  return p


def _read_split_pickle(path: Path, split_aliases: Mapping[str, str]) -> dict[str, Mapping]:
  """The pickle's ``{split: dict}`` with each split of :data:`SPLITS` present (aliases allowed)."""
  try:
    with open(path, "rb") as f:
      # latin1 lets Python 2 pickles of NumPy arrays load; it only affects Python 2 str objects.
      data = pickle.load(f, encoding="latin1")
  except Exception as e:  # any unpickling failure: truncated, garbage, missing class, ...
    raise ValueError(f"{path}: corrupt or unreadable pickle ({type(e).__name__}: {e})") from e
  if not isinstance(data, Mapping):
    raise ValueError(
        f"{path.name}: top level: expected a dict of splits {list(SPLITS)}, got "
        f"{type(data).__name__}")
  splits = {}
  for split in SPLITS:
    alias = split_aliases.get(split)
    if split in data and alias in data:
      raise ValueError(f"{path.name}: both {split!r} and its alias {alias!r} are present")
    key = split if split in data else alias
    if key not in data:
      accepted = repr(split) + (f" (or {alias!r})" if alias else "")
      raise ValueError(
          f"{path.name}: missing split {accepted}; top-level keys found: {sorted(map(str, data))}")
    if not isinstance(data[key], Mapping):
      raise ValueError(
          f"{path.name}[{key!r}]: expected a dict of arrays, got {type(data[key]).__name__}")
    splits[split] = data[key]
  return splits


def _read_mat(path: Path) -> dict[str, Any]:
  import scipy.io  # deferred: only the .mat loader needs scipy

  try:
    return scipy.io.loadmat(path)
  except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
    raise ValueError(
        f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save as v5 (save -v7) ({e})"
    ) from e
  except Exception as e:
    raise ValueError(f"{path}: cannot read as a MATLAB .mat file ({type(e).__name__}: {e})") from e


# ==================================================================== validation helpers
def _check_task(task: str, num_classes: int | None) -> None:
  if task not in ("regression", "classification"):
    raise ValueError(f"task: expected 'regression' or 'classification', got {task!r}")
  if task == "regression" and num_classes is not None:
    raise ValueError(f"num_classes: only for task='classification', got {num_classes}")
  if num_classes is not None and num_classes < 2:
    raise ValueError(f"num_classes: expected >= 2, got {num_classes}")


def _require_keys(mapping: Mapping, keys: Sequence[str], where: str) -> None:
  missing = [k for k in keys if k not in mapping]
  if missing:
    raise ValueError(
        f"{where}: missing key(s) {missing}; keys found: {sorted(map(str, mapping))}")


def _feature_array(x: Any, where: str, n: int, label_key: str, *, ndim: int) -> np.ndarray:
  """A float32 copy of ``x``, checked to be numeric, ``ndim``-D, with ``n`` samples."""
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise ValueError(f"{where}: expected a numeric array, got dtype {x.dtype}")
  if x.ndim != ndim:
    raise ValueError(f"{where}: expected a {ndim}-D array [N, T, D], got shape {x.shape}")
  if x.shape[0] != n:
    raise ValueError(f"{where}: {x.shape[0]} samples, but {label_key!r} has {n}")
  return np.array(x, dtype=np.float32)


def _check_finite(x: np.ndarray, where: str) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    raise ValueError(
        f"{where}: {int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} inf entries "
        f"(first at index {tuple(int(i) for i in np.argwhere(bad)[0])})")


def _labels_1d(y: Any, where: str) -> np.ndarray:
  """Squeezes ``[N]``, ``[N, 1]`` or ``[N, 1, 1]`` labels to ``[N]``, checked finite and numeric."""
  y = np.asarray(y)
  if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
    raise ValueError(f"{where}: expected numeric labels, got dtype {y.dtype}")
  if y.ndim == 0 or y.shape[1:] not in ((), (1,), (1, 1)):
    raise ValueError(
        f"{where}: expected labels [N], [N, 1] or [N, 1, 1], got shape {y.shape} "
        "(multi-label targets are not supported)")
  y = y.reshape(y.shape[0])
  if np.issubdtype(y.dtype, np.floating):
    _check_finite(y, where)
  return y


def _integer_labels(y: np.ndarray, where: str) -> np.ndarray:
  """int32 class indices from integral, non-negative values."""
  y = np.asarray(y)
  if np.issubdtype(y.dtype, np.floating) and not np.array_equal(y, np.round(y)):
    raise ValueError(
        f"{where}: class labels must be whole numbers, got e.g. {y[y != np.round(y)][:3]}")
  if y.size and y.min() < 0:
    raise ValueError(f"{where}: class labels must be >= 0, got minimum {y.min()}")
  return y.astype(np.int32)


def _sentiment_classes(score: np.ndarray, num_classes: int) -> np.ndarray:
  """Bins scores s: 2 classes ``[s < 0, s >= 0]``; 3 classes ``[s < 0, s == 0, s > 0]``."""
  if num_classes == 2:
    return (score >= 0).astype(np.int32)
  return (np.sign(score) + 1).astype(np.int32)


def _apply_task(
    parts: dict[str, _Part],
    raw_classes: Mapping[str, Any],
    task: str,
    num_classes: int | None,
    where: str,
) -> dict[str, _Part]:
  """Replaces the regression scores of ``parts`` by class indices for ``task='classification'``."""
  if task == "regression":
    return parts
  if raw_classes:
    out = {}
    for split, (features, mask, score) in parts.items():
      key = f"{where}[{split!r}]['classification_labels']"
      if split not in raw_classes:
        raise ValueError(f"{key}: missing (present in {sorted(raw_classes)})")
      y = _integer_labels(_labels_1d(raw_classes[split], key), key)
      if y.shape != score.shape:
        raise ValueError(
            f"{key}: {y.shape[0]} samples, but 'regression_labels' has {score.shape[0]}")
      out[split] = (features, mask, y)
    return out
  if num_classes not in (None, 2, 3):
    raise ValueError(
        f"num_classes: sentiment scores are binned into 2 or 3 classes, got {num_classes}")
  k = num_classes or 3
  return {s: (f, m, _sentiment_classes(y, k)) for s, (f, m, y) in parts.items()}


def _make_dataset(
    name: str, task: str, parts: Mapping[str, _Part], num_classes: int | None
) -> Dataset:
  if task == "classification" and num_classes is None:
    num_classes = max(max((int(y.max()) + 1 for _, _, y in parts.values() if y.size), default=0), 2)
  splits = {
      split: Batch.create(features, label, step_mask=mask, task=task, num_classes=num_classes)
      for split, (features, mask, label) in parts.items()
  }
  return Dataset(name=name, task=task, num_classes=num_classes, splits=splits)


# ==================================================================== masks
def _text_mask(entry: Mapping, length: int, n: int, where: str) -> np.ndarray:
  """``text_bert[:, 1, :]`` (the attention-mask row) as bool ``[N, L]``; all true without it."""
  if "text_bert" not in entry:
    return np.ones((n, length), bool)
  tb = np.asarray(entry["text_bert"])
  if tb.ndim != 3 or tb.shape[1] != 3 or tb.shape[0] != n or tb.shape[2] != length:
    raise ValueError(
        f"{where}['text_bert']: expected [N, 3, L] = {[n, 3, length]} (ids / attention mask / "
        f"segment ids, L from 'text'), got shape {tb.shape}")
  return _binary_mask(tb[:, 1, :], (n, length), f"{where}['text_bert'][:, 1]")


def _binary_mask(mask: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"{where}: expected mask shape {tuple(shape)}, got {mask.shape}")
  if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
    raise ValueError(f"{where}: mask values must be 0/1 or bool, got {np.unique(mask)[:5]}")
  return mask.astype(bool)


def _prefix_mask(lengths: Any, steps: int, n: int, where: str) -> np.ndarray:
  """``mask[i, t] = t < min(lengths[i], steps)``: bool ``[N, steps]``."""
  lengths = np.asarray(lengths)
  if lengths.shape != (n,):
    raise ValueError(f"{where}: expected shape {(n,)}, got {lengths.shape}")
  if not np.issubdtype(lengths.dtype, np.number) or not np.array_equal(lengths, np.round(lengths)):
    raise ValueError(f"{where}: lengths must be whole numbers")
  if lengths.size and lengths.min() < 0:
    raise ValueError(f"{where}: lengths must be >= 0, got minimum {lengths.min()}")
  return np.arange(steps)[None, :] < lengths[:, None]


# ==================================================================== multi-view helpers
def _presplit_view_count(keys: Sequence[str], where: str) -> int:
  """K for the pre-split layout (``x1_train … xK_train``, tests, ``gt_*``), else 0."""
  if not {"gt_train", "gt_test"} <= set(keys):
    return 0
  numbers = {}
  for split in ("train", "test"):
    numbers[split] = sorted(
        int(k[1:-len(split) - 1]) for k in keys
        if k.startswith("x") and k.endswith(f"_{split}") and k[1:-len(split) - 1].isdigit())
  if not numbers["train"]:
    return 0
  k = len(numbers["train"])
  if numbers["train"] != list(range(1, k + 1)) or numbers["test"] != numbers["train"]:
    raise ValueError(
        f"{where}: pre-split layout: view keys must be x1_train..xK_train and "
        f"x1_test..xK_test; found "
        f"train views {numbers['train']} and test views {numbers['test']}")
  return k


def _cell_entries(cell: Any, where: str) -> list[Any]:
  if not (isinstance(cell, np.ndarray) and cell.dtype == object):
    raise ValueError(
        f"{where}: expected a cell array (1xK or Kx1) of view matrices, got "
        f"{getattr(cell, 'dtype', type(cell).__name__)} of shape {np.shape(cell)}")
  if cell.ndim != 2 or 1 not in cell.shape:
    raise ValueError(f"{where}: expected a 1xK or Kx1 cell, got shape {cell.shape}")
  return list(cell.ravel())


def _oriented_views(views: Sequence[tuple[Any, int, str]], samples_axis: int | None
                    ) -> list[np.ndarray]:
  """The views ``(matrix, N, where)`` of one file as float32 ``[N, D]``, transposing ``[D, N]``.

  The sample axis of a view is the one of length ``N``; ``samples_axis`` (0 or 1) imposes it on
  every view. A square ``[N, N]`` view (e.g. a kernel) is ambiguous on its own and takes the
  orientation of the file's other views when they agree; otherwise it is an error naming the
  view and ``samples_axis``.
  """
  if samples_axis not in (None, 0, 1):
    raise ValueError(f"samples_axis: expected 0 ([N, D] views), 1 ([D, N]) or None, got "
                     f"{samples_axis!r}")
  matrices = []
  for x, n, where in views:
    if hasattr(x, "toarray"):  # MATLAB sparse matrices load as scipy.sparse
      x = x.toarray()
    x = np.asarray(x)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
      raise ValueError(f"{where}: expected a numeric 2-D matrix, got {x.dtype} of shape {x.shape}")
    if n not in x.shape or (samples_axis is not None and x.shape[samples_axis] != n):
      axis = "axis" if samples_axis is None else f"axis {samples_axis} (samples_axis)"
      raise ValueError(f"{where}: shape {x.shape} has no {axis} matching the {n} labels")
    matrices.append(x)
  axes = [samples_axis if samples_axis is not None else None if x.shape[0] == x.shape[1]
          else int(x.shape[1] == n) for x, (_, n, _) in zip(matrices, views)]
  known = {a for a in axes if a is not None}
  for i, axis in enumerate(axes):
    if axis is None:
      if len(known) != 1:
        others = "the other views disagree" if known else "no other view is oblong"
        raise ValueError(
            f"{views[i][2]}: shape {matrices[i].shape} is ambiguous: both axes match the "
            f"{views[i][1]} labels and {others}; pass samples_axis=0 (views stored [N, D]) or 1 "
            "([D, N])")
      axes[i] = next(iter(known))
  return [(x.T if axis else x).astype(np.float32) for x, axis in zip(matrices, axes)]


def _mat_labels(y: Any, where: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 2 and 1 in y.shape:
    y = y.ravel()
  if y.ndim != 1 or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
    raise ValueError(
        f"{where}: expected numeric labels [N, 1], [1, N] or [N], got {y.dtype} {y.shape}")
  if np.issubdtype(y.dtype, np.floating):
    _check_finite(y, where)
    if not np.array_equal(y, np.round(y)):
      raise ValueError(f"{where}: class labels must be whole numbers")
  return y.astype(np.int64)


def _pool_split(
    path: Path, train_idx: Any, test_idx: Any, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, test rows) of layout (b): explicit, files beside ``path``, or stratified 80/20."""
  if (train_idx is None) != (test_idx is None):
    raise ValueError("train_idx and test_idx: give both or neither")
  if train_idx is None:
    found = {s: path.with_name(f"{path.stem}_{s}_idx.npy") for s in ("train", "test")}
    present = [s for s, p in found.items() if p.is_file()]
    if len(present) == 1:
      missing = "test" if present == ["train"] else "train"
      raise ValueError(f"{found[present[0]].name} found but {found[missing].name} is missing")
    if not present:
      test = _stratified_holdout(labels, 0.2, rng)
      return np.flatnonzero(~test), np.flatnonzero(test)
    train_idx, test_idx = found["train"], found["test"]
  n = labels.shape[0]
  train = _row_indices(train_idx, n, "train_idx")
  test = _row_indices(test_idx, n, "test_idx")
  overlap = np.intersect1d(train, test)
  if overlap.size:
    raise ValueError(f"train_idx and test_idx share {overlap.size} rows, e.g. {overlap[:5]}")
  return train, test


def _row_indices(spec: Any, n: int, name: str) -> np.ndarray:
  if isinstance(spec, (str, os.PathLike)):
    p = Path(spec)
    if not p.is_file():
      raise FileNotFoundError(f"{name}: {p}: no such file")
    try:
      idx = np.load(p, allow_pickle=False)
    except Exception as e:
      raise ValueError(f"{name}: {p}: cannot read as .npy ({type(e).__name__}: {e})") from e
    name = f"{name} ({p.name})"
  else:
    idx = np.asarray(spec)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{name}: expected 1-D integer row indices, got {idx.dtype} {idx.shape}")
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(
        f"{name}: 0-based rows must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
  if np.unique(idx).size != idx.size:
    raise ValueError(f"{name}: repeated row indices")
  return idx.astype(np.int64)


def _stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
  """Bool ``[N]`` holding out ``min(round(fraction · n_c), n_c − 1)`` random rows of class c.

  Classes are visited in sorted order and each draws one permutation from ``rng``, so the result is
  a function of (labels, fraction, rng state).
  """
  held = np.zeros(labels.shape[0], bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = min(int(np.floor(fraction * members.size + 0.5)), members.size - 1)
    held[rng.permutation(members)[:count]] = True
  return held


def _view_names(view_names: Sequence[str] | None, k: int) -> list[str]:
  if view_names is None:
    return [f"view{i}" for i in range(k)]
  names = list(view_names)
  if len(names) != k or len(set(names)) != k:
    raise ValueError(f"view_names: expected {k} distinct names, got {names}")
  return names


# ==================================================================== npz helpers
def _npz_split_codes(split: np.ndarray, n: int, where: str) -> np.ndarray:
  """``split`` ``[N]`` (names or 0/1/2) as int codes of :data:`NPZ_SPLIT_CODES`."""
  if split.shape != (n,):
    raise ValueError(f"{where}: expected shape {(n,)} (one entry per label), got {split.shape}")
  if split.dtype.kind in "US":
    names = split.astype(str)
    unknown = sorted(set(names.tolist()) - set(NPZ_SPLIT_CODES))
    if unknown:
      raise ValueError(f"{where}: unknown split names {unknown}; expected {list(NPZ_SPLIT_CODES)}")
    return np.array([NPZ_SPLIT_CODES[s] for s in names.tolist()], dtype=np.int64)
  if np.issubdtype(split.dtype, np.integer):
    unknown = sorted(set(np.unique(split).tolist()) - {0, 1, 2})
    if unknown:
      raise ValueError(
          f"{where}: unknown split codes {unknown}; expected 0 (train), 1 (valid), 2 (test)")
    return split.astype(np.int64)
  raise ValueError(f"{where}: expected strings or integers, got dtype {split.dtype}")


def _npz_modalities(arrays: Mapping[str, np.ndarray], where: str) -> list[str]:
  reserved = {"label", "split", "modalities"}
  if "modalities" in arrays:
    names = [str(s) for s in arrays["modalities"].ravel()]
    bad = [m for m in names if m not in arrays or m in reserved or m.endswith("_mask")]
    if bad or not names or len(set(names)) != len(names):
      raise ValueError(
          f"{where}['modalities']: {names} must be distinct names of feature arrays; not usable: "
          f"{bad}; arrays found: {sorted(arrays)}")
  else:
    candidates = {k: v for k, v in arrays.items() if k not in reserved and not k.endswith("_mask")
                  and np.issubdtype(v.dtype, np.floating)}
    odd = {k: v.shape for k, v in candidates.items() if v.ndim not in (2, 3)}
    if odd:  # never dropped silently: a 4-D modality would train without it
      raise ValueError(
          f"{where}: float arrays {odd} are not modalities ([N, T, D] or [N, D]); reshape them, "
          "or name the modalities in a 'modalities' array to leave the others out")
    names = sorted(candidates)
    if not names:
      raise ValueError(
          f"{where}: no modality arrays (2-D / 3-D float arrays other than label, split, *_mask); "
          f"arrays found: { {k: (str(v.dtype), v.shape) for k, v in arrays.items()} }")
  orphans = [k for k in arrays if k.endswith("_mask") and k[:-len("_mask")] not in names]
  if orphans:
    raise ValueError(f"{where}: masks {orphans} have no modality among {names}")
  return names
