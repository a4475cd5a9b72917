"""Every notebook in notebooks/ runs top to bottom without an error (its own asserts included), and
is committed with its outputs.

The kernel is `python3`; run inside the project's venv (`make test` does), whose python3 kernelspec
(`python -m ipykernel install --prefix .venv --name python3`) starts the venv's interpreter, so the
notebook imports the installed shardlm. The notebooks set their own XLA_FLAGS before importing jax;
the kernel is a fresh process, so conftest's flags do not leak into it.
"""

from __future__ import annotations

import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


# Values the test gives a notebook's cell tagged "parameters" (a cell setting them runs right after
# it, as papermill does): the layouts notebook on SmolLM2's first layer (every layout's per-layer
# collectives are the same), every cell the same.
TEST_PARAMETERS = {"sharding_layouts.ipynb": "LAYERS = 1"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    if path.name in TEST_PARAMETERS:
        [at] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ())]
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(TEST_PARAMETERS[path.name]))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the message holds the cell and its traceback
        pytest.fail(f"{path.name}: a cell raised:\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s")


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


def test_notebooks_saved_with_outputs():
    """Notebooks are committed executed (`make notebooks`), so they read without running: every code
    cell has run, in order, and the plots and tables are there."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert None not in counts, f"{path.name}: code cells {[i for i, n in enumerate(counts) if n is None]} " \
                                   "have not run; regenerate with `make notebooks`"
        assert counts == sorted(counts), f"{path.name}: cells ran out of order {counts}"
        assert any(c.outputs for c in code), f"{path.name}: no outputs saved"
        errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: saved with an error output"
