"""Shared pytest fixtures built on :mod:`annbatch.synthetic`.

All data is small so tests stay fast, and deterministic (fixed seeds).

- ``rng``: ``np.random.default_rng(0)``, fresh per test.
- ``sparse_adata``: 1,000 × 300 AnnData, ``X`` a canonical float32 CSR matrix with
  the full synthetic obs/var/obsm annotation; fresh per test, so tests may mutate it.
- ``dense_adata``: 1,000 × 300 AnnData with a dense C-contiguous float32 ``X``; fresh per test.
- ``h5ad_files``: list of 3 :class:`~pathlib.Path` to h5ad files (400, 550 and 700 rows,
  200 genes each, 60 % of genes shared by all files, the rest file-specific), written
  once per session. Treat them as read-only.
- ``zarr_input``: :class:`~pathlib.Path` to a 600 × 250 sparse (CSR) AnnData written with
  ``AnnData.write_zarr`` in zarr format 3; fresh per test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest

from annbatch.synthetic import make_adata, write_h5ad_files

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def sparse_adata() -> ad.AnnData:
    return make_adata(1_000, 300, seed=0)


@pytest.fixture
def dense_adata() -> ad.AnnData:
    return make_adata(1_000, 300, dense=True, seed=1)


@pytest.fixture(scope="session")
def h5ad_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Different row counts per file catch code that assumes equal-sized inputs.
    return write_h5ad_files(
        tmp_path_factory.mktemp("h5ad_files"), 3, [400, 550, 700], 200, overlap=0.6, seed=10
    )


@pytest.fixture
def zarr_input(tmp_path: Path) -> Path:
    path = tmp_path / "input.zarr"
    # zarr v3 is anndata's upcoming default and what the zarr>=3 stack is built around.
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        make_adata(600, 250, seed=2).write_zarr(path)
    return path
