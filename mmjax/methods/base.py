"""The interface every method offers the generic trainer, and helpers shared by methods.

A method is three pure functions bundled in :class:`Method`:

* ``init(key, batch) -> (params, method_state)``
* ``loss(params, method_state, batch, key, train) -> (loss, (metrics, new_method_state, predictions))``
  where ``metrics`` holds every loss term (``"loss"`` is the total) and ``predictions`` are
  ``[B]`` scores (regression) or ``[B, C]`` logits (classification);
* ``predict(params, method_state, batch) -> predictions`` (evaluation mode, no loss terms computed).

A multi-stage method (e.g. EMMR, papers/002: a full-modality network trained first, then frozen)
also lists its :class:`Stage` s in ``Method.stages``; each stage has its own loss, validation
predictions and trainable subset, and starts from the previous stage's best parameters (see
``docs/training.md``). ``Method.predict`` is what the trained model is evaluated with.

The trainer (:mod:`mmjax.train`) never knows which method it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.data import Batch, Dataset
from mmjax.losses._common import masked_mean

Params = Any
MethodState = Any
LossOutput = tuple[jax.Array, tuple[dict[str, jax.Array], MethodState, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a method must know about the data: task, classes, modalities and their shapes.

  ``scoring`` is ``Dataset.scoring`` (``"sims_regression"`` for labels in [-1, 1]); ``None``
  means the task itself.
  """

  task: str
  num_classes: int | None
  modalities: tuple[str, ...]
  feature_shapes: dict[str, tuple[int, int]]
  scoring: str | None = None

  def __post_init__(self):
    if self.scoring is None:
      object.__setattr__(self, "scoring", self.task)

  @classmethod
  def from_dataset(cls, dataset: Dataset) -> TaskSpec:
    return cls(dataset.task, dataset.num_classes, dataset.modalities, dataset.feature_shapes(),
               dataset.scoring)

  @property
  def output_dim(self) -> int:
    return 1 if self.task == "regression" else int(self.num_classes)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of a multi-stage method; :func:`mmjax.train.fit` runs them in order.

  Attributes:
    name: names the stage in log lines, in the ``"stage"`` field of ``metrics.jsonl`` and in the
      workdir sub-folder ``<workdir>/<name>/`` holding its checkpoints (a plain folder name).
    loss: same signature as ``Method.loss``; the objective of this stage.
    predict: validation predictions for this stage's early stopping / model selection; ``None``
      uses ``Method.predict``.
    trainable: ``params -> pytree of bools`` with ``params``' structure, ``True`` = updated in this
      stage; the other leaves leave the stage bit-identical. ``None``: every leaf is trainable.
    num_epochs: epochs of this stage; ``None`` uses ``config.num_epochs``.
    prepare: ``(params, method_state, train_split) -> method_state``, run once when the stage
      starts (and again on resume, before its checkpoint is restored) on the stage's starting
      state and the whole training split (a :class:`~mmjax.data.Batch` of NumPy arrays, rows =
      ``batch.index``): where a stage caches per-sample values that no step of the stage
      changes (EMMR: the frozen teacher's outputs). ``None``: the state passes as it is.
  """

  name: str
  loss: Callable[[Params, MethodState, Batch, jax.Array, bool], LossOutput]
  predict: Callable[[Params, MethodState, Batch], jax.Array] | None = None
  trainable: Callable[[Params], Any] | None = None
  num_epochs: int | None = None
  prepare: Callable[[Params, MethodState, Batch], MethodState] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A method as the trainer sees it (see the module docstring).

  ``stages`` empty: one implicit stage training every parameter with ``loss``, selected with
  ``predict``. Otherwise the trainer runs ``stages`` in order and ``loss`` is not used by it.
  ``compute_dtype``: what its modules compute in (:func:`mmjax.methods.mixed_precision`).
  """

  name: str
  init: Callable[[jax.Array, Batch], tuple[Params, MethodState]]
  loss: Callable[[Params, MethodState, Batch, jax.Array, bool], LossOutput]
  predict: Callable[[Params, MethodState, Batch], jax.Array]
  stages: tuple[Stage, ...] = ()
  compute_dtype: str = "float32"

  def at_stage(self, stage: Stage) -> Method:
    """This method as ``stage`` trains it: the stage's loss, its predict (or this one's), no
    stages."""
    return dataclasses.replace(self, loss=stage.loss, predict=stage.predict or self.predict,
                               stages=())


def task_loss(outputs: jax.Array, batch: Batch, spec: TaskSpec) -> jax.Array:
  """Mean squared error (regression, EUAR eq. 11) or cross-entropy over the valid samples.

  Args:
    outputs: ``[B]`` predictions (regression) or ``[B, C]`` logits.
    batch: supplies ``label [B]`` and ``valid [B]``.
    spec: the task.
  """
  if spec.task == "regression":
    per_sample = jnp.square(outputs - batch.label)
  else:
    per_sample = optax.softmax_cross_entropy_with_integer_labels(
        outputs.astype(jnp.float32), batch.label)
  return masked_mean(per_sample, batch.valid)


def head_output(outputs: jax.Array, spec: TaskSpec) -> jax.Array:
  """``[B, 1]`` -> ``[B]`` for regression; logits unchanged for classification."""
  return outputs[..., 0] if spec.task == "regression" else outputs


def flax_method(
    name: str,
    model: nn.Module,
    spec: TaskSpec,
    regularizers: Callable[[dict[str, Any], Batch], dict[str, tuple[float, jax.Array]]] | None = None,
    task_weight: float = 1.0,
) -> Method:
  """A stateless method from a Flax model ``model(batch, train=...) -> (outputs, aux)``.

  ``regularizers(aux, batch)`` returns ``{term: (weight, value)}``; the loss is
  ``task_weight * task + sum weight * value`` and every term is reported under its name
  (``task``, the task loss of ``outputs``, too). ``task_weight = 0``: a model trained only through
  its terms (e.g. late fusion's per-modality losses) whose fused ``outputs`` are still evaluated.
  Stochastic layers draw from the ``"sample"`` and ``"dropout"`` RNG streams, both split from the
  step key.
  """

  def init(key, batch):
    params = model.init({"params": key}, batch, train=False)["params"]
    return params, {}

  def loss(params, state, batch, key, train):
    sample_key, dropout_key = jax.random.split(key)
    rngs = {"sample": sample_key, "dropout": dropout_key} if train else {}
    outputs, aux = model.apply({"params": params}, batch, train=train, rngs=rngs)
    predictions = head_output(outputs, spec)
    metrics = {"task": task_loss(predictions, batch, spec)}
    total = task_weight * metrics["task"]
    for term, (weight, value) in (regularizers(aux, batch) if regularizers else {}).items():
      metrics[term] = value
      total = total + weight * value
    metrics["loss"] = total
    return total, (metrics, state, predictions)

  def predict(params, state, batch):
    del state
    outputs, _ = model.apply({"params": params}, batch, train=False)
    return head_output(outputs, spec)

  return Method(name=name, init=init, loss=loss, predict=predict)
