"""The collection: a zarr v3 group of preshuffled, sharded AnnData datasets (``dataset_0``, ``dataset_1``, …)."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.core.sync import sync

from annbatch._convert import Target
from annbatch._datasets import ENCODING, Datasets, check_version, drop_consolidated
from annbatch._location import display_url, local_or_url, object_store
from annbatch._lock import STALE_AFTER, LockHeld, WriteLock, describe
from annbatch._staging import Staging
from annbatch._zarr import zarrs_pipeline
from annbatch.abc import Sampler
from annbatch.errors import CollectionError, CollectionLockedError, rename_parameters
from annbatch.preshuffle import add_adatas as _add_adatas
from annbatch.preshuffle._executor import Executor
from annbatch.preshuffle._inputs import InputLike, LoadAdata
from annbatch.writer import CompressorsLike

if TYPE_CHECKING:
    from annbatch.loader import Loader

__all__ = ["Collection", "DatasetCollection", "CollectionError", "CollectionLockedError"]


def _locked_error(label: str, err: LockHeld) -> CollectionLockedError:
    return CollectionLockedError(
        f"The collection {label!r} is being written by another process ({describe(err.holder)}; "
        f"lock {err.where!r}); waited {err.waited:.0f} s. Retry when it has finished, or pass a larger "
        "`lock_timeout` to wait for it. A lock of a killed writer is taken over by itself (on object "
        f"storage once its heartbeat is older than {STALE_AFTER:.0f} s); do not delete it while that writer runs.",
        err.holder,
    )


_Location = str | os.PathLike | zarr.Group
_Inputs = Iterable[InputLike] | InputLike


def _check_given_once(our_name: str, our_value: object, their_name: str, their_value: object, missing: str) -> None:
    """Check that a value was given by our parameter name or by its scverse name, exactly once.

    ``missing``: the message when neither was given.
    """
    if our_value is not None and their_value is not None:
        raise TypeError(f"Give `{our_name}` or `{their_name}` (its scverse name), not both.")
    if our_value is None and their_value is None:
        raise TypeError(missing)


def _zarr_compressor(
    zarr_compressor: Iterable[BytesBytesCodec] | BytesBytesCodec, compressors: CompressorsLike
) -> tuple[BytesBytesCodec, ...]:
    """``compressors`` given by its scverse name: zarr bytes-to-bytes codec(s), checked."""
    if not (isinstance(compressors, str) and compressors == "auto"):
        raise ValueError("Give `compressors` or `zarr_compressor` (its scverse name), not both.")
    codecs = (zarr_compressor,) if isinstance(zarr_compressor, BytesBytesCodec) else tuple(zarr_compressor)
    wrong = [type(c).__name__ for c in codecs if not isinstance(c, BytesBytesCodec)]
    if wrong:
        raise TypeError(
            "`zarr_compressor` must be zarr bytes-to-bytes codecs, e.g. "
            f"`(zarr.codecs.BloscCodec(cname='lz4'),)`; got {', '.join(wrong)}."
        )
    return codecs


def _respell(err: BaseException, spelled: Mapping[str, str]) -> None:
    """Have ``err``'s message name the parameters as the caller spelled them (``spelled``: ours -> theirs)."""
    if spelled and err.args and isinstance(err.args[0], str):
        err.args = (rename_parameters(err.args[0], spelled, flags=False), *err.args[1:])


