"""The collection: a zarr v3 group of preshuffled, sharded AnnData datasets (``dataset_0``, ``dataset_1``, …)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from annbatch._convert import Target
from annbatch._lock import STALE_AFTER, LockHeld, WriteLock, describe
from annbatch._staging import Staging
from annbatch._zarr import quiet_listing, zarrs_pipeline
from annbatch.abc import Sampler
from annbatch.errors import CollectionError, CollectionLockedError
from annbatch.preshuffle import add_adatas as _add_adatas
from annbatch.preshuffle._inputs import InputAnnData, InputLike, LoadAdata, _from_store
from annbatch.writer import CompressorsLike

if TYPE_CHECKING:
    from annbatch.loader import Loader

__all__ = ["Collection", "DatasetCollection", "CollectionError", "CollectionLockedError"]

ENCODING = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
_DATASET_KEY = re.compile(r"^dataset_(\d+)$")


def _version(text: object) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(text).split("."))
    except ValueError:
        return None


def _check_version(label: str, found: object) -> None:
    """Refuse a collection in a newer format than this annbatch reads, before anything reads it wrongly."""
    ours, theirs = _version(ENCODING["encoding-version"]), _version(found)
    if theirs is None:
        raise CollectionError(
            f"{label!r} has an unreadable encoding-version {found!r}; it was not written by annbatch."
        )
    if theirs[:2] > ours[:2]:
        raise CollectionError(
            f"{label!r} is in collection format {found}, newer than this annbatch reads "
            f"({ENCODING['encoding-version']}): upgrade annbatch (pip install -U annbatch)."
        )


def _locked_error(label: str, err: LockHeld) -> CollectionLockedError:
    return CollectionLockedError(
        f"The collection {label!r} is being written by another process ({describe(err.holder)}; "
        f"lock {err.where!r}); waited {err.waited:.0f} s. Retry when it has finished, or pass a larger "
        "`lock_timeout` to wait for it. A lock of a killed writer is taken over by itself (on object "
        f"storage once its heartbeat is older than {STALE_AFTER:.0f} s); do not delete it while that writer runs.",
        err.holder,
    )


class Collection:
    """A preshuffled collection of AnnData datasets stored as sharded zarr v3.

    The on-disk layout is a zarr group with attributes
    ``{"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}`` whose children
    ``dataset_0``, ``dataset_1``, … are complete AnnData zarr stores sharing one var space. Rows were
    dealt at random across datasets and permuted within each, so any contiguous run of rows is a random
    sample of the whole collection.

    Parameters
    ----------
    path_or_group
        A path (created if missing, unless ``mode="r"``) or an open :class:`zarr.Group`.
    mode
        ``"r"``: read only, must exist; ``"r+"``: must exist; ``"a"``: open or create;
        ``"w-"``: create, fail if it exists.

    Examples
    --------
    >>> coll = annbatch.Collection("cells.zarr")  # doctest: +SKIP
    >>> coll.add_adatas(["a.h5ad", "b.h5ad"], seed=0)  # doctest: +SKIP
    """

    def __init__(
        self, path_or_group: str | os.PathLike | zarr.Group, mode: Literal["r", "r+", "a", "w-"] = "a"
    ):
        if mode not in ("r", "r+", "a", "w-"):
            raise ValueError(f"`mode` must be one of 'r', 'r+', 'a', 'w-', got {mode!r}.")
        self._mode = mode
        if isinstance(path_or_group, zarr.Group):
            self._group = path_or_group
            self._label = str(path_or_group.store_path)
            self._check_or_init(exists=bool(self._group.attrs) or bool(list(self._group.keys())))
        else:
            path = Path(path_or_group)
            self._label = str(path)
            exists = path.exists() and any(path.iterdir()) if path.is_dir() else path.exists()
            if path.exists() and not path.is_dir():
                raise CollectionError(
                    f"{str(path)!r} is a file, not a collection folder. Choose another path."
                )
            if not exists and mode in ("r", "r+"):
                raise CollectionError(f"No collection at {str(path)!r}. Create one with mode='a'.")
            if exists and not (path / "zarr.json").exists():
                raise CollectionError(
                    f"{str(path)!r} exists but is not an annbatch collection (no zarr.json). "
                    "Choose a new or empty path; nothing was changed."
                )
            if exists:
                self._group = zarr.open_group(path, mode="r" if mode == "r" else "a", zarr_format=3)
            else:  # created with its attrs in one write: a kill cannot leave an unmarked group
                try:
                    # a copy: zarr keeps the dict it is given as the group's attrs, and later writes change it
                    self._group = zarr.open_group(path, mode="w-", zarr_format=3, attributes=dict(ENCODING))
                except zarr.errors.ContainsGroupError:
                    if mode == "w-":
                        raise CollectionError(
                            f"{str(path)!r} already exists; use mode='a' to add to it."
                        ) from None
                    # Another process created it a moment ago: use theirs, as if it had been there.
                    exists = True
                    self._group = zarr.open_group(path, mode="a", zarr_format=3)
            self._check_or_init(exists=exists)

    def _check_or_init(self, *, exists: bool) -> None:
        attrs = dict(self._group.attrs)
        if exists:
            if self._mode == "w-":
                raise CollectionError(f"{self._label!r} already exists; use mode='a' to add to it.")
            if attrs.get("encoding-type") != ENCODING["encoding-type"]:
                raise CollectionError(
                    f"{self._label!r} exists but is not an annbatch collection "
                    f"(encoding-type {attrs.get('encoding-type')!r}). Choose a new or empty path; nothing was changed."
                )
            _check_version(self._label, attrs.get("encoding-version"))
            if self._mode != "r":
                # Only when no one is writing: staging then belongs to a running writer, which
                # recovers under its lock before it writes (add_adatas).
                lock = WriteLock(self._group)
                if lock.try_acquire():
                    with lock:
                        Staging(self._group).recover()
        else:
            self._group.attrs.update(ENCODING)

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        """The collection's root zarr group."""
        return self._group

    @property
    def dataset_keys(self) -> list[str]:
        """Names of the datasets in order, such as ``dataset_0``, ``dataset_1``."""
        with quiet_listing():
            keys = [k for k in self._group.group_keys() if _DATASET_KEY.match(k)]
        return sorted(keys, key=lambda k: int(_DATASET_KEY.match(k).group(1)))

    def __len__(self) -> int:
        return len(self.dataset_keys)

    def __iter__(self) -> Iterator[zarr.Group]:
        """The datasets' zarr groups (each a complete AnnData store), in order."""
        with zarrs_pipeline():
            for key in self.dataset_keys:
                yield zarr.open_group(self._group.store, path=self._child(key), mode="r")

    @property
    def is_empty(self) -> bool:
        """Whether the collection has no datasets yet."""
        return len(self) == 0

    def _child(self, key: str) -> str:
        return f"{self._group.path}/{key}" if self._group.path else key

    def _dataset_shapes(self) -> list[tuple[int, int]]:
        shapes = []
        for g in self:
            x = g["X"]
            shapes.append(tuple(x.attrs["shape"]) if isinstance(x, zarr.Group) else tuple(x.shape[:2]))
        return shapes

    @property
    def n_obs(self) -> int:
        """Total number of rows (cells) over all datasets."""
        return sum(s[0] for s in self._dataset_shapes())

    @property
    def n_vars(self) -> int:
        """Number of variables (genes), shared by all datasets."""
        shapes = self._dataset_shapes()
        return shapes[0][1] if shapes else 0

    @property
    def var(self) -> pd.DataFrame:
        """The shared var DataFrame."""
        self._require_datasets()
        return ad.io.read_elem(next(iter(self))["var"])

    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Obs of all datasets, concatenated in collection order, reading only the requested columns.

        Parameters
        ----------
        columns
            Columns to read; all columns if ``None``; ``[]`` reads only the index (obs names).
        """
        self._require_datasets()
        frames = []
        for g in self:
            obs_group = g["obs"]
            available = list(obs_group.attrs["column-order"])
            wanted = available if columns is None else list(columns)
            missing = [c for c in wanted if c not in available]
            if missing:
                raise KeyError(f"obs column(s) {missing} not in the collection; available: {available}.")
            index = ad.io.read_elem(obs_group[obs_group.attrs["_index"]])
            frame = pd.DataFrame({c: ad.io.read_elem(obs_group[c]) for c in wanted}, index=pd.Index(index))
            frames.append(frame)
        return pd.concat(frames) if len(frames) > 1 else frames[0]

    def _require_datasets(self) -> None:
        if self.is_empty:
            raise CollectionError(
                f"The collection {self._label!r} is empty: add data with `add_adatas` first."
            )

    def _open_dataset(self, key: str) -> InputAnnData:
        with zarrs_pipeline():
            return _from_store(zarr.open_group(self._group.store, path=self._child(key), mode="r"), name=key)

    def _size_on_disk(self) -> int | None:
        store = self._group.store
        if not isinstance(store, LocalStore):
            return None
        root = Path(store.root) / self._group.path
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def __repr__(self) -> str:
        if self.is_empty:
            return f"Collection({self._label!r}): empty"
        shapes = self._dataset_shapes()
        first = next(iter(self))
        x = first["X"]
        kind, dtype = ("csr", x["data"].dtype) if isinstance(x, zarr.Group) else ("dense", x.dtype)
        size = self._size_on_disk()
        size_txt = f", {_human_bytes(size)} on disk" if size is not None else ""
        return (
            f"Collection({self._label!r}): {len(shapes)} datasets, "
            f"{sum(s[0] for s in shapes):,} obs × {shapes[0][1]:,} vars, X: {kind} {dtype}{size_txt}\n"
            f"    rows per dataset: {', '.join(f'{s[0]:,}' for s in shapes[:8])}{' …' if len(shapes) > 8 else ''}\n"
            f"    obs: {', '.join(first['obs'].attrs['column-order'])}"
        )

    # -- writing ---------------------------------------------------------------------------------------------
    def add_adatas(
        self,
        inputs: Sequence[InputLike] | InputLike,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        dataset_size: str | int = "20GB",
        shuffle_chunk_size: int = 1000,
        groupby: Sequence[str] | str | None = None,
        var_subset: Sequence[str] | None = None,
        join: Literal["outer", "inner"] = "outer",
        merge: Literal["same", "first"] | None = None,
        load_adata: LoadAdata | None = None,
        memory_limit: str | int | None = None,
        n_obs_per_chunk: int = 32,
        shard_size: str | int = "1GB",
        compressors: CompressorsLike = "auto",
        progress: bool = True,
        lock_timeout: float = 10.0,
    ) -> Collection:
        """Convert AnnData inputs into the collection (create on the first call, append afterwards).

        Inputs are read lazily, cut into blocks of ``shuffle_chunk_size`` rows and the blocks dealt at
        random to output datasets; each dataset's rows are then permuted and written sharded. When the
        collection already has datasets, the new rows are spread at random across them (each affected
        dataset is rewritten with its old and new rows permuted together) and new datasets are added only
        when the existing ones would exceed ``dataset_size``. Everything is validated before anything is
        written, and datasets become visible only when all are complete.

        Parameters
        ----------
        inputs
            Paths to ``.h5ad`` files or ``.zarr`` AnnData stores, or AnnData objects (in memory or backed).
        shuffle
            Deal blocks at random and permute rows. ``False`` keeps the input order.
        seed, rng
            Randomness: the same seed gives an identical collection. Give at most one.
        dataset_size
            Upper bound on a dataset, as rows (``int``) or in-memory bytes (``"20GB"``).
        shuffle_chunk_size
            Rows per block dealt to datasets. Shuffle quality depends on
            ``rows per dataset / shuffle_chunk_size``: keep it above ~2,000.
        groupby
            obs column(s) to sort each dataset's rows by (stably, so order within a value stays random),
            giving long runs of one value for key-homogeneous sampling. The collection records it, and
            appends keep it: leave it out when appending (a different one is refused).
        var_subset
            Keep only these var names (in this order). Ignored when appending: the collection's var is used.
        join
            ``"outer"``: union of the inputs' var names (missing values are 0); ``"inner"``: intersection.
        merge
            How to combine var columns across inputs: ``None`` (drop them), ``"same"`` (keep columns that
            agree), ``"first"`` (first non-missing value).
        load_adata
            A function ``path -> AnnData`` to open each path yourself (e.g. a backed or lazy AnnData).
        memory_limit
            Peak memory to plan for (bytes or a size string); datasets are kept small enough to be built
            within it (the interpreter and libraries come on top). Defaults to an eighth of the RAM
            available when the conversion starts.
        n_obs_per_chunk, shard_size, compressors
            Storage layout, see :func:`annbatch.write_sharded`.
        progress
            Show tqdm progress bars.
        lock_timeout
            Seconds to wait while another process writes to the collection (one writer at a time, see
            :ref:`concurrent-writers`) before raising :class:`CollectionLockedError`, which names it.

        Returns
        -------
        Collection
            The collection itself, for chaining.
        """
        if self._mode == "r":
            raise CollectionError(
                f"{self._label!r} is open read-only (mode='r'); open it with mode='a' to add data."
            )
        if seed is not None and rng is not None:
            raise ValueError("Give either `seed` or `rng`, not both.")
        lock = WriteLock(self._group)
        try:
            lock.acquire(timeout=lock_timeout)
        except LockHeld as err:
            raise _locked_error(self._label, err) from None
        with lock:
            # Under the lock: staging left by a writer killed since this collection was opened is ours
            # to finish or drop now, and the datasets are listed only after the previous writer is done.
            Staging(self._group).recover()
            _add_adatas(
                self, inputs, shuffle=shuffle, rng=rng if rng is not None else np.random.default_rng(seed),
                dataset_size=dataset_size, shuffle_chunk_size=shuffle_chunk_size, groupby=groupby,
                var_subset=var_subset, join=join, merge=merge, load_adata=load_adata,
                memory_limit=memory_limit, n_obs_per_chunk=n_obs_per_chunk, shard_size=shard_size,
                compressors=compressors, progress=progress,
            )  # fmt: skip
        return self

    # -- reading ---------------------------------------------------------------------------------------------
    def loader(
        self,
        batch_size: int = 4096,
        chunk_size: int = 256,
        preload_nchunks: int = 32,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        obs_columns: Sequence[str] | None = None,
        obs_keys: Sequence[str] | None = None,
        batch_key: str | None = None,
        return_index: bool = False,
        drop_last: bool = False,
        to: Target = None,
        batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
        class_weights: Mapping | Sequence[float] | None = None,
        num_samples: int | None = None,
        prefetch: int = 2,
        preload_to_gpu: bool = False,
        layer: str | None = None,
        sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
    ) -> Loader:
        """A :class:`~annbatch.Loader` over this collection's ``X`` (or ``layers[layer]``).

        Reads ``preload_nchunks`` random runs of ``chunk_size`` contiguous rows at once, shuffles them in
        memory and yields mini-batches of ``batch_size`` rows (:class:`~annbatch.types.Batch` dicts).
        The parameters are those of :class:`~annbatch.Loader`, with defaults for training
        (``batch_size=4096``, ``chunk_size=256``, ``preload_nchunks=32``, ``shuffle=True``), plus
        ``layer`` to read ``layers[layer]`` instead of ``X``. ``batch_sampler`` replaces the default
        :class:`~annbatch.samplers.RandomSampler`; ``batch_sampler="homogeneous"`` (one ``batch_key``
        value per batch) and ``"balanced"`` (``batch_key`` values drawn uniformly or by
        ``class_weights``) are shorthands. ``sampler`` is the former name of ``batch_sampler``
        (deprecated).
        """
        from annbatch.loader import Loader  # imports torch when installed: only when a loader is made

        if sampler is not None:
            if batch_sampler is not None:
                raise ValueError("Give `batch_sampler` only; `sampler` is its former name.")
            warnings.warn(
                "`Collection.loader(sampler=...)` is deprecated; call it `batch_sampler=...` "
                "(the name annbatch.Loader and torch use).",
                FutureWarning,
                stacklevel=2,
            )
            batch_sampler = sampler

        loader = Loader(
            batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks, shuffle=shuffle,
            drop_last=drop_last, seed=seed, rng=rng, return_index=return_index, to=to, batch_sampler=batch_sampler,
            obs_columns=obs_columns, obs_keys=obs_keys, batch_key=batch_key, class_weights=class_weights,
            num_samples=num_samples, prefetch=prefetch, preload_to_gpu=preload_to_gpu,
        )  # fmt: skip
        return loader.use_collection(self, layer=layer)


DatasetCollection = Collection


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
