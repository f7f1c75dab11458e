"""Tests for mmjax.train: determinism, data parallelism, kill + resume, early stopping, errors.

Every run trains a small EUAR (Gaussian experts, so the per-step ``"sample"`` RNG matters) on a
small standardised synthetic dataset for a few epochs. ``REFERENCE`` is the uninterrupted run the
other runs are compared against.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.data import make_synthetic, standardize
from mmjax.methods import Method, TaskSpec, build, default_model_config
from mmjax.train import (
    FitResult, TrainingDiverged, TrainingInterrupted, data_mesh, default_train_config, evaluate, fit,
    fit_seeds)

NUM_EPOCHS = 3


class _Killed(Exception):
  """Stands for the process being killed."""


@pytest.fixture(scope="module")
def dataset():
  return standardize(make_synthetic(
      jax.random.key(0), n_train=64, n_valid=32, n_test=8, seq_len=4, dims=8))


@pytest.fixture(scope="module")
def method(dataset):
  config = default_model_config("euar")
  # A visible load-balancing weight: per-device (instead of global-batch) routing statistics
  # would break the 1-device == 4-device test.
  config.update(dict(hidden=16, num_experts=4, top_k=2, beta_balance=0.1))
  return build("euar", config, TaskSpec.from_dataset(dataset))


def _config(**overrides) -> ml_collections.ConfigDict:
  config = default_train_config()
  config.update(dict(num_epochs=NUM_EPOCHS, batch_size=16, learning_rate=1e-2, patience=0,
                     progress=False))
  config.update(overrides)
  return config


def _quiet(line: str) -> None:
  del line


@pytest.fixture(scope="module")
def reference(method, dataset, tmp_path_factory) -> tuple[FitResult, str]:
  """The uninterrupted run (default 4-device mesh), with its workdir."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return fit(method, dataset, _config(), workdir=workdir, log=_quiet), workdir


def _without_seconds(history):
  return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def _assert_same_run(result: FitResult, expected: FitResult) -> None:
  chex.assert_trees_all_equal(result.state, expected.state)
  assert _without_seconds(result.history) == _without_seconds(expected.history)
  assert (result.best_epoch, result.best_valid) == (expected.best_epoch, expected.best_valid)


def _assert_close_run(result: FitResult, expected: FitResult) -> None:
  """The same run up to float rounding (another compiled program of the same steps; Adam's
  normalised updates carry a rounding difference of the gradient into the parameters, as in the
  1-vs-4-device test)."""
  assert result.best_epoch == expected.best_epoch
  chex.assert_trees_all_close(result.state, expected.state, rtol=1e-4, atol=1e-6)
  assert len(result.history) == len(expected.history)
  for got, want in zip(_without_seconds(result.history), _without_seconds(expected.history)):
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def _read_jsonl(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- determinism


def test_reference_run_is_well_formed(reference, method, dataset):
  result, workdir = reference
  assert [r["epoch"] for r in result.history] == list(range(1, NUM_EPOCHS + 1))
  assert [r["step"] for r in result.history] == [4 * e for e in range(1, NUM_EPOCHS + 1)]
  assert {"train/task", "train/kl", "train/balance", "train/uloss", "train/loss",
          "train/grad_norm", "valid/mae"} <= set(result.history[0])
  assert _read_jsonl(workdir) == result.history
  maes = [r["valid/mae"] for r in result.history]
  assert result.best_epoch == 1 + int(np.argmin(maes))
  # The returned state is the best epoch's: evaluating it reproduces that epoch's validation.
  valid = evaluate(method, result.state, dataset.splits["valid"], dataset.task)
  assert valid == pytest.approx(result.best_valid, rel=1e-6)


def test_same_seed_is_bit_identical(reference, method, dataset):
  _assert_same_run(fit(method, dataset, _config(), log=_quiet), reference[0])


def test_different_seed_differs(reference, method, dataset):
  result = fit(method, dataset, _config(seed=1), log=_quiet)
  expected = reference[0]
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(expected.state.params)):
    assert not np.allclose(a, b)
  assert result.history[-1]["train/loss"] != expected.history[-1]["train/loss"]
  assert result.history[-1]["valid/mae"] != expected.history[-1]["valid/mae"]


