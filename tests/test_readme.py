"""The README's Python code and the tutorials run as written (on small synthetic inputs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from annbatch.synthetic import make_adata

README = Path(__file__).parents[1] / "README.md"
LANDING = Path(__file__).parents[1] / "docs" / "index.md"


def _python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_has_python_code():
    assert _python_blocks(), "the README's quickstart is gone"


def test_readme_python_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    for i in (1, 2, 3):
        make_adata(3_000, 200, n_donors=2, seed=i, obs_prefix=f"d{i}").write_h5ad(tmp_path / f"donor{i}.h5ad")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _python_blocks():
        if "import scvi" in block and importlib.util.find_spec("scvi") is None:
            continue  # the scvi-tools example needs the `scvi` extra; tests/test_scvi.py skips alike
        exec(compile(block, str(README), "exec"), namespace)


def test_docs_landing_example_runs(tmp_path, monkeypatch):
    """The documentation's 30-second example, which makes its own input files."""
    (block,) = _python_blocks(LANDING)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(LANDING), "exec"), {})
    assert (tmp_path / "cells.zarr" / "dataset_0").exists()


TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.md"))


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(tutorial, tmp_path, monkeypatch):
    # the tutorials are MyST notebooks: their {code-cell} blocks run in order, as Jupyter would run them
    text = tutorial.read_text()
    if "annbatch_cli(\"train\"" in text:
        pytest.importorskip("lightning")  # the training tutorial runs `annbatch train`
    for module in ("torch", "scanpy", "scvi"):  # optional dependencies (the Python 3.12 leg has no torch)
        if f"import {module}" in text:
            pytest.importorskip(module)
    cells = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", text, flags=re.S)
    assert cells, f"{tutorial.name} has no code cells"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for cell in cells:
        code = "\n".join(line for line in cell.splitlines() if not line.startswith(("%", "!")))
        exec(compile(code, str(tutorial), "exec"), namespace)
