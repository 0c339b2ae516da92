"""Lightning integration: :class:`CollectionDataModule` feeds a ``lightning.Trainer`` from a collection.

Needs the ``train`` extra (``pip install "annbatch[train]"``); the core package does not import it.
"""

from annbatch.lightning._datamodule import CollectionDataModule

__all__ = ["CollectionDataModule"]