def test_rbg_prng_runs_are_reproducible_and_resume_only_under_it(reference, method, dataset,
                                                                  tmp_path):
  """JAX_DEFAULT_PRNG_IMPL=rbg (docs/training.md): every key of the run follows it — the same seed
  gives the same run, another than threefry's; a threefry run does not resume under it."""
  with jax.default_prng_impl("rbg"):
    runs = [fit(method, dataset, _config(num_epochs=1), log=_quiet) for _ in range(2)]
    _assert_same_run(runs[0], runs[1])
    assert runs[0].state.key.shape == (4,)  # rbg key data (threefry: 2 words)
    assert runs[0].history[0]["train/loss"] != reference[0].history[0]["train/loss"]
    workdir = tmp_path / "run"
    shutil.copytree(reference[1], workdir)
    with pytest.raises(ValueError, match=r"holds a state of another structure"):
      fit(method, dataset, _config(), workdir=str(workdir), resume=True, log=_quiet)


@pytest.mark.parametrize("overrides", [dict(epoch_mode="stream"), dict(scan_chunk=3)])
def test_scanned_epochs_equal_the_streaming_loop(overrides, reference, method, dataset):
  """The reference scans each epoch (4 steps) on device-held data; streaming host batches step by
  step, or scanning in chunks of 3 + 1 steps, runs the same steps on the same batches: the same
  run up to the rounding of differently fused programs."""
  assert _config().epoch_mode == "auto" and reference[0].history  # the reference scans
  _assert_close_run(fit(method, dataset, _config(**overrides), log=_quiet), reference[0])


def test_one_device_matches_four_devices(reference, method, dataset):
  assert len(jax.devices()) == 4  # tests/conftest.py forces four CPU devices.
  result = fit(method, dataset, _config(), mesh=data_mesh(jax.devices()[:1]), log=_quiet)
  expected = reference[0]
  assert result.best_epoch == expected.best_epoch
  chex.assert_trees_all_close(result.state.params, expected.state.params, rtol=1e-4, atol=1e-6)
  for got, want in zip(result.history, expected.history):
    for key in want:
      if key.startswith(("train/", "valid/")):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_vmapped_seeds_equal_separate_runs(method, dataset, tmp_path):
  """Seeds 1 and 0 in one program, early-stopped with patience 1 (seed 0 stops after epoch 2 and,
  half of the stack, leaves it; seed 1 trains 3): vmapped, each equals its own fit up to the rounding of
  batched matmuls; ``exact`` (lax.map), bit for bit. Each seed's folder is a finished fit's,
  which resume reloads as is."""
  dirs = [tmp_path / "seed1", tmp_path / "seed0"]
  together = fit_seeds(method, dataset, _config(patience=1), [1, 0], workdirs=dirs,
                       log=lambda seed, line: None)
  exact = fit_seeds(method, dataset, _config(patience=1), [1, 0], exact=True,
                    log=lambda seed, line: None)
  alone = [fit(method, dataset, _config(seed=seed, patience=1), log=_quiet) for seed in (1, 0)]
  assert [len(r.history) for r in alone] == [3, 2]
  for batched, mapped, want in zip(together, exact, alone):
    _assert_close_run(batched, want)
    _assert_same_run(mapped, want)
  lines = []
  reloaded = fit(method, dataset, _config(patience=1), workdir=str(dirs[1]), resume=True,
                 log=lines.append)
  assert lines == ["resumed after epoch 2 (step 8)"]
  _assert_same_run(reloaded, together[1])
  assert _read_jsonl(str(dirs[1])) == together[1].history


# ----------------------------------------------------------------------------- kill + resume


def _kill_after_epochs(method, dataset, workdir, epochs):
  """A run that ends cleanly after ``epochs`` epochs, as if stopped between epochs."""
  fit(method, dataset, _config(num_epochs=epochs), workdir=workdir, log=_quiet)


def _kill_before_checkpoint(method, dataset, workdir, epochs, **overrides):
  """Killed after training epoch ``epochs + 1`` but before its checkpoint is written (with
  ``async_checkpoint``, possibly while epoch ``epochs``' is still being written)."""

  def log(line):
    if line.startswith(f"epoch {epochs + 1:3d}"):
      raise _Killed

  with pytest.raises(_Killed):
    fit(method, dataset, _config(**overrides), workdir=workdir, log=log)


