"""A DataModule that feeds scvi-tools models from a collection, in the tensors scvi-tools expects."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from annbatch.lightning import CollectionDataModule
from annbatch.lightning._datamodule import _as_list
from annbatch.samplers import SubsetSampler
from annbatch.scvi._registry import BATCH, CAT_COVS, CONT_COVS, LABELS, X, scvi_registry

if TYPE_CHECKING:
    from annbatch.abc import Sampler
    from annbatch.collection import Collection
    from annbatch.loader import Loader

__all__ = ["SCVIDataModule"]


class SCVIDataModule(CollectionDataModule):
    """Train ``scvi.model.SCVI`` on a :class:`~annbatch.Collection`, streamed with the chunked shuffler.

    A :class:`~annbatch.lightning.CollectionDataModule` that also describes the collection the way
    scvi-tools' ``setup_anndata`` would (:attr:`registry`) and hands each batch to the model as the
    tensors scvi-tools modules read (``X`` dense float, ``batch``, ``labels`` and covariates as columns).
    The model is built from the registry and trained with the module passed as ``datamodule``::

        dm = SCVIDataModule("cells.zarr", batch_key="donor")
        model = scvi.model.SCVI(registry=dm.registry, n_latent=10)
        model.train(datamodule=dm, max_epochs=10)
        latent = model.get_latent_representation(dataloader=dm.inference_dataloader())

    The collection's rows arrive in the shuffled chunked order for training; :meth:`inference_dataloader`
    reads them in row order, so the latent representation lines up with ``collection.obs``.

    Parameters
    ----------
    collection
        A :class:`~annbatch.Collection`, its path or a URL; opened read-only.
    batch_key
        Categorical obs column used as scVI's batch covariate (e.g. donor or sample). ``None``: one batch.
    labels_key
        Categorical obs column of cell labels (read by models that use labels, e.g. with
        ``dispersion="gene-label"``). ``None``: every cell has the same label.
    categorical_covariate_keys, continuous_covariate_keys
        Further obs columns given to the model as covariates (categorical columns as codes, continuous
        ones as floats).
    layer
        Read counts from ``layers[layer]`` instead of ``X``. scVI models raw counts.
    batch_size, chunk_size, preload_nchunks, batch_sampler, val_fraction, split_key, val_values, seed, prefetch
        As for :class:`~annbatch.lightning.CollectionDataModule` (``batch_size`` defaults to 1024 here:
        scVI trains best on smaller batches than a linear model).
    model_name
        The model class the registry is written for (scvi-tools checks it when a saved model is loaded).
    storage_options
        Settings of the object store for a collection given by URL (see :class:`~annbatch.Collection`).
    """

    def __init__(
        self,
        collection: str | os.PathLike | Collection,
        *,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        layer: str | None = None,
        batch_size: int = 1024,
        chunk_size: int = 256,
        preload_nchunks: int = 32,
        batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
        val_fraction: float = 0.1,
        split_key: str | None = None,
        val_values: Sequence[Any] | None = None,
        seed: int = 0,
        prefetch: int = 2,
        model_name: str = "SCVI",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.labels_key: str | None = labels_key
        self.categorical_covariate_keys: list[str] = _as_list(categorical_covariate_keys or [])
        self.continuous_covariate_keys: list[str] = _as_list(continuous_covariate_keys or [])
        self.model_name: str = model_name
        keys = [*([labels_key] if labels_key else []), *self.categorical_covariate_keys,
                *self.continuous_covariate_keys]  # fmt: skip
        super().__init__(
            collection,
            batch_size=batch_size,
            chunk_size=chunk_size,
            preload_nchunks=preload_nchunks,
            obs_keys=list(dict.fromkeys(keys)) or None,
            batch_key=batch_key,
            batch_sampler=batch_sampler,
            val_fraction=val_fraction,
            split_key=split_key,
            val_values=val_values,
            seed=seed,
            layer=layer,
            to="torch",
            prefetch=prefetch,
            storage_options=storage_options,
        )
        self._layer = layer
        categorical = {"batch_key": [batch_key] if batch_key else [], "labels_key": [labels_key] if labels_key else [],
                       "categorical_covariate_keys": self.categorical_covariate_keys}  # fmt: skip
        for name, columns in categorical.items():
            for column in columns:
                self._check_categorical(name, column)
        for column in self.continuous_covariate_keys:
            if column in self.categories:
                raise TypeError(
                    f"`continuous_covariate_keys`: obs column {column!r} is not numeric; give it in "
                    "`categorical_covariate_keys` instead."
                )

    def _check_categorical(self, name: str, column: str) -> None:
        """scvi-tools needs a category for every cell: no missing values, and no float columns."""
        assert self._keys is not None  # every key column is in the obs table
        if column not in self.categories:
            raise TypeError(
                f"`{name}={column!r}`: obs column {column!r} is numeric ({self._keys.arrays[column].dtype}), "
                "not categorical; scvi-tools needs labels. Give a categorical or string column"
                + (
                    " (or put it in `continuous_covariate_keys`)."
                    if name == "categorical_covariate_keys"
                    else "."
                )
            )
        missing = int(np.count_nonzero(self._keys.arrays[column] < 0))
        if missing:
            raise ValueError(
                f"`{name}={column!r}`: {missing} cells have no value in obs column {column!r}; scvi-tools "
                "needs one for every cell. Give them a category (e.g. 'unknown') in the input files and "
                "convert them again, or choose another column."
            )

    # -- what scvi-tools sizes its model from -----------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Number of cells in the collection."""
        return self._n_obs

    @property
    def n_train(self) -> int:
        """Number of training cells."""
        return len(self.train_rows)

    @property
    def n_val(self) -> int:
        """Number of validation cells."""
        return len(self.val_rows)

    @property
    def train_idx(self) -> np.ndarray:
        """Row numbers of the training cells (scvi-tools stores them on the model as ``train_indices``)."""
        return self.train_rows

    @property
    def val_idx(self) -> np.ndarray:
        """Row numbers of the validation cells."""
        return self.val_rows

    def _mapping(self, column: str | None) -> np.ndarray:
        if column is None:
            return np.array(["0"], dtype=object)  # one batch or label, as setup_anndata makes without a key
        return np.asarray(self.categories[column].astype(str), dtype=object)

    @property
    def batch_labels(self) -> np.ndarray:
        """The batch categories, in code order."""
        return self._mapping(self.batch_key)

    @property
    def label_keys(self) -> np.ndarray:
        """The label categories, in code order."""
        return self._mapping(self.labels_key)

    @property
    def n_batch(self) -> int:
        """Number of batches (categories of ``batch_key``)."""
        return len(self.batch_labels)

    @property
    def n_labels(self) -> int:
        """Number of labels (categories of ``labels_key``)."""
        return len(self.label_keys)

    @property
    def n_samples(self) -> int:
        """Number of samples: scvi-tools asks for it when saving; this module has no sample key."""
        return 0

    @property
    def n_cats_per_cov(self) -> list[int] | None:
        """Categories of each categorical covariate."""
        keys = self.categorical_covariate_keys
        return [len(self.categories[k]) for k in keys] if keys else None

    @property
    def n_continuous_cov(self) -> int:
        """Number of continuous covariates."""
        return len(self.continuous_covariate_keys)

    @property
    def registry(self) -> dict[str, Any]:
        """The collection described as scvi-tools' ``setup_anndata`` registry: ``SCVI(registry=dm.registry)``."""
        return scvi_registry(
            model_name=self.model_name,
            n_obs=self.n_obs,
            var_names=np.asarray(self.var_names.astype(str), dtype=object),
            layer=self._layer,
            batch=(self.batch_key, self.batch_labels),
            labels=(self.labels_key, self.label_keys),
            categorical_covariates={k: self._mapping(k) for k in self.categorical_covariate_keys},
            continuous_covariates=self.continuous_covariate_keys,
        )

    # -- batches as scvi-tools reads them ---------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, torch.Tensor | None]:
        """Rename an annbatch batch into scvi-tools' tensors (still on the CPU, X possibly sparse)."""
        x = batch[X]
        obs = batch.get("obs") or {}
        n = x.shape[0]

        def column(values: Any) -> torch.Tensor:
            return torch.as_tensor(values).reshape(n, 1)

        zeros = torch.zeros((n, 1), dtype=torch.int64)
        cats, conts = self.categorical_covariate_keys, self.continuous_covariate_keys
        return {
            X: x,
            BATCH: column(batch["batch"]) if self.batch_key else zeros,
            LABELS: column(obs[self.labels_key]) if self.labels_key else zeros,
            CAT_COVS: torch.cat([column(obs[k]) for k in cats], dim=1) if cats else None,
            CONT_COVS: torch.cat([column(obs[k]).float() for k in conts], dim=1) if conts else None,
        }

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, torch.Tensor | None]:
        """Densify X on the device it was moved to: sparse rows cross to the GPU, dense rows do not."""
        x = batch[X]
        if x.layout != torch.strided:
            x = x.to_dense()
        return {**batch, X: x.float()}

    def inference_dataloader(
        self,
        rows: np.ndarray | None = None,
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> _ModelInputs:
        """Every cell (or ``rows``) once, in row order, as model inputs: for ``get_latent_representation``.

        Parameters
        ----------
        rows
            Row numbers (or a boolean mask over all rows) to read; ``None`` reads the whole collection.
            Rows come in increasing order, so ``latent[i]`` belongs to the ``i``-th selected row of
            ``collection.obs``.
        batch_size
            Cells per batch (default: the module's ``batch_size``).
        device
            Move the tensors there (the model's device, e.g. ``model.device``); ``None`` keeps them on
            the CPU.
        """
        selected = np.arange(self._n_obs) if rows is None else np.asarray(rows)
        size = self._sizes["batch_size"] if batch_size is None else int(batch_size)
        cs = self._sizes["chunk_size"]
        preload = max(self._sizes["preload_nchunks"], -(-size // cs))
        sampler = SubsetSampler(selected, size, cs, preload, shuffle=False)
        loader = self.collection.loader(batch_sampler=sampler, **self._loader_kw)
        return _ModelInputs(self, loader, torch.device(device) if device is not None else None)


class _ModelInputs:
    """A loader whose batches go through the DataModule's transfer hooks, as the Trainer would do."""

    def __init__(self, module: SCVIDataModule, loader: Loader, device: torch.device | None):
        self._module, self._loader, self._device = module, loader, device

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | None]]:
        for batch in self._loader:
            tensors = self._module.on_before_batch_transfer(batch, 0)
            if self._device is not None:
                tensors = {k: v.to(self._device) if v is not None else None for k, v in tensors.items()}
            yield self._module.on_after_batch_transfer(tensors, 0)
