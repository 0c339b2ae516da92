"""How annbatch configures zarr: the Rust (zarrs) codec pipeline for fast sharded I/O."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore, MemoryStore, WrapperStore

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


@contextmanager
def zarrs_pipeline(store: Store | None = None) -> Iterator[None]:
    """Open and use zarr arrays with the zarrs codec pipeline inside this block (local stores only).

    zarr picks an array's codec pipeline when the array is opened, so arrays must be opened in the block.
    zarrs decodes and encodes chunks in Rust threads that release the GIL; for codecs it does not
    support it falls back to zarr-python's own pipeline.

    Arrays of any ``store`` other than a local folder keep zarr-python's pipeline: zarrs fetches from
    object storage in Rust while holding the GIL, so every other thread of the process (a training
    loop's, a server's in the same process) would wait for each network read to finish. zarr-python
    reads through obstore's async API, which waits without the GIL.
    """
    if store is not None and not _is_local(store):
        yield
        return
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        yield


def _is_local(store: Store) -> bool:
    while isinstance(store, WrapperStore):
        store = store._store
    return isinstance(store, LocalStore | MemoryStore)


@contextmanager
def quiet_listing() -> Iterator[None]:
    """Silence zarr's warning about non-zarr folders (our ``.staging`` area) while listing a group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized")
        yield


# zarr types a node's children as ``Array | Group`` and its attributes and metadata as JSON values;
# these narrow them where the AnnData layout fixes what they are.


def child_group(group: zarr.Group, name: str) -> zarr.Group:
    """The child ``name`` of ``group``, which the layout makes a group."""
    node = group[name]
    assert isinstance(node, zarr.Group), f"{group.path}/{name} is not a group"
    return node


def child_array(group: zarr.Group, name: str) -> zarr.Array:
    """The child ``name`` of ``group``, which the layout makes an array."""
    node = group[name]
    assert isinstance(node, zarr.Array), f"{group.path}/{name} is not an array"
    return node


def list_attr(node: zarr.Group | zarr.Array, name: str) -> list[Any]:
    """A list-valued attribute of an AnnData element (``shape``, ``column-order``)."""
    value = node.attrs[name]
    assert isinstance(value, list | tuple), f"{node.path}: attribute {name!r} is not a list"
    return list(value)


def metadata_dict(arr: zarr.Array) -> dict[str, Any]:
    """The array's metadata as its JSON document (``zarr.json``), a plain dict."""
    return dict(arr.metadata.to_dict())
