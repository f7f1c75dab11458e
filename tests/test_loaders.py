"""Tests for mmjax.data.loaders: small files in each exact on-disk format, checked by value."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from mmjax.data import Dataset
from mmjax.data.loaders import (
    LOADERS,
    load_dataset,
    load_mmsa_pickle,
    load_multiview_mat,
    load_npz,
    load_sdk_pickle,
)

SPLIT_SIZES = {"train": 5, "valid": 3, "test": 4}


def _write_pickle(path: Path, obj) -> Path:
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  return path


# ==================================================================== MMSA pickles
def _mmsa_split(rng, n, *, length=4, t_audio=4, t_vision=4, lengths=None, text_bert=True):
  """One split of an MMSA pickle (unaligned when ``lengths`` = (audio_lengths, vision_lengths))."""
  split = {
      "text": rng.normal(size=(n, length, 768)).astype(np.float32),
      "audio": rng.normal(size=(n, t_audio, 5)).astype(np.float32),
      "vision": rng.normal(size=(n, t_vision, 20)).astype(np.float32),
      "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
      "id": np.array([f"vid{i}$_${i}" for i in range(n)], dtype=object),
      "raw_text": np.array(["a b"] * n, dtype=object),
  }
  if text_bert:
    tb = np.zeros((n, 3, length), np.float32)
    tb[:, 0] = rng.integers(100, 2000, size=(n, length))
    tb[:, 1, :2] = 1.0  # every sample has at least [CLS] + one token
    split["text_bert"] = tb
  if lengths is not None:
    split["audio_lengths"], split["vision_lengths"] = lengths
  return split


def _mmsa_file(tmp_path, rng, name="unaligned_50.pkl", **kwargs):
  data = {s: _mmsa_split(rng, n, **kwargs) for s, n in SPLIT_SIZES.items()}
  return data, _write_pickle(tmp_path / name, data)


def test_mmsa_unaligned_masks_lengths_and_inf(tmp_path):
  rng = np.random.default_rng(0)
  data = {s: _mmsa_split(rng, n, lengths=(np.full(n, 4), np.full(n, 4)))
          for s, n in SPLIT_SIZES.items()}
  train = data["train"]
  # Hand-set: attention rows, lengths (0, partial, beyond T), -inf at a valid and a padded step.
  train["text_bert"][:, 1] = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
  train["audio_lengths"] = [2, 0, 7, 4, 1]
  train["vision_lengths"] = np.array([3, 1, 4, 0, 2])
  train["audio"][0, 1, 3] = -np.inf
  train["audio"][0, 3, 0] = -np.inf
  ds = load_mmsa_pickle(_write_pickle(tmp_path / "unaligned_50.pkl", data))

  assert isinstance(ds, Dataset) and ds.task == "regression" and ds.num_classes is None
  assert ds.modalities == ("text", "audio", "vision")
  assert ds.feature_shapes() == {"text": (4, 768), "audio": (4, 5), "vision": (4, 20)}
  b = ds.splits["train"]
  expected_masks = {
      "text": [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]],
      "audio": [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]],
      "vision": [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]],
  }
  for m, mask in expected_masks.items():
    mask = np.array(mask, bool)
    np.testing.assert_array_equal(b.step_mask[m], mask)
    raw = np.where(np.isneginf(train[m]), 0.0, train[m])
    np.testing.assert_array_equal(b.features[m], np.where(mask[..., None], raw, 0.0))
    assert b.features[m].dtype == np.float32
  assert b.features["audio"][0, 1, 3] == 0.0
  assert b.features["audio"][0, 1, 2] == train["audio"][0, 1, 2]
  np.testing.assert_array_equal(b.label, train["regression_labels"])
  assert b.label.dtype == np.float32
  for split, n in SPLIT_SIZES.items():
    assert ds.splits[split].batch_size == n


def test_mmsa_aligned_masks_follow_text(tmp_path):
  rng = np.random.default_rng(1)
  data, path = _mmsa_file(tmp_path, rng, name="aligned_50.pkl", t_audio=4, t_vision=6)
  b = load_mmsa_pickle(path).splits["test"]
  text_mask = data["test"]["text_bert"][:, 1] == 1
  np.testing.assert_array_equal(b.step_mask["text"], text_mask)
  np.testing.assert_array_equal(b.step_mask["audio"], text_mask)  # T_a == L: aligned to words
  np.testing.assert_array_equal(b.step_mask["vision"], np.ones((4, 6), bool))  # T_v != L
  np.testing.assert_array_equal(b.features["audio"][~text_mask], 0.0)
  np.testing.assert_array_equal(b.features["vision"], data["test"]["vision"])


def test_mmsa_without_text_bert_all_text_steps_valid(tmp_path):
  data, path = _mmsa_file(tmp_path, np.random.default_rng(2), text_bert=False)
  b = load_mmsa_pickle(path).splits["valid"]
  assert b.step_mask["text"].all() and b.step_mask["audio"].all()
  np.testing.assert_array_equal(b.features["text"], data["valid"]["text"])


SCORES = np.array([-2.0, -0.2, 0.0, 0.6, 3.0], np.float32)


@pytest.mark.parametrize("num_classes, expected", [
    (None, [0, 0, 1, 2, 2]),  # MMSA: negative / neutral / positive
    (3, [0, 0, 1, 2, 2]),
    (2, [0, 0, 1, 1, 1]),  # s >= 0 is the positive class (acc2 "has0")
])
def test_mmsa_classification_bins_scores(tmp_path, num_classes, expected):
  rng = np.random.default_rng(3)
  data = {s: _mmsa_split(rng, n) for s, n in SPLIT_SIZES.items()}
  data["train"]["regression_labels"] = SCORES
  ds = load_mmsa_pickle(_write_pickle(tmp_path / "a.pkl", data), task="classification",
                        num_classes=num_classes)
  assert ds.task == "classification" and ds.num_classes == (num_classes or 3)
  np.testing.assert_array_equal(ds.splits["train"].label, expected)
  assert ds.splits["train"].label.dtype == np.int32


def test_mmsa_classification_labels_used_when_present(tmp_path):
  rng = np.random.default_rng(4)
  data = {s: _mmsa_split(rng, n) for s, n in SPLIT_SIZES.items()}
  for s, n in SPLIT_SIZES.items():
    data[s]["classification_labels"] = np.arange(n, dtype=np.float32) % 3
  data["train"]["regression_labels"] = SCORES
  ds = load_mmsa_pickle(_write_pickle(tmp_path / "a.pkl", data), task="classification")
  assert ds.num_classes == 3
  np.testing.assert_array_equal(ds.splits["train"].label, [0, 1, 2, 0, 1])


# ==================================================================== SDK pickles
@pytest.mark.parametrize("label_shape", [(1, 1), (1,), ()])
def test_sdk_pickle_labels_nan_inf_and_dev_alias(tmp_path, label_shape):
  rng = np.random.default_rng(5)
  data = {}
  for split, n in (("train", 5), ("dev", 3), ("test", 4)):
    data[split] = {
        "text": rng.normal(size=(n, 3, 300)).astype(np.float32),
        "audio": rng.normal(size=(n, 3, 74)).astype(np.float32),
        "vision": rng.normal(size=(n, 3, 35)).astype(np.float32),
        "labels": rng.uniform(-3, 3, size=(n, *label_shape)).astype(np.float32),
        "id": np.array([["vid", str(i)] for i in range(n)]),
    }
  data["train"]["audio"][1, 2, 7] = np.nan
  data["train"]["audio"][0, 0, 0] = -np.inf
  data["train"]["vision"][4, 1, 3] = np.nan
  ds = load_sdk_pickle(_write_pickle(tmp_path / "mosi_data.pkl", data))
  b = ds.splits["train"]
  for m in ("audio", "vision"):
    raw = data["train"][m]
    np.testing.assert_array_equal(b.features[m], np.where(np.isnan(raw) | np.isneginf(raw), 0, raw))
    assert b.step_mask[m].all()
  assert b.features["audio"][1, 2, 7] == 0 and b.features["vision"][4, 1, 3] == 0
  np.testing.assert_array_equal(b.label, data["train"]["labels"].reshape(5))
  np.testing.assert_array_equal(ds.splits["valid"].features["text"], data["dev"]["text"])
  assert ds.feature_shapes() == {"text": (3, 300), "audio": (3, 74), "vision": (3, 35)}


def _iemocap_file(tmp_path, emotion, blank=None):
  """MulT's ``iemocap_data.pkl`` layout: ``labels [N, 4, 2]``, ``labels[n, e, 1] = 1`` for the
  emotion ``e = emotion[n]`` of sample ``n`` (every split the same); ``text[n, 0, 0] = n``."""
  n = len(emotion)
  labels = np.zeros((n, 4, 2), np.float32)
  labels[:, :, 0] = 1
  labels[np.arange(n), emotion] = [0, 1]
  if blank is not None:
    labels[blank] = [1, 0]
  text = np.zeros((n, 2, 3), np.float32)
  text[:, 0, 0] = np.arange(n)
  split = {"text": text, "audio": np.zeros((n, 2, 4), np.float32),
           "vision": np.zeros((n, 2, 5), np.float32), "labels": labels}
  return _write_pickle(tmp_path / "iemocap_data.pkl", dict.fromkeys(("train", "valid", "test"),
                                                                    split))


@pytest.mark.parametrize("num_classes, rows, classes", [
    (None, [0, 1, 2, 3, 4, 5], [3, 0, 1, 2, 1, 0]),  # the 4 emotions
    (2, [0, 2, 3, 4], [0, 1, 0, 1]),  # EMMR: sad / angry 0, happy 1, neutral left out
])
def test_sdk_pickle_iemocap_emotions(tmp_path, num_classes, rows, classes):
  path = _iemocap_file(tmp_path, np.array([3, 0, 1, 2, 1, 0]))  # angry neutral happy sad happy ne.
  ds = load_sdk_pickle(path, task="classification", num_classes=num_classes)
  assert ds.num_classes == (num_classes or 4)
  for batch in ds.splits.values():
    np.testing.assert_array_equal(batch.features["text"][:, 0, 0], rows)
    np.testing.assert_array_equal(batch.label, classes)


# ==================================================================== multi-view .mat
def _view_pool(rng, labels, dims):
  """Views [N, D]; column 0 of view0 holds the row number so loaded rows can be traced back."""
  views = [rng.normal(size=(labels.size, d)) for d in dims]
  views[0][:, 0] = np.arange(labels.size)
  return views


def _rows(batch):
  return batch.features["view0"][:, 0, 0].astype(int)


def _cell(views, column):
  cell = np.empty((len(views), 1) if column else (1, len(views)), dtype=object)
  for k, v in enumerate(views):
    cell.flat[k] = v
  return cell


@pytest.mark.parametrize("samples_axis", [None, 1])
def test_multiview_square_view_takes_the_file_orientation(tmp_path, samples_axis):
  """MSRC-v1-style: a [N, N] kernel view beside a view stored [D, N]; both transposed."""
  rng = np.random.default_rng(3)
  oblong, kernel = rng.normal(size=(3, 6)), rng.normal(size=(6, 6))
  labels = np.array([1, 2, 1, 2, 1, 2])[:, None]
  ds = _mat(tmp_path, {"X": _cell([oblong, kernel], False), "gt": labels},
            train_idx=np.arange(6), test_idx=np.arange(0), valid_fraction=0.0,
            samples_axis=samples_axis)()
  train = ds.splits["train"]
  np.testing.assert_allclose(train.features["view0"][:, 0], oblong.T, rtol=1e-6)
  np.testing.assert_allclose(train.features["view1"][:, 0], kernel.T, rtol=1e-6)


def test_multiview_presplit_layout(tmp_path):
  rng = np.random.default_rng(6)
  gt = {"train": np.repeat(np.arange(1, 4), 10), "test": np.repeat(np.arange(1, 4), 2)}
  mat = {}
  for split, y in gt.items():
    mat[f"x1_{split}"] = rng.integers(0, 7, size=(y.size, 5)).astype(np.uint8)
    mat[f"x2_{split}"] = rng.normal(size=(3, y.size))  # stored transposed [D, N]
    mat[f"gt_{split}"] = y[:, None].astype(np.uint8)
  scipy.io.savemat(tmp_path / "hw.mat", mat)
  ds = load_multiview_mat(tmp_path / "hw.mat", view_names=["pix", "fou"], valid_fraction=0.2)

  assert ds.task == "classification" and ds.num_classes == 3
  assert ds.modalities == ("pix", "fou") and ds.feature_shapes() == {"pix": (1, 5), "fou": (1, 3)}
  test = ds.splits["test"]
  np.testing.assert_array_equal(test.features["pix"][:, 0], mat["x1_test"].astype(np.float32))
  np.testing.assert_array_equal(test.features["fou"][:, 0], mat["x2_test"].T.astype(np.float32))
  np.testing.assert_array_equal(test.label, gt["test"] - 1)
  # train + valid partition the pre-split train rows; valid holds 2 of each class's 10.
  pooled = np.concatenate([ds.splits[s].features["fou"][:, 0] for s in ("train", "valid")])
  pooled_labels = np.concatenate([ds.splits[s].label for s in ("train", "valid")])
  order = np.lexsort(pooled.T)
  expected_order = np.lexsort(mat["x2_train"])
  np.testing.assert_array_equal(pooled[order], mat["x2_train"].T[expected_order].astype(np.float32))
  np.testing.assert_array_equal(pooled_labels[order], gt["train"][expected_order] - 1)
  np.testing.assert_array_equal(np.bincount(ds.splits["valid"].label), [2, 2, 2])


@pytest.mark.parametrize("column_cell, label_key, label_row, transpose, idx_source", [
    (False, "gt", False, False, "auto"),
    (True, "Y", True, False, "paths"),
    (False, "Y", False, True, "arrays"),
    (True, "gt", True, True, "auto"),
])
def test_multiview_cell_layouts_with_index_files(
    tmp_path, column_cell, label_key, label_row, transpose, idx_source):
  rng = np.random.default_rng(7)
  labels = np.repeat(np.arange(1, 4), 8)  # 24 rows, 1-based classes
  views = _view_pool(rng, labels, (6, 4))
  stored = [v.T for v in views] if transpose else views
  y = labels[None, :] if label_row else labels[:, None]
  contents = {"X": _cell(stored, column_cell), label_key: y}
  if label_key == "gt":
    contents["Y"] = y[..., ::-1] if label_row else y[::-1]  # a decoy: 'gt' wins when both exist
  scipy.io.savemat(tmp_path / "cub.mat", contents)
  perm = rng.permutation(24)
  train_idx, test_idx = perm[:18], perm[18:]
  kwargs = {}
  if idx_source == "auto":
    np.save(tmp_path / "cub_train_idx.npy", train_idx)
    np.save(tmp_path / "cub_test_idx.npy", test_idx)
  elif idx_source == "paths":
    np.save(tmp_path / "tr.npy", train_idx)
    np.save(tmp_path / "te.npy", test_idx)
    kwargs = {"train_idx": tmp_path / "tr.npy", "test_idx": str(tmp_path / "te.npy")}
  else:
    kwargs = {"train_idx": train_idx, "test_idx": test_idx.tolist()}
  ds = load_multiview_mat(tmp_path / "cub.mat", **kwargs)

  assert ds.num_classes == 3 and ds.feature_shapes() == {"view0": (1, 6), "view1": (1, 4)}
  np.testing.assert_array_equal(_rows(ds.splits["test"]), test_idx)  # file order kept
  assert set(_rows(ds.splits["train"])) | set(_rows(ds.splits["valid"])) == set(train_idx)
  for b in ds.splits.values():
    r = _rows(b)
    for k, v in enumerate(views):
      np.testing.assert_array_equal(b.features[f"view{k}"][:, 0], v[r].astype(np.float32))
    np.testing.assert_array_equal(b.label, labels[r] - 1)
    assert b.step_mask["view0"].shape == (r.size, 1) and b.step_mask["view0"].all()


def test_multiview_default_split_is_stratified_and_seeded(tmp_path):
  rng = np.random.default_rng(8)
  labels = np.repeat([0, 1, 2, 3], [13, 20, 8, 3])  # 0-based already: not shifted
  scipy.io.savemat(tmp_path / "d.mat", {"X": _cell(_view_pool(rng, labels, (3,)), False),
                                        "gt": labels[:, None]})
  ds = load_multiview_mat(tmp_path / "d.mat", seed=3, valid_fraction=0.25)
  rows = {s: _rows(b) for s, b in ds.splits.items()}
  # test: round-half-up(0.2 n_c) of n_c = 13, 20, 8, 3 -> 2.6, 4, 1.6, 0.6 -> 3, 4, 2, 1;
  # valid: round-half-up(0.25 n_c') of the remaining 10, 16, 6, 2 -> 2.5, 4, 1.5, 0.5 -> 3, 4, 2, 1.
  np.testing.assert_array_equal(np.bincount(labels[rows["test"]]), [3, 4, 2, 1])
  np.testing.assert_array_equal(np.bincount(labels[rows["valid"]]), [3, 4, 2, 1])
  np.testing.assert_array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(44))
  for s, b in ds.splits.items():
    np.testing.assert_array_equal(b.label, labels[rows[s]])
  again = load_multiview_mat(tmp_path / "d.mat", seed=3, valid_fraction=0.25)
  for s in rows:
    np.testing.assert_array_equal(_rows(again.splits[s]), rows[s])
  other = load_multiview_mat(tmp_path / "d.mat", seed=4, valid_fraction=0.25)
  assert not np.array_equal(np.sort(_rows(other.splits["test"])), np.sort(rows["test"]))


def test_multiview_valid_carve_is_stratified_and_seeded(tmp_path):
  rng = np.random.default_rng(9)
  labels = np.repeat([1, 2, 3], [30, 10, 2])
  scipy.io.savemat(tmp_path / "e.mat", {"X": _cell(_view_pool(rng, labels, (2,)), False),
                                        "gt": labels[:, None]})
  train_idx, test_idx = np.arange(0, 42, 2), np.arange(1, 42, 2)  # 15 + 5 + 1 train rows
  load = lambda seed: load_multiview_mat(tmp_path / "e.mat", train_idx=train_idx,
                                         test_idx=test_idx, seed=seed, valid_fraction=0.5)
  ds = load(0)
  valid, train = _rows(ds.splits["valid"]), _rows(ds.splits["train"])
  # 7.5 -> 8, 2.5 -> 3, 0.5 -> 1 but capped at 0: every class keeps a train row.
  np.testing.assert_array_equal(np.bincount(labels[valid] - 1, minlength=3), [8, 3, 0])
  assert set(valid).isdisjoint(train) and set(valid) | set(train) == set(train_idx)
  np.testing.assert_array_equal(train, np.setdiff1d(train_idx, valid))  # train keeps file order
  np.testing.assert_array_equal(_rows(load(0).splits["valid"]), valid)
  assert any(not np.array_equal(_rows(load(s).splits["valid"]), valid) for s in (1, 2, 3))


# ==================================================================== generic .npz
def test_npz_regression_masks_modalities_and_split_strings(tmp_path):
  rng = np.random.default_rng(10)
  n = 6
  arrays = {
      "audio": rng.normal(size=(n, 3, 2)).astype(np.float32),
      "text": rng.normal(size=(n, 4)),  # [N, D] -> T = 1
      "audio_mask": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 1]]),
      "label": np.linspace(-1, 1, n),
      "split": np.array(["train", "test", "train", "valid", "train", "test"]),
      "modalities": np.array(["text", "audio"]),
      "index": np.arange(n, dtype=np.float64)[:, None],  # 2-D float but not listed: ignored
  }
  np.savez(tmp_path / "u.npz", **arrays)
  ds = load_npz(tmp_path / "u.npz")
  assert ds.task == "regression" and ds.modalities == ("text", "audio")
  assert ds.feature_shapes() == {"text": (1, 4), "audio": (3, 2)}
  for split, rows in (("train", [0, 2, 4]), ("valid", [3]), ("test", [1, 5])):
    b = ds.splits[split]
    mask = arrays["audio_mask"][rows].astype(bool)
    np.testing.assert_array_equal(b.step_mask["audio"], mask)
    np.testing.assert_array_equal(
        b.features["audio"], np.where(mask[..., None], arrays["audio"][rows], 0))
    np.testing.assert_array_equal(b.features["text"][:, 0], arrays["text"][rows].astype(np.float32))
    assert b.step_mask["text"].all()
    np.testing.assert_array_equal(b.label, arrays["label"][rows].astype(np.float32))


@pytest.mark.parametrize("label, task, num_classes, expected_task, expected_classes", [
    (np.array([0, 2, 1, 2, 0, 1]), None, None, "classification", 3),
    (np.array([0, 1, 1, 0, 0, 1]), None, 4, "classification", 4),
    (np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0]), "classification", None, "classification", 2),
    (np.array([0, 2, 1, 2, 0, 1]), "regression", None, "regression", None),
])
def test_npz_task_inference_and_integer_splits(
    tmp_path, label, task, num_classes, expected_task, expected_classes):
  x = np.arange(6 * 2, dtype=np.float32).reshape(6, 1, 2)
  split = np.array([0, 0, 1, 2, 0, 2])
  np.savez(tmp_path / "c.npz", b=x, a=x[:, 0] + 100, label=label, split=split)
  ds = load_npz(tmp_path / "c.npz", task=task, num_classes=num_classes)
  assert ds.task == expected_task and ds.num_classes == expected_classes
  assert ds.modalities == ("a", "b")  # sorted names when no 'modalities' array
  np.testing.assert_array_equal(ds.splits["test"].label, label[[3, 5]])
  np.testing.assert_array_equal(ds.splits["train"].features["b"], x[[0, 1, 4]])
  expected_dtype = np.float32 if expected_task == "regression" else np.int32
  assert ds.splits["train"].label.dtype == expected_dtype


def test_load_dataset_dispatches_each_source(tmp_path):
  x = np.ones((4, 2, 3), np.float32)
  np.savez(tmp_path / "d.npz", x=x, label=np.zeros(4, np.float32), split=np.array([0, 0, 1, 2]))
  ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
  assert ds.name == f"npz:{tmp_path / 'd.npz'}" and ds.splits["train"].batch_size == 2
  assert set(LOADERS) == {"synthetic", "mmsa", "sdk", "multiview", "npz"}
  synthetic = load_dataset("synthetic:classification", seed=3, n_train=8, n_valid=2, n_test=2)
  assert synthetic.task == "classification" and synthetic.splits["train"].batch_size == 8
  rng = np.random.default_rng(11)
  _, path = _mmsa_file(tmp_path, rng)
  ds = load_dataset(f"mmsa:{path}", task="classification", num_classes=2)
  assert ds.name == f"mmsa:{path}" and ds.num_classes == 2


# ==================================================================== errors
def _mmsa_with(tmp_path, edit):
  rng = np.random.default_rng(12)
  data = {s: _mmsa_split(rng, n, lengths=(np.full(n, 2), np.full(n, 3)))
          for s, n in SPLIT_SIZES.items()}
  edit(data)
  return lambda: load_mmsa_pickle(_write_pickle(tmp_path / "bad.pkl", data))


def _pickle_bytes(tmp_path, payload: bytes):
  (tmp_path / "bad.pkl").write_bytes(payload)
  return lambda: load_sdk_pickle(tmp_path / "bad.pkl")


def _mat(tmp_path, contents, **kwargs):
  scipy.io.savemat(tmp_path / "bad.mat", contents)
  return lambda: load_multiview_mat(tmp_path / "bad.mat", **kwargs)


def _npz(tmp_path, **arrays):
  base = {"x": np.zeros((3, 2, 2), np.float32), "label": np.zeros(3, np.float32),
          "split": np.array(["train", "valid", "test"])}
  np.savez(tmp_path / "bad.npz", **{**base, **arrays})
  return lambda: load_npz(tmp_path / "bad.npz")


def _pool_mat(tmp_path, gt=((1,), (2,), (1,), (2,)), **kwargs):
  """Layout (b) with one [4, 3] view and labels ``gt``."""
  return _mat(tmp_path, {"X": _cell([np.zeros((4, 3))], False), "gt": np.array(gt)}, **kwargs)


def _del(split, key):
  return lambda d: d[split].pop(key)


def _set(split, key, value):
  return lambda d: d[split].__setitem__(key, value(d[split]))


def _poison(split, key, threshold, value):
  """Replaces the entries of ``key`` above ``threshold`` by ``value``."""
  return _set(split, key, lambda s: np.where(s[key] > threshold, value, s[key]))


ERROR_CASES = {
    "mmsa missing key": (
        lambda p: _mmsa_with(p, _del("valid", "vision")),
        r"bad.pkl\['valid'\]: missing key\(s\) \['vision'\]"),
    "mmsa missing split": (
        lambda p: _mmsa_with(p, lambda d: d.pop("test")), r"missing split 'test'"),
    "mmsa mismatched N": (
        lambda p: _mmsa_with(p, _set("train", "audio", lambda s: s["audio"][:-1])),
        r"\['audio'\]: 4 samples, but 'regression_labels' has 5"),
    "mmsa wrong rank": (
        lambda p: _mmsa_with(p, _set("test", "text", lambda s: s["text"][:, 0])),
        r"\['text'\]: expected a 3-D array \[N, T, D\], got shape \(4, 768\)"),
    "mmsa NaN": (
        lambda p: _mmsa_with(p, _poison("train", "text", 2, np.nan)),
        r"\['text'\]: \d+ NaN and 0 inf entries"),
    "mmsa +inf audio": (
        lambda p: _mmsa_with(p, _poison("train", "audio", 1, np.inf)),
        r"\['audio'\]: 0 NaN and \d+ inf"),
    "mmsa text_bert shape": (
        lambda p: _mmsa_with(p, _set("train", "text_bert", lambda s: s["text_bert"][:, :2])),
        r"\['text_bert'\]: expected \[N, 3, L\]"),
    "mmsa negative length": (
        lambda p: _mmsa_with(p, _set("valid", "vision_lengths", lambda s: np.array([1, -1, 2]))),
        r"\['vision_lengths'\]: lengths must be >= 0"),
    "mmsa bad num_classes": (
        lambda p: lambda: load_mmsa_pickle(_mmsa_file(p, np.random.default_rng(0))[1],
                                           task="classification", num_classes=5),
        r"binned into 2 or 3 classes, got 5"),
    "corrupt pickle (truncated)": (
        lambda p: _pickle_bytes(p, pickle.dumps({"train": {"x": np.ones(100)}})[:60]),
        r"bad.pkl: corrupt or unreadable pickle"),
    "corrupt pickle (garbage)": (
        lambda p: _pickle_bytes(p, b"this is not a pickle"), r"corrupt or unreadable pickle"),
    "pickle not a dict": (
        lambda p: _pickle_bytes(p, pickle.dumps([1, 2])), r"top level: expected a dict"),
    "sdk valid and dev": (
        lambda p: _pickle_bytes(p, pickle.dumps(dict.fromkeys("train valid dev test".split(), {}))),
        r"both 'valid' and its alias 'dev'"),
    "sdk IEMOCAP labels as regression": (
        lambda p: _pickle_bytes(p, pickle.dumps({s: {
            "text": np.zeros((2, 3, 4)), "audio": np.zeros((2, 3, 4)),
            "vision": np.zeros((2, 3, 4)), "labels": np.zeros((2, 4, 2))}
            for s in ("train", "valid", "test")})),
        r"\['labels'\]: IEMOCAP emotion labels \[N, 4, 2\] need task='classification'"),
    "sdk IEMOCAP sample without an emotion": (
        lambda p: lambda: load_sdk_pickle(_iemocap_file(p, np.array([1, 0, 2]), blank=1),
                                          task="classification"),
        r"\['train'\]\['labels'\]: each sample needs exactly one of \('neutral', 'happy', 'sad', "
        r"'angry'\); samples \[1\] have \[0\]"),
    "sdk IEMOCAP 3 classes": (
        lambda p: lambda: load_sdk_pickle(_iemocap_file(p, np.array([1, 0, 2])),
                                          task="classification", num_classes=3),
        r"map to 4 classes \(the emotions\) or 2 \(EMMR's negative / positive\), got 3"),
    "mat unknown layout": (
        lambda p: _mat(p, {"features": np.zeros((4, 2)), "labels": np.ones((4, 1))}),
        r"unrecognised multi-view layout; keys found: \['features', 'labels'\]\. Supported"),
    "mat square views only": (
        lambda p: _mat(p, {"X": _cell([np.zeros((4, 4))], False), "gt": np.arange(1, 5)[:, None]}),
        r"\['X'\]\[0\]: shape \(4, 4\) is ambiguous: .* no other view is oblong; pass "
        r"samples_axis=0"),
    "mat square view, others disagree": (
        lambda p: _mat(p, {"X": _cell([np.zeros((4, 3)), np.zeros((3, 4)), np.zeros((4, 4))],
                                      False), "gt": np.arange(1, 5)[:, None]}),
        r"\['X'\]\[2\]: shape \(4, 4\) is ambiguous: .* the other views disagree"),
    "mat samples_axis contradicted": (
        lambda p: _mat(p, {"X": _cell([np.zeros((4, 3))], False), "gt": np.arange(1, 5)[:, None]},
                       samples_axis=1),
        r"\['X'\]\[0\]: shape \(4, 3\) has no axis 1 \(samples_axis\) matching the 4 labels"),
    "mat view count mismatch": (
        lambda p: _mat(p, {"X": _cell([np.zeros((5, 3))], False), "gt": np.arange(4)[:, None]}),
        r"\['X'\]\[0\]: shape \(5, 3\) has no axis matching the 4 labels"),
    "mat X not a cell": (
        lambda p: _mat(p, {"X": np.zeros((4, 3)), "gt": np.arange(4)[:, None]}),
        r"\['X'\]: expected a cell array"),
    "mat presplit views misnumbered": (
        lambda p: _mat(p, {"x1_train": np.zeros((2, 3)), "x3_train": np.zeros((2, 3)),
                           "x1_test": np.zeros((2, 3)), "x3_test": np.zeros((2, 3)),
                           "gt_train": np.ones((2, 1)), "gt_test": np.ones((2, 1))}),
        r"view keys must be x1_train..xK_train"),
    "mat index out of range": (
        lambda p: _pool_mat(p, train_idx=np.array([0, 4]), test_idx=np.array([1])),
        r"train_idx: 0-based rows must lie in \[0, 4\)"),
    "mat overlapping indices": (
        lambda p: _pool_mat(p, train_idx=np.array([0, 1, 2]), test_idx=np.array([2, 3])),
        r"share 1 rows"),
    "mat one index file": (
        lambda p: (np.save(p / "bad_train_idx.npy", np.arange(3)), _pool_mat(p))[1],
        r"bad_train_idx.npy found but bad_test_idx.npy is missing"),
    "mat fractional labels": (
        lambda p: _pool_mat(p, gt=[[1.5], [2], [1], [2]]),
        r"\['gt'\]: class labels must be whole numbers"),
    "mat corrupt": (
        lambda p: ((p / "bad.mat").write_bytes(b"MATLAB garbage" * 20),
                   lambda: load_multiview_mat(p / "bad.mat"))[1],
        r"bad.mat: cannot read as a MATLAB .mat file"),
    "npz split names": (
        lambda p: _npz(p, split=np.array(["train", "dev", "tst"])),
        r"\['split'\]: unknown split names \['dev', 'tst'\]"),
    "npz mask values": (
        lambda p: _npz(p, x_mask=np.full((3, 2), 2)), r"\['x_mask'\]: mask values must be 0/1"),
    "npz mask shape": (
        lambda p: _npz(p, x_mask=np.ones((3, 3), bool)),
        r"expected mask shape \(3, 2\), got \(3, 3\)"),
    "npz orphan mask": (
        lambda p: _npz(p, y_mask=np.ones((3, 2), bool)), r"masks \['y_mask'\] have no modality"),
    "npz mismatched N": (
        lambda p: _npz(p, x=np.zeros((4, 2, 2), np.float32)),
        r"\['x'\]: 4 samples, but 'label' has 3"),
    "npz missing label": (
        lambda p: (np.savez(p / "bad.npz", x=np.zeros((3, 1, 1))),
                   lambda: load_npz(p / "bad.npz"))[1],
        r"missing key\(s\) \['label', 'split'\]"),
    "npz 4-D float array": (
        lambda p: _npz(p, y=np.zeros((3, 2, 2, 2), np.float32)),
        r"float arrays \{'y': \(3, 2, 2, 2\)\} are not modalities"),
    "npz no train rows": (
        lambda p: _npz(p, split=np.array([1, 2, 2])), r"no sample is in 'train'"),
    "npz corrupt": (
        lambda p: ((p / "bad.npz").write_bytes(b"PK\x03\x04 truncated"),
                   lambda: load_npz(p / "bad.npz"))[1],
        r"bad.npz: cannot read as .npz"),
    "unknown prefix": (
        lambda p: lambda: load_dataset("hdf5:/x.h5"),
        r"unknown source 'hdf5'; accepted forms: synthetic.*; mmsa:<.*; sdk:<.*; multiview:<.*; npz:<"),
    "no prefix": (lambda p: lambda: load_dataset("/data/aligned_50.pkl"), r"accepted forms"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_loader_errors_name_the_problem(tmp_path, case):
  make, pattern = ERROR_CASES[case]
  with pytest.raises(ValueError, match=pattern):
    make(tmp_path)()


@pytest.mark.parametrize("spec", ["mmsa", "sdk", "multiview", "npz"])
def test_missing_file_raises_file_not_found(tmp_path, spec):
  with pytest.raises(FileNotFoundError, match="nothere.bin: no such file"):
    load_dataset(f"{spec}:{tmp_path / 'nothere.bin'}")


def test_missing_index_file_raises_file_not_found(tmp_path):
  scipy.io.savemat(tmp_path / "a.mat", {"X": _cell([np.zeros((4, 3))], False), "gt": np.arange(4)})
  with pytest.raises(FileNotFoundError, match="train_idx: .*tr.npy: no such file"):
    load_multiview_mat(tmp_path / "a.mat", train_idx=tmp_path / "tr.npy", test_idx=[0])


# ==================================================================== real data (../shared/data)
def _shared_data() -> Path:
  return Path(os.environ.get("MMJAX_SHARED_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data")


def _real_file(name: str) -> Path:
  path = _shared_data() / name
  if not path.is_file():
    pytest.skip(f"real data not available: {path}")
  return path


def test_real_handwritten_uses_presplit_keys():
  path = _real_file("handwritten_6views.mat")
  ds = load_dataset(f"multiview:{path}")
  raw = scipy.io.loadmat(path)
  dims = (240, 76, 216, 47, 64, 6)
  assert ds.num_classes == 10
  assert ds.feature_shapes() == {f"view{k}": (1, d) for k, d in enumerate(dims)}
  sizes = {s: b.batch_size for s, b in ds.splits.items()}
  assert sizes["train"] + sizes["valid"] == 1600 and sizes["test"] == 400 and sizes["valid"] == 160
  counts = sum(np.bincount(b.label, minlength=10) for b in ds.splits.values())
  np.testing.assert_array_equal(counts, np.full(10, 200))
  for k in range(6):
    np.testing.assert_array_equal(
        ds.splits["test"].features[f"view{k}"][:, 0], raw[f"x{k + 1}_test"].astype(np.float32))
  np.testing.assert_array_equal(ds.splits["test"].label, raw["gt_test"].ravel() - 1)


def test_real_cub_uses_provided_index_files():
  path = _real_file("cub_googlenet_doc2vec_c10.mat")
  ds = load_multiview_mat(path)
  raw = scipy.io.loadmat(path)
  train_idx = np.load(path.with_name("cub_googlenet_doc2vec_c10_train_idx.npy"))
  test_idx = np.load(path.with_name("cub_googlenet_doc2vec_c10_test_idx.npy"))
  image, text = raw["X"][0]
  assert ds.num_classes == 10 and ds.feature_shapes() == {"view0": (1, 1024), "view1": (1, 300)}
  assert ds.splits["test"].batch_size == 120
  assert ds.splits["train"].batch_size + ds.splits["valid"].batch_size == 480
  counts = sum(np.bincount(b.label, minlength=10) for b in ds.splits.values())
  np.testing.assert_array_equal(counts, np.full(10, 60))
  test = ds.splits["test"]
  np.testing.assert_array_equal(test.features["view0"][:, 0], image[test_idx].astype(np.float32))
  np.testing.assert_array_equal(test.features["view1"][:, 0], text[test_idx].astype(np.float32))
  np.testing.assert_array_equal(test.label, raw["gt"].ravel()[test_idx] - 1)
  # train + valid rows are exactly the provided train rows (matched through the text view).
  pooled = np.concatenate([ds.splits[s].features["view1"][:, 0] for s in ("train", "valid")])
  expected = text[train_idx].astype(np.float32)
  np.testing.assert_array_equal(pooled[np.lexsort(pooled.T)], expected[np.lexsort(expected.T)])
