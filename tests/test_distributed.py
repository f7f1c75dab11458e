"""Multi-process data parallelism: two jax.distributed processes on localhost (CPU) train exactly
like one process holding the same global batch, write every log line once and resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.xla import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args, devices_per_process):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                       f"{TEST_XLA_FLAGS}")
  return subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed_worker", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_train_like_one_write_once_and_resume(tmp_path):
  """One process on 2 devices trains 3 epochs; two processes of 1 device train 2 epochs into a
  workdir, then resume it to 3: the same parameters, and each file and line written once."""
  single = launch([str(tmp_path / "single.npz"), "3"], devices_per_process=2)
  out, _ = single.communicate(timeout=600)
  assert single.returncode == 0, out[-3000:]
  outputs = []
  for epochs, resume in (("2", "0"), ("3", "1")):
    address = f"127.0.0.1:{free_port()}"
    workers = [launch([str(tmp_path / "multi.npz"), epochs, str(tmp_path / "run"), resume,
                       address, "2", str(i)], devices_per_process=1) for i in range(2)]
    for proc in workers:
      out, _ = proc.communicate(timeout=600)
      assert proc.returncode == 0, out[-3000:]
      outputs.append(out)
  one, two = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert set(one.files) == set(two.files)
  assert int(one["euar/devices"]) == int(two["euar/devices"]) == 2
  for key in one.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Process 0 alone logs; the resumed launch says so once per method.
  assert all("[process 1]" not in out for out in outputs)
  assert [out.count("[process 0] resumed after epoch 2") for out in outputs] == [0, 0, 2, 0]
  for name in ("concat", "euar"):
    with open(tmp_path / "run" / name / "metrics.jsonl") as f:
      assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / name / "config.json").read_text())["num_epochs"] == 3
