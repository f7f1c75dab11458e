"""``experiment.train`` with a workdir: what a resumed or repeated run accepts and refuses.

A refused run must name the changed field and leave the workdir as it was (``config.json``
included); a resume that changes only what cannot alter the run continues it.
"""

import shutil

import pytest

from mmjax import experiment


def _config(**changes):
  config = experiment.get_config("concat")  # the embedded synthetic data
  config.num_epochs, config.batch_size, config.progress = 1, 128, False
  for name, value in changes.items():
    target = config
    *parents, leaf = name.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _train(config, workdir, resume, lines=None):
  dataset, method = experiment.prepare(config)
  log = (lambda line: None) if lines is None else lines.append
  return experiment.train(config, str(workdir), resume=resume, dataset=dataset, method=method,
                          log=log)[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  _train(_config(), workdir, resume=False)
  return workdir


@pytest.mark.parametrize("changes, resume, message", [
    ({"learning_rate": 0.01}, True, "learning_rate 0.001 -> 0.01"),
    ({"data_seed": 1}, True, "data_seed 0 -> 1"),
    ({"model.hidden": 64}, True, "model.hidden 128 -> 64"),
    ({"method": "late_fusion"}, True, "method 'concat' -> 'late_fusion'"),
    ({}, False, "already holds checkpoints up to epoch 1; pass resume=True"),
])
def test_refused_runs_name_the_field_and_leave_the_workdir(trained, changes, resume, message):
  before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    _train(_config(**changes), trained, resume=resume)
  assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


def test_resume_may_add_epochs(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  lines = []
  result = _train(_config(num_epochs=2), workdir, resume=True, lines=lines)
  assert lines[0].startswith("resumed after epoch 1 (step ")
  assert [row["epoch"] for row in result.history] == [1, 2]
  assert '"num_epochs": 2' in (workdir / "config.json").read_text()


def test_resume_without_checkpoint_says_so(tmp_path):
  lines = []
  _train(_config(), tmp_path, resume=True, lines=lines)
  assert lines[0] == f"resume: no checkpoint in {tmp_path}; training from scratch"
