"""Every notebooks/*.ipynb runs top to bottom without errors, in CI mode (smaller sizes).

Needs the ``notebooks`` extra (nbclient, nbformat, ipykernel, matplotlib); skipped without it.
The notebooks are executed in memory: the committed files (with their outputs) are not changed.
Each notebook gets a wall-clock deadline (FASTBP_NOTEBOOK_TIMEOUT seconds, default 600) as a
guard against hangs; it is far above the expected run time, not a performance check.
"""
import os
import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DEADLINE = float(os.environ.get("FASTBP_NOTEBOOK_TIMEOUT", 600))


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("CI", "true")              # the notebooks read it and shrink their sizes
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    end = time.monotonic() + DEADLINE

    def remaining(cell):                          # per-notebook deadline, spread over the cells
        return max(1, int(end - time.monotonic()))

    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=int(DEADLINE), timeout_func=remaining,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}}, record_timing=False)
    try:
        client.execute()
    except nbclient.exceptions.CellTimeoutError:
        pytest.fail(f"{path.name}: did not finish within {DEADLINE:.0f} s "
                    "(FASTBP_NOTEBOOK_TIMEOUT)")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
