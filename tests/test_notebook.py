"""notebooks/lyra_colab.ipynb runs top to bottom: install check, train, chat, evaluate against the base,
GGUF export. Executed with nbclient in smoke mode (the tiny offline model), set through its "parameters"
cell, in a temp working dir, so the notebook cannot rot.

    python -m pytest -q tests/test_notebook.py
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "lyra_colab.ipynb"


def read_notebook():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook


def parameters_cell(notebook):
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def test_the_notebook_is_stored_clean_and_defaults_to_the_real_job():
    notebook = read_notebook()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs before committing"
    assert re.search(r"^SMOKE = False\b", parameters_cell(notebook).source, flags=re.M)
    source = "\n".join(cell.source for cell in code)
    for module in ("lyra.train", "lyra.chat", "lyra.evaluate", "lyra.export"):
        assert f'"-m", "{module}"' in source
    assert '"compare_base=true"' in source and '"format=gguf"' in source and "scripts/setup.sh" in source


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path):
    from nbclient import NotebookClient

    notebook = read_notebook()
    cell = parameters_cell(notebook)
    # What a papermill run would inject: smoke mode, this checkout, no install (the suite runs installed).
    cell.source += f"\nSMOKE = True\nREPO_DIR = {str(REPO_ROOT)!r}\nINSTALL = False\n"
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    run_dir = tmp_path / "runs" / "colab"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert {"base", "delta", "eval_loss"} <= set(evaluation)
    assert evaluation["delta"]["eval_loss"] == pytest.approx(evaluation["eval_loss"] - evaluation["base"]["eval_loss"])
    assert (tmp_path / "runs" / "colab-gguf" / "model-f16.gguf").stat().st_size > 0
    assert (tmp_path / "runs" / "colab-gguf" / "Modelfile").is_file()

    printed = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for output in cell.outputs)
    assert "mode: smoke" in printed and "skipping scripts/setup.sh" in printed
    assert "$ " in printed and "prompt=你好，你是誰？" in printed
