"""One exported error hierarchy, and collections in a newer format refused on open."""

from __future__ import annotations

import json

import pytest

import annbatch
from annbatch import errors


def test_every_error_is_an_annbatch_error_and_its_builtin():
    expected = {"InputError": ValueError, "CollectionError": ValueError, "CollectionLockedError": ValueError,
                "CommitError": OSError, "BackingError": ValueError, "TrainError": ValueError,
                "CollectionChangedError": RuntimeError}  # fmt: skip
    assert set(errors.__all__) == {"AnnbatchError", *expected}
    for name, builtin in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.AnnbatchError) and issubclass(cls, builtin), name
    # the same classes wherever they are imported from
    from annbatch._backing import BackingError
    from annbatch._staging import CommitError
    from annbatch.collection import CollectionError
    from annbatch.preshuffle import InputError

    assert (BackingError, CommitError, CollectionError, InputError) == (
        errors.BackingError, errors.CommitError, errors.CollectionError, errors.InputError)  # fmt: skip
    assert annbatch.AnnbatchError is errors.AnnbatchError and annbatch.InputError is errors.InputError


def test_errors_raised_are_caught_by_the_root(tmp_path):
    with pytest.raises(errors.AnnbatchError, match="No collection"):
        annbatch.Collection(tmp_path / "nope.zarr", mode="r")
    with pytest.raises(errors.AnnbatchError, match="missing.h5ad"):
        annbatch.Collection(tmp_path / "c.zarr").add_adatas([tmp_path / "missing.h5ad"], progress=False)


def _set_version(path, version):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["encoding-version"] = version
    (path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("mode", ["r", "a"])
def test_a_newer_format_says_upgrade(tmp_path, mode):
    path = tmp_path / "c.zarr"
    annbatch.Collection(path)
    _set_version(path, "0.2.0")
    with pytest.raises(annbatch.CollectionError, match=r"0\.2\.0.*upgrade annbatch"):
        annbatch.Collection(path, mode=mode)
    _set_version(path, "0.1.7")  # a patch release of the same format reads fine
    annbatch.Collection(path, mode=mode)
    _set_version(path, "banana")
    with pytest.raises(annbatch.CollectionError, match="banana"):
        annbatch.Collection(path, mode=mode)


# -- messages name the parameter the caller passed, in backticks ----------------------------------------
def _small(n_obs=60, **kw):
    from annbatch.synthetic import make_adata

    return make_adata(n_obs, 30, seed=0, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"dataset_size": 1.5}, TypeError, r"`dataset_size` must be rows as an int .* got 1\.5"),
        ({"dataset_size": 1e6}, TypeError, r"`dataset_size` must be rows as an int"),
        ({"dataset_size": "500000"}, ValueError, r"`dataset_size='500000'` has no unit"),
        ({"dataset_size": "10XB"}, ValueError, r"`dataset_size='10XB'` is not a size"),
        ({"shard_size": 1.5}, TypeError, r"`shard_size` must be rows as an int"),
        ({"memory_limit": "-1GB"}, ValueError, r"`memory_limit` must be positive"),
        ({"shuffle_chunk_size": 1.5}, TypeError, r"`shuffle_chunk_size` must be an int"),
        ({"shuffle_chunk_size": "10"}, TypeError, r"`shuffle_chunk_size` must be an int"),
        ({"n_obs_per_chunk": 2.5}, TypeError, r"`n_obs_per_chunk` must be an int"),
        ({"compressors": "lz4"}, ValueError, r"`compressors` must be 'auto', None or zarr codec"),
        ({"var_subset": "gene_0"}, TypeError, r"`var_subset` must be a list of var names"),
        ({"var_subset": []}, errors.InputError, r"`var_subset` is empty"),
        ({"groupby": "nope"}, errors.InputError, r"`groupby` column\(s\) \['nope'\]"),
        ({"seed": -1}, ValueError, "`seed` must be 0 or more"),
        ({"seed": 1.5}, TypeError, "`seed` must be an int"),
        ({"shard_size": None}, TypeError, "`shard_size`"),
    ],
)
def test_add_adatas_errors_name_the_parameter(tmp_path, kwargs, error, pattern):
    path = tmp_path / "c.zarr"
    with pytest.raises(error, match=pattern):
        annbatch.Collection(path).add_adatas([_small()], progress=False, **kwargs)
    assert annbatch.Collection(path).is_empty


def test_an_input_of_the_wrong_type_names_inputs(tmp_path):
    with pytest.raises(errors.InputError, match=r"`inputs` must be paths .* got int 42"):
        annbatch.Collection(tmp_path / "c.zarr").add_adatas([42], progress=False)


def test_write_sharded_errors_name_the_parameter_and_element(tmp_path):
    import zarr

    adata = _small()
    with pytest.raises(TypeError, match=r"`group` must be a zarr v3 group.* got str"):
        annbatch.write_sharded(str(tmp_path / "a.zarr"), adata)
    group = zarr.open_group(tmp_path / "b.zarr", mode="w", zarr_format=3)
    with pytest.raises(TypeError, match="`n_obs_per_chunk` must be an int"):
        annbatch.write_sharded(group, adata, n_obs_per_chunk=1.5)
    with pytest.raises(ValueError, match="`compressors`"):
        annbatch.write_sharded(group, adata, compressors="blosc")
    adata.layers["counts"] = adata.X.tocsc()
    fix = r"`adata\.layers\['counts'\] = adata\.layers\['counts'\]\.tocsr\(\)`"
    with pytest.raises(ValueError, match=r"`adata\.layers\['counts'\]` is a CSC matrix.*" + fix):
        annbatch.write_sharded(group, adata, key="c")


def test_loader_errors_name_the_parameter_the_caller_used(tmp_path):
    coll = annbatch.Collection(tmp_path / "c.zarr").add_adatas([_small()], progress=False)
    with pytest.raises(ValueError, match="^`sampler` must be a Sampler"):
        coll.loader(sampler="random")
    with pytest.raises(TypeError, match="^`sampler` must be an annbatch"):
        coll.loader(sampler=42)
    with pytest.raises(ValueError, match=r"^`sampler='homogeneous'` samples"):
        coll.loader(sampler="homogeneous")
    with pytest.raises(ValueError, match="^`batch_sampler` must be a Sampler"):
        coll.loader(batch_sampler="random")
    with pytest.raises(KeyError, match=r"`layer='nope'`: no such layer in the collection; its layers: \["):
        coll.loader(layer="nope")
    # one column name is a list of one, not of its characters
    batch = next(iter(coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, obs_keys="cell_type")))
    assert list(batch["obs"]) == ["cell_type"]
