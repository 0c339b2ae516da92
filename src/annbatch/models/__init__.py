"""Reference models that train on annbatch loaders with Lightning.

Needs the ``train`` extra (torch, lightning): ``pip install 'annbatch[train]'``. The models read the
:class:`~annbatch.types.Batch` dicts a loader yields with ``to="torch"``, take sparse CSR batches without
densifying them on CPU, and fill their sizes (genes, classes, batches) from ``trainer.datamodule`` when
they are not given, recording them in checkpoints.

- :class:`MLP`: a feed-forward network whose first layer takes sparse input.
- :class:`Classifier`: logistic regression or MLP predicting an obs column (e.g. cell type).
- :class:`VAE`: a small scVI-style negative-binomial variational autoencoder with a batch covariate.
"""

from annbatch.models._classifier import Classifier
from annbatch.models._mlp import MLP
from annbatch.models._vae import VAE

__all__ = ["MLP", "Classifier", "VAE"]
