"""Conversion on executors: ``add_adatas(..., executor=...)`` with a process pool and a dask LocalCluster.

The reference is always the same conversion without an executor: the same seed gives the same
collection (X, obs, var of every dataset). The cluster is a real ``distributed.LocalCluster`` of two
worker processes; a worker is killed with SIGKILL from inside its task to show what a dying worker does.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import resource
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import Collection
from annbatch.errors import InputError
from annbatch.synthetic import make_adata

distributed = pytest.importorskip("distributed")

if TYPE_CHECKING:
    from conftest import S3

BUILD = {"seed": 3, "dataset_size": 500, "shuffle_chunk_size": 50, "n_obs_per_chunk": 16, "shard_size": 64,
         "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:  # fmt: skip
        yield cluster


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


@pytest.fixture
def pool():
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _datasets(coll: Collection) -> list[ad.AnnData]:
    return [ad.io.read_elem(group) for group in coll]


def assert_same_collection(a: Collection, b: Collection) -> None:
    left, right = _datasets(a), _datasets(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.obs.equals(y.obs)
        assert x.var.equals(y.var)
        assert x.X.shape == y.X.shape
        xa, ya = (m.toarray() if sp.issparse(m) else m for m in (x.X, y.X))
        np.testing.assert_array_equal(xa, ya)


def test_dask_and_process_pool_give_the_serial_collection(tmp_path: Path, h5ad_files, client, pool) -> None:
    serial = Collection(tmp_path / "serial.zarr").add_adatas(h5ad_files, **BUILD)
    on_dask = Collection(tmp_path / "dask.zarr").add_adatas(h5ad_files, executor=client, **BUILD)
    on_pool = Collection(tmp_path / "pool.zarr").add_adatas(h5ad_files, executor=pool, **BUILD)
    assert len(serial.dataset_keys) > 2  # several tasks ran
    assert_same_collection(serial, on_dask)
    assert_same_collection(serial, on_pool)
    # appending rewrites existing datasets: workers read those from the collection itself
    extra = make_adata(300, 150, nnz_per_row=20, seed=5)
    extra.var_names = ad.read_h5ad(h5ad_files[0], backed="r").var_names[:150]
    serial.add_adatas([extra], seed=4, progress=False)
    on_dask.add_adatas([extra], seed=4, progress=False, executor=client)
    assert_same_collection(serial, on_dask)


def test_dense_inputs_and_layers(tmp_path: Path, client) -> None:
    adata = make_adata(900, 40, dense=True, seed=2)
    adata.layers["counts"] = adata.X * 2
    adata.obsm["X_pca"] = np.asarray(adata.X[:, :5])
    serial = Collection(tmp_path / "serial.zarr").add_adatas([adata], **BUILD)
    on_dask = Collection(tmp_path / "dask.zarr").add_adatas([adata], executor=client, **BUILD)
    assert_same_collection(serial, on_dask)
    for x, y in zip(_datasets(serial), _datasets(on_dask), strict=True):
        np.testing.assert_array_equal(x.layers["counts"], y.layers["counts"])
        np.testing.assert_array_equal(x.obsm["X_pca"], y.obsm["X_pca"])


def _die_once(path: str, marker: str) -> ad.AnnData:
    """``load_adata`` that kills the worker process running it the first time it runs in a worker."""
    in_worker = multiprocessing.parent_process() is not None  # dask's and the pool's workers are children
    if in_worker and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return ad.read_h5ad(path)


def test_killed_dask_worker_has_its_task_retried(tmp_path: Path, h5ad_files, client) -> None:
    from functools import partial

    marker = tmp_path / "killed"
    load = partial(_die_once, marker=str(marker))
    serial = Collection(tmp_path / "serial.zarr").add_adatas(h5ad_files, load_adata=ad.read_h5ad, **BUILD)
    on_dask = Collection(tmp_path / "dask.zarr").add_adatas(h5ad_files, load_adata=load, executor=client, **BUILD)
    assert marker.exists()  # a worker did die mid-task
    assert_same_collection(serial, on_dask)
    assert not (tmp_path / "dask.zarr" / ".staging").exists()
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_killed_pool_worker_fails_the_call_and_keeps_the_collection(tmp_path: Path, h5ad_files, pool) -> None:
    from functools import partial

    coll = Collection(tmp_path / "cells.zarr").add_adatas(h5ad_files[:1], **BUILD)
    before = _datasets(coll)
    load = partial(_die_once, marker=str(tmp_path / "killed"))
    with pytest.raises(cf.process.BrokenProcessPool):
        coll.add_adatas(h5ad_files[1:], load_adata=load, executor=pool, **BUILD)
    again = Collection(tmp_path / "cells.zarr", mode="r")
    for x, y in zip(before, _datasets(again), strict=True):
        assert x.obs.equals(y.obs)
        np.testing.assert_array_equal(x.X.toarray(), y.X.toarray())
    assert len(again.dataset_keys) == len(before)
    assert not (tmp_path / "cells.zarr" / ".staging").exists()


def test_failing_task_leaves_the_previous_collection(tmp_path: Path, h5ad_files, client) -> None:
    coll = Collection(tmp_path / "cells.zarr").add_adatas(h5ad_files[:1], **BUILD)
    before = _datasets(coll)
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(Path(h5ad_files[1]).read_bytes())
    load_calls = {"n": 0}

    def load(path: str) -> ad.AnnData:
        load_calls["n"] += 1  # counts in this process only: workers get their own copy
        adata = ad.read_h5ad(path)
        if multiprocessing.parent_process() is not None and path == str(bad):
            raise RuntimeError("cannot read bad.h5ad on this worker")
        return adata

    with pytest.raises(RuntimeError, match="bad.h5ad"):
        coll.add_adatas([bad], load_adata=load, executor=client, **BUILD)
    assert load_calls["n"] == 1
    after = _datasets(Collection(tmp_path / "cells.zarr", mode="r"))
    assert len(after) == len(before)
    for x, y in zip(before, after, strict=True):
        assert x.obs.equals(y.obs)


def test_forking_pool_and_backed_anndata_are_refused(tmp_path: Path, h5ad_files) -> None:
    coll = Collection(tmp_path / "cells.zarr")
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as forking:
        with pytest.raises(ValueError, match="spawn"):
            coll.add_adatas(h5ad_files, executor=forking, **BUILD)
    backed = ad.read_h5ad(h5ad_files[0], backed="r")
    with cf.ThreadPoolExecutor(1) as threads, pytest.raises(InputError, match="path"):
        coll.add_adatas([backed], executor=threads, **BUILD)
    with pytest.raises(TypeError, match="executor"):
        coll.add_adatas(h5ad_files, executor="dask", **BUILD)
    assert coll.dataset_keys == []


def test_in_memory_anndata_and_threads(tmp_path: Path) -> None:
    adata = make_adata(700, 60, nnz_per_row=10, seed=1)
    serial = Collection(tmp_path / "serial.zarr").add_adatas([adata], **BUILD)
    with cf.ThreadPoolExecutor(2) as threads:
        on_threads = Collection(tmp_path / "threads.zarr").add_adatas([adata], executor=threads, **BUILD)
    assert_same_collection(serial, on_threads)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_task_memory_is_bounded_by_memory_limit(tmp_path: Path, client) -> None:
    # ~96 MiB of dense rows; each task may plan for 8 MiB, so a worker's peak grows far less than the input
    adata = ad.AnnData(np.random.default_rng(0).random((12_000, 2_000), dtype=np.float32))
    path = tmp_path / "big.h5ad"
    adata.write_h5ad(path)
    del adata
    warm = make_adata(200, 20, nnz_per_row=5, seed=0)  # imports and first-use allocations on the workers
    Collection(tmp_path / "warm.zarr").add_adatas([warm], executor=client, **BUILD)
    before = client.run(_peak_rss_mib)
    coll = Collection(tmp_path / "cells.zarr").add_adatas([path], executor=client, memory_limit="8MB",
                                                          seed=0, progress=False)  # fmt: skip
    after = client.run(_peak_rss_mib)
    assert len(coll.dataset_keys) >= 10
    growth = max(after[w] - before[w] for w in after)
    assert growth < 48, f"a worker's peak memory grew by {growth:.0f} MiB for 8 MB tasks"


def test_dask_workers_write_to_s3(s3: S3, prefix: str, tmp_path: Path, h5ad_files, client) -> None:
    url = f"s3://annbatch-test/{prefix}/cells.zarr"
    local = Collection(tmp_path / "local.zarr").add_adatas(h5ad_files, **BUILD)
    remote = Collection(url, storage_options=s3.storage_options()).add_adatas(h5ad_files, executor=client, **BUILD)
    assert_same_collection(local, Collection(url, mode="r", storage_options=s3.storage_options()))
    assert s3.secret not in repr(remote)


def test_cli_convert_on_a_scheduler(tmp_path: Path, h5ad_files, cluster) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "annbatch.cli", "convert", *map(str, h5ad_files), "--seed", "3",
           "--dataset-size", "500", "--shuffle-chunk-size", "50", "--n-obs-per-chunk", "16", "--shard-size", "64"]  # fmt: skip
    subprocess.run([*cli, "-o", str(tmp_path / "serial.zarr")], check=True, capture_output=True)
    done = subprocess.run([*cli, "-o", str(tmp_path / "dask.zarr"), "--scheduler", cluster.scheduler_address],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_collection(Collection(tmp_path / "serial.zarr", mode="r"), Collection(tmp_path / "dask.zarr", mode="r"))
    # a scheduler that is not there: named, and nothing is left behind
    gone = subprocess.run([*cli, "-o", str(tmp_path / "none.zarr"), "--scheduler", "tcp://127.0.0.1:9"],
                          capture_output=True, text=True)  # fmt: skip
    assert gone.returncode != 0 and "tcp://127.0.0.1:9" in gone.stderr
    assert not (tmp_path / "none.zarr").exists()
