"""annbatch on object storage: collections written to and loaded from a real S3 server on 127.0.0.1.

The moto S3 server is conftest's ``s3`` fixture (a child process, see there why). Stores are obstore
``S3Store``s with dummy credentials passed as arguments, wrapped in :class:`zarr.storage.ObjectStore`;
every test works under its own key prefix of one bucket.

The reference for S3 data is always independent of annbatch's S3 read path: the inputs themselves,
the same keys copied byte for byte to a local folder, or the same collection built on a local disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annbatch import Collection
from annbatch.synthetic import make_adata

obstore = pytest.importorskip("obstore")
pytest.importorskip("moto.server")
from zarr.storage import WrapperStore  # noqa: E402

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import S3

# zarrs rebuilds the obstore store on its side for every array it opens and says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")

N_VARS = 40
SIZES = (230, 170)  # two inputs of different sizes
N_OBS = sum(SIZES)
# 400 rows in datasets of at most 150 (3 datasets), shards of 64 rows: every array has several shards.
BUILD = {"seed": 0, "dataset_size": 150, "shuffle_chunk_size": 25, "n_obs_per_chunk": 16, "shard_size": 64,
         "memory_limit": "1GB", "progress": False}  # fmt: skip
LOAD = {"batch_size": 32, "chunk_size": 16, "preload_nchunks": 4, "return_index": True}


# ---------------------------------------------------------------------------------------------------------
# data and references
# ---------------------------------------------------------------------------------------------------------
def _inputs(dense: bool, sizes=SIZES) -> list[ad.AnnData]:
    return [make_adata(n, N_VARS, seed=20 + i, dense=dense, obs_prefix=f"in{i}") for i, n in enumerate(sizes)]


def _dense(x) -> np.ndarray:
    if sp.issparse(x):  # stored indices are uint8/uint16, which scipy handles poorly
        x = sp.csr_matrix((np.asarray(x.data), np.asarray(x.indices, dtype=np.int64),
                           np.asarray(x.indptr, dtype=np.int64)), shape=x.shape)  # fmt: skip
        return x.toarray()
    return np.asarray(x)


def _read_back(coll: Collection) -> ad.AnnData:
    """The whole collection read with plain anndata (wherever it is stored), datasets in order."""
    parts = [ad.read_zarr(group) for group in coll]
    X = np.concatenate([_dense(p.X) for p in parts])
    obsm = {k: np.concatenate([p.obsm[k] for p in parts]) for k in parts[0].obsm}
    return ad.AnnData(X=X, obs=pd.concat([p.obs for p in parts]), var=parts[0].var, obsm=obsm)


def _as_objects(values: pd.Series) -> np.ndarray:
    return np.asarray(values.to_numpy(), dtype=object)


def _assert_holds(coll: Collection, inputs: list[ad.AnnData]) -> None:
    """The collection holds every input row exactly once, with the input's X, obs and obsm."""
    back = _read_back(coll)
    obs = coll.obs()
    assert coll.n_obs == back.n_obs == len(obs) == sum(a.n_obs for a in inputs)
    assert coll.n_vars == N_VARS
    assert coll.var.index.equals(inputs[0].var_names)
    assert back.var_names.equals(inputs[0].var_names)
    assert obs.index.is_unique
    assert obs.index.equals(back.obs_names), "obs and the datasets must be in the same order"
    position = pd.Series(np.arange(back.n_obs), index=back.obs_names)
    for i, adata in enumerate(inputs):
        rows = position[adata.obs_names].to_numpy()  # KeyError if a row is missing
        assert (obs["src_path"].iloc[rows].astype(str) == f"<AnnData #{i}>").all()
        np.testing.assert_array_equal(back.X[rows], _dense(adata.X))
        np.testing.assert_array_equal(back.obsm["X_pca"][rows], adata.obsm["X_pca"])
        for col in adata.obs.columns:
            expected = _as_objects(adata.obs[col])
            np.testing.assert_array_equal(_as_objects(obs[col].iloc[rows]), expected, err_msg=col)
            np.testing.assert_array_equal(_as_objects(back.obs[col].iloc[rows]), expected, err_msg=col)


def _content(group: zarr.Group) -> dict[str, object]:
    """Every node's metadata (attributes included) and every array's decoded values, by path."""
    out: dict[str, object] = {}
    for name, node in group.members(max_depth=None):
        meta = node.metadata.to_dict()
        meta.pop("consolidated_metadata", None)
        out[name] = meta
        if isinstance(node, zarr.Array):
            values = node[...]
            out[f"{name}:values"] = values.tolist() if values.dtype.kind in "OTUS" else values.tobytes()
    return out


