"""The machine a benchmark ran on, for its table's footer (no flags: any benchmark may import it)."""

import platform


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def allocator() -> str:
  """The malloc this process runs with: ``tcmalloc`` / ``jemalloc`` when one is preloaded
  (``LD_PRELOAD``, seen in ``/proc/self/maps``), else ``glibc``."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  return next((name for name in ("tcmalloc", "jemalloc") if name in maps), "glibc")
