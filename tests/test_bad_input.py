"""Bad input that used to be accepted silently: each case now ends in one ``ValueError`` naming
the field (the launchers print it as one ``error:`` line, exit code 2)."""

import numpy as np
import pytest

from mmjax import experiment, train
from mmjax.data import Batch

FEATURES = {"a": np.zeros((2, 3, 4), np.float32)}


def _npz_config(tmp_path, num_classes, split=(0, 0, 0, 0, 1, 2)):
  x = np.random.default_rng(0).normal(size=(6, 2, 3)).astype(np.float32)
  np.savez(tmp_path / "d.npz", x=x, label=np.array([0, 1, 2, 3, 4, 0]), split=np.array(split))
  config = experiment.get_config("concat", f"npz:{tmp_path / 'd.npz'}")
  config.num_classes = num_classes
  return config


@pytest.mark.parametrize("make, message", [
    (lambda p: Batch.create(FEATURES, np.array(["neg", "pos"])),
     "label: expected numeric labels, got dtype <U3"),
    (lambda p: Batch.create(FEATURES, np.array([0.5, np.nan], np.float32)),
     "label: contains NaN or inf"),
    (lambda p: experiment.load_data(_npz_config(p, 3)),
     r"label: values must lie in \[0, 3\), got range \[0, 3\]"),
    (lambda p: experiment.load_data(_with(experiment.get_config("concat"), num_classes=3)),
     "config.num_classes: 'synthetic' data has its own classes, leave it 0 .* got 3"),
    (lambda p: experiment.load_data(_with(experiment.get_config("concat", "mmsa:/x.pkl"),
                                          num_classes=2)),
     "config.num_classes: binning mmsa scores into 2 classes needs config.task=classification"),
    (lambda p: experiment.load_data(_npz_config(p, 0, split=(0, 0, 0, 0, 0, 2))),
     "dataset: 'npz:.*d.npz' has no valid samples"),
    (lambda p: experiment.check_config(_with(experiment.get_config("concat"), num_classes=1)),
     "config.num_classes: expected 0 .* or a class count >= 2, got 1"),
])
def test_refused_with_the_field_named(tmp_path, make, message):
  with pytest.raises(ValueError, match=message):
    make(tmp_path)


def test_npz_num_classes_is_used(tmp_path):
  """``num_classes`` above the labels' range is the dataset's class count (no longer ignored)."""
  assert experiment.load_data(_npz_config(tmp_path, 7)).num_classes == 7


def _with(config, **changes):
  config.update(changes)
  return config


def _raise(error):
  raise error


@pytest.mark.parametrize("error, code, line", [
    (ValueError("config.batch_size: must be > 0,\n  got 0"), 2,
     "error: config.batch_size: must be > 0, got 0"),
    (NotADirectoryError(20, "Not a directory", "/tmp/file/run"), 2,
     "error: [Errno 20] Not a directory: '/tmp/file/run'"),
    (train.TrainingDiverged("training diverged at epoch 2, step 7: loss = nan"), 2,
     "error: training diverged at epoch 2, step 7: loss = nan"),
    (train.TrainingInterrupted("interrupted by SIGTERM at epoch 1, step 5: saved", 15), 143,
     "interrupted by SIGTERM at epoch 1, step 5: saved"),
])
def test_launchers_end_in_one_line_and_an_exit_code(capsys, error, code, line):
  """What the launchers wrap every step in: bad input, a refused file system path and divergence
  end in one ``error:`` line and exit 2; a saved interruption in its line and ``128 + signal``."""
  with pytest.raises(SystemExit) as exited:
    experiment.exit_on_bad_input(_raise)(error)
  assert exited.value.code == code
  assert capsys.readouterr().err == line + "\n"
