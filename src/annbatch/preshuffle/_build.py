"""Building one output dataset: gather its blocks, permute the rows, write the result sharded.

Each dataset is an independent task (a :class:`DatasetTask` and the opened inputs are all it needs), so
datasets can be built in parallel or on different machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from tqdm.auto import tqdm

from annbatch._csr import RawCSR, scatter_rows
from annbatch.writer import min_index_dtype, write_anndata

from ._inputs import InputAnnData
from ._plan import SRC_PATH, Block, ElementSpec, VarSpace


@dataclass
class DatasetTask:
    """Everything needed to build one output dataset from the opened sources."""

    blocks: list[Block]
    seed: int | None  # None: keep the block order, do not permute rows
    groupby: Sequence[str] = ()
    write_kwargs: dict = field(default_factory=dict)

    @property
    def n_obs(self) -> int:
        """Number of rows of the dataset."""
        return sum(b.n_obs for b in self.blocks)


@dataclass
class SourceSpec:
    """How rows of every source map into the output."""

    sources: Sequence[InputAnnData]
    is_new: Sequence[bool]  # False for an existing dataset of the collection being rebuilt
    var_space: VarSpace
    elements: dict[str, ElementSpec]
    obs_schema: dict[str, pd.CategoricalDtype]


def build_dataset(task: DatasetTask, spec: SourceSpec, target: zarr.Group, *, progress: bool = True) -> None:
    """Read the task's rows, permute them (then sort stably by ``groupby``) and write them to ``target``."""
    obs, order = plan_rows(task, spec)
    write_rows(task, spec, obs, order, target, progress=progress)


