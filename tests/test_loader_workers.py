"""The Loader inside ``torch.utils.data.DataLoader`` worker processes (spawn context).

Spawned workers take seconds to start (each imports torch and annbatch), so each DataLoader with
persistent workers (one yielding torch tensors, one scipy CSR) runs two epochs once per module, without
``set_epoch``, and the tests check its output.
"""

from __future__ import annotations

import gc
import pickle
import warnings
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

import annbatch  # noqa: E402
from annbatch import _convert  # noqa: E402
from annbatch._csr import RawCSR  # noqa: E402
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
def collection(tmp_path_factory) -> tuple[annbatch.Collection, np.ndarray, pd.DataFrame]:
    root = tmp_path_factory.mktemp("workers") / "c.zarr"
    inputs = [make_adata(n, 40, seed=30 + n) for n in (310, 250)]
    coll = annbatch.Collection(root).add_adatas(
        inputs, seed=0, dataset_size=200, shuffle_chunk_size=40, progress=False
    )
    assert len(coll) >= 3
    adatas = [ad.read_zarr(root / key) for key in coll.dataset_keys]
    X = np.concatenate([a.X.toarray() for a in adatas])
    obs = pd.concat([a.obs for a in adatas])
    return coll, X, obs


def _run(collection, **kwargs) -> Run:
    coll, X, obs = collection
    loader = coll.loader(
        batch_size=BATCH_SIZE,
        chunk_size=8,
        preload_nchunks=4,
        seed=None,  # the base seed is drawn once, here, and shipped to every worker
        return_index=True,
        **kwargs,
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
        epochs = [list(dl) for _ in range(N_EPOCHS)]  # no set_epoch: the workers advance their copies
    len_warnings = [str(w.message) for w in caught if "Length of IterableDataset" in str(w.message)]
    reported = len(dl)
    del dl
    gc.collect()
    return Run(loader, X, obs, epochs, reported, len_warnings)


@pytest.fixture(scope="module")
def run(collection) -> Run:
    return _run(collection, obs_columns=["cell_type", "n_counts"], to="torch")


@pytest.fixture(scope="module")
def scipy_run(collection) -> Run:
    return _run(collection, obs_keys=["cell_type"])


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


def test_scipy_batches_from_workers_are_plain_csr_and_cover_every_row_once(scipy_run):
    labels = scipy_run.loader.categories["cell_type"]
    cell_types = scipy_run.obs["cell_type"].astype(str).to_numpy()
    for batches in scipy_run.epochs:
        idx = np.concatenate([np.asarray(b["index"]) for b in batches])
        np.testing.assert_array_equal(np.sort(idx), np.arange(len(scipy_run.X)))
        for b in batches:
            rows = np.asarray(b["index"])
            assert type(b["X"]) is sp.csr_matrix  # sent through shared memory, rebuilt as plain scipy
            np.testing.assert_array_equal(b["X"].toarray(), scipy_run.X[rows])
            np.testing.assert_array_equal(labels[np.asarray(b["obs"]["cell_type"])], cell_types[rows])
    first, second = ([np.asarray(b["index"]) for b in e] for e in scipy_run.epochs)
    assert len(first) != len(second) or not all(
        np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )


@pytest.fixture
def in_worker(monkeypatch):
    monkeypatch.setattr(_convert, "_in_torch_worker", lambda: True)


def _raw_csr() -> tuple[RawCSR, np.ndarray]:
    m = make_adata(300, 50, seed=1).X
    raw = RawCSR(m.data, m.indices.astype(np.uint16), m.indptr.astype(np.int64), m.shape)
    return raw, m.toarray()


def test_worker_csr_goes_through_shared_memory(in_worker):
    raw, dense = _raw_csr()
    matrix = _convert.convert(raw, None)
    assert isinstance(matrix, sp.csr_matrix)
    payload = ForkingPickler.dumps(matrix)
    assert len(payload) < 2000 < matrix.data.nbytes  # a handle, not the arrays
    back = ForkingPickler.loads(payload)
    assert type(back) is sp.csr_matrix
    assert back.indices.dtype == np.uint16 and back.indptr.dtype == np.int64
    np.testing.assert_array_equal(back.toarray(), dense)
    matrix.data[:] = 0  # the sender's batch and the received one do not share memory
    np.testing.assert_array_equal(back.toarray(), dense)


def test_worker_csr_pickles_plainly(in_worker):
    raw, dense = _raw_csr()
    back = pickle.loads(pickle.dumps(_convert.convert(raw, None)))
    assert type(back) is sp.csr_matrix
    np.testing.assert_array_equal(back.toarray(), dense)
    assert type(ForkingPickler.loads(ForkingPickler.dumps(raw.to_scipy()))) is sp.csr_matrix


def test_csr_outside_workers_is_plain():
    raw, dense = _raw_csr()
    matrix = _convert.convert(raw, None)
    assert type(matrix) is sp.csr_matrix
    np.testing.assert_array_equal(matrix.toarray(), dense)