def _epoch(coll: Collection, *, seed: int, obs_columns=None) -> list[dict]:
    return list(coll.loader(**LOAD, seed=seed, obs_columns=obs_columns))


def _download(s3: S3, prefix: str, dst: Path) -> Path:
    """The keys under ``prefix`` copied byte for byte into a local folder."""
    for key, value in s3.read(prefix).items():
        path = dst / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value)
    return dst


# ---------------------------------------------------------------------------------------------------------
# collections built once per module
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    kind: str
    prefix: str
    inputs: list[ad.AnnData]
    s3: Collection  # opened read-only through a fresh store
    local: Collection  # built on a local disk from the same inputs and seed


@pytest.fixture(scope="module", params=["sparse", "dense"])
def built(request, s3: S3, tmp_path_factory) -> Built:
    kind = request.param
    inputs = _inputs(dense=kind == "dense")
    prefix = f"built-{kind}"
    Collection(s3.group(prefix)).add_adatas(inputs, **BUILD)
    local = Collection(tmp_path_factory.mktemp(kind) / "c.zarr").add_adatas(inputs, **BUILD)
    assert len(local) == 3, "the tests want several datasets"
    return Built(kind, prefix, inputs, Collection(s3.group(prefix, read_only=True), mode="r"), local)


@pytest.fixture(scope="module")
def base(s3: S3) -> str:
    """A small sparse collection on S3 (2 datasets) that staging tests copy under their own prefix."""
    Collection(s3.group("base")).add_adatas(
        _inputs(dense=False, sizes=(120,)), **{**BUILD, "dataset_size": 60, "shard_size": 32}
    )
    assert s3.keys("base")
    return "base"


def _dataset(objects: dict[str, bytes], name: str) -> dict[str, bytes]:
    """The objects of one dataset, relative to it."""
    return {k[len(name) + 1 :]: v for k, v in objects.items() if k.startswith(f"{name}/")}


def _under(objects: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {f"{name}/{k}": v for k, v in objects.items()}


# ---------------------------------------------------------------------------------------------------------
# writing on S3
# ---------------------------------------------------------------------------------------------------------
def test_create_then_append_on_s3(s3: S3, prefix: str):
    inputs = _inputs(dense=False, sizes=(*SIZES, 40))
    coll = Collection(s3.group(prefix))
    assert coll.is_empty
    assert Collection(s3.group(prefix)).is_empty, "an empty group is not an error"
    coll.add_adatas(inputs[:2], **BUILD)
    assert coll.dataset_keys == ["dataset_0", "dataset_1", "dataset_2"]
    _assert_holds(coll, inputs[:2])
    assert s3.group(prefix).attrs["encoding-type"] == "annbatch-preshuffled"

    # Append through a new client: 40 rows fit into the existing datasets, which are rewritten (their
    # old versions are moved aside under .staging/_replaced, then the new ones copied into place).
    Collection(s3.group(prefix), mode="r+").add_adatas(inputs[2:], **{**BUILD, "seed": 1})
    reopened = Collection(s3.group(prefix, read_only=True), mode="r")
    assert reopened.dataset_keys == ["dataset_0", "dataset_1", "dataset_2"]
    _assert_holds(reopened, inputs)
    assert "on disk" not in repr(reopened) and f"{sum(a.n_obs for a in inputs):,} obs" in repr(reopened)
    assert not [k for k in s3.keys(prefix) if k.startswith(".staging")], "staging must be gone"


def test_s3_collection_equals_local_collection(built: Built):
    """The same inputs and seed give the same collection on S3 as on a local disk."""
    assert built.s3.dataset_keys == built.local.dataset_keys
    assert _content(built.s3.group) == _content(built.local.group)
    _assert_holds(built.s3, built.inputs)


# ---------------------------------------------------------------------------------------------------------
# loading from S3
# ---------------------------------------------------------------------------------------------------------
def test_loader_epoch_on_s3(built: Built, s3: S3, tmp_path: Path):
    """One shuffled epoch covers every row once; rows equal the same keys copied to a local folder."""
    copy = Collection(_download(s3, built.prefix, tmp_path / "copy.zarr"), mode="r")
    ref = _read_back(copy)
    batches = _epoch(built.s3, seed=3, obs_columns=["cell_type", "n_counts"])
    index = np.concatenate([np.asarray(b["index"]) for b in batches])
    np.testing.assert_array_equal(np.sort(index), np.arange(N_OBS))
    assert not np.array_equal(index, np.arange(N_OBS)), "the epoch must be shuffled"
    for b in batches:
        rows = np.asarray(b["index"])
        assert sp.issparse(b["X"]) == (built.kind == "sparse")
        assert b["X"].dtype == ref.X.dtype
        np.testing.assert_array_equal(_dense(b["X"]), ref.X[rows])
        np.testing.assert_array_equal(
            _as_objects(b["obs"]["cell_type"]), _as_objects(ref.obs["cell_type"].iloc[rows])
        )
        np.testing.assert_array_equal(b["obs"]["n_counts"].to_numpy(), ref.obs["n_counts"].to_numpy()[rows])
    assert b["var"].index.equals(ref.var_names)


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x["index"]), np.asarray(y["index"]))
        assert type(x["X"]) is type(y["X"])
        np.testing.assert_array_equal(_dense(x["X"]), _dense(y["X"]))


