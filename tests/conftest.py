"""Test configuration: four forced CPU devices so data-parallel code is exercised on one host.

The flag must be set before JAX is imported anywhere in the test process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
