"""Preshuffling: converting AnnData inputs into a collection of shuffled, sharded datasets."""

from ._add import DEFAULT_MEMORY_FRACTION, add_adatas
from ._inputs import InputError

__all__ = ["add_adatas", "InputError", "DEFAULT_MEMORY_FRACTION"]
