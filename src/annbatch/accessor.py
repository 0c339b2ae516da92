"""The ``adata.annbatch`` accessor: loaders, collections and sharded stores straight from an AnnData.

``import annbatch`` registers :class:`AnnbatchAccessor` as the ``annbatch`` namespace of every
:class:`anndata.AnnData`, with :func:`anndata.register_anndata_namespace` (anndata 0.12 and later).
With an older anndata nothing is registered; use :class:`annbatch.Loader` and
:class:`annbatch.Collection` directly there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import zarr

from annbatch.collection import Collection
from annbatch.writer import write_sharded

if TYPE_CHECKING:
    from annbatch._convert import Target
    from annbatch.abc import Sampler
    from annbatch.loader import Loader

__all__ = ["AnnbatchAccessor"]


class AnnbatchAccessor:
    """annbatch for one AnnData, as ``adata.annbatch``: mini-batch loaders, collections, sharded stores.

    Every call reads the AnnData as it is at that moment: nothing is kept between calls, so a loader
    made after changing ``adata`` (or from a view such as ``adata[adata.obs.cell_type == "B"]``) sees
    exactly those rows and values.

    Parameters
    ----------
    adata
        The AnnData (in memory, a view, or backed) the methods work on.

    Examples
    --------
    >>> import annbatch
    >>> from annbatch.synthetic import make_adata
    >>> adata = make_adata(500, 100, seed=0)
    >>> for batch in adata.annbatch.loader(batch_size=128, obs_keys=["cell_type"], seed=0):
    ...     x, cell_type = batch["X"], batch["obs"]["cell_type"]
    """

    def __init__(self, adata: ad.AnnData):
        self._adata = adata

    def loader(
        self,
        batch_size: int = 256,
        chunk_size: int = 32,
        preload_nchunks: int = 64,
        *,
        obs_keys: Sequence[str] | None = None,
        obs_columns: Sequence[str] | None = None,
        batch_key: str | None = None,
        batch_sampler: Sampler | Literal["homogeneous", "balanced"] | None = None,
        layer: str | None = None,
        obsm: str | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        to: Target = None,
        **loader_kwargs: Any,
    ) -> Loader:
        """A :class:`~annbatch.Loader` over this AnnData's ``X`` (or a layer, or an obsm matrix).

        Batches are the dicts every annbatch loader yields (:class:`~annbatch.types.Batch`), as from
        :meth:`Collection.loader <annbatch.Collection.loader>`; row numbers (``"index"``, with
        ``return_index=True``) count rows of this AnnData (of the view, for a view).

        The defaults suit an AnnData in memory: rows can be reached anywhere at no cost, so runs are
        short (``chunk_size=32``, where a collection uses 256), which mixes an AnnData stored in
        sample order well, and ``preload_nchunks=64`` runs (2,048 rows) are shuffled together, giving
        8 batches of ``batch_size=256`` rows (a collection's 4,096 suit large GPU models on large data).

        Parameters
        ----------
        batch_size
            Rows per mini-batch.
        chunk_size
            Contiguous rows per read.
        preload_nchunks
            Runs read and shuffled together per load.
        obs_keys
            obs columns yielded with every batch as arrays under ``"obs"``: categoricals and string
            columns as int64 codes (labels in :attr:`Loader.categories <annbatch.Loader.categories>`),
            numbers as they are.
        obs_columns
            obs columns yielded with every batch as a pandas DataFrame under ``"obs"``. Without
            ``obs_keys`` or ``obs_columns`` batches carry no obs, as from a collection's loader
            (building a DataFrame per batch costs time).
        batch_key
            An obs column yielded as int64 codes under ``"batch"``, and sampled by with
            ``batch_sampler="homogeneous"`` or ``"balanced"`` (which need the AnnData sorted by it).
        batch_sampler
            A :class:`~annbatch.abc.Sampler`, or ``"homogeneous"`` (one ``batch_key`` value per batch)
            or ``"balanced"`` (``batch_key`` values drawn uniformly); default: random chunks.
        layer
            Read ``adata.layers[layer]`` instead of ``X``.
        obsm
            Read ``adata.obsm[obsm]`` (e.g. ``"X_pca"``) instead of ``X``. Give at most one of
            ``layer`` and ``obsm``.
        shuffle
            Shuffle chunk order and rows within each load.
        seed
            The same seed gives the same batches; every epoch a new order derived from it.
        to
            ``None`` (numpy / scipy CSR), ``"torch"`` or ``"jax"``.
        **loader_kwargs
            Other :class:`~annbatch.Loader` parameters, e.g. ``return_index``, ``drop_last``,
            or ``prefetch``.

        Returns
        -------
        Loader
            A new loader; iterate over it once per epoch.

        Raises
        ------
        ValueError
            For a matrix the loader cannot read by rows (CSC, dask, ...): the message says how to
            convert it. :class:`KeyError` for an unknown ``layer``, ``obsm`` or obs column.
        """
        from annbatch.loader import Loader  # imports torch when installed: only when a loader is made

        loader = Loader(
            batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks, shuffle=shuffle,
            seed=seed, to=to, batch_sampler=batch_sampler, obs_keys=obs_keys, batch_key=batch_key,
            obs_columns=[] if obs_columns is None and obs_keys is None else obs_columns,
            **loader_kwargs,
        )  # fmt: skip
        return loader.add_adata(self._adata, layer=layer, obsm=obsm)

    def to_collection(self, path_or_group: str | os.PathLike | zarr.Group, **kwargs: Any) -> Collection:
        """Convert this AnnData into a preshuffled :class:`~annbatch.Collection` (created, or appended to).

        The same as ``annbatch.Collection(path_or_group).add_adatas([adata], **kwargs)``.

        Parameters
        ----------
        path_or_group
            Where the collection is (or is to be): a path or an open zarr group.
        **kwargs
            Parameters of :meth:`Collection.add_adatas <annbatch.Collection.add_adatas>`, e.g.
            ``seed``, ``groupby`` or ``progress``.

        Returns
        -------
        Collection
            The collection; :meth:`~annbatch.Collection.loader` reads from it.
        """
        return Collection(path_or_group).add_adatas([self._adata], **kwargs)

    def write_sharded(self, path_or_group: str | os.PathLike | zarr.Group, **kwargs: Any) -> zarr.Group:
        """Write this AnnData as one sharded zarr v3 store (see :func:`annbatch.write_sharded`).

        Parameters
        ----------
        path_or_group
            A new path (an existing one is refused, to overwrite nothing) or an open zarr v3 group.
        **kwargs
            Parameters of :func:`annbatch.write_sharded`: ``n_obs_per_chunk``, ``shard_size``,
            ``compressors``, ``key``.

        Returns
        -------
        zarr.Group
            The group holding the AnnData; :func:`anndata.read_zarr` reads it back.
        """
        if self._adata.isbacked:  # checked before a path is created
            raise ValueError(
                "`write_sharded` needs an in-memory AnnData: "
                "use `adata.to_memory().annbatch.write_sharded(...)`."
            )
        if isinstance(path_or_group, zarr.Group):
            group = path_or_group
        else:
            try:
                group = zarr.open_group(path_or_group, mode="w-", zarr_format=3)
            except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
                raise FileExistsError(
                    f"`path_or_group`: {os.fspath(path_or_group)!r} already exists. Choose a new path, or "
                    "pass an open group to write into (`zarr.open_group(path, mode='w')` replaces what is "
                    "there)."
                ) from None
        return write_sharded(group, self._adata, **kwargs)


def _register() -> None:
    register = getattr(ad, "register_anndata_namespace", None)
    if register is not None:  # anndata >= 0.12.0; older versions have no extension mechanism
        register("annbatch")(AnnbatchAccessor)


_register()
