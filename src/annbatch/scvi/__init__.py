"""scvi-tools integration: :class:`SCVIDataModule` trains ``scvi.model.SCVI`` (and its kin) on a collection.

Needs the ``scvi`` extra (``pip install "annbatch[scvi]"``, which brings scvi-tools); the core package
does not import it.
"""

from annbatch.scvi._datamodule import SCVIDataModule

__all__ = ["SCVIDataModule"]
