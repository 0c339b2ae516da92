"""The Loader: sampler → fetch → assemble → convert, with background prefetch."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from annbatch import types
from annbatch._assemble import Batch, read_loads
from annbatch._backing import (
    Backing,
    BackingError,
    backing_from_memory,
    backing_from_zarr,
    backings_from_adatas,
    check_compatible,
    shared_var,
)
from annbatch._buffers import BufferPool
from annbatch._convert import Target, check_target, convert, target_from_to_torch
from annbatch._datasets import as_written
from annbatch._obs import BatchObs
from annbatch._prefetch import Prefetcher
from annbatch._resume import Progress
from annbatch._zarr import child_group
from annbatch.abc import Sampler
from annbatch.samplers import RandomSampler
from annbatch.samplers._keyed import KeySamplerSpec

if TYPE_CHECKING:
    from annbatch._datasets import Datasets, Snapshot

try:  # A torch IterableDataset when torch is there (DataLoader then treats it as iterable-style).
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - exercised in environments without torch
    _Base = object  # type: ignore[misc,assignment]

__all__ = ["Loader"]


class Loader(_Base):
    """Mini-batches from on-disk or in-memory AnnData data, read in contiguous chunks and shuffled in memory.

    Each load reads ``preload_nchunks`` chunks of ``chunk_size`` contiguous rows from all datasets
    concurrently, shuffles those rows in memory and yields mini-batches of ``batch_size`` rows as dicts
    ``{"X": ..., "obs": ..., "var": ..., "index": ...}``. The next load is read in a background thread
    while the current one is consumed. On a preshuffled :class:`~annbatch.Collection`, contiguous
    chunks are already random samples, so this gives near-random batches at sequential-read speed.

    Parameters
    ----------
    batch_size
        Rows per mini-batch.
    chunk_size
        Contiguous rows per read.
    preload_nchunks
        Chunks per load (``chunk_size * preload_nchunks`` rows are shuffled together).
    shuffle
        Shuffle chunk order and rows within each load.
    drop_last
        Drop the last, smaller batch of an epoch.
    rng, seed
        Randomness of the default sampler; the same seed gives the same batches, and every new
        iteration (epoch) a new order derived from it. Give at most one.
    return_index
        Add the global row numbers of each batch as ``"index"``.
    to
        ``None``/``"numpy"`` (numpy or scipy CSR), ``"torch"`` (dense or sparse CSR tensors, zero-copy)
        or ``"jax"``.
    batch_sampler
        A :class:`~annbatch.abc.Sampler` deciding what to read; replaces the default
        :class:`~annbatch.samplers.RandomSampler` (then ``batch_size``, ``chunk_size``,
        ``preload_nchunks``, ``shuffle``, ``drop_last`` and ``rng`` are not used). Shorthands that sample
        by ``batch_key``: ``"homogeneous"`` (every batch from one key value,
        :class:`~annbatch.samplers.ClassSampler`) and ``"balanced"`` (key values drawn uniformly, or by
        ``class_weights``, with replacement; :class:`~annbatch.samplers.WeightedClassSampler`); both read
        contiguous runs of one value, so write the collection with ``groupby=<key>``.
    obs_columns
        obs columns to yield with every batch as a pandas DataFrame under ``"obs"``; ``None`` yields no
        obs for collections and all obs columns for datasets added with an obs DataFrame.
    obs_keys
        obs columns to yield with every batch as arrays aligned with X rows, under ``"obs"`` as a dict:
        categoricals as int64 codes (labels in :attr:`categories`; ``-1`` for a missing value), numeric
        and boolean columns in their dtype; torch tensors with ``to="torch"``. String columns are coded
        like categoricals (labels: their sorted distinct values). Encoded once when data is added, never
        per batch.
    batch_key
        An obs column (e.g. donor or batch) yielded as int64 codes under ``"batch"``.
    class_weights
        Weights per ``batch_key`` value (mapping label → weight, or one per category) for the
        ``"homogeneous"``/``"balanced"`` shorthands.
    num_samples
        Rows per epoch for the ``"homogeneous"``/``"balanced"`` shorthands (default: all rows).
    prefetch
        Loads read ahead in the background (``0`` reads in the consumer's thread).
    preload_to_gpu
        Accepted for compatibility with the scverse API; GPU preloading (cupy) is not supported yet and
        ``True`` raises.
    to_torch
        The scverse ``annbatch`` spelling of ``to``, deprecated (a :class:`FutureWarning`): ``True`` is
        ``to="torch"``, ``False`` is ``to=None``. Giving a ``to`` it contradicts raises.

    Examples
    --------
    >>> loader = annbatch.Loader(
    ...     batch_size=4096, chunk_size=256, preload_nchunks=32, shuffle=True
    ... )  # doctest: +SKIP
    >>> loader.use_collection(annbatch.Collection("cells.zarr"))  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     x = batch["X"]
    """

    def __init__(
        self,
        *,
        batch_size: int = 1,
        chunk_size: int = 512,
        preload_nchunks: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
        return_index: bool = False,
        to: Target = None,
        batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
        obs_columns: Sequence[str] | None = None,
        obs_keys: Sequence[str] | None = None,
        batch_key: str | None = None,
        class_weights: Mapping | Sequence[float] | None = None,
        num_samples: int | None = None,
        prefetch: int = 2,
        preload_to_gpu: bool = False,
        to_torch: bool | None = None,
    ):
        if to_torch is not None:
            to = target_from_to_torch(to_torch, to)
        self._key_sampler = KeySamplerSpec.of(
            batch_sampler, batch_key, batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks,
            shuffle=shuffle, drop_last=drop_last, rng=rng, seed=seed, class_weights=class_weights,
            num_samples=num_samples,
        )  # fmt: skip
        # With a key sampler, this one stands in until data is added.
        if self._key_sampler is not None or batch_sampler is None:
            batch_sampler = RandomSampler(batch_size, chunk_size, preload_nchunks, shuffle=shuffle,
                                          drop_last=drop_last, rng=rng, seed=seed)  # fmt: skip
        elif not isinstance(batch_sampler, Sampler):
            raise TypeError(
                f"`batch_sampler` must be an annbatch.abc.Sampler, got {type(batch_sampler).__name__}."
            )
        if preload_to_gpu:
            raise ValueError("`preload_to_gpu` needs cupy and a GPU, which this build does not support yet.")
        if prefetch < 0:
            raise ValueError(f"`prefetch` must be 0 or more, got {prefetch}.")
        self._sampler = batch_sampler
        self._to = check_target(to)
        self._return_index = return_index
        self._batch_obs = BatchObs(obs_columns, obs_keys, batch_key)
        self._prefetch = prefetch
        self._buffers = BufferPool()  # load buffers, recycled across loads and epochs
        self._backings: list[Backing] = []
        self._obs: list[pd.DataFrame | None] = []
        self._obs_reader: Callable[[list[str]], pd.DataFrame] | None = None
        self._snapshot: Snapshot | None = None  # the collection's versions, checked after every load
        self._var: pd.DataFrame | None = None
        self._progress = Progress()

    # -- adding data -----------------------------------------------------------------------------------------
    def use_collection(
        self, collection: Datasets, *, load_adata: Callable | None = None, layer: str | None = None
    ) -> Loader:
        """Read from every dataset of a :class:`~annbatch.Collection` (``X``, or ``layers[layer]``).

        The loader reads the collection as it is now. If an append rewrites a dataset it reads, the
        next load raises :class:`~annbatch.errors.CollectionChangedError`: build a new loader then.
        """
        if self._backings:
            raise ValueError("This loader already has data; use a new Loader for another collection.")
        if collection.is_empty:
            raise ValueError(f"The collection {collection!r} is empty: add data with `add_adatas` first.")
        snapshot = collection.snapshot()  # before opening anything: a commit from now on is seen
        if load_adata is not None:
            for group in collection._open_datasets():
                self.add_adata(load_adata(group))
        else:
            key = "X" if layer is None else f"layers/{layer}"
            first = next(collection._open_datasets())
            if layer is not None and key not in first:
                layers = sorted(child_group(first, "layers").keys()) if "layers" in first else []
                raise KeyError(f"`layer={layer!r}`: no such layer in the collection; its layers: {layers}.")
            # An edited dataset may hold arrays written by others, which leave chunks of fill values out.
            backings = [
                backing_from_zarr(group[key], name=f"{group.path}/{key}", complete=as_written(group))
                for group in collection._open_datasets()
            ]
            self._obs_reader = collection._obs_columns  # without the obs names, which batches never carry
            self._add_backings(backings, [None] * len(backings), var=collection.var)
        self._snapshot = snapshot
        return self

    def add_adata(self, adata: ad.AnnData, *, layer: str | None = None, obsm: str | None = None) -> Loader:
        """Add an AnnData (in memory, a view, or backed): its ``X`` (or a layer, or an obsm matrix) and obs.

        Parameters
        ----------
        adata
            The AnnData. Its ``X`` must be dense, scipy CSR, backed CSR or a zarr array.
        layer
            Read ``adata.layers[layer]`` instead of ``X``.
        obsm
            Read ``adata.obsm[obsm]`` (e.g. ``"X_pca"``) instead of ``X``; batches then carry no ``var``.
            Give at most one of ``layer`` and ``obsm``.
        """
        return self.add_adatas([adata], layer=layer, obsm=obsm)

    def add_adatas(
        self, adatas: Sequence[ad.AnnData], *, layer: str | None = None, obsm: str | None = None
    ) -> Loader:
        """Add several AnnData objects, in order (``layer`` and ``obsm`` as in :meth:`add_adata`)."""
        backings = backings_from_adatas(adatas, layer=layer, obsm=obsm)
        var = adatas[0].var if adatas and obsm is None else None
        self._add_backings(backings, [a.obs for a in adatas], var=var)
        return self

    def add_dataset(
        self, dataset: Any, obs: pd.DataFrame | None = None, var: pd.DataFrame | None = None
    ) -> Loader:
        """Add one matrix: numpy array, scipy CSR, zarr array/CSR group, h5py dataset or backed CSR.

        Parameters
        ----------
        dataset
            The matrix, rows being observations.
        obs
            A DataFrame describing its rows (one row per row of ``dataset``).
        var
            A DataFrame describing its columns (one row per column of ``dataset``); it becomes
            :attr:`var`, yielded with every batch. Its index must equal the var names of data added before.
        """
        return self.add_datasets([dataset], [obs], var=var)

    def add_datasets(
        self,
        datasets: Sequence[Any],
        obs: Sequence[pd.DataFrame | None] | None = None,
        var: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    ) -> Loader:
        """Add several matrices, in order.

        Parameters
        ----------
        datasets
            The matrices (see :meth:`add_dataset`), sharing one var space.
        obs
            One DataFrame (or ``None``) per dataset, describing its rows.
        var
            A DataFrame describing the columns shared by all datasets, or one per dataset (with equal
            indices); it becomes :attr:`var`, yielded with every batch.
        """
        obs = list(obs) if obs is not None else [None] * len(datasets)
        if len(obs) != len(datasets):
            raise ValueError(f"Got {len(datasets)} datasets but {len(obs)} obs frames.")
        backings = [
            backing_from_memory(d, name=f"dataset #{len(self._backings) + i}") for i, d in enumerate(datasets)
        ]
        self._add_backings(backings, obs, var=shared_var(var, backings, first=len(self._backings)))
        return self

    def _add_backings(self, backings: list[Backing], obs: list, var: pd.DataFrame | None) -> None:
        everything = self._backings + backings
        check_compatible(everything)
        for o, b in zip(obs, backings, strict=True):
            if o is not None and len(o) != b.n_obs:
                raise ValueError(f"obs has {len(o)} rows but its dataset has {b.n_obs}.")
        if var is not None and self._var is not None and not var.index.equals(self._var.index):
            raise BackingError(
                "The added data's var names differ from the loader's; subset them to one var space."
            )
        all_obs = self._obs + obs
        batch_obs = self._batch_obs.encode(self._obs_reader, all_obs)
        sampler = self._sampler
        if self._key_sampler is not None:
            key = self._key_sampler.batch_key
            sampler = self._key_sampler.build(batch_obs.codes(key), batch_obs.categories.get(key))
        n_obs = sum(b.n_obs for b in everything)
        sampler.validate(n_obs)  # bad masks, scattered keys etc. fail before any read
        # Nothing is changed until everything above passed.
        self._backings, self._obs, self._batch_obs, self._sampler = everything, all_obs, batch_obs, sampler
        self._var = var if var is not None else self._var

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Total rows over all datasets."""
        return sum(b.n_obs for b in self._backings)

    @property
    def n_var(self) -> int:
        """Number of variables (columns of X)."""
        return self._backings[0].shape[1] if self._backings else 0

    n_vars = n_var

    @property
    def dataset_type(self) -> type:
        """The type of the first added dataset's data, as the loader reads it.

        :class:`zarr.Array` for dense zarr data (a collection's included), a subclass of
        :class:`anndata.abc.CSRDataset` for sparse zarr or backed data (test it with :func:`issubclass`),
        else the type of what was added (:class:`numpy.ndarray`, a scipy sparse class, :class:`h5py.Dataset`).
        """
        self._require_data()
        origin = self._backings[0].origin
        assert origin is not None  # every backing records it
        return origin

    @property
    def var(self) -> pd.DataFrame | None:
        """The var DataFrame, when known."""
        return self._var

    @property
    def batch_sampler(self) -> Sampler:
        """The sampler deciding what each load reads."""
        return self._sampler

    @property
    def batch_size(self) -> int | None:
        """Rows per mini-batch."""
        return self._sampler.batch_size

    def __len__(self) -> int:
        """Number of mini-batches in one epoch.

        Inside :class:`torch.utils.data.DataLoader` workers each worker ends on its own partial batch,
        so up to ``num_workers - 1`` more (smaller) batches may come back than this count.
        """
        self._require_data()
        return self._progress.length(self._epoch_sampler(), self.n_obs)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration uses (each iteration otherwise advances it by one).

        Call this every epoch when the loader runs inside :class:`torch.utils.data.DataLoader` workers,
        which get a fresh copy of the loader per epoch unless ``persistent_workers=True``.
        """
        self._progress.load_state_dict({"version": 1, "epoch": epoch, "runs": []})

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands: the epoch, and the mini-batches yielded of it so far.

        A small JSON-able dict, ``{"version": 1, "epoch": e, "runs": [[world_size, batches], ...]}``,
        counting batches handed to the consumer (never loads read ahead); Lightning saves it in
        checkpoints. Given the same data and sampler settings (seed included), a fresh loader given it
        yields the rest of the epoch batch for batch on the same number of ranks, and on another number
        (with a :class:`~annbatch.samplers.DistributedSampler`) deals the rest anew, no row twice. It
        does not see iteration inside :class:`torch.utils.data.DataLoader` workers (their copies): see
        :ref:`resuming` for the details.
        """
        return self._progress.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration (see there for the guarantees).

        Parameters
        ----------
        state
            A state from :meth:`state_dict` of a loader with the same data and sampler settings.
        """
        self._progress.load_state_dict(state)

    def _require_data(self) -> None:
        if not self._backings:
            raise ValueError(
                "The loader has no data: call `use_collection`, `add_adata(s)` or `add_dataset(s)` first."
            )

    # -- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[types.Batch]:
        """Yield the mini-batches of one epoch."""
        self._require_data()
        sampler = self._epoch_sampler()
        sampler.validate(self.n_obs)
        verify = self._snapshot.verify if self._snapshot is not None else None
        reads = read_loads(self._backings, self._buffers, self._progress.begin(sampler, self.n_obs), verify)
        loads = ([self._item(batch) for batch in load] for load in reads)
        for load in Prefetcher(loads, depth=self._prefetch) if self._prefetch else loads:
            for batch in load:
                self._progress.yielded()  # counted before the consumer holds it
                yield batch
        self._progress.end()

    def _epoch_sampler(self) -> Sampler:
        """A copy of the sampler set to the next epoch and this process's worker."""
        sampler = copy.copy(self._sampler)
        worker = _torch_worker_info()
        if worker is not None:
            sampler.set_worker(worker.id, worker.num_workers)
        sampler.set_epoch(self._progress.next_epoch)
        return sampler

    @property
    def categories(self) -> dict[str, pd.Index]:
        """Labels of the integer codes yielded for categorical ``obs_keys`` and ``batch_key``.

        ``categories["donor"][code]`` is the label of ``code``; ``-1`` marks a missing value. For a
        collection these are its stored categories (appends add new ones at the end), so codes stay
        valid across appends and runs.
        """
        return self._batch_obs.categories

    def _item(self, batch: Batch) -> types.Batch:
        item: types.Batch = {"X": convert(batch.X, self._to), "obs": None, "var": self._var, "index": None}
        self._batch_obs.fill(item, batch.rows, self._to)
        if self._return_index:
            item["index"] = batch.rows
        return item


def _torch_worker_info():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return torch.utils.data.get_worker_info()
