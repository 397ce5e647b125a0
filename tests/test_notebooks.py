"""The four notebooks execute headless on the CPU with the embedded demo model (their assert cells are the checks:
perplexity ordering and the seed bug's refusal and repair in 03, bit-exact convention round trips in 02)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def demo_compile_cache(tmp_path_factory):
    # Same directory as test_demo.py's fixture: notebook kernels reuse the programs its CLI run compiled.
    d = tmp_path_factory.getbasetemp() / "megamoe-jax-cache"
    d.mkdir(exist_ok=True)
    return d


def test_four_notebooks_exist_and_are_stripped():
    import nbformat
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{p.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, demo_compile_cache, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(demo_compile_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.delenv("MPLBACKEND", raising=False)       # the kernel's inline backend renders the figures
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no figure rendered"
