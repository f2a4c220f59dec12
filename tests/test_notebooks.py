"""Both notebooks execute top to bottom (nbclient) on a trace the test makes, without errors or
warnings, and show their figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from trace_factory import make_trace, tracked_trace

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("notebooks")
    tracked_trace(root / "run.h5", tokenizer)
    make_trace(root / "other.h5", loss="kto")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def _execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in _outputs(nb))


def _stderr(nb: nbformat.NotebookNode) -> str:
    """What the cells wrote to stderr, less tqdm's notice that ipywidgets is absent (from transformers)."""
    text = "".join(out.get("text", "") for out in _outputs(nb) if out.get("name") == "stderr")
    return "\n".join(line for line in text.splitlines()
                     if "TqdmWarning: IProgress not found" not in line and "import tqdm as notebook_tqdm" not in line)


@pytest.mark.parametrize("name", ["token_heatmaps.ipynb", "case_diagnostics.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "MARGINSCOPE_TRACE" in code[0].source and "/run-long.h5" in code[0].source


def test_token_heatmaps_notebook(run_dir, monkeypatch):
    nb = _execute("token_heatmaps.ipynb", {"MARGINSCOPE_TRACE": str(run_dir / "run.h5"),
                                           "MARGINSCOPE_TOKENIZER": str(run_dir / "tokenizer")}, monkeypatch)
    assert _images(nb) == 3 and _stderr(nb) == ""
    text = "".join(out.get("text", "") for out in _outputs(nb))
    assert "showing probe p0" in text
    tables = [out["data"]["text/html"] for out in _outputs(nb) if "text/html" in out.get("data", {})]
    assert tables and "positive" in tables[0]  # the cosine table, labelled by decoded tokens


def test_case_diagnostics_notebook(run_dir, monkeypatch):
    nb = _execute("case_diagnostics.ipynb", {"MARGINSCOPE_TRACE": str(run_dir / "run.h5"),
                                             "MARGINSCOPE_COMPARE": str(run_dir / "other.h5")}, monkeypatch)
    assert _images(nb) == 9 and _stderr(nb) == ""
    text = "".join(out.get("text", "") for out in _outputs(nb))
    assert "loss dpo" in text and "no other run to compare" not in text
    assert "first order against the observed change" in text and "Cases agree" in text
    tables = [out["data"]["text/html"] for out in _outputs(nb) if "text/html" in out.get("data", {})]
    assert any("actual update (first order)" in t for t in tables)
