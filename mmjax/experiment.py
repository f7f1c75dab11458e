"""Glue the launchers share: a full experiment config, data loading, method building, training.

Kept importable (and tested) so that ``experiments/*.py`` stay a dozen lines of flag handling.
"""

from __future__ import annotations

import os

import ml_collections

from mmjax import data as data_lib
from mmjax import methods
from mmjax.train import FitResult, default_train_config, fit


def get_config(method: str = "euar", dataset: str = "synthetic") -> ml_collections.ConfigDict:
  """Training defaults + ``method``'s model defaults + data options.

  Fields beyond :func:`mmjax.train.default_train_config`: ``method``, ``dataset`` (a
  :func:`mmjax.data.load_dataset` spec), ``data_seed`` (synthetic data / split seed),
  ``standardize`` (per-feature z-scoring fitted on train), ``model`` (the method's hyper-parameters).
  """
  config = default_train_config()
  config.method = method
  config.dataset = dataset
  config.data_seed = 0
  config.standardize = True
  config.model = methods.default_model_config(method)
  return config


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset named by ``config.dataset``, standardised on its train split if asked."""
  source = config.dataset.partition(":")[0]
  kwargs = {"seed": config.data_seed} if source in ("synthetic", "multiview") else {}
  dataset = data_lib.load_dataset(config.dataset, **kwargs)
  return data_lib.standardize(dataset) if config.standardize else dataset


def build_method(config: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> methods.Method:
  return methods.build(config.method, config.model, methods.TaskSpec.from_dataset(dataset))


def train(config: ml_collections.ConfigDict, workdir: str | None, *, resume: bool = False,
          dataset: data_lib.Dataset | None = None, log=print
          ) -> tuple[methods.Method, data_lib.Dataset, FitResult]:
  """Loads data (unless given), builds the method, trains; writes ``config.json`` to ``workdir``."""
  dataset = load_data(config) if dataset is None else dataset
  method = build_method(config, dataset)
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=1))
  return method, dataset, fit(method, dataset, config, workdir=workdir, resume=resume, log=log)
