"""examples/strategies.ipynb runs headless, every cell, on the embedded model (nbclient, as Jupyter would)."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "strategies.ipynb"


@pytest.mark.slow
def test_the_strategies_notebook_runs_every_cell_without_an_error(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # CellExecutionError on the first failing cell, with its traceback
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    html = [o["data"]["text/html"] for o in outputs if o.get("output_type") == "display_data" and "text/html" in o.get("data", {})]
    assert len(html) >= 5 and all("<svg" in page for page in html)  # every tree rendered
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the accuracy plot
