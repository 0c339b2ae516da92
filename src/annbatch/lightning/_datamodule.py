"""A Lightning DataModule over a collection: train/validation split, DDP sharding, resumable epochs."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import pandas as pd

from annbatch._convert import Target, check_target
from annbatch._location import local_or_url
from annbatch._obs import ObsTable
from annbatch._zarr import child_group, list_attr
from annbatch.abc import Sampler
from annbatch.collection import Collection, CollectionError
from annbatch.samplers import ClassSampler, DistributedSampler, SubsetSampler, WeightedSampler

if TYPE_CHECKING:
    from collections.abc import Mapping

    from annbatch.loader import Loader

__all__ = ["CollectionDataModule"]

_VAL_STREAM = 31  # spawn key of the random choice of validation chunks, apart from the samplers' streams


def _open(collection: str | os.PathLike | Collection, storage_options: dict[str, Any] | None) -> Collection:
    """The collection, opened read-only: training never writes into the user's data."""
    if isinstance(collection, Collection):
        if storage_options is not None:
            raise ValueError("`storage_options` are for a collection given by URL, not an open Collection.")
        return collection
    if not isinstance(collection, str | os.PathLike):
        raise TypeError(
            f"`collection` must be a Collection, a path or a URL, got {type(collection).__name__}."
        )
    location = local_or_url(collection)
    if isinstance(location, Path) and not location.exists():
        path = os.fspath(location)
        raise CollectionError(
            f"No collection at {path!r}: convert the data into one first (`annbatch convert INPUT.h5ad "
            f"... -o {path}`, or `annbatch.Collection(path).add_adatas(...)`)."
        )
    return Collection(collection, mode="r", storage_options=storage_options)


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}.")
    return int(value)


def _as_list(value: Any) -> list:
    """A list of what was given: one column name or value on its own counts as a list of one."""
    return [value] if isinstance(value, str) else list(value)


