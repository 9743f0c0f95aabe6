"""docs/tutorial.ipynb runs top to bottom (nbclient, in this interpreter's kernel) with no error: its own cells
check e5lite against transformers and the score decomposition, so a drifted API or a wrong number fails here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "docs" / "tutorial.ipynb"
BUDGET_S = 60  # on two CPU cores; the suite's whole budget is 12 minutes


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbclient and ipykernel are in the dev extra")
    nbclient = pytest.importorskip("nbclient", reason="nbclient and ipykernel are in the dev extra")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # kept without outputs
    monkeypatch.chdir(tmp_path)  # whatever the notebook writes lands here
    t0 = time.perf_counter()
    # CellExecutionError on the first failing cell, with its traceback
    nbclient.NotebookClient(
        nb, timeout=BUDGET_S * 2, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.perf_counter() - t0
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "embeddings: max |e5lite - transformers|" in text  # the cells ran, their outputs came back
    assert "cosine" in text and "InfoNCE loss" in text
    print(f"tutorial ran in {elapsed:.1f} s")