def test_loader_same_seed_same_batches_on_s3_and_local(built: Built, s3: S3, tmp_path: Path):
    """Read through zarr's async API (S3) and annbatch's direct shard reader (local): same batches."""
    from_s3 = _epoch(built.s3, seed=11)
    _same_batches(from_s3, _epoch(built.local, seed=11))
    copy = Collection(_download(s3, built.prefix, tmp_path / "copy.zarr"), mode="r")
    _same_batches(from_s3, _epoch(copy, seed=11))
    assert not np.array_equal(
        np.asarray(from_s3[0]["index"]), np.asarray(_epoch(built.s3, seed=12)[0]["index"])
    )


def test_s3_collections_are_read_by_the_object_shard_reader(built: Built):
    """Our layout on S3 is read by annbatch's object-storage shard reader, not chunk by chunk through zarr;
    it reads many row ranges at once and gives what zarr gives."""
    from annbatch._object_shards import ObjectShardReader

    backing = built.s3.loader(batch_size=16, chunk_size=8, preload_nchunks=2)._backings[0]
    arrays = [backing.data, backing.indices] if built.kind == "sparse" else [backing.array]
    for reader in arrays:
        assert isinstance(reader, ObjectShardReader)
        n = reader.shape[0]
        jobs = [(0, 1), (3, 40), (n - 5, n), (7, 7), (0, n)]
        reference = zarr.open_array(built.s3._group.store, path=reader._key, mode="r")
        for (a, b), part in zip(jobs, reader.read(jobs), strict=True):
            np.testing.assert_array_equal(part, reference[a:b])


