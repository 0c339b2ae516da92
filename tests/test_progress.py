"""The conversion's "reading rows" bar: one per dataset, counting that dataset's rows, ending at 100 %."""

from __future__ import annotations

import io

import pytest
import scipy.sparse as sp
import tqdm

import annbatch.preshuffle._build as build
from annbatch import Collection
from annbatch.synthetic import make_adata


class _Recorded(tqdm.tqdm):
    """A real tqdm, drawing every update into a buffer and remembered after it closes."""

    bars: list[_Recorded] = []

    def __init__(self, *args, **kwargs):
        self.out, self.label = io.StringIO(), kwargs.get("desc", "")  # a disabled bar keeps no desc
        kwargs.update(file=self.out, mininterval=0, miniters=1)  # draw every update
        super().__init__(*args, **kwargs)
        _Recorded.bars.append(self)


@pytest.fixture
def bars(monkeypatch) -> list[_Recorded]:
    _Recorded.bars = []
    monkeypatch.setattr(build, "tqdm", _Recorded)
    return _Recorded.bars


def _rows_bars(bars: list[_Recorded]) -> list[_Recorded]:
    return [b for b in bars if b.label == "reading rows"]


def _adata(n_obs: int, *, seed: int, dense: bool = False, genes=None):
    adata = make_adata(n_obs, 60, dense=dense, seed=seed, var_names=genes)
    adata.layers["counts"] = adata.X.copy() if dense else sp.csr_matrix(adata.X, copy=True)
    assert set(adata.obsm) == {"X_pca"}  # X, a layer and an obsm entry: three elements
    return adata


def _assert_full(bars: list[_Recorded], dataset_rows: list[int]) -> None:
    rows = _rows_bars(bars)
    assert sorted(b.total for b in rows) == sorted(dataset_rows), "one bar per dataset, of its rows"
    for b in rows:
        assert b.unit == "row"
        assert b.n == b.total, f"stopped at {b.n} of {b.total}"
        drawn = b.out.getvalue()
        assert f"{b.total}/{b.total}" in drawn and "100%" in drawn, drawn[-300:]
        assert f"{b.total + 1}/" not in drawn and "row-element" not in drawn
        for key in ("X", "layers/counts", "obsm/X_pca"):  # the element being read is named
            assert key in drawn


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_reading_rows_bar_counts_the_datasets_rows(tmp_path, bars, dense):
    inputs = [_adata(230, seed=0, dense=dense), _adata(171, seed=1, dense=dense)]
    coll = Collection(tmp_path / "c.zarr").add_adatas(inputs, seed=0, dataset_size=150, shuffle_chunk_size=20)
    sizes = [n_obs for n_obs, _ in coll._dataset_shapes()]
    assert sum(sizes) == 401 and len(sizes) == 3
    _assert_full(bars, sizes)


def test_reading_rows_bar_with_dropped_columns_and_rebuilt_datasets(tmp_path, bars):
    path = tmp_path / "c.zarr"
    first = _adata(300, seed=0)
    coll = Collection(path).add_adatas([first], seed=0, dataset_size=200, shuffle_chunk_size=20)
    before = [g["X"].attrs["shape"][0] for g in coll]
    bars.clear()
    # An append whose input has genes the collection lacks (CSR read in a first pass, columns dropped)
    # tops up the existing datasets: each is read again, old rows and new, under one bar.
    genes = [*first.var_names[:40], *(f"new_{i}" for i in range(20))]
    with pytest.warns(UserWarning, match="dropped"):
        coll.add_adatas([_adata(90, seed=2, genes=genes)], seed=1)
    after = [g["X"].attrs["shape"][0] for g in coll]
    assert len(after) == len(before) and sum(after) == 390
    _assert_full(bars, [a for a, b in zip(after, before, strict=True) if a != b])


def test_no_bars_without_progress(tmp_path, bars):
    Collection(tmp_path / "c.zarr").add_adatas([_adata(100, seed=0)], seed=0, progress=False)
    rows = _rows_bars(bars)
    assert rows and all(b.disable and b.out.getvalue() == "" for b in rows)
