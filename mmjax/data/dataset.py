"""A dataset: named splits, each one host-side :class:`~mmjax.data.batch.Batch` of NumPy arrays."""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.batch import TASKS, Batch

SPLITS = ("train", "valid", "test")

# How predictions are scored (mmjax.train.split_metrics): MOSI / MOSEI regression (labels in
# [-3, 3]), CH-SIMS regression (labels in [-1, 1]) or classification.
SCORINGS = ("regression", "sims_regression", "classification")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Splits ``train`` / ``valid`` / ``test`` of one task.

  Attributes:
    name: where it came from (e.g. ``"synthetic"``, ``"mmsa:/path/aligned_50.pkl"``).
    task: ``"regression"`` or ``"classification"``.
    num_classes: number of classes for classification, ``None`` for regression.
    splits: split name -> a whole split as one ``Batch`` of NumPy arrays.
  """

  name: str
  task: str
  num_classes: int | None
  splits: dict[str, Batch]

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
    if set(self.splits) != set(SPLITS):
      raise ValueError(f"splits: expected keys {list(SPLITS)}, got {sorted(self.splits)}")
    modalities = self.splits["train"].modalities
    for split, batch in self.splits.items():
      if batch.modalities != modalities:
        raise ValueError(
            f"splits[{split!r}]: modalities {batch.modalities} differ from train's {modalities}")
      for m in modalities:
        if batch.features[m].shape[1:] != self.splits["train"].features[m].shape[1:]:
          raise ValueError(
              f"splits[{split!r}].features[{m!r}]: per-sample shape "
              f"{batch.features[m].shape[1:]} differs from train's "
              f"{self.splits['train'].features[m].shape[1:]}")
      batch.validate(task=self.task, num_classes=self.num_classes)

  @property
  def modalities(self) -> tuple[str, ...]:
    return self.splits["train"].modalities

  @property
  def scoring(self) -> str:
    """One of :data:`SCORINGS`: ``"sims_regression"`` for a regression task whose labels all lie in
    [-1, 1] (CH-SIMS; MOSI / MOSEI labels span [-3, 3]), else the task."""
    if self.task == "regression" and all(
        np.all(np.abs(np.asarray(b.label)) <= 1.0) for b in self.splits.values()):
      return "sims_regression"
    return self.task

  def feature_shapes(self) -> dict[str, tuple[int, int]]:
    """Modality -> per-sample ``(T, D)``."""
    return {m: tuple(x.shape[1:]) for m, x in self.splits["train"].features.items()}
