"""Tests for multi-stage training in :func:`mmjax.train.fit` (``Method.stages``, docs/training.md).

A toy two-stage method: ``pred = A(x) + B(x)`` with ``x`` the time-averaged features and ``A``,
``B`` linear maps (Flax ``Dense`` sub-trees of the params). Stage ``"pretrain"`` fits ``A`` alone
(``B`` frozen) for ``PRETRAIN_EPOCHS``; stage ``"main"`` fits ``A + B`` with ``A`` frozen for
``config.num_epochs``. The toy draws no random numbers (dropout costs about a second of compile time
per stage); the stages' keys are checked directly. The ``reference`` fixture is the uninterrupted
run the other runs are compared against.
"""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.data import Batch, Dataset
from mmjax.methods import Method, Stage, TaskSpec, task_loss
from mmjax.train import FitResult, default_train_config, evaluate, fit

PRETRAIN_EPOCHS, MAIN_EPOCHS = 3, 2
STEPS_PER_EPOCH = 2  # 32 training samples, batches of 16
PRETRAIN_LINE = "[pretrain] stage 1/2: 2/4 parameter arrays trainable, up to 3 epochs"
MAIN_LINE = "[main] stage 2/2: 2/4 parameter arrays trainable, up to 2 epochs"


class _Killed(Exception):
  """Stands for the process being killed."""


class _Toy(nn.Module):
  """``A(x)`` (``full=False``) or ``A(x) + B(x)``: ``[B]`` regression scores."""

  @nn.compact
  def __call__(self, batch, full=True):
    x = jnp.concatenate([batch.features[m].mean(axis=1) for m in batch.modalities], axis=-1)
    a = nn.Dense(1, name="A")(x)[:, 0]
    return a + nn.Dense(1, name="B")(x)[:, 0] if full else a


def _toy_method(spec: TaskSpec) -> Method:
  """The toy method: stage "pretrain" trains A, stage "main" trains B."""
  model = _Toy()

  def init(key, batch):
    return model.init({"params": key}, batch)["params"], {"n": jnp.zeros(())}

  def make_loss(full):
    def loss(params, state, batch, key, train):
      del key, train
      pred = model.apply({"params": params}, batch, full=full)
      value = task_loss(pred, batch, spec)
      new_state = state if full else {"n": state["n"] + 1}  # pretrain counts its steps
      return value, ({"task": value, "loss": value}, new_state, pred)
    return loss

  def predict(params, state, batch):
    del state
    return model.apply({"params": params}, batch)

  def pretrain_predict(params, state, batch):
    # The pretrain step count on purpose: every later epoch's validation MAE is worse than the
    # first one's, so stage "pretrain" selects its first epoch, not its last.
    del params
    return jnp.full(batch.label.shape, state["n"])

  only = lambda name: lambda params: {k: jax.tree.map(lambda _: k == name, v)
                                      for k, v in params.items()}
  stages = (Stage("pretrain", make_loss(False), pretrain_predict, only("A"), PRETRAIN_EPOCHS),
            Stage("main", make_loss(True), trainable=only("B")))
  return Method("toy", init, make_loss(True), predict, stages)


@pytest.fixture(scope="module")
def dataset():
  """A linear regression task in NumPy (``make_synthetic`` would cost seconds of eager compiles)."""
  rng = np.random.default_rng(0)
  weights = rng.normal(size=6)

  def split(n):
    x = rng.normal(size=(n, 2, 6)).astype(np.float32)
    return Batch.create({"x": x}, (x.mean(axis=1) @ weights).astype(np.float32))

  return Dataset("toy", "regression", None, dict(train=split(32), valid=split(16), test=split(8)))


@pytest.fixture(scope="module")
def method(dataset):
  return _toy_method(TaskSpec.from_dataset(dataset))


def _config(**overrides) -> ml_collections.ConfigDict:
  config = default_train_config()
  # Weight decay and clipping: frozen leaves must escape them too (AdamW decays zero-grad leaves).
  config.update(dict(num_epochs=MAIN_EPOCHS, batch_size=16, learning_rate=5e-2, patience=0,
                     weight_decay=1e-2, grad_clip_norm=1.0, progress=False))
  config.update(overrides)
  return config