# ---------------------------------------------------------------------------------------------------------
# interrupted writes on S3: the states a killed process leaves, recovered when the collection is reopened
# ---------------------------------------------------------------------------------------------------------
def test_leftover_staging_is_ignored_then_removed(s3: S3, base: str, prefix: str):
    """A conversion killed before its commit leaves keys under ``.staging``: readers ignore them and
    opening for writing removes them, leaving the collection as it was."""
    s3.copy_tree(base, prefix)
    before = s3.read(prefix)
    content = _content(s3.group(prefix, read_only=True))
    staged = _dataset(before, "dataset_1")
    # A write killed midway: the group's zarr.json (new_group writes it first) and part of the arrays.
    partial = dict(sorted(staged.items())[: len(staged) // 2]) | {"zarr.json": staged["zarr.json"]}
    s3.write(prefix, _under(partial, ".staging/dataset_1") | _under(staged, ".staging/dataset_2"))

    readonly = Collection(s3.group(prefix, read_only=True), mode="r")
    assert readonly.dataset_keys == ["dataset_0", "dataset_1"]
    assert readonly.n_obs == 120
    assert any(k.startswith(".staging/") for k in s3.keys(prefix)), "mode='r' changes nothing"

    Collection(s3.group(prefix), mode="a")
    assert s3.read(prefix) == before
    assert _content(s3.group(prefix, read_only=True)) == content


def test_interrupted_commit_is_finished_on_reopen(s3: S3, base: str, prefix: str):
    """Killed right after the journal was written (the commit point): reopening applies the journal."""
    s3.copy_tree(base, prefix)
    before = s3.read(prefix)
    new_version = _dataset(before, "dataset_1")  # any complete dataset serves as the staged new version
    s3.write(prefix, _under(new_version, ".staging/dataset_0"))
    s3.write(prefix, {".staging/journal.json": json.dumps({"commit": ["dataset_0"]}).encode()})

    Collection(s3.group(prefix), mode="a")
    after = s3.read(prefix)
    assert _dataset(after, "dataset_0") == new_version
    assert _dataset(after, "dataset_1") == new_version
    assert not [k for k in after if k.startswith(".staging")]
    coll = Collection(s3.group(prefix, read_only=True), mode="r")
    index = np.concatenate([np.asarray(b["index"]) for b in _epoch(coll, seed=0)])
    np.testing.assert_array_equal(np.sort(index), np.arange(coll.n_obs))


def test_kill_while_deleting_the_staged_copy(s3: S3, base: str, prefix: str):
    """Killed while the staged copy is deleted after it was copied into place.

    ``_move(staged, name)`` copies ``.staging/dataset_0/*`` to ``dataset_0/*``, deletes the staged
    dataset's ``zarr.json`` and then the rest of its keys. The state below is what a kill halfway
    through that delete leaves: the journal, the old dataset under ``_replaced``, the new dataset
    complete in place, and part of the staged keys without their ``zarr.json``. Recovery must leave the
    new dataset in place (a staged copy without ``zarr.json`` counts as moved).
    """
    s3.copy_tree(base, prefix)
    before = s3.read(prefix)
    old, new = _dataset(before, "dataset_0"), _dataset(before, "dataset_1")
    rest = sorted((k, v) for k, v in new.items() if k != "zarr.json")
    remaining = dict(rest[len(rest) // 2 :])
    s3.delete(prefix, [f"dataset_0/{k}" for k in old])
    s3.write(prefix, _under(new, "dataset_0") | _under(old, ".staging/_replaced/dataset_0"))
    s3.write(prefix, _under(remaining, ".staging/dataset_0"))
    s3.write(prefix, {".staging/journal.json": json.dumps({"commit": ["dataset_0"]}).encode()})

    Collection(s3.group(prefix), mode="a")
    after = s3.read(prefix)
    assert sorted(_dataset(after, "dataset_0")) == sorted(new), "dataset_0 lost keys in recovery"
    assert _dataset(after, "dataset_0") == new


def test_missing_shard_on_s3_is_an_error(s3: S3, base: str, prefix: str):
    """A collection's writer stores every shard, so a missing one is damage (as on a local disk)."""
    s3.copy_tree(base, prefix)
    shards = [k for k in s3.keys(prefix) if k.startswith("dataset_0/X/data/c/")]
    assert len(shards) >= 2
    s3.delete(prefix, [shards[1]])
    coll = Collection(s3.group(prefix, read_only=True), mode="r")
    with pytest.raises((OSError, ValueError, KeyError), match="(?i)missing|damaged"):
        _epoch(coll, seed=0)


class FailingPut(WrapperStore):
    """The S3 store, except that the ``n``-th write of a key starting with ``match`` fails, as a PUT
    that still fails after obstore's retries (a network outage, throttling) would."""

    def __init__(self, store, match: str = "dataset_0/", n: int = 3):
        super().__init__(store)
        self.match, self.n, self.count = match, n, 0

    def _with_store(self, store):
        return type(self)(store, self.match, self.n)

    async def set(self, key, value):
        if key.startswith(self.match):
            self.count += 1
            if self.count == self.n:
                raise OSError(f"simulated S3 failure writing {key!r}")
        return await self._store.set(key, value)


def test_failed_write_during_commit_keeps_the_data(s3: S3, prefix: str):
    """An append whose commit fails midway (one PUT of the copy into place fails) must leave the
    previous collection or the new one: no row may be lost."""
    first, extra = _inputs(dense=False, sizes=(100, 30))
    Collection(s3.group(prefix)).add_adatas([first], **{**BUILD, "dataset_size": 200})
    assert Collection(s3.group(prefix, read_only=True), mode="r").dataset_keys == ["dataset_0"]

    # The append rewrites dataset_0: moved to .staging/_replaced, then the new one copied into place.
    failing = zarr.open_group(FailingPut(s3.store(prefix)), mode="a")
    with pytest.raises(OSError, match="simulated S3 failure"):
        Collection(failing).add_adatas([extra], **{**BUILD, "dataset_size": 200, "seed": 1})

    coll = Collection(s3.group(prefix), mode="a")  # opening for writing recovers what can be recovered
    assert not coll.is_empty, f"every row is gone; keys left: {s3.keys(prefix)}"
    assert coll.n_obs in (100, 130)
    names = set(coll.obs([]).index)
    assert set(first.obs_names) <= names
