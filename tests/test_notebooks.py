"""Executes every ``notebooks/*.ipynb`` top to bottom, so the notebooks (whose cells assert) never rot.

Each notebook runs in a fresh ``python3`` kernel whose interpreter is this test process's
``sys.executable`` (the venv's Python, which has mmjax installed), from the ``notebooks/`` folder.
A temporary kernelspec directory pins that interpreter: a ``python3`` kernelspec installed
elsewhere (user-wide or system-wide, pointing at another Python) cannot shadow it. The kernel
inherits this process's environment (including the CPU-device flags set in ``conftest.py``).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
import nbclient
from nbclient.exceptions import CellExecutionError
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """A kernelspec directory holding one ``python3`` kernel that runs ``sys.executable``."""
  root = tmp_path_factory.mktemp("kernels")
  spec_dir = root / KERNEL_NAME
  spec_dir.mkdir()
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"Python 3 ({sys.executable})",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return root


def run_notebook(nb: nbformat.NotebookNode, kernel_dir: pathlib.Path) -> nbformat.NotebookNode:
  """Executes ``nb`` in place from ``NOTEBOOK_DIR`` with the pinned kernel; returns it."""
  km = AsyncKernelManager(
      kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
  client = nbclient.NotebookClient(
      nb, km=km, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  return client.execute()


def test_kernel_runs_this_python(kernel_dir: pathlib.Path):
  check = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import os, sys\nprint(sys.executable)\nprint(os.getcwd())")])
  out = run_notebook(check, kernel_dir).cells[0].outputs[0]["text"].splitlines()
  assert out == [sys.executable, str(NOTEBOOK_DIR)]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, kernel_dir: pathlib.Path):
  nb = nbformat.read(path, as_version=4)
  try:
    run_notebook(nb, kernel_dir)
  except CellExecutionError as error:  # its message holds the failing cell's source and traceback
    message = f"{path.name} failed:\n{ANSI_ESCAPE.sub('', str(error))}"
    raise pytest.fail.Exception(message, pytrace=False) from None
