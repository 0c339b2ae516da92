"""A loader on a collection that an append rewrites, in this process or another one.

The loader reads the version it was built on. Every batch it yields must be that version's rows (X and
obs codes, checked against the collection read before the append); once an append has begun rewriting
a dataset the loader reads, it stops with :class:`~annbatch.errors.CollectionChangedError` naming the
dataset, and never reports the healthy collection as corrupt. A new loader then reads the new version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import Collection
from annbatch.errors import CollectionChangedError
from annbatch.synthetic import make_adata

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VARS, N_NEW = 3000, 40, 600
# Two datasets with room left: an append spreads its rows into both, rewriting them.
BUILD = {"seed": 0, "dataset_size": 2000, "shuffle_chunk_size": 50, "n_obs_per_chunk": 16, "shard_size": 64,
         "progress": False}  # fmt: skip
LOAD = {"batch_size": 64, "chunk_size": 16, "preload_nchunks": 8, "return_index": True, "obs_keys": ["cell_type"]}

APPENDER = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # appending needs no torch
    import annbatch
    from annbatch.synthetic import make_adata

    adata = make_adata(int(sys.argv[2]), int(sys.argv[3]), seed=7, obs_prefix="new")
    print("ready", flush=True)
    sys.stdin.readline()  # go
    annbatch.Collection(sys.argv[1]).add_adatas(adata, seed=1, progress=False)
    print("done", flush=True)
    """
)


class Version:
    """A collection's rows as plain anndata reads them: the reference every yielded batch must match."""

    def __init__(self, coll: Collection):
        parts = [ad.read_zarr(group) for group in coll]
        self.X = np.concatenate([_dense(p.X) for p in parts])
        obs = coll.obs(["cell_type"])
        self.codes = obs["cell_type"].cat.codes.to_numpy()

    def check(self, batch: dict) -> None:
        rows = np.asarray(batch["index"])
        np.testing.assert_array_equal(_dense(batch["X"]), self.X[rows])
        np.testing.assert_array_equal(np.asarray(batch["obs"]["cell_type"]), self.codes[rows])


def _dense(x) -> np.ndarray:
    if sp.issparse(x):  # stored indices are narrow unsigned ints, which scipy handles poorly
        x = sp.csr_matrix((np.asarray(x.data), np.asarray(x.indices, dtype=np.int64),
                           np.asarray(x.indptr, dtype=np.int64)), shape=x.shape)  # fmt: skip
        return x.toarray()
    return np.asarray(x)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "cells.zarr"
    Collection(path).add_adatas(make_adata(N_OBS, N_VARS, seed=3), **BUILD)
    assert len(Collection(path, mode="r")) == 2
    return path


def test_append_in_this_process_stops_the_old_loader(path: Path):
    coll = Collection(path, mode="r")
    before = Version(coll)
    loader = coll.loader(**LOAD, seed=0)
    rows = np.concatenate([np.asarray(b["index"]) for b in loader])
    assert np.array_equal(np.sort(rows), np.arange(N_OBS))

    Collection(path).add_adatas(make_adata(N_NEW, N_VARS, seed=7, obs_prefix="new"), seed=1, progress=False)
    with pytest.raises(CollectionChangedError, match=r"dataset_0 \(version 1 → 2\).*build a new loader") as info:
        for batch in loader:
            before.check(batch)  # nothing of the new version before the error
    assert set(info.value.changed) == {"dataset_0", "dataset_1"}
    assert not isinstance(info.value, OSError), "a rewritten dataset is not a corrupt one"
    with pytest.raises(CollectionChangedError):  # and it stays stopped: never a mix of versions
        next(iter(loader))

    fresh = Collection(path, mode="r")
    after = Version(fresh)
    new_rows = []
    for batch in fresh.loader(**LOAD, seed=0):
        after.check(batch)
        new_rows.append(np.asarray(batch["index"]))
    assert np.array_equal(np.sort(np.concatenate(new_rows)), np.arange(N_OBS + N_NEW))


@pytest.mark.parametrize(("go_at", "prefetch"), [(0, 2), (7, 2), (30, 0), (45, 2)])
def test_append_from_another_process_while_reading(path: Path, tmp_path: Path, go_at: int, prefetch: int):
    """Another process appends while a loader reads, started at different points of the epoch."""
    coll = Collection(path, mode="r")
    before = Version(coll)
    loader = coll.loader(**LOAD, seed=0, prefetch=prefetch)
    with open(tmp_path / "appender.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(N_NEW), str(N_VARS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready", (tmp_path / "appender.log").read_text()
        yielded, done = 0, False
        with pytest.raises(CollectionChangedError, match="build a new loader"):
            for _epoch in range(200):
                if done:  # the append has committed: the next epoch's first load must stop
                    next(iter(loader))
                    pytest.fail("an epoch began on a loader whose collection had changed")
                for batch in loader:
                    before.check(batch)
                    yielded += 1
                    if yielded == go_at + 1:
                        proc.stdin.write("go\n")
                        proc.stdin.flush()
                if yielded > go_at:
                    done = proc.stdout.readline().strip() == "done"
                    assert done, (tmp_path / "appender.log").read_text()
        assert proc.wait(timeout=60) == 0, (tmp_path / "appender.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert Collection(path, mode="r").n_obs == N_OBS + N_NEW


@pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")
def test_append_on_s3_stops_the_old_loader(s3, prefix: str):
    writer = Collection(s3.group(prefix))
    writer.add_adatas(make_adata(1200, N_VARS, seed=3), **{**BUILD, "dataset_size": 800})
    reader = Collection(s3.group(prefix, read_only=True), mode="r")
    before = Version(reader)
    loader = reader.loader(**LOAD, seed=0)
    for batch in loader:
        before.check(batch)
    Collection(s3.group(prefix)).add_adatas(make_adata(200, N_VARS, seed=7, obs_prefix="new"), progress=False)
    with pytest.raises(CollectionChangedError, match="dataset_"):
        for batch in loader:
            before.check(batch)
    assert Collection(s3.group(prefix, read_only=True), mode="r").n_obs == 1400


def test_an_append_that_only_adds_datasets_leaves_old_loaders_reading(tmp_path: Path):
    """Datasets the loader does not read may come and go: it keeps yielding its own version."""
    path = tmp_path / "cells.zarr"
    Collection(path).add_adatas(make_adata(400, N_VARS, seed=3), **{**BUILD, "dataset_size": 400})
    coll = Collection(path, mode="r")
    before = Version(coll)
    loader = coll.loader(**LOAD, seed=0)
    snapshot = coll.snapshot()
    # A commit of a brand-new dataset only: its version appears, those of the loader's datasets stay.
    from annbatch._datasets import record_rewrite

    record_rewrite(Collection(path).group, ["dataset_9"])
    assert snapshot.changed() == {}
    rows = []
    for batch in loader:
        before.check(batch)
        rows.append(np.asarray(batch["index"]))
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(400))


def test_versions_are_counted_in_the_root_attributes(path: Path):
    coll = Collection(path, mode="r")
    assert coll.snapshot().versions == {"dataset_0": 1, "dataset_1": 1}
    Collection(path).add_adatas(make_adata(N_NEW, N_VARS, seed=7, obs_prefix="new"), seed=1, progress=False)
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs["dataset-versions"] == {"dataset_0": 2, "dataset_1": 2}
