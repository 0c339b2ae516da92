"""Fast mini-batch loading of single-cell collections larger than memory."""

from importlib.metadata import version

from . import abc, errors, samplers, testing, types
from .accessor import AnnbatchAccessor  # registers `adata.annbatch` (anndata >= 0.12)
from .collection import Collection, DatasetCollection
from .errors import AnnbatchError, CollectionError, CollectionLockedError, InputError
from .writer import write_sharded

__version__ = version("annbatch")


def __getattr__(name: str):
    # The Loader module imports torch (when installed) to subclass IterableDataset; load it on first use
    # so `import annbatch` and the CLI stay fast.
    if name == "Loader":
        from .loader import Loader

        return Loader
    raise AttributeError(f"module 'annbatch' has no attribute {name!r}")


__all__ = [
    "AnnbatchAccessor",
    "AnnbatchError",
    "Collection",
    "CollectionError",
    "CollectionLockedError",
    "DatasetCollection",
    "InputError",
    "Loader",
    "abc",
    "errors",
    "samplers",
    "testing",
    "types",
    "write_sharded",
]