def _kill_between_saves(method, dataset, workdir, epochs, monkeypatch):
  """Killed inside the checkpointing of epoch ``epochs + 1``, after its first orbax save."""
  save = ocp.CheckpointManager.save

  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == epochs + 1:
      raise _Killed

  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", save_then_die)
    with pytest.raises(_Killed):
      fit(method, dataset, _config(), workdir=workdir, log=_quiet)


@pytest.mark.parametrize("kill, epochs, overrides", [
    (_kill_after_epochs, 1, {}),
    (_kill_before_checkpoint, 1, {}),
    (_kill_before_checkpoint, 1, dict(async_checkpoint=True)),
    (_kill_between_saves, NUM_EPOCHS - 1, {}),
])
def test_killed_run_resumes_identically(kill, epochs, overrides, reference, method, dataset,
                                        tmp_path, monkeypatch):
  expected, _ = reference
  # The last epoch must be the best one, or a wrongly restored best state would go unnoticed.
  assert expected.best_epoch == NUM_EPOCHS
  workdir = str(tmp_path)
  if kill is _kill_between_saves:
    kill(method, dataset, workdir, epochs, monkeypatch)
  else:
    kill(method, dataset, workdir, epochs, **overrides)
  lines = []
  result = fit(method, dataset, _config(), workdir=workdir, resume=True, log=lines.append)
  assert lines[0].startswith(f"resumed after epoch {epochs}")
  assert len(lines) == 1 + NUM_EPOCHS - epochs
  _assert_same_run(result, expected)
  assert _read_jsonl(workdir) == result.history


def _largest_file(path):
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _set_checksum(meta_dir, value):
  meta = json.loads((meta_dir / "metadata").read_text())
  (meta_dir / "metadata").write_text(json.dumps(dict(meta, checksum=value)))


