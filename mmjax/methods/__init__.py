"""Methods: EUAR, EASE, SAM-LML, EMMR and the fusion baselines, each a
:class:`~mmjax.methods.base.Method`.

``build(name, config, spec)`` is the one entry point the trainer and launchers use.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from mmjax.methods import baselines, ease, emmr, euar, samlml
from mmjax.methods.base import Method, Stage, TaskSpec, flax_method, task_loss
from mmjax.methods.precision import COMPUTE_DTYPES, mixed_precision

# name -> (builder, default model config)
REGISTRY: dict[str, tuple[Callable[..., Method], Callable[[], ml_collections.ConfigDict]]] = {
    "euar": (euar.build, euar.default_config),
    "ease": (ease.build, ease.default_config),
    "samlml": (samlml.build, samlml.default_config),
    "emmr": (emmr.build, emmr.default_config),
    "concat": (baselines.build_concat, baselines.default_config),
    "late_fusion": (baselines.build_late_fusion, baselines.default_config),
    "late_fusion_joint": (baselines.build_late_fusion_joint, baselines.default_config),
}


# The methods' own training corruption (``config.train_corruption = "method"``; see
# mmjax.data.train_corruption): what each paper's training applies on top of the data. Others: none.
TRAIN_CORRUPTION = {
    "ease": ease.TRAIN_CORRUPTION,
    "emmr": emmr.TRAIN_CORRUPTION,
}


def default_train_corruption(name: str) -> str:
  """The ``config.train_corruption`` spec that ``"method"`` stands for with method ``name``."""
  return TRAIN_CORRUPTION.get(name, "none")


def default_model_config(name: str) -> ml_collections.ConfigDict:
  return _lookup(name)[1]()


def build(name: str, config: ml_collections.ConfigDict, spec: TaskSpec) -> Method:
  """The method ``name`` with model hyper-parameters ``config`` for the data described by ``spec``."""
  return _lookup(name)[0](config, spec)


def _lookup(name: str):
  if name not in REGISTRY:
    raise ValueError(f"method: unknown {name!r}; available: {sorted(REGISTRY)}")
  return REGISTRY[name]