class CollectionDataModule(L.LightningDataModule):
    """Train and validation loaders over a :class:`~annbatch.Collection`, for a Lightning ``Trainer``.

    ``train_dataloader()`` and ``val_dataloader()`` return :class:`~annbatch.Loader` objects that the
    Trainer iterates directly (no :class:`torch.utils.data.DataLoader` around them), yielding
    :class:`~annbatch.types.Batch` dicts. Under DDP every rank reads its own share of each epoch
    (:class:`~annbatch.samplers.DistributedSampler`, ranks taken from the Trainer), with equal batch
    counts; each epoch gets a new order derived from ``(seed, epoch)``. The training loader's position
    is saved in checkpoints and restored on resumption, so a Trainer resumed from a mid-epoch
    checkpoint continues that epoch with the rows it has not yet seen (see
    :meth:`annbatch.Loader.state_dict`).

    Parameters
    ----------
    collection
        A :class:`~annbatch.Collection`, its path, or a URL of object storage (``s3://bucket/cells.zarr``,
        ``gs://``, ``az://``); opened read-only.
    batch_size, chunk_size, preload_nchunks
        Rows per mini-batch, contiguous rows per read, chunks per load (see :class:`~annbatch.Loader`).
    obs_keys
        obs columns yielded with each batch under ``"obs"`` (categoricals as int64 codes, labels in
        :attr:`categories`); one name on its own stands for a list of one.
    batch_key
        obs column yielded as codes under ``"batch"`` (e.g. donor, as a covariate).
    batch_sampler
        ``None`` (shuffled chunks), ``"homogeneous"`` (every training batch from one ``batch_key``
        value), ``"balanced"`` (``batch_key`` values drawn uniformly), or a
        :class:`~annbatch.abc.Sampler` for training. Shorthands are restricted to the training rows; a
        sampler you pass is used as it is, so it must leave out the validation rows itself (see
        :attr:`val_rows`).
    val_fraction
        Share of rows held out for validation, as whole chunks of ``chunk_size`` rows chosen at random
        with ``seed`` (random blocks rather than one range: a collection converted with ``groupby``
        is sorted within each dataset). ``0`` means no validation.
    split_key, val_values
        Hold out every row whose ``split_key`` value is in ``val_values`` instead (e.g. donors; one
        string on its own stands for a list of one); ``val_fraction`` is then not used.
    seed
        Seed of the split and of the training order (each epoch derives a new order from it).
    return_index
        Add each batch's global row numbers under ``"index"``.
    layer
        Read ``layers[layer]`` instead of ``X``.
    to
        Output arrays: ``"torch"`` (default), ``"numpy"``/``None`` or ``"jax"``.
    val_batch_size
        Rows per validation batch (default ``batch_size``).
    prefetch
        Loads read ahead in the background per loader.
    storage_options
        Settings of the object store for a collection given by URL (see :class:`~annbatch.Collection`);
        without them, credentials come from the environment.
    """

    def __init__(
        self,
        collection: str | os.PathLike | Collection,
        *,
        batch_size: int = 4096,
        chunk_size: int = 256,
        preload_nchunks: int = 32,
        obs_keys: Sequence[str] | None = None,
        batch_key: str | None = None,
        batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
        val_fraction: float = 0.1,
        split_key: str | None = None,
        val_values: Sequence[Any] | None = None,
        seed: int = 0,
        return_index: bool = False,
        layer: str | None = None,
        to: Target = "torch",
        val_batch_size: int | None = None,
        prefetch: int = 2,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "chunk_size": chunk_size, "preload_nchunks": preload_nchunks}
        sizes = {name: _check_count(name, value) for name, value in sizes.items()}
        if val_batch_size is not None:
            val_batch_size = _check_count("val_batch_size", val_batch_size)
        prefetch = _check_count("prefetch", prefetch, minimum=0)
        seed = _check_count("seed", seed, minimum=0)
        to = check_target(to)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real):
            raise TypeError(f"`val_fraction` must be a number in [0, 1), got {val_fraction!r}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
        if (split_key is None) != (val_values is None):
            raise ValueError(
                "Give `split_key` and `val_values` together (e.g. `split_key='donor'`, `val_values=['D1']`)."
            )
        if isinstance(batch_sampler, str) and batch_sampler not in ("homogeneous", "balanced"):
            raise ValueError(
                f"`batch_sampler` must be None, 'homogeneous', 'balanced' or a Sampler, got {batch_sampler!r}."
            )
        if isinstance(batch_sampler, str) and batch_key is None:
            raise ValueError(f"`batch_sampler={batch_sampler!r}` samples by an obs column: give `batch_key`.")
        if batch_sampler is not None and not isinstance(batch_sampler, str | Sampler):
            raise TypeError(
                "`batch_sampler` must be None, 'homogeneous', 'balanced' or an annbatch.abc.Sampler, "
                f"got {type(batch_sampler).__name__}."
            )
        per_load = sizes["chunk_size"] * sizes["preload_nchunks"]
        if not isinstance(batch_sampler, Sampler) and sizes["batch_size"] > per_load:
            raise ValueError(
                f"`batch_size={batch_size}` is more than the rows of one load, `chunk_size` × "
                f"`preload_nchunks` = {chunk_size} × {preload_nchunks} = {per_load}: raise "
                "`preload_nchunks` or `chunk_size`, or lower `batch_size`."
            )
        self.collection: Collection = _open(collection, storage_options)
        if self.collection.is_empty:
            raise CollectionError(
                f"The collection {collection!s} is empty: add data with `add_adatas` first."
            )
        self.obs_keys: list[str] = _as_list(obs_keys) if obs_keys is not None else []
        self.batch_key: str | None = batch_key
        self._sizes: dict[str, int] = sizes
        self._batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = batch_sampler
        self._seed: int = int(seed)
        self._loader_kw: dict[str, Any] = {"obs_keys": self.obs_keys or None, "batch_key": batch_key,
                           "return_index": return_index, "to": to, "layer": layer, "prefetch": prefetch}  # fmt: skip
        self._val_batch_size: int = val_batch_size if val_batch_size is not None else batch_size
        self._n_obs: int = self.collection.n_obs
        self._check_columns({"obs_keys": self.obs_keys, "batch_key": [batch_key] if batch_key else [],
                             "split_key": [split_key] if split_key else []})  # fmt: skip
        self._check_layer(layer)
        key_columns = list(dict.fromkeys([*self.obs_keys, *([batch_key] if batch_key else [])]))
        columns = list(dict.fromkeys([*key_columns, *([split_key] if split_key else [])]))
        obs = self.collection.obs(columns=columns) if columns else None
        self._keys: ObsTable | None = ObsTable(obs, key_columns) if key_columns else None
        if isinstance(batch_sampler, str) and batch_key not in self._keys.categories:
            raise ValueError(
                f"`batch_key={batch_key!r}` must be a categorical obs column to sample by it "
                f"(`batch_sampler={batch_sampler!r}`); it is {obs[batch_key].dtype}."
            )
        self.val_rows: np.ndarray
        if split_key is not None:
            self.val_rows = self._rows_with(obs[split_key], split_key, _as_list(val_values))
        else:
            self.val_rows = self._random_chunks(val_fraction)
        train = np.ones(self._n_obs, dtype=bool)
        train[self.val_rows] = False
        self.train_rows: np.ndarray = np.flatnonzero(train)
        if not len(self.train_rows):
            raise ValueError(
                "Every row is held out for validation; lower `val_fraction` or choose other `val_values`."
            )
        self._train: Loader | None = None
        self._val: Loader | None = None
        self._train_world: tuple[int, int] | None = None
        self._pending_state: Mapping[str, Any] | None = None

    # -- what a model sizes itself from ---------------------------------------------------------------------
    @property
    def n_vars(self) -> int:
        """Number of variables (columns of X)."""
        return self.collection.n_vars

    @property
    def var_names(self) -> pd.Index:
        """The variables' names."""
        return self.collection.var.index

    @property
    def categories(self) -> dict[str, pd.Index]:
        """Labels of the codes of each categorical ``obs_keys`` column and of ``batch_key``."""
        return dict(self._keys.categories) if self._keys is not None else {}

    def _check_columns(self, wanted: dict[str, list[str]]) -> None:
        """Name the setting that asks for an obs column the collection lacks."""
        available = self._obs_columns()
        for name, columns in wanted.items():
            missing = [c for c in columns if c not in available]
            if missing:
                shown = missing if name == "obs_keys" else missing[0]
                raise KeyError(
                    f"`{name}={shown!r}`: no such obs column in the collection; available: {available}."
                )

    def _obs_columns(self) -> list[str]:
        first = next(iter(self.collection))
        return [str(c) for c in list_attr(child_group(first, "obs"), "column-order")]

    def _check_layer(self, layer: str | None) -> None:
        if layer is None:
            return
        first = next(iter(self.collection))
        layers = sorted(child_group(first, "layers").keys()) if "layers" in first else []
        if layer not in layers:
            raise KeyError(f"`layer={layer!r}`: no such layer in the collection; its layers: {layers}.")

    # -- the split --------------------------------------------------------------------------------------------
    def _rows_with(self, column: pd.Series, name: str, values: Sequence[Any]) -> np.ndarray:
        values = list(values)
        present = set(column.dropna().unique())
        unknown = [v for v in values if v not in present]
        if unknown:
            shown = sorted(map(str, present))[:20]
            raise ValueError(
                f"`val_values` {unknown} do not occur in obs column {name!r}; its values include {shown}."
            )
        rows = np.flatnonzero(column.isin(values).to_numpy())
        return rows

    def _random_chunks(self, fraction: float) -> np.ndarray:
        """Whole chunks of ``chunk_size`` rows, chosen at random, holding about ``fraction`` of the rows."""
        cs = self._sizes["chunk_size"]
        n_chunks = -(-self._n_obs // cs)
        n_val = round(n_chunks * fraction)
        if fraction and not n_val:
            n_val = 1
        if n_val >= n_chunks and fraction:
            raise ValueError(
                f"`val_fraction={fraction}` of {self._n_obs} rows in chunks of {cs} leaves nothing to train on; "
                "lower it or `chunk_size`."
            )
        rng = np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(_VAL_STREAM,)))
        chunks = np.sort(rng.choice(n_chunks, size=n_val, replace=False))
        rows = (chunks[:, None] * cs + np.arange(cs)).ravel()
        return rows[rows < self._n_obs]

    # -- loaders ---------------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _train_sampler(self) -> Sampler:
        sizes, seed = self._sizes.values(), self._seed
        if isinstance(self._batch_sampler, Sampler):
            return self._batch_sampler
        if self._batch_sampler is None:
            return SubsetSampler(self.train_rows, *sizes, shuffle=True, seed=seed)
        keys, batch_key = self._keys, self.batch_key
        assert keys is not None and batch_key is not None  # a shorthand needs `batch_key` (see __init__)
        codes = keys.arrays[batch_key].copy()
        if batch_key not in keys.categories:
            raise TypeError(f"batch_key {batch_key!r} must be categorical to sample by it.")
        codes[self.val_rows] = -1  # validation rows count as unlabelled: never drawn for training
        classes = pd.Categorical.from_codes(codes, categories=keys.categories[batch_key])
        if self._batch_sampler == "homogeneous":
            return ClassSampler(classes, *sizes, seed=seed)
        return WeightedSampler(classes, *sizes, num_samples=len(self.train_rows), seed=seed)

    def _val_sampler(self, world: int) -> Sampler:
        cs, preload = self._sizes["chunk_size"], self._sizes["preload_nchunks"]
        # Every rank gets at least one load: smaller loads where the validation set is small.
        per_rank = -(-len(self.val_rows) // world)
        preload = max(1, min(preload, per_rank // cs))
        batch_size = min(self._val_batch_size, cs * preload)
        return SubsetSampler(self.val_rows, batch_size, cs, preload, shuffle=False)

    def _loader(self, sampler: Sampler, world: int, rank: int, *, equal: bool) -> Loader:
        if world > 1:
            sampler = DistributedSampler(sampler, rank=rank, world_size=world, equal_batches=equal)
        return self.collection.loader(batch_sampler=sampler, **self._loader_kw)

    def setup(self, stage: str | None = None) -> None:
        """Build the loaders for this rank (called by the Trainer on every rank)."""
        rank, world = self._rank_world()
        if self._train is None or self._train_world != (rank, world):
            self._train = self._loader(self._train_sampler(), world, rank, equal=True)
            self._val = (
                self._loader(self._val_sampler(world), world, rank, equal=False)
                if len(self.val_rows)
                else None
            )
            self._train_world = (rank, world)
            if self._pending_state is not None:
                self._train.load_state_dict(self._pending_state)
                self._pending_state = None

    def train_dataloader(self) -> Loader:
        """The shuffled training loader (a new order each epoch)."""
        self.setup()
        assert self._train is not None  # built by setup
        return self._train

    def val_dataloader(self) -> Loader | list:
        """The validation loader: unshuffled, every validation row once per evaluation."""
        self.setup()
        return self._val if self._val is not None else []

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (see :meth:`annbatch.Loader.state_dict`), saved in checkpoints."""
        if self._train is None:
            return {"train": self._pending_state} if self._pending_state is not None else {}
        return {"train": self._train.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader from :meth:`state_dict` (applied when the loader is built)."""
        state = state_dict.get("train")
        if state is None:
            return
        if self._train is not None:
            self._train.load_state_dict(state)
        else:
            self._pending_state = state
