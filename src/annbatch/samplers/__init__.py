"""Samplers: decide which rows to load and how to cut them into mini-batches.

See :class:`annbatch.abc.Sampler` for the interface and how to write your own.
"""

from annbatch.samplers._class import ClassSampler
from annbatch.samplers._distributed import DistributedSampler
from annbatch.samplers._random import RandomSampler, SequentialSampler
from annbatch.samplers._subset import SubsetSampler
from annbatch.samplers._weighted import WeightedClassSampler, WeightedSampler

__all__ = [
    "ClassSampler",
    "DistributedSampler",
    "RandomSampler",
    "SequentialSampler",
    "SubsetSampler",
    "WeightedClassSampler",
    "WeightedSampler",
]
