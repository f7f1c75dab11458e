"""The fusion baselines against logistic regression on the real multi-view sets (docs/baselines.md).

Clean test accuracy (%) of, per data set:

* ``LR``: scikit-learn ``LogisticRegression(C=1.0, max_iter=5000)`` on the concatenated views;
* ``concat``: mmjax's early fusion;
* ``avg LR``: one ``LogisticRegression`` per view, ``predict_proba`` averaged over the views;
* ``late_fusion_joint``: per-view heads trained jointly through their averaged logits (what
  ``late_fusion`` was before docs/baselines.md);
* ``late_fusion``: one classifier per view on its own loss, probabilities averaged.

mmjax methods use their default model config (:func:`mmjax.methods.baselines.default_config`)
updated with ``--model`` (e.g. ``--model=l2=0.01,dropout=0.2``), and the shared training defaults
(``experiment.get_config(method, "multiview:<path>")``), with ``config.seed = 0 .. --seeds - 1``.
``--selection=last`` scores the last epoch of runs without early stopping instead of the
best-validation state, to separate what the model can reach from what model selection keeps.

Data sets: ``handwritten`` (file split 1600 / 400, of which mmjax's loader moves a stratified 10 %
of train to valid: 1440 / 160 / 400), ``cub`` (TMC index files: 431 / 49 / 120) and
``handwritten15``: a stratified ``--fraction`` (15 %) subsample of Handwritten's train rows, drawn
per class from mmjax's train and valid splits (220 / 20) with the same 400 test rows. Views are
standardised on the (subsampled) train split. Both sides see the same data: LR is fitted on mmjax's
train split (valid rows are used only by mmjax, for early stopping), and scored on the test split.
The data and LR are deterministic (± 0).

  python benchmarks/baselines_vs_logreg.py --data_dir=../shared/data --seeds=3
  python benchmarks/baselines_vs_logreg.py --data_dir=../shared/data --seeds=3 --selection=last
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from mmjax import data as data_lib
from mmjax import experiment, methods
from mmjax.data import Batch, Dataset
from mmjax.train import Checkpointer, evaluate

FILES = {"handwritten": "handwritten_6views.mat", "cub": "cub_googlenet_doc2vec_c10.mat",
         "handwritten15": "handwritten_6views.mat"}
METHODS = ("concat", "late_fusion_joint", "late_fusion")
# Table columns: each scikit-learn reference before the mmjax methods it is compared with.
COLUMNS = ("LR", "concat", "avg LR", "late_fusion_joint", "late_fusion")


def default_data_dir() -> Path:
  """``$MMJAX_SHARED_DATA``, else ``../shared/data`` beside the repository."""
  return Path(os.environ.get("MMJAX_SHARED_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data")


def stratified_subsample(split: Batch, fraction: float, seed: int) -> Batch:
  """``round(fraction · n_c)`` rows of each class ``c`` of ``split``, drawn without replacement
  with ``numpy.random.default_rng(seed)``, kept in their original order."""
  rng = np.random.default_rng(seed)
  label = np.asarray(split.label)
  rows = [rng.choice(np.flatnonzero(label == c), int(round(fraction * np.sum(label == c))),
                     replace=False) for c in np.unique(label)]
  return split.take(np.sort(np.concatenate(rows)))


def subsample_train(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
  """``dataset`` with stratified ``fraction`` subsamples of train and of valid; test unchanged."""
  splits = dict(dataset.splits)
  for name in ("train", "valid"):
    splits[name] = stratified_subsample(splits[name], fraction, seed)
  return dataclasses.replace(dataset, splits=splits)


def load(name: str, data_dir: Path, fraction: float = 0.15) -> tuple[Dataset, str]:
  """The standardised data set ``name`` (see the module docstring) and its ``multiview:`` spec."""
  spec = f"multiview:{data_dir / FILES[name]}"
  dataset = data_lib.load_dataset(spec)
  if name == "handwritten15":
    dataset = subsample_train(dataset, fraction)
  return data_lib.standardize(dataset), spec


def views(split: Batch) -> list[np.ndarray]:
  """The ``[N, D_k]`` features of every view (utterance-level data: one step per sample)."""
  return [np.asarray(split.features[m][:, 0]) for m in split.modalities]


def logreg(max_iter: int = 5000) -> LogisticRegression:
  return LogisticRegression(C=1.0, max_iter=max_iter)


def logreg_accuracy(dataset: Dataset, max_iter: int = 5000) -> float:
  """Test accuracy of one LR on the concatenated views, fitted on the train split."""
  train, test = dataset.splits["train"], dataset.splits["test"]
  model = logreg(max_iter).fit(np.concatenate(views(train), 1), train.label)
  return float(model.score(np.concatenate(views(test), 1), test.label))


def averaged_logreg_accuracy(dataset: Dataset, max_iter: int = 5000) -> float:
  """Test accuracy of ``argmax_c mean_k P_k(c | x_k)``, one LR per view fitted on train."""
  train, test = dataset.splits["train"], dataset.splits["test"]
  probs = [logreg(max_iter).fit(x, train.label).predict_proba(x_test)
           for x, x_test in zip(views(train), views(test))]
  return float(np.mean(np.argmax(np.mean(probs, 0), 1) == test.label))


def parse_model(text: str) -> dict[str, Any]:
  """``"l2=0.01,dropout=0.2"`` -> ``{"l2": 0.01, "dropout": 0.2}`` (values as Python literals)."""
  pairs = [item.partition("=") for item in filter(None, text.split(","))]
  if any(not sep for _, sep, _ in pairs):
    raise ValueError(f"--model: expected <field>=<value>,..., got {text!r}")
  return {name: ast.literal_eval(value) for name, _, value in pairs}


def mmjax_accuracy(dataset: Dataset, spec: str, method: str, model: dict[str, Any], seed: int,
                   selection: str = "best") -> float:
  """Clean test accuracy of ``method`` (default model config updated with ``model``) trained with
  the shared training defaults.

  ``selection="best"``: the state :func:`mmjax.train.fit` returns (best validation accuracy, early
  stopping). ``"last"`` (diagnosis only): no early stopping (``patience = 0``), the state after the
  last epoch, read back from the run's latest checkpoint.
  """
  config = experiment.get_config(method, spec)
  config.seed, config.progress = seed, False
  config.model.update(model)
  if selection == "best":
    built, _, result = experiment.train(config, None, dataset=dataset, log=lambda line: None)
    state = result.state
  else:
    config.patience = 0
    with tempfile.TemporaryDirectory() as workdir:
      built, _, result = experiment.train(config, workdir, dataset=dataset, log=lambda line: None)
      checkpointer = Checkpointer(workdir)
      state, _ = checkpointer.restore_latest(result.state)
      checkpointer.close()
  return evaluate(built, state, dataset.splits["test"], dataset.scoring)["accuracy"]


def cell(accuracies: list[float]) -> str:
  values = 100 * np.asarray(accuracies)
  return f"{values.mean():.2f} ± {values.std():.2f}"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", type=Path, default=default_data_dir(),
                      help="folder holding the .mat files (default: ../shared/data)")
  parser.add_argument("--sets", default="handwritten,cub,handwritten15",
                      help=f"comma-separated, from {sorted(FILES)}")
  parser.add_argument("--seeds", type=int, default=3, help="mmjax training seeds 0 .. seeds-1")
  parser.add_argument("--fraction", type=float, default=0.15,
                      help="handwritten15: stratified fraction of the train rows kept")
  parser.add_argument("--max_iter", type=int, default=5000, help="LogisticRegression max_iter")
  parser.add_argument("--model", default="",
                      help="model config overrides of every mmjax method, e.g. l2=0.01,dropout=0.2")
  parser.add_argument("--selection", choices=("best", "last"), default="best",
                      help="mmjax state scored: best validation epoch (what fit returns) or, to "
                           "diagnose selection, the last epoch of a run without early stopping")
  args = parser.parse_args(argv)
  sets = args.sets.split(",")
  unknown = sorted(set(sets) - set(FILES))
  if unknown:
    parser.error(f"--sets: unknown {unknown}; available: {sorted(FILES)}")
  try:
    model = parse_model(args.model)
  except (ValueError, SyntaxError) as e:
    parser.error(str(e))
  fields = set(methods.default_model_config("concat"))  # one config for the three baselines
  if not set(model) <= fields:
    parser.error(f"--model: unknown fields {sorted(set(model) - fields)}; known: {sorted(fields)}")
  rows = []
  for name in sets:
    start = time.perf_counter()
    dataset, spec = load(name, args.data_dir, args.fraction)
    row = {"set": name, "LR": cell([logreg_accuracy(dataset, args.max_iter)]),
           "avg LR": cell([averaged_logreg_accuracy(dataset, args.max_iter)])}
    for method in METHODS:
      row[method] = cell([mmjax_accuracy(dataset, spec, method, model, seed, args.selection)
                          for seed in range(args.seeds)])
    rows.append(row)
    sizes = "/".join(str(dataset.splits[s].batch_size) for s in ("train", "valid", "test"))
    print(f"{name} ({sizes}): {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
  state = {"best": "best validation epoch", "last": "last epoch, no early stopping"}[args.selection]
  print(f"Clean test accuracy (%), mmjax mean ± std over {args.seeds} seeds ({state}), model "
        f"defaults{' + ' + args.model if args.model else ''}\n")
  header = ("set",) + COLUMNS
  print("| " + " | ".join(header) + " |")
  print("|" + " --- |" * len(header))
  for row in rows:
    print("| " + " | ".join(row[h] for h in header) + " |")


if __name__ == "__main__":
  main()
