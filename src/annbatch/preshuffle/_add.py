"""Adding AnnData inputs to a collection: plan, build every output dataset, commit them together."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
import psutil
from anndata.utils import make_index_unique
from tqdm.auto import tqdm

from annbatch._sizes import parse_bytes, rows_for
from annbatch._staging import Staging
from annbatch.writer import CompressorsLike, min_index_dtype

from ._build import DatasetTask, SourceSpec, build_dataset
from ._executor import Executor, make_jobs, run_jobs
from ._inputs import InputAnnData, InputError, InputLike, InputOrigin, LoadAdata, from_store, open_input
from ._plan import (
    Block,
    ElementSpec,
    VarSpace,
    assign_blocks,
    check_inputs,
    dataset_targets,
    plan_elements,
    plan_obs_schema,
    plan_var_space,
)

if TYPE_CHECKING:
    from annbatch._datasets import Datasets

DEFAULT_MEMORY_FRACTION = 0.125
"""Default conversion memory limit, as a fraction of the RAM available when the conversion starts."""

# Building a dataset holds its rows once in their output dtypes; writing then buffers about two copies
# of one shard of the largest array in the encoder (measured with zarrs; see benchmarks/convert.py).
_SHARD_BUFFERS = 2.0
# Root attribute of a collection: the obs columns its datasets are sorted by (``groupby``), kept by appends.
GROUPBY_ATTR = "groupby"


def add_adatas(
    collection: Datasets,
    inputs: Iterable[InputLike] | InputLike,
    *,
    shuffle: bool = True,
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
    progress: bool = True,
    executor: Executor | None = None,
) -> None:
    """See :meth:`annbatch.Collection.add_adatas`."""
    if isinstance(inputs, str | os.PathLike | ad.AnnData):
        inputs = [inputs]
    elif isinstance(inputs, Iterator | AbstractSet):  # a generator or a set of paths, say
        inputs = list(inputs)
    elif not isinstance(inputs, Sequence):
        inputs = [inputs]
    if len(inputs) == 0:
        raise ValueError("`inputs` is empty: pass at least one .h5ad/.zarr path or AnnData.")
    rng = rng if rng is not None else np.random.default_rng()
    limit = (
        parse_bytes(memory_limit, name="memory_limit")
        if memory_limit is not None
        else int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)
    )
    opened: list[InputAnnData] = []
    try:
        existing = [
            from_store(group, name=group.basename, origin=InputOrigin(group=group))
            for group in collection._open_datasets()
        ]
        groupby = _collection_groupby(collection, groupby, appending=bool(existing))
        # In-memory inputs are named "<AnnData #i>", numbered after those already in the collection.
        first = _n_anndata_sources(existing)
        for i, item in enumerate(inputs):
            opened.append(open_input(item, load_adata=load_adata, index=first + i))
        _run(collection, opened, existing, shuffle=shuffle, rng=rng, dataset_size=dataset_size,
             shuffle_chunk_size=shuffle_chunk_size, groupby=groupby, var_subset=var_subset, join=join,
             merge=merge, limit=limit, progress=progress, executor=executor,
             write_kwargs={"n_obs_per_chunk": n_obs_per_chunk, "shard_size": shard_size,
                           "compressors": compressors})  # fmt: skip
    finally:
        for inp in opened:
            inp.close()


def _run(collection, new, existing, *, shuffle, rng, dataset_size, shuffle_chunk_size, groupby, var_subset,
         join, merge, limit, progress, executor, write_kwargs) -> None:  # fmt: skip
    check_inputs(new, groupby)
    existing_var = existing[0].var if existing else None
    var_space = plan_var_space(new, join=join, var_subset=var_subset, existing_var=existing_var, merge=merge)
    existing_specs = _existing_specs(existing)
    if existing_specs is not None and existing_specs["X"].kind != new[0].elements["X"].kind:
        raise InputError(
            f"The collection's X is {existing_specs['X'].kind} but the new inputs' X is "
            f"{new[0].elements['X'].kind}; convert the inputs to the same kind before appending."
        )
    elements = plan_elements(new, var_space.n_vars, existing_specs)
    _make_obs_names_unique(new, existing)
    names = [str(c) for e in existing for c in e.obs["src_path"].cat.categories] if existing else []
    obs_schema = plan_obs_schema(
        [e.obs for e in existing] + [n.obs for n in new], names + [n.name for n in new]
    )

    bytes_per_row, largest_per_row = _bytes_per_row(new, elements)
    shard_bytes = (
        parse_bytes(write_kwargs["shard_size"], name="shard_size")
        if isinstance(write_kwargs["shard_size"], str)
        else rows_for(write_kwargs["shard_size"], largest_per_row, name="shard_size") * largest_per_row
    )
    rows_per_dataset = min(
        rows_for(dataset_size, bytes_per_row, name="dataset_size"),
        _rows_within(limit, bytes_per_row, largest_per_row, shard_bytes),
    )
    existing_sizes = [e.n_obs for e in existing]
    n_new = sum(n.n_obs for n in new)
    targets = dataset_targets(n_new, existing_sizes, rows_per_dataset)
    # When the existing datasets are full, new datasets are needed: then every row, old and new, is
    # dealt again, so the new datasets do not hold only new rows.
    redeal = bool(existing) and len(targets) > len(existing)
    if redeal:
        targets = dataset_targets(n_new + sum(existing_sizes), [], rows_per_dataset)
    dealt = [n.n_obs for n in new] + (existing_sizes if redeal else [])
    blocks_per_dataset = assign_blocks(dealt, dataset_targets=targets, shuffle_chunk_size=shuffle_chunk_size,
                                       rng=rng if shuffle else None)  # fmt: skip
    seeds = rng.integers(0, 2**63, size=len(targets))
    # Sources: the new inputs first, then the existing datasets (rebuilt with their share of new rows).
    sources = [*new, *existing]
    spec = SourceSpec(
        sources=sources,
        is_new=[True] * len(new) + [False] * len(existing),
        # Existing datasets are already in the collection's var space.
        var_space=VarSpace(var_space.var, [*var_space.column_maps, *([None] * len(existing))]),
        elements=elements,
        obs_schema=obs_schema,
    )
    keys = collection.dataset_keys
    next_index = max((int(k.split("_")[1]) for k in keys), default=-1) + 1
    names = keys + [f"dataset_{next_index + j}" for j in range(len(targets) - len(keys))]
    # A dataset that gets no new rows is still rewritten when appended inputs bring new categories,
    # so every dataset keeps identical categories (and codes).
    stale = [k for k, e in enumerate(existing) if not _same_categories(e.obs, obs_schema)]
    tasks: dict[str, DatasetTask] = {}
    for k, blocks in enumerate(blocks_per_dataset):
        if not redeal and k < len(existing):
            if not blocks and k not in stale:
                continue  # nothing changes for this dataset: it stays as it is
            blocks = [Block(len(new) + k, 0, existing_sizes[k]), *blocks]
        tasks[names[k]] = DatasetTask(
            blocks=blocks, seed=int(seeds[k]) if shuffle else None, groupby=groupby, write_kwargs=write_kwargs
        )

    if not existing:
        # Recorded before anything is committed, so no committed collection lacks it; appends keep it.
        collection.group.attrs[GROUPBY_ATTR] = list(groupby)
    staging = Staging(collection.group)
    try:
        if executor is not None:
            run_jobs(make_jobs(tasks, spec, staging.store, staging.path), executor, progress=progress)
        else:
            for name, task in tqdm(tasks.items(), desc="Writing datasets", unit="dataset", disable=not progress):
                build_dataset(task, spec, staging.new_group(name), progress=progress)
    except BaseException:
        staging.discard()  # nothing was committed: the collection is as it was
        raise
    # Not under the discard above: once the journal is written, staging holds the datasets being
    # replaced, and a failed commit is finished from the journal (Staging.commit says how).
    staging.commit(list(tasks))


def _collection_groupby(
    collection: Datasets, groupby: Sequence[str] | str | None, *, appending: bool
) -> list[str]:
    """The obs columns to sort datasets by: the ones the collection was created with, when appending.

    An append without ``groupby`` keeps the collection's grouping (rewritten datasets are sorted as the
    others are); an append with a different one is refused, since it would leave the datasets sorted
    in two ways. Collections written without the record (older ones) take ``groupby`` as given.
    """
    given = None if groupby is None else ([groupby] if isinstance(groupby, str) else list(groupby))
    stored = collection.group.attrs.get(GROUPBY_ATTR)
    if not appending or stored is None:
        return given or []
    assert isinstance(stored, list | tuple), f"attribute {GROUPBY_ATTR!r} is not a list"  # written as one
    recorded = [str(c) for c in stored]
    if given is not None and given != recorded:
        raise InputError(
            f"The collection {collection._label!r} was converted with `groupby={recorded}`; appending with "
            f"`groupby={given}` would sort its datasets in two ways. Leave `groupby` out (the collection's "
            "own is used) or convert into a new collection."
        )
    return recorded


def _n_anndata_sources(existing: Sequence[InputAnnData]) -> int:
    if not existing:
        return 0
    return sum(str(c).startswith("<AnnData #") for c in existing[0].obs["src_path"].cat.categories)


def _same_categories(obs: pd.DataFrame, schema: dict[str, pd.CategoricalDtype]) -> bool:
    """Whether every categorical column of ``obs`` already has the planned categories."""
    for col, dtype in schema.items():
        if col not in obs.columns:
            continue
        values = obs[col]
        if not isinstance(values.dtype, pd.CategoricalDtype) or list(values.cat.categories) != list(
            dtype.categories
        ):
            return False
    return True


def _existing_specs(existing: Sequence[InputAnnData]) -> dict[str, ElementSpec] | None:
    if not existing:
        return None
    first = existing[0]
    return {k: ElementSpec(kind=e.kind, dtype=e.dtype, width=e.shape[1:]) for k, e in first.elements.items()}


def _make_obs_names_unique(new: Sequence[InputAnnData], existing: Sequence[InputAnnData]) -> None:
    names = pd.Index(np.concatenate([np.asarray(x.obs.index, dtype=object) for x in [*existing, *new]]))
    if names.is_unique:
        return
    unique = make_index_unique(names)  # keeps first occurrences: existing rows never change names
    pos = sum(e.n_obs for e in existing)
    for inp in new:
        inp.obs.index = unique[pos : pos + inp.n_obs]
        pos += inp.n_obs


def _rows_within(limit: int, row_bytes: float, largest_row_bytes: float, shard_bytes: float) -> int:
    """Most rows per dataset whose build and write stay within ``limit`` bytes.

    peak(rows) = rows * row_bytes + buffers * min(shard_bytes, rows * largest_row_bytes)
    """
    full_shards = (limit - _SHARD_BUFFERS * shard_bytes) / row_bytes  # the largest array spans a shard
    if full_shards * largest_row_bytes >= shard_bytes:
        return max(1, int(full_shards))
    return max(1, int(limit / (row_bytes + _SHARD_BUFFERS * largest_row_bytes)))


def _bytes_per_row(inputs: Sequence[InputAnnData], elements: dict[str, ElementSpec]) -> tuple[float, float]:
    """In-memory bytes of one output row, in total and of its largest single array.

    Sparse sizes come from the inputs' mean number of non-zeros per row.
    """
    n_obs = sum(inp.n_obs for inp in inputs)
    sizes = [1.0]
    for key, spec in elements.items():
        if spec.kind == "dense":
            sizes.append(spec.dtype.itemsize * int(np.prod(spec.width)))
        else:
            mean_nnz = sum(inp.elements[key].nnz() for inp in inputs) / n_obs
            sizes += [
                mean_nnz * spec.dtype.itemsize,
                mean_nnz * min_index_dtype(spec.width[0]).itemsize,
                16.0,
            ]
    return sum(sizes), max(sizes)
