"""XLA flags the tests use (see ``tests/conftest.py``), shared with the subprocesses they start."""

# Compile faster, run slower: the suite is dominated by compiling many small models.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
