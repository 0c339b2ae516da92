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
