"""Test configuration: four forced CPU devices so data-parallel code is exercised on one host.

The flags must be set before JAX is imported anywhere in the test process. A fresh persistent
compilation cache per test session (inherited by the launcher subprocesses) lets the many runs of
one model — same-seed, resume, one-vs-four-device checks — compile once instead of every time.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
