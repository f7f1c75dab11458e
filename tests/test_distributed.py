"""Multi-process data parallelism: two jax.distributed processes on localhost (CPU) train exactly
like one process holding the same global batch."""

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


def test_two_processes_train_like_one(tmp_path):
  single = launch([str(tmp_path / "single.npz")], devices_per_process=2)
  address = f"127.0.0.1:{free_port()}"
  workers = [launch([str(tmp_path / "multi.npz"), address, "2", str(i)], devices_per_process=1)
             for i in range(2)]
  for proc in [single, *workers]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
  one, two = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert set(one.files) == set(two.files)
  assert int(one["euar/devices"]) == int(two["euar/devices"]) == 2
  for key in one.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
