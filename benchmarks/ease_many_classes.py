"""Many classes, few samples: EASE against concat on a controlled multi-view classification set.

The set (drawn from ``--seed``): ``--classes`` Gaussian classes; each of three views (``--dims``) is
``mean_view[y] + --noise · N(0, I)`` with class means ``N(0, I)``; ``--per_class`` training, 2
validation and 10 test samples per class, one time step per view, standardised on train. Every
``--case`` (``<method>[:<model field>=<value>,...]``, as ``bench_methods.py``) trains with the
shared defaults of ``mmjax.experiment.get_config`` (and the method's own train-time corruption) and
prints its clean test accuracy, best epoch and wall time.

  python benchmarks/ease_many_classes.py                 # ≈ 7 min on 2 busy cores (7 cases)
  python benchmarks/ease_many_classes.py --case=ease:hidden=32 --case=concat:hidden=32
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# --case is bench_methods' flag (same syntax); this script only changes its default.
import bench_methods  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.set_default("case", [
    "concat", "concat:hidden=32", "ease:hidden=32",
    "ease:hidden=32,use_ucmi=False,use_ucsa=False,use_mipc=False", "ease:hidden=64", "ease",
    "ease:use_ucmi=False,use_ucsa=False,use_mipc=False"])
_CLASSES = flags.DEFINE_integer("classes", 40, "Number of classes K.", lower_bound=2)
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "Training samples per class.", lower_bound=1)
_DIMS = flags.DEFINE_list("dims", ["60", "30", "20"], "Feature size of each view.")
_NOISE = flags.DEFINE_float("noise", 1.5, "Within-class standard deviation.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Data and training seed.")


def make_dataset(num_classes: int, per_class: int, dims: Sequence[int], noise: float, seed: int):
  """The standardised ``Dataset`` of the module docstring (train / valid / test)."""
  from mmjax.data import Batch, Dataset, standardize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  means = [rng.normal(size=(num_classes, d)) for d in dims]

  def split(n_per_class):
    y = np.repeat(np.arange(num_classes), n_per_class)
    features = {f"view{i}": (means[i][y] + noise * rng.normal(size=(len(y), d)))[:, None, :]
                .astype(np.float32) for i, d in enumerate(dims)}
    return Batch.create(features, y.astype(np.int32), task="classification",
                        num_classes=num_classes)

  return standardize(Dataset("many_classes", "classification", num_classes,
                             {"train": split(per_class), "valid": split(2), "test": split(10)}))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  from mmjax.train import evaluate  # pylint: disable=g-import-not-at-top
  dataset = make_dataset(_CLASSES.value, _PER_CLASS.value, [int(d) for d in _DIMS.value],
                         _NOISE.value, _SEED.value)
  print(f"| case | test accuracy % | best epoch | s |  ({_CLASSES.value} classes, "
        f"{_PER_CLASS.value} train samples per class, seed {_SEED.value})")
  print("| --- | ---: | ---: | ---: |")
  for case in flags.FLAGS.case:
    method, overrides = bench_methods.parse_case(case)
    config = experiment.get_config(method, "synthetic:classification")
    config.seed, config.progress = _SEED.value, False
    config.model.update(overrides)
    start = time.perf_counter()
    built, _, result = experiment.train(config, None, dataset=dataset, log=lambda line: None)
    accuracy = evaluate(built, result.state, dataset.splits["test"], dataset.scoring)["accuracy"]
    print(f"| {case} | {100 * accuracy:.1f} | {result.best_epoch} | "
          f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
