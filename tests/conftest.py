"""Test configuration: four forced CPU devices so data-parallel code is exercised on one host.

The flags must be set before JAX is imported anywhere in the test process. The suite is dominated
by compilation of many small models, so two settings trade run-time speed for compile speed (tests
and subprocesses they start only; the library and launchers are untouched):

* ``--xla_backend_optimization_level=0`` (``TEST_XLA_FLAGS``, also used by the subprocess tests):
  ~20 % less wall time for the suite's heavy files;
* a fresh persistent compilation cache per test session (inherited by the launcher subprocesses),
  so the many runs of one model — same-seed, resume, one-vs-four-device checks — compile once.
"""

import atexit
import os
import shutil
import tempfile

from tests.helpers.xla import TEST_XLA_FLAGS  # pylint: disable=wrong-import-position

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
