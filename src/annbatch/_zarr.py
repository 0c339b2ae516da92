"""How annbatch configures zarr: the Rust (zarrs) codec pipeline for fast sharded I/O."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import zarr

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


@contextmanager
def zarrs_pipeline() -> Iterator[None]:
    """Open and use zarr arrays with the zarrs codec pipeline inside this block.

    zarr picks an array's codec pipeline when the array is opened, so arrays must be opened in the block.
    zarrs decodes and encodes chunks in Rust threads that release the GIL; for codecs it does not
    support it falls back to zarr-python's own pipeline.
    """
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        yield


@contextmanager
def quiet_listing() -> Iterator[None]:
    """Silence zarr's warning about non-zarr folders (our ``.staging`` area) while listing a group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized")
        yield
