"""Execute every notebook in notebooks/ headless (nbclient + ipykernel) and fail on any error.

The kernel is this interpreter (``sys.executable``), registered in a temporary kernelspec directory placed first on
JUPYTER_PATH, so the notebooks see the same biaslab as the tests whatever other kernels the machine has. The
notebooks hold their own assertions (each derivation is checked against the exact engine), so executing them
without an error is a test of their claims. They are committed with outputs stripped; this test checks that too.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "biaslab-tests"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"biaslab tests ({sys.executable})",
        "language": "python",
        # one torch thread: the toys are tiny and CI has 2 shared cores
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "OMP_NUM_THREADS": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    root = spec_dir.parent.parent
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    monkeypatch_module.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))  # no writes under $HOME
    monkeypatch_module.setenv("IPYTHONDIR", str(root / "ipython"))
    return KERNEL


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_series_is_there():
    names = [p.name for p in NOTEBOOKS]
    assert [n[:3] for n in names] == ["01_", "02_", "03_", "04_", "05_", "06_"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 1, f"{path.name} should render at least one plot"
    assert "import biaslab" in "".join(c.source for c in nb.cells if c.cell_type == "code") or any(
        "from biaslab" in c.source for c in nb.cells
    )