CORRUPTIONS = {  # applied to checkpoints/latest/<epoch>; the expected reason in the log line
    "truncated": (lambda c: (f := _largest_file(c / "state" / "d")).write_bytes(
        f.read_bytes()[:f.stat().st_size // 2]), ""),
    "zeroed": (lambda c: (f := _largest_file(c / "state" / "d")).write_bytes(
        bytes(f.stat().st_size)), ""),
    "bit flip": (lambda c: (f := _largest_file(c / "state" / "d")).write_bytes(
        (b := bytearray(f.read_bytes())) and bytes(
            b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0x10]) + b[len(b) // 2 + 1:])), ""),
    "corrupt JSON": (lambda c: (c / "meta" / "metadata").write_text("{not json"), ""),
    "deleted item": (lambda c: shutil.rmtree(c / "state"), ""),
    "checksum mismatch": (lambda c: _set_checksum(c / "meta", "0" * 64), "(checksum mismatch)"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(corruption, reference, method,
                                                              dataset, tmp_path):
  """The finished reference run keeps epochs 2 and 3; epoch 3 corrupted: the resume says so,
  restores epoch 2, redoes epoch 3 and ends as the uninterrupted run."""
  expected, source = reference
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  corrupt, reason = CORRUPTIONS[corruption]
  corrupt(workdir / "checkpoints" / "latest" / str(NUM_EPOCHS))
  lines = []
  result = fit(method, dataset, _config(), workdir=str(workdir), resume=True, log=lines.append)
  assert lines[0].startswith(f"checkpoint {workdir / 'checkpoints' / 'latest' / '3'} is unusable")
  assert reason in lines[0] and lines[0].endswith("falling back to the previous one")
  assert lines[1].startswith(f"resumed after epoch {NUM_EPOCHS - 1}")
  _assert_same_run(result, expected)


def test_no_usable_checkpoint_is_one_error(reference, method, dataset, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[1], workdir)
  for epoch in (NUM_EPOCHS - 1, NUM_EPOCHS):
    _set_checksum(workdir / "checkpoints" / "latest" / str(epoch) / "meta", "0" * 64)
  with pytest.raises(ValueError, match=r"checkpoints: no usable checkpoint in .*latest \(epoch 3: "
                     r"checksum mismatch; epoch 2: checksum mismatch\)"):
    fit(method, dataset, _config(), workdir=str(workdir), resume=True, log=_quiet)


def test_checkpoint_of_another_structure_is_refused_and_kept(reference, method, dataset, tmp_path):
  """A run whose state gained an array (another version of the method) resumes a workdir: refused
  in one line, and no checkpoint is deleted (it is foreign, not damaged)."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[1], workdir)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  init = lambda key, batch: (method.init(key, batch)[0], {"table": jnp.zeros((4, 2))})
  with pytest.raises(ValueError, match=r"checkpoints: .*latest/3 holds a state of another structure "
                     r"than this run's \(\d+ arrays saved, \d+ expected\).*nothing was deleted"):
    fit(dataclasses.replace(method, init=init), dataset, _config(), workdir=str(workdir),
        resume=True, log=_quiet)
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_disk_full_names_the_intact_checkpoint_and_resumes(reference, method, dataset, tmp_path,
                                                          monkeypatch):
  def no_space(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  fit(method, dataset, _config(num_epochs=1), workdir=str(tmp_path), log=_quiet)
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", no_space)
    with pytest.raises(OSError, match=r"the checkpoint of epoch 2 could not be written \(No space "
                       r"left on device\); epoch 1 in .*latest is intact; free space and resume"):
      fit(method, dataset, _config(), workdir=str(tmp_path), resume=True, log=_quiet)
  _assert_same_run(fit(method, dataset, _config(), workdir=str(tmp_path), resume=True, log=_quiet),
                   reference[0])


@pytest.mark.parametrize("signum, overrides", [(signal.SIGTERM, dict(epoch_mode="stream")),
                                               (signal.SIGINT, dict(scan_chunk=1))])
def test_signal_saves_at_the_next_step_and_resumes_identically(signum, overrides, reference, method,
                                                               dataset, tmp_path):
  """The signal arrives while epoch 1 is logged: the run stops after the next step (step 5, the
  first of epoch 2; a scanned epoch in chunks of one step), saved; the resume continues inside
  epoch 2 and ends as the uninterrupted run of the same config, bit for bit."""
  expected = fit(method, dataset, _config(**overrides), log=_quiet)
  _assert_close_run(expected, reference[0])

  def log(line):
    if line.startswith("epoch   1"):
      os.kill(os.getpid(), signum)

  previous = signal.getsignal(signum)
  with pytest.raises(TrainingInterrupted, match=rf"^interrupted by {signum.name} at epoch 2, step 5: "
                     r"saved under .*; resume with --resume"):
    fit(method, dataset, _config(**overrides), workdir=str(tmp_path), log=log)
  assert signal.getsignal(signum) is previous  # handlers put back
  lines = []
  result = fit(method, dataset, _config(**overrides), workdir=str(tmp_path), resume=True,
               log=lines.append)
  assert lines[:2] == ["resumed after epoch 1 (step 4)",
                       "continuing epoch 2 after step 5 (1 of its steps done before the interruption)"]
  _assert_same_run(result, expected)
  assert _read_jsonl(str(tmp_path)) == result.history
  assert not os.listdir(tmp_path / "checkpoints" / "interrupted")  # cleared once epoch 2 is saved


def test_resume_without_checkpoint_starts_fresh(reference, method, dataset, tmp_path):
  lines = []
  result = fit(method, dataset, _config(), workdir=str(tmp_path), resume=True, log=lines.append)
  assert not any(line.startswith("resumed") for line in lines)
  _assert_same_run(result, reference[0])


def test_resume_requires_workdir(method, dataset):
  with pytest.raises(ValueError, match="resume"):
    fit(method, dataset, _config(), resume=True, log=_quiet)


def test_fresh_run_refuses_used_workdir(reference, method, dataset):
  with pytest.raises(ValueError, match="workdir.*resume=True"):
    fit(method, dataset, _config(), workdir=reference[1], log=_quiet)


def test_divergence_stops_at_the_step_and_keeps_the_good_checkpoints(dataset, tmp_path):
  """Adam (lr 1) moves ``w`` by about 1 per step; the loss is NaN once ``w > 5.5``, i.e. at step 7
  (``w`` ≈ 6 after 6 steps): epoch 2 of 4 steps. Epoch 1 stays the latest and the best."""
  loss = lambda params, state, batch, key, train: (
      (value := (params["w"] - 100.0) ** 2 + jnp.where(params["w"] > 5.5, jnp.nan, 0.0)),
      ({"loss": value}, state, jnp.broadcast_to(params["w"], batch.label.shape)))
  toy = Method(name="toy", init=lambda key, batch: ({"w": jnp.zeros(())}, {}), loss=loss,
               predict=lambda params, state, batch: jnp.broadcast_to(params["w"], batch.label.shape))
  with pytest.raises(TrainingDiverged, match=r"^training diverged at epoch 2, step 7: loss = nan; "
                     r"the checkpoints up to epoch 1 are kept"):
    fit(toy, dataset, _config(learning_rate=1.0, num_epochs=4), workdir=str(tmp_path), log=_quiet)
  assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["1"]
  assert sorted(os.listdir(tmp_path / "checkpoints" / "best")) == ["1"]
  assert [row["epoch"] for row in _read_jsonl(str(tmp_path))] == [1]


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_returns_best_epoch(method, dataset):
  # Validation labels are negated: the better the model fits the training data, the worse its
  # validation MAE, so validation peaks early and training must stop `patience` epochs later.
  valid = dataset.splits["valid"]
  shifted = dataclasses.replace(dataset, splits=dict(
      dataset.splits, valid=valid.replace(label=-valid.label)))
  patience, num_epochs = 1, 8
  result = fit(method, shifted, _config(patience=patience, num_epochs=num_epochs), log=_quiet)
  maes = [r["valid/mae"] for r in result.history]
  assert len(maes) < num_epochs
  assert result.best_epoch == 1 + int(np.argmin(maes))
  assert len(maes) == result.best_epoch + patience
  assert maes[-1] > maes[result.best_epoch - 1]
  valid_metrics = evaluate(method, result.state, shifted.splits["valid"], shifted.task)
  assert valid_metrics["mae"] == pytest.approx(min(maes), rel=1e-6)
  assert valid_metrics["mae"] != pytest.approx(maes[-1], rel=1e-6)


# ----------------------------------------------------------------------------- errors


def test_batch_size_must_divide_device_count(method, dataset):
  with pytest.raises(ValueError, match="batch_size"):
    fit(method, dataset, _config(batch_size=6), log=_quiet)


def test_sims_style_labels_are_scored_with_sims_metrics():
  """Labels in [-1, 1] (CH-SIMS): validation uses sims_regression_metrics (acc2/3/5, f1), and the
  model selection its MAE; MOSI-range labels keep the MOSI metrics."""
  from mmjax import metrics  # pylint: disable=g-import-not-at-top
  from mmjax.train import predict  # pylint: disable=g-import-not-at-top
  from mmjax.data import load_dataset  # pylint: disable=g-import-not-at-top
  sizes = dict(n_train=64, n_valid=32, n_test=8, seq_len=2, dims=4)
  base = standardize(load_dataset("synthetic", seed=3, **sizes))
  assert base.scoring == "regression"
  sims = standardize(load_dataset("synthetic:sims", seed=3, **sizes))
  np.testing.assert_allclose(sims.splits["valid"].label, base.splits["valid"].label / 3.0)
  assert sims.scoring == "sims_regression"
  method = build("concat", default_model_config("concat"), TaskSpec.from_dataset(sims))
  config = default_train_config()
  config.update(num_epochs=2, batch_size=32, progress=False)
  result = fit(method, sims, config, log=_quiet)
  assert {"valid/acc2", "valid/acc3", "valid/acc5", "valid/f1", "valid/mae"} <= set(
      result.history[-1])
  assert "valid/acc7" not in result.history[-1]
  want = metrics.sims_regression_metrics(
      predict(method, result.state, sims.splits["valid"], batch_size=32),
      sims.splits["valid"].label)
  assert result.best_valid == pytest.approx(want, rel=1e-6)
  assert evaluate(method, result.state, sims.splits["valid"], sims.scoring) == pytest.approx(want)