def plan_rows(task: DatasetTask, spec: SourceSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """The dataset's obs in output order, and ``order``: the output position -> the task's row.

    Needs only the sources' obs, so it runs where the plan was made; :func:`write_rows` does the rest.
    """
    obs = _gather_obs(task.blocks, spec)
    order = _row_order(obs, task)
    return obs.iloc[order], order


def write_rows(
    task: DatasetTask, spec: SourceSpec, obs: pd.DataFrame, order: np.ndarray, target: zarr.Group,
    *, progress: bool = True,
) -> None:  # fmt: skip
    """Read the arrays of the task's rows from ``spec.sources``, place them in ``order``, write ``target``.

    Uses only the sources' ``elements`` (not their obs): a worker opens just those.
    """
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    arrays: dict[str, np.ndarray | RawCSR] = {}
    with tqdm(total=task.n_obs, desc="reading rows", unit="row", leave=False, disable=not progress) as bar:
        rows = _RowProgress(bar, len(spec.elements))
        for i, (key, elem) in enumerate(spec.elements.items()):
            bar.set_postfix_str(f"{key} ({i + 1}/{len(spec.elements)})", refresh=False)
            arrays[key] = _gather_element(key, elem, task.blocks, spec, order, inverse, rows)
    write_anndata(target, obs=obs, var=spec.var_space.var, rows=arrays, **task.write_kwargs)


class _RowProgress:
    """Counts the dataset's rows on a bar whose total is the dataset's rows, over all its elements.

    Every element (X, each layer, each obsm entry) counts for an equal share of each row, so the bar
    advances as the elements are read one after the other, and stands at exactly the dataset's rows once
    the last element is read, whatever the number of elements. Row-elements are counted exactly and the
    bar shows their whole-row equivalent, so it never overshoots or stops short.
    """

    def __init__(self, bar: tqdm, n_elements: int):
        self._bar, self._n_elements = bar, max(n_elements, 1)
        self._row_elements = self._shown = 0

    def update(self, n_rows: int) -> None:
        """``n_rows`` rows of the element being read were placed."""
        self._row_elements += n_rows
        rows = self._row_elements // self._n_elements
        if rows > self._shown:
            self._bar.update(rows - self._shown)
            self._shown = rows


def _gather_obs(blocks: Sequence[Block], spec: SourceSpec) -> pd.DataFrame:
    pieces = []
    for block in blocks:
        src = spec.sources[block.source]
        piece = src.obs.iloc[block.start : block.stop]
        if spec.is_new[block.source]:
            piece = piece.assign(**{SRC_PATH: src.name})
        pieces.append(piece)
    obs = pd.concat(pieces, join="outer") if len(pieces) > 1 else pieces[0].copy()
    for col, dtype in spec.obs_schema.items():
        if col in obs.columns:
            values = obs[col]
            if isinstance(values.dtype, pd.CategoricalDtype):
                values = values.astype(object)
            obs[col] = pd.Categorical(values, dtype=dtype)
    return obs


def _row_order(obs: pd.DataFrame, task: DatasetTask) -> np.ndarray:
    n = len(obs)
    order = np.arange(n) if task.seed is None else np.random.default_rng(task.seed).permutation(n)
    if task.groupby:
        keys = []
        for col in reversed(list(task.groupby)):  # lexsort sorts by the last key first
            values = (
                obs[col].to_numpy()[order]
                if not isinstance(obs[col].dtype, pd.CategoricalDtype)
                else (obs[col].cat.codes.to_numpy()[order])
            )
            keys.append(pd.factorize(values, sort=True)[0] if values.dtype == object else values)
        order = order[np.lexsort(keys)]  # stable: rows of one key value stay in random order
    return order


def _gather_element(
    key, elem: ElementSpec, blocks, spec: SourceSpec, order, inverse, bar: _RowProgress
) -> np.ndarray | RawCSR:
    """Read every block of one element and place its rows at their permuted positions.

    The output is allocated once and each block is placed as soon as it is read, so peak memory is the
    dataset plus one block. CSR needs the output row offsets first: they come from ``indptr`` alone,
    except for inputs that lose columns to the var space, which are read (and kept) in a first pass.
    """
    n_obs = len(order)
    maps = (
        spec.var_space.column_maps if key == "X" or key.startswith("layers/") else [None] * len(spec.sources)
    )
    starts = np.cumsum([0] + [b.n_obs for b in blocks])
    source = [spec.sources[b.source].elements[key] for b in blocks]
    if elem.kind == "dense":
        out = np.empty((n_obs, *elem.width), dtype=elem.dtype)
        for b, block in enumerate(blocks):
            part = _conform_dense(source[b].read(block.start, block.stop), elem, maps[block.source])
            out[inverse[starts[b] : starts[b + 1]]] = part
            bar.update(block.n_obs)
        return out
    kept: dict[int, RawCSR] = {}
    row_nnz = np.empty(n_obs, dtype=np.int64)
    for b, block in enumerate(blocks):
        col_map = maps[block.source]
        if col_map is not None and (col_map < 0).any():  # columns dropped: nnz known only after reading
            kept[b] = _conform_csr(source[b].read(block.start, block.stop), elem, col_map)
            row_nnz[starts[b] : starts[b + 1]] = np.diff(kept[b].indptr)
        else:
            row_nnz[starts[b] : starts[b + 1]] = source[b].row_nnz(block.start, block.stop)
    indptr = np.zeros(n_obs + 1, dtype=np.int64)
    np.cumsum(row_nnz[order], out=indptr[1:])
    data = np.empty(indptr[-1], dtype=elem.dtype)
    indices = np.empty(indptr[-1], dtype=min_index_dtype(elem.width[0]))
    dest = indptr[:-1][inverse]  # output offset of every input row
    for b, block in enumerate(blocks):
        csr = kept.pop(b, None)
        if csr is None:
            csr = _conform_csr(source[b].read(block.start, block.stop), elem, maps[block.source])
        scatter_rows(csr.indptr, csr.indices, csr.data, dest[starts[b] : starts[b + 1]], indices, data)
        bar.update(block.n_obs)
    return RawCSR(data, indices, indptr, (n_obs, elem.width[0]))


def _conform_dense(part: np.ndarray, elem: ElementSpec, col_map: np.ndarray | None) -> np.ndarray:
    """Cast to the output dtype and move columns into the output var space (missing columns are 0)."""
    if col_map is None:
        return part
    out = np.zeros((part.shape[0], *elem.width), dtype=elem.dtype)
    keep = col_map >= 0
    out[:, col_map[keep]] = part[:, keep]
    return out


def _conform_csr(part: RawCSR, elem: ElementSpec, col_map: np.ndarray | None) -> RawCSR:
    """Move columns into the output var space; dtypes are cast by the scatter kernel."""
    if col_map is None:
        return part
    new_cols = col_map[part.indices]
    keep = new_cols >= 0
    rows = np.repeat(np.arange(part.shape[0]), np.diff(part.indptr))[keep]
    # COO → CSR sorts columns within rows (the var space may reorder them).
    moved = sp.csr_matrix((part.data[keep], (rows, new_cols[keep])), shape=(part.shape[0], elem.width[0]))
    return RawCSR.from_scipy(moved)