class Collection(Datasets):
    """A preshuffled collection of AnnData datasets stored as sharded zarr v3.

    The on-disk layout is a zarr group with attributes
    ``{"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}`` whose children
    ``dataset_0``, ``dataset_1``, … are complete AnnData zarr stores sharing one var space. Rows were
    dealt at random across datasets and permuted within each, so any contiguous run of rows is a random
    sample of the whole collection.

    Parameters
    ----------
    path_or_group
        A path or URL (created if missing, unless ``mode`` is ``"r"`` or ``"r+"``), or an open
        :class:`zarr.Group`. URLs of object storage (``s3://bucket/cells.zarr``, ``gs://``,
        ``az://``) are opened through obstore; ``file://`` URLs are local paths.
    mode
        ``"r"``: read only, must exist; ``"r+"``: must exist; ``"a"``: open or create;
        ``"w-"``: create, fail if it exists. Iterating the collection yields writable dataset groups
        unless ``mode="r"`` (see :meth:`__iter__`).
    group
        The scverse ``annbatch`` name of ``path_or_group``; give one of them.
    is_collection_h5ad
        Accepted for the scverse ``annbatch`` API, where ``True`` opens a collection of ``.h5ad``
        files. annbatch stores collections in zarr only: ``True`` raises :class:`CollectionError`.
        Convert the files into a zarr collection instead, e.g.
        ``Collection("cells.zarr").add_adatas(["a.h5ad", "b.h5ad"])``.
    storage_options
        Settings of the object store, for URLs: obstore's configuration keys of the store kind (for
        S3 e.g. ``endpoint``, ``region``, ``access_key_id``, ``secret_access_key``), and
        ``client_options`` (e.g. ``{"allow_http": True}`` for a local server). What is not given is
        read from the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
        ...). Reprs and messages show the URL only, never these settings.

    Examples
    --------
    >>> coll = annbatch.Collection("cells.zarr")  # doctest: +SKIP
    >>> coll.add_adatas(["a.h5ad", "b.h5ad"], seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        path_or_group: _Location | None = None,
        mode: Literal["r", "r+", "a", "w-"] = "a",
        *,
        group: _Location | None = None,
        is_collection_h5ad: bool = False,
        storage_options: dict[str, Any] | None = None,
    ):
        if is_collection_h5ad:
            raise CollectionError(
                "`is_collection_h5ad=True`: annbatch collections are zarr stores; h5ad-backed collections "
                "are not supported. Convert the .h5ad files into a zarr collection instead, e.g. "
                "`Collection('cells.zarr').add_adatas(['a.h5ad', 'b.h5ad'])`."
            )
        _check_given_once(
            "path_or_group", path_or_group, "group", group,
            "Give the collection's path or zarr group, e.g. `Collection('cells.zarr')`.",
        )  # fmt: skip
        path_or_group = path_or_group if path_or_group is not None else group
        assert path_or_group is not None  # for type checkers: checked just above
        if mode not in ("r", "r+", "a", "w-"):
            raise ValueError(f"`mode` must be one of 'r', 'r+', 'a', 'w-', got {mode!r}.")
        self._mode = mode
        if isinstance(path_or_group, zarr.Group):
            self._group = path_or_group
            self._label = str(path_or_group.store_path)
            self._check_or_init(exists=bool(self._group.attrs) or bool(list(self._group.keys())))
        else:
            location = local_or_url(path_or_group)
            if storage_options is not None and not isinstance(location, str):
                raise ValueError(
                    f"`storage_options` are for collections in object storage (URLs such as s3://...); "
                    f"{str(location)!r} is a local path."
                )
            if isinstance(location, str):
                self._open_url(location, storage_options)
            else:
                self._open_path(location)
        self._writable = mode != "r" and not self._group.store.read_only

    def _open_url(self, url: str, storage_options: dict[str, Any] | None) -> None:
        """Open or create the collection at an object-storage URL."""
        mode = self._mode
        store = object_store(url, storage_options, read_only=mode == "r")
        self._label = display_url(url)
        try:
            self._group = zarr.open_group(store, mode="r" if mode == "r" else "r+", zarr_format=3)
            exists = True
        except FileNotFoundError:  # zarr's GroupNotFoundError: no zarr.json under the prefix
            if not sync(store.is_empty("")):
                raise CollectionError(
                    f"{self._label!r} holds objects but is not an annbatch collection (no zarr.json). "
                    "Choose a new or empty prefix; nothing was changed."
                ) from None
            if mode in ("r", "r+"):
                raise CollectionError(
                    f"No collection at {self._label!r}. Create one with `annbatch convert INPUT.h5ad ... "
                    f"-o {self._label}` or `annbatch.Collection(url).add_adatas(...)`."
                ) from None
            self._group = zarr.open_group(store, mode="w-", zarr_format=3, attributes=dict(ENCODING))
            exists = False
        except OSError as err:  # the service cannot be reached or refuses the request
            raise CollectionError(f"Cannot open {self._label!r}: {err}") from None
        self._check_or_init(exists=exists)

    def _open_path(self, path: Path) -> None:
        """Open or create the collection in a local folder."""
        mode = self._mode
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
            check_version(self._label, attrs.get("encoding-version"))
            if self._mode != "r":
                # Only when no one is writing: staging then belongs to a running writer, which
                # recovers under its lock before it writes (add_adatas).
                lock = WriteLock(self._group)
                if lock.try_acquire():
                    with lock:
                        Staging(self._group).recover()
        else:
            self._group.attrs.update(ENCODING)

    def __iter__(self) -> Iterator[zarr.Group]:
        """The datasets' zarr groups (each a complete AnnData store), in order.

        Writable when the collection was opened for writing (``mode`` ``"a"``, ``"r+"`` or ``"w-"``),
        read-only with ``mode="r"``. A dataset can then be edited in place, e.g.
        ``ad.io.write_elem(g, "X", ad.io.read_elem(g["X"]).astype("float64"))``, keeping its rows and
        var. A writable group is opened without consolidated metadata, which is first removed from the
        dataset: anndata cannot edit a consolidated store, and the consolidated copy would describe the
        dataset as it was before the edit. Readers then read each element's own metadata.

        An edit is not a new dataset version: build loaders after editing. A loader built before reads
        the layout it found and is not warned (unlike after an append); do not edit while one reads.
        While writable groups are handed out, the collection's write lock is held (another process's
        ``add_adatas`` waits, and iterating while one runs raises
        :class:`~annbatch.errors.CollectionLockedError`); it is released when the loop ends.
        """
        if not self._writable:
            yield from self._open_datasets()
            return
        with self._write_lock(), zarrs_pipeline(self._group.store):
            for key in self.dataset_keys:
                path = self._child(key)
                drop_consolidated(self._group.store, path)
                yield zarr.open_group(self._group.store, path=path, mode="r+", use_consolidated=False)

    def _write_lock(self, timeout: float = 0.0) -> WriteLock:
        """The collection's write lock, taken (waiting up to ``timeout`` s); use it as a context manager."""
        lock = WriteLock(self._group)
        try:
            lock.acquire(timeout=timeout)
        except LockHeld as err:
            raise _locked_error(self._label, err) from None
        return lock

    # -- writing ---------------------------------------------------------------------------------------------
    def add_adatas(
        self,
        inputs: _Inputs | None = None,
        *,
        adata_paths: _Inputs | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        dataset_size: str | int = "20GB",
        shuffle_chunk_size: int = 1000,
        groupby: Sequence[str] | str | None = None,
        var_subset: Sequence[str] | None = None,
        join: Literal["outer", "inner"] = "outer",
        merge: Literal["same", "unique", "first", "only"] | None = None,
        load_adata: LoadAdata | None = None,
        memory_limit: str | int | None = None,
        n_obs_per_chunk: int = 32,
        shard_size: str | int = "1GB",
        compressors: CompressorsLike = "auto",
        zarr_compressor: Iterable[BytesBytesCodec] | BytesBytesCodec | None = None,
        h5ad_compressor: Literal["gzip", "lzf"] | None = None,
        progress: bool = True,
        lock_timeout: float = 10.0,
        executor: Executor | None = None,
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
            Paths to ``.h5ad`` files or ``.zarr`` AnnData stores, or AnnData objects (in memory, backed,
            or lazily read with :func:`anndata.experimental.read_lazy`, also subsets of them): one, or a
            list or other iterable of them. A lazily read CSR matrix is read twice, once for its row
            sizes, which dask does not expose; a path reads it once.
        adata_paths
            The scverse ``annbatch`` name of ``inputs``; give one of them.
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
            How to combine var columns across inputs, by the strategies of :func:`anndata.concat`: ``None``
            (drop them), ``"same"`` (columns every input has, whose values agree wherever inputs share a
            var name), ``"unique"`` (columns whose values agree wherever inputs share a var name, however
            many inputs have them), ``"first"`` (each column's first non-missing value) or ``"only"``
            (columns only one input has). Values of var names an input lacks are missing. Ignored when
            appending: the collection's var is kept.
        load_adata
            A function ``path -> AnnData`` to open each path yourself (e.g. a backed or lazy AnnData).
        memory_limit
            Peak memory to plan for (bytes or a size string); datasets are kept small enough to be built
            within it (the interpreter and libraries come on top). Defaults to an eighth of the RAM
            available when the conversion starts.
        n_obs_per_chunk, shard_size, compressors
            Storage layout, see :func:`annbatch.write_sharded`.
        zarr_compressor
            The scverse ``annbatch`` name of ``compressors``, as zarr bytes-to-bytes codec(s), e.g.
            ``(BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),)``; give at most one of them.
        h5ad_compressor
            Accepted for the scverse ``annbatch`` API, where it compresses h5ad output: ``"gzip"``,
            ``"lzf"`` or ``None``. annbatch writes only zarr, so it has no effect; other values raise
            :class:`ValueError`.
        progress
            Show tqdm progress bars.
        lock_timeout
            Seconds to wait while another process writes to the collection (one writer at a time, see
            :ref:`concurrent-writers`) before raising :class:`CollectionLockedError`, which names it.
        executor
            Where to build the output datasets: a :class:`concurrent.futures.Executor` (e.g. a
            ``ProcessPoolExecutor``) or a ``dask.distributed.Client``. Each dataset is an independent
            task that reads its rows from the inputs and writes its staged dataset; this process plans
            and commits. The same seed gives the same collection as without an executor. Workers must
            see the inputs' paths and the collection (a shared file system or object storage); AnnData
            objects are sent to them whole (pass paths for large ones). ``memory_limit`` and
            ``dataset_size`` bound each task's memory. A dask worker that dies has its task retried
            elsewhere (the task rewrites its dataset from scratch); any other failure stops the call
            and leaves the collection as it was. ``None``: build the datasets here, one at a time.

        Returns
        -------
        Collection
            The collection itself, for chaining.
        """
        if self._mode == "r":
            raise CollectionError(
                f"{self._label!r} is open read-only (mode='r'); open it with mode='a' to add data."
            )
        # Our parameter names -> the scverse names the caller used: messages name what was passed.
        spelled = {"inputs": "adata_paths"} if adata_paths is not None else {}
        _check_given_once(
            "inputs", inputs, "adata_paths", adata_paths,
            "Give the inputs to convert, e.g. `add_adatas(['a.h5ad', 'b.h5ad'])`.",
        )  # fmt: skip
        inputs = inputs if inputs is not None else adata_paths
        if zarr_compressor is not None:
            compressors = _zarr_compressor(zarr_compressor, compressors)
            spelled["compressors"] = "zarr_compressor"
        if h5ad_compressor not in (None, "gzip", "lzf"):
            raise ValueError(
                f"`h5ad_compressor` must be 'gzip', 'lzf' or None, got {h5ad_compressor!r}; it only concerns "
                "h5ad output, which annbatch does not write, so leave it out."
            )
        if seed is not None and rng is not None:
            raise ValueError("Give either `seed` or `rng`, not both.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}.")
        if seed is not None and seed < 0:
            raise ValueError(f"`seed` must be 0 or more, got {seed}.")
        with self._write_lock(lock_timeout):
            # Under the lock: staging left by a writer killed since this collection was opened is ours
            # to finish or drop now, and the datasets are listed only after the previous writer is done.
            Staging(self._group).recover()
            try:
                _add_adatas(
                    self, inputs, shuffle=shuffle, rng=rng if rng is not None else np.random.default_rng(seed),
                    dataset_size=dataset_size, shuffle_chunk_size=shuffle_chunk_size, groupby=groupby,
                    var_subset=var_subset, join=join, merge=merge, load_adata=load_adata,
                    memory_limit=memory_limit, n_obs_per_chunk=n_obs_per_chunk, shard_size=shard_size,
                    compressors=compressors, progress=progress, executor=executor,
                )  # fmt: skip
            except (ValueError, TypeError) as err:
                _respell(err, spelled)
                raise
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
            # Checked here so that errors name the parameter the caller used.
            if isinstance(sampler, str) and sampler not in ("homogeneous", "balanced"):
                raise ValueError(
                    f"`sampler` must be a Sampler, 'homogeneous' or 'balanced', got {sampler!r}."
                )
            if not isinstance(sampler, str | Sampler):
                raise TypeError(f"`sampler` must be an annbatch.abc.Sampler, got {type(sampler).__name__}.")
            if isinstance(sampler, str) and batch_key is None:
                raise ValueError(f"`sampler={sampler!r}` samples by an obs column: give `batch_key`.")
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
