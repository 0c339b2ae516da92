"""The Loader: sampler → fetch → assemble → convert, with background prefetch."""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from annbatch import types
from annbatch._assemble import Assembler, Batch
from annbatch._backing import Backing, BackingError, backing_from_memory, backing_from_zarr
from annbatch._buffers import BufferPool
from annbatch._convert import Target, check_target, convert
from annbatch._fetch import Fetcher
from annbatch._obs import ObsTable
from annbatch._prefetch import Prefetcher
from annbatch._resume import Progress
from annbatch.abc import Sampler
from annbatch.samplers import ClassSampler, RandomSampler, WeightedSampler

if TYPE_CHECKING:
    from annbatch.collection import Collection
    from annbatch.types import LoadRequest

try:  # A torch IterableDataset when torch is there (DataLoader then treats it as iterable-style).
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - exercised in environments without torch
    _Base = object

__all__ = ["Loader"]

_KEY_SAMPLERS = ("homogeneous", "balanced")


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
        ``class_weights``, with replacement; :class:`~annbatch.samplers.WeightedSampler`); both read
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
    ):
        self._key_sampler: dict | None = None
        if isinstance(batch_sampler, str):
            if batch_sampler not in _KEY_SAMPLERS:
                raise ValueError(
                    f"`batch_sampler` must be a Sampler, 'homogeneous' or 'balanced', got {batch_sampler!r}."
                )
            if batch_key is None:
                raise ValueError(
                    f"`batch_sampler={batch_sampler!r}` samples by an obs column: give `batch_key`."
                )
            # Built once the key's codes are known (when data is added).
            self._key_sampler = {"kind": batch_sampler, "batch_size": batch_size, "chunk_size": chunk_size,
                                 "shuffle": shuffle,
                                 "preload_nchunks": preload_nchunks, "weights": class_weights,
                                 "num_samples": num_samples, "drop_last": drop_last, "rng": rng, "seed": seed}  # fmt: skip
            batch_sampler = None
        elif class_weights is not None or num_samples is not None:
            raise ValueError(
                "`class_weights`/`num_samples` apply to batch_sampler='homogeneous' or 'balanced'."
            )
        if batch_sampler is None:
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
        if obs_columns is not None and obs_keys is not None:
            raise ValueError(
                "Give `obs_columns` (a pandas DataFrame per batch) or `obs_keys` (arrays per batch), not both."
            )
        self._obs_columns = list(obs_columns) if obs_columns is not None else None
        self._obs_keys = list(obs_keys) if obs_keys is not None else []
        self._batch_key = batch_key
        self._key_columns = list(
            dict.fromkeys(self._obs_keys + ([batch_key] if batch_key is not None else []))
        )
        self._frame_table: ObsTable | None = None
        self._key_table: ObsTable | None = None
        self._prefetch = prefetch
        self._buffers = BufferPool()  # load buffers, recycled across loads and epochs
        self._backings: list[Backing] = []
        self._obs: list[pd.DataFrame | None] = []
        self._obs_reader: Callable[[Sequence[str] | None], pd.DataFrame] | None = None
        self._var: pd.DataFrame | None = None
        self._progress = Progress()

    # -- adding data -----------------------------------------------------------------------------------------
    def use_collection(
        self, collection: Collection, *, load_adata: Callable | None = None, layer: str | None = None
    ) -> Loader:
        """Read from every dataset of a :class:`~annbatch.Collection` (``X``, or ``layers[layer]``)."""
        if self._backings:
            raise ValueError("This loader already has data; use a new Loader for another collection.")
        if collection.is_empty:
            raise ValueError(f"The collection {collection!r} is empty: add data with `add_adatas` first.")
        if load_adata is not None:
            for group in collection:
                self.add_adata(load_adata(group))
            return self
        key = "X" if layer is None else f"layers/{layer}"
        backings = [
            backing_from_zarr(group[key], name=f"{group.path}/{key}", complete=True) for group in collection
        ]
        self._obs_reader = collection.obs
        self._add_backings(backings, [None] * len(backings), var=collection.var)
        return self

    def add_adata(self, adata: ad.AnnData, *, layer: str | None = None) -> Loader:
        """Add an AnnData (in memory or backed): its ``X`` (or a layer) and obs."""
        return self.add_adatas([adata], layer=layer)

    def add_adatas(self, adatas: Sequence[ad.AnnData], *, layer: str | None = None) -> Loader:
        """Add several AnnData objects, in order."""
        for i, adata in enumerate(adatas[1:], start=1):
            if not adata.var_names.equals(adatas[0].var_names):
                raise BackingError(
                    f"AnnData #{i} has different var names than AnnData #0; subset them to one var space "
                    "(e.g. `adata[:, shared_genes]`) before adding."
                )
        backings = []
        for i, adata in enumerate(adatas):
            x = adata.X if layer is None else adata.layers[layer]
            if x is None:
                raise BackingError(f"AnnData #{i} has no X; pass `layer=` or add X.")
            backings.append(
                backing_from_memory(x, name=f"X of AnnData #{i}" if layer is None else f"layer {layer!r}")
            )
        self._add_backings(backings, [a.obs for a in adatas], var=adatas[0].var if adatas else None)
        return self

    def add_dataset(self, dataset: Any, obs: pd.DataFrame | None = None) -> Loader:
        """Add one matrix: numpy array, scipy CSR, zarr array/CSR group, h5py dataset or backed CSR."""
        return self.add_datasets([dataset], [obs])

    def add_datasets(
        self, datasets: Sequence[Any], obs: Sequence[pd.DataFrame | None] | None = None
    ) -> Loader:
        """Add several matrices (and optionally an obs DataFrame for each)."""
        obs = list(obs) if obs is not None else [None] * len(datasets)
        if len(obs) != len(datasets):
            raise ValueError(f"Got {len(datasets)} datasets but {len(obs)} obs frames.")
        backings = [
            backing_from_memory(d, name=f"dataset #{len(self._backings) + i}") for i, d in enumerate(datasets)
        ]
        self._add_backings(backings, obs, var=None)
        return self

    def _add_backings(self, backings: list[Backing], obs: list, var: pd.DataFrame | None) -> None:
        everything = self._backings + backings
        kinds = {b.kind for b in everything}
        if len(kinds) > 1:
            raise BackingError(
                "Cannot mix sparse (CSR) and dense datasets in one loader; convert them to one kind."
            )
        widths = {b.shape[1:] for b in everything}
        if len(widths) > 1:
            raise BackingError(
                f"Datasets have different numbers of variables {sorted(widths)}; align their var first."
            )
        for o, b in zip(obs, backings, strict=True):
            if o is not None and len(o) != b.n_obs:
                raise ValueError(f"obs has {len(o)} rows but its dataset has {b.n_obs}.")
        if var is not None and self._var is not None and not var.index.equals(self._var.index):
            raise BackingError(
                "The added data's var names differ from the loader's; subset them to one var space."
            )
        dtypes = {b.dtype for b in everything}
        if len(dtypes) > 1:
            warnings.warn(f"Datasets have different dtypes {sorted(map(str, dtypes))}; promoting to "
                          f"{np.result_type(*dtypes)}.", stacklevel=3)  # fmt: skip
        before = (self._backings, self._obs, self._var, self._sampler, self._frame_table, self._key_table)
        self._backings, self._obs = everything, self._obs + obs
        self._var = var if var is not None else self._var
        try:
            self._prepare_obs()  # also builds a batch_key sampler from the codes
            self._sampler.validate(self.n_obs)  # bad masks, scattered keys etc. fail before any read
        except BaseException:
            (self._backings, self._obs, self._var, self._sampler, self._frame_table, self._key_table) = before
            raise

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

        The state counts batches handed to the consumer (not loads read ahead in the background). It
        is a small dict of integers: ``{"version": 1, "epoch": e, "runs": [[world_size, batches], ...]}``
        where each run of an interrupted epoch records its number of ranks and the batches each rank
        yielded. Between epochs it names the next epoch. Lightning saves it into checkpoints (a
        loader is a stateful dataloader) and restores it on resumption.

        Guarantees, given the same collection and sampler settings (seed included):

        - on the same number of ranks, a fresh loader given the state yields exactly the rest of the
          epoch, batch for batch, as if never interrupted;
        - on another number of ranks (with a :class:`~annbatch.samplers.DistributedSampler`), the rest
          of the epoch is dealt anew: over the whole epoch no row is yielded twice, and rows are left
          out only by ``equal_batches`` truncation. One rank's state resumes every rank, since ranks
          yield the same number of batches.

        Inside :class:`torch.utils.data.DataLoader` workers the iteration happens in copies of the
        loader, which this process's state does not see: resume without workers (as the
        :class:`~annbatch.lightning.CollectionDataModule` does) for these guarantees.

        Returns
        -------
        dict
            A JSON-able state for :meth:`load_state_dict`.
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
        loads = self._batches(self._progress.begin(sampler, self.n_obs))
        if self._prefetch:
            loads = Prefetcher(loads, depth=self._prefetch)
        for load in loads:
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

    def _batches(self, requests: Iterator[LoadRequest]) -> Iterator[list[types.Batch]]:
        fetcher = Fetcher(self._backings)
        first = self._backings[0]
        dtype = np.result_type(*{b.dtype for b in self._backings})
        assembler = Assembler(fetcher, dtype, first.shape[1], first.shape[1:], self._buffers)
        requests = iter(requests)

        def hand_out(load) -> list[types.Batch]:
            return [self._item(batch) for batch in assembler.collect(load)]

        pending = None
        try:
            while True:
                try:
                    submitted = assembler.submit(next(requests))  # read while the previous load is handed out
                except StopIteration:
                    break
                except BaseException:
                    if pending is not None:  # what was read before the failure still reaches the consumer
                        yield hand_out(pending)
                    raise
                if pending is not None:
                    yield hand_out(pending)
                pending = submitted
            if pending is not None:
                yield hand_out(pending)
        finally:
            fetcher.close()

    def _prepare_obs(self) -> None:
        """Encode the requested obs columns once (called whenever data is added)."""
        self._frame_table = self._key_table = None
        if self._obs_reader is None and not all(o is not None for o in self._obs):
            if self._obs_columns or self._key_columns:
                raise ValueError("obs columns were requested but some datasets were added without obs.")
            return
        if self._key_columns:
            self._key_table = ObsTable(self._read_obs(self._key_columns), self._key_columns)
        columns = self._obs_columns
        if columns is None and self._obs_reader is None and not self._key_columns:
            columns = list(_concat_obs(self._obs).columns)  # compatible default: all columns as a DataFrame
        if columns:
            self._frame_table = ObsTable(self._read_obs(columns), columns, strings="keep")
        if self._key_sampler is not None:
            self._sampler = self._build_key_sampler()

    def _build_key_sampler(self) -> Sampler:
        spec = dict(self._key_sampler)
        codes = self._key_table.arrays[self._batch_key]
        categories = self._key_table.categories.get(self._batch_key)
        if categories is None:
            raise TypeError(f"batch_key {self._batch_key!r} must be categorical to sample by it.")
        classes = pd.Categorical.from_codes(codes, categories=categories)
        kind, weights = spec.pop("kind"), spec.pop("weights")
        sizes = (spec.pop("batch_size"), spec.pop("chunk_size"), spec.pop("preload_nchunks"))
        if kind == "homogeneous":
            return ClassSampler(classes, *sizes, class_weights=weights, **spec)
        spec.pop("shuffle")  # weighted draws are random by nature
        return WeightedSampler(classes, *sizes, weights="balanced" if weights is None else weights, **spec)

    def _read_obs(self, columns: Sequence[str]) -> pd.DataFrame:
        if self._obs_reader is not None:
            return self._obs_reader(list(dict.fromkeys(columns)))
        return _concat_obs(self._obs)

    @property
    def categories(self) -> dict[str, pd.Index]:
        """Labels of the integer codes yielded for categorical ``obs_keys`` and ``batch_key``.

        ``categories["donor"][code]`` is the label of ``code``; ``-1`` codes are missing values. For a
        collection these are the categories stored with it: the union over all inputs, in the order
        first seen at conversion, with categories brought by later appends added at the end, so codes
        stay valid across appends and runs.
        """
        return dict(self._key_table.categories) if self._key_table is not None else {}

    def _item(self, batch: Batch) -> types.Batch:
        item = {"X": convert(batch.X, self._to), "obs": None, "var": self._var, "index": None}
        if self._frame_table is not None:
            item["obs"] = self._frame_table.frame(batch.rows)
        if self._key_table is not None:
            arrays = self._key_table.take(batch.rows)
            if self._obs_keys:
                item["obs"] = {k: convert(arrays[k], self._to) for k in self._obs_keys}
            if self._batch_key is not None:
                item["batch"] = convert(arrays[self._batch_key], self._to)
        if self._return_index:
            item["index"] = batch.rows
        return item


def _concat_obs(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate obs frames; categorical columns get the union of categories (first-seen order)."""
    if len(frames) == 1:
        return frames[0]
    frames = [f.copy() for f in frames]
    for col in {c for f in frames for c in f.columns}:
        dtypes = [f[col].dtype for f in frames if col in f.columns]
        if any(isinstance(d, pd.CategoricalDtype) for d in dtypes):
            cats: dict = {}
            for f in frames:
                if col in f.columns:
                    s = f[col]
                    cats.update(
                        dict.fromkeys(
                            s.cat.categories
                            if isinstance(s.dtype, pd.CategoricalDtype)
                            else s.dropna().unique()
                        )
                    )
            for f in frames:
                if col in f.columns:
                    f[col] = pd.Categorical(f[col].astype(object), categories=list(cats))
    return pd.concat(frames)


def _torch_worker_info():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return torch.utils.data.get_worker_info()
