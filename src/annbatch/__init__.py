"""Fast mini-batch loading of single-cell collections larger than memory."""

from importlib.metadata import version

from . import abc, samplers, types
from .collection import Collection, CollectionError, DatasetCollection
from .loader import Loader
from .preshuffle import InputError
from .writer import write_sharded

__version__ = version("annbatch")

__all__ = [
    "Collection",
    "CollectionError",
    "DatasetCollection",
    "InputError",
    "Loader",
    "abc",
    "samplers",
    "types",
    "write_sharded",
]
