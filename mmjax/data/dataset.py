"""A dataset: named splits, each one host-side :class:`~mmjax.data.batch.Batch` of NumPy arrays."""

from __future__ import annotations

import dataclasses

from mmjax.data.batch import TASKS, Batch

SPLITS = ("train", "valid", "test")


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

  def feature_shapes(self) -> dict[str, tuple[int, int]]:
    """Modality -> per-sample ``(T, D)``."""
    return {m: tuple(x.shape[1:]) for m, x in self.splits["train"].features.items()}
