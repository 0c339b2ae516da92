"""The Loader inside ``torch.utils.data.DataLoader`` worker processes (spawn context).

Spawned workers take seconds to start (each imports torch and annbatch), so one DataLoader with
persistent workers runs two epochs once per module and the tests check its output.
"""

from __future__ import annotations

import gc
import pickle
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

import annbatch  # noqa: E402
from annbatch.synthetic import make_adata  # noqa: E402

BATCH_SIZE = 30  # 560 rows: two workers of 280 rows, each with a partial last batch
NUM_WORKERS = 2
N_EPOCHS = 2


@dataclass
class Run:
    loader: annbatch.Loader
    X: np.ndarray  # source rows, dense, in global order
    obs: pd.DataFrame
    epochs: list[list[dict]]
    reported_len: int
    len_warnings: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("workers") / "c.zarr"
    inputs = [make_adata(n, 40, seed=30 + n) for n in (310, 250)]
    coll = annbatch.Collection(root).add_adatas(
        inputs, seed=0, dataset_size=200, shuffle_chunk_size=40, progress=False
    )
    assert len(coll) >= 3
    adatas = [ad.read_zarr(root / key) for key in coll.dataset_keys]
    X = np.concatenate([a.X.toarray() for a in adatas])
    obs = pd.concat([a.obs for a in adatas])
    loader = coll.loader(
        batch_size=BATCH_SIZE,
        chunk_size=8,
        preload_nchunks=4,
        seed=None,  # the base seed is drawn once, here, and shipped to every worker
        return_index=True,
        obs_columns=["cell_type", "n_counts"],
        to="torch",
    )
    dl = DataLoader(
        loader,
        batch_size=None,
        num_workers=NUM_WORKERS,
        multiprocessing_context="spawn",
        persistent_workers=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epochs = [list(dl) for _ in range(N_EPOCHS)]
    len_warnings = [str(w.message) for w in caught if "Length of IterableDataset" in str(w.message)]
    reported = len(dl)
    del dl
    gc.collect()
    return Run(loader, X, obs, epochs, reported, len_warnings)


def test_loader_pickles(run):
    clone = pickle.loads(pickle.dumps(run.loader))
    assert clone.n_obs == run.loader.n_obs == len(run.X)
    batch = next(iter(clone))
    np.testing.assert_array_equal(batch["X"].to_dense().numpy(), run.X[batch["index"]])


def test_workers_cover_every_row_once_per_epoch(run):
    for batches in run.epochs:
        idx = np.concatenate([np.asarray(b["index"]) for b in batches])
        assert len(np.unique(idx)) == len(idx), "workers overlap"
        np.testing.assert_array_equal(np.sort(idx), np.arange(len(run.X)))
        sizes = [b["X"].shape[0] for b in batches]
        # each worker's batches are full except its own last one
        assert sum(s != BATCH_SIZE for s in sizes) <= NUM_WORKERS
        assert all(0 < s <= BATCH_SIZE for s in sizes)


def test_worker_batches_are_aligned(run):
    for batches in run.epochs:
        for b in batches:
            rows = np.asarray(b["index"])
            x = b["X"]
            assert isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr
            np.testing.assert_array_equal(x.to_dense().numpy(), run.X[rows])
            np.testing.assert_array_equal(
                b["obs"]["n_counts"].to_numpy(), run.obs["n_counts"].to_numpy()[rows]
            )
            np.testing.assert_array_equal(
                b["obs"]["cell_type"].astype(str).to_numpy(),
                run.obs["cell_type"].astype(str).to_numpy()[rows],
            )


def test_persistent_workers_draw_a_new_order_each_epoch(run):
    first, second = ([np.asarray(b["index"]) for b in e] for e in run.epochs)
    assert len(first) != len(second) or not all(
        np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )


def test_workers_do_not_change_the_epochs_row_set(run):
    """Stacked in index order, one epoch's batches from all workers are exactly the source matrix."""
    for batches in run.epochs:
        got = sp.vstack([sp.csr_matrix(b["X"].to_dense().numpy()) for b in batches]).toarray()
        idx = np.concatenate([np.asarray(b["index"]) for b in batches])
        np.testing.assert_array_equal(got[np.argsort(idx)], run.X)


def test_dataloader_length_is_within_documented_bound(run):
    # Documented limitation (Loader.__len__): each of the 2 workers ends on its own partial batch, so up to
    # num_workers - 1 more batches than len(loader) may come back.
    assert all(run.reported_len <= len(e) <= run.reported_len + 1 for e in run.epochs)