def _quiet(line: str) -> None:
  del line


@pytest.fixture(scope="module")
def reference(method, dataset, tmp_path_factory) -> tuple[FitResult, str, list[str]]:
  """The uninterrupted two-stage run, its workdir and its log lines."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  lines = []
  return fit(method, dataset, _config(), workdir=workdir, log=lines.append), workdir, lines


def _without(history, *keys):
  return [{k: v for k, v in record.items() if k not in keys} for record in history]


def _assert_same_run(result: FitResult, expected: FitResult) -> None:
  chex.assert_trees_all_equal(result.state, expected.state)
  assert _without(result.history, "seconds") == _without(expected.history, "seconds")
  assert (result.best_epoch, result.best_valid) == (expected.best_epoch, expected.best_valid)


def _heads(lines):
  """Log lines cut before their first ``" |"`` (epoch lines keep ``"[stage] epoch   N"``)."""
  return [line.split(" |")[0] for line in lines]


def _read_jsonl(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_leaves(tree, other, equal: bool) -> None:
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True):
    assert np.array_equal(a, b) == equal


# ----------------------------------------------------------------------------- one run


def test_history_layout_and_logs(reference):
  result, workdir, lines = reference
  stages = [(r["stage"], r["epoch"], r["step"]) for r in result.history]
  assert stages == ([("pretrain", e, STEPS_PER_EPOCH * e) for e in range(1, PRETRAIN_EPOCHS + 1)]
                    + [("main", e, STEPS_PER_EPOCH * e) for e in range(1, MAIN_EPOCHS + 1)])
  assert _read_jsonl(workdir) == result.history
  for stage in ("pretrain", "main"):
    assert os.path.isdir(os.path.join(workdir, stage, "checkpoints", "best"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert _heads(lines) == [PRETRAIN_LINE, "[pretrain] epoch   1", "[pretrain] epoch   2",
                           "[pretrain] epoch   3", MAIN_LINE, "[main] epoch   1",
                           "[main] epoch   2"]
  # best_epoch / best_valid are the last stage's, selected on its own validation MAE.
  main = [r for r in result.history if r["stage"] == "main"]
  maes = [r["valid/mae"] for r in main]
  assert result.best_epoch == 1 + int(np.argmin(maes))
  assert result.best_valid["mae"] == min(maes)


def test_stage_keys(reference):
  """Stage "main" (index 1) steps with ``fold_in(fold_in(PRNGKey(seed), 2 + 1), 1)``."""
  stage_root = jax.random.fold_in(jax.random.PRNGKey(0), 3)
  assert np.array_equal(reference[0].state.key, jax.random.fold_in(stage_root, 1))


def test_stage_one_selects_its_first_epoch(reference):
  """Precondition of the next test: stage "pretrain" keeps training after its best epoch (1)."""
  pretrain = [r for r in reference[0].history if r["stage"] == "pretrain"]
  maes = [r["valid/mae"] for r in pretrain]
  assert maes == sorted(maes) and maes[0] < maes[1] and PRETRAIN_EPOCHS > 1
  losses = [r["train/loss"] for r in pretrain]
  assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]


def test_frozen_leaves_are_bit_identical(reference, method, dataset):
  """A after "main" == A after pretrain epoch 1 (its best); B frozen in pretrain, trained after."""
  result = reference[0]
  pretrain = dataclasses.replace(method, stages=(
      dataclasses.replace(method.stages[0], num_epochs=1),))
  after_pretrain = fit(pretrain, dataset, _config(), log=_quiet).state.params
  params0, _ = method.init(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                           dataset.splits["train"].take(np.arange(2)))
  _assert_leaves(after_pretrain["B"], params0["B"], equal=True)
  _assert_leaves(after_pretrain["A"], params0["A"], equal=False)
  _assert_leaves(result.state.params["A"], after_pretrain["A"], equal=True)
  _assert_leaves(result.state.params["B"], params0["B"], equal=False)


def test_best_state_reproduces_best_valid(reference, method, dataset):
  result = reference[0]
  valid = evaluate(method, result.state, dataset.splits["valid"], dataset.task)
  assert valid == pytest.approx(result.best_valid, rel=1e-6)


def test_one_stage_equals_implicit_stage(method, dataset):
  implicit = dataclasses.replace(method, stages=())
  explicit = dataclasses.replace(method, stages=(Stage("train", method.loss),))
  got, want = (fit(m, dataset, _config(), log=_quiet) for m in (explicit, implicit))
  assert [r.pop("stage") for r in got.history] == ["train"] * MAIN_EPOCHS
  _assert_same_run(got, want)


# ----------------------------------------------------------------------------- kill + resume


def _fit_until(kill_at, method, dataset, workdir, *, resume):
  """A run killed when it logs a line starting with ``kill_at``; returns its log lines."""
  lines = []

  def log(line):
    if line.startswith(kill_at):
      raise _Killed
    lines.append(line)

  with pytest.raises(_Killed):
    fit(method, dataset, _config(), workdir=workdir, resume=resume, log=log)
  return lines


def test_killed_run_resumes_identically(reference, method, dataset, tmp_path):
  """Killed between the stages, resumed and killed inside stage 2, resumed to the end."""
  expected, workdir = reference[0], str(tmp_path)
  _fit_until("[main] stage 2/2", method, dataset, workdir, resume=False)
  lines = _fit_until("[main] epoch   2", method, dataset, workdir, resume=True)
  assert _heads(lines) == [PRETRAIN_LINE, "[pretrain] resumed after epoch 3 (step 6)", MAIN_LINE,
                           "[main] epoch   1"]  # pretrain restored, not retrained
  lines = []
  result = fit(method, dataset, _config(), workdir=workdir, resume=True, log=lines.append)
  assert _heads(lines) == [PRETRAIN_LINE, "[pretrain] resumed after epoch 3 (step 6)", MAIN_LINE,
                           "[main] resumed after epoch 1 (step 2)", "[main] epoch   2"]
  _assert_same_run(result, expected)
  assert _read_jsonl(workdir) == result.history


def test_fresh_run_refuses_used_workdir(reference, method, dataset):
  with pytest.raises(ValueError, match="workdir.*pretrain.*resume=True"):
    fit(method, dataset, _config(), workdir=reference[1], log=_quiet)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("stages, match", [
    (lambda s: (s[0], dataclasses.replace(s[1], name="pretrain")), r"stages\[1\].name.*twice"),
    (lambda s: (dataclasses.replace(s[0], name="a/b"),), r"stages\[0\].name"),
    (lambda s: (dataclasses.replace(s[0], num_epochs=0),), r"stages\[0\].num_epochs"),
    (lambda s: (dataclasses.replace(s[0], trainable=lambda p: {"A": True}),),
     r"stages\[0\].trainable"),
])
def test_bad_stages(stages, match, method, dataset):
  with pytest.raises(ValueError, match=match):
    fit(dataclasses.replace(method, stages=stages(method.stages)), dataset, _config(), log=_quiet)


def test_ties_keep_the_later_epoch_and_patience_counts_strict_improvements(method, dataset):
  """Constant validation predictions tie every epoch: the best state is the latest tie, and with
  patience 2 the stage stops after epoch 3 (improved at 1, no strict improvement at 2 and 3)."""
  stage = dataclasses.replace(method.stages[0], num_epochs=6,
                              predict=lambda params, state, batch: jnp.zeros(batch.label.shape))
  constant = dataclasses.replace(method, stages=(stage,))
  result = fit(constant, dataset, _config(patience=2), log=_quiet)
  assert [r["epoch"] for r in result.history] == [1, 2, 3]
  assert result.best_epoch == 3
  three = fit(dataclasses.replace(method, stages=(dataclasses.replace(stage, num_epochs=3),)),
              dataset, _config(), log=_quiet)
  _assert_leaves(result.state.params, three.state.params, equal=True)
