"""Fast mini-batch loading of single-cell collections larger than memory."""

from importlib.metadata import version

__version__ = version("annbatch")
