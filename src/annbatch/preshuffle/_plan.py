"""Planning a conversion: validation, the shared var space and obs schema, and rows-to-datasets assignment.

Everything here is decided before any output is written, so bad input fails with nothing written.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ._inputs import InputAnnData, InputError

SRC_PATH = "src_path"


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of input ``source``."""

    source: int
    start: int
    stop: int

    @property
    def n_obs(self) -> int:
        """Number of rows in the block."""
        return self.stop - self.start


@dataclass
class ElementSpec:
    """Output layout of one row-aligned element (X, a layer, an obsm entry)."""

    kind: Literal["csr", "dense"]
    dtype: np.dtype
    width: tuple[int, ...]  # shape after the obs axis (n_vars for X and layers)


@dataclass
class VarSpace:
    """The output var index and, per input, where each input column goes (-1: dropped)."""

    var: pd.DataFrame
    column_maps: list[np.ndarray | None]  # None: the input's var equals the output var, in order

    @property
    def n_vars(self) -> int:
        """Number of output variables."""
        return len(self.var)


def check_inputs(inputs: Sequence[InputAnnData], groupby: Sequence[str]) -> None:
    """Raise :class:`InputError` for inputs that cannot be converted, naming the file and the remedy."""
    for inp in inputs:
        if inp.n_obs == 0:
            raise InputError(f"Input {inp.name!r} has no rows (0 cells). Remove it from the inputs.")
        if not inp.var.index.is_unique:
            dupes = inp.var.index[inp.var.index.duplicated()].unique()[:5].tolist()
            raise InputError(
                f"Input {inp.name!r} has duplicated var names (e.g. {dupes}). "
                "Make them unique first, e.g. `adata.var_names_make_unique()`."
            )
        missing = [c for c in groupby if c not in inp.obs.columns]
        if missing:
            raise InputError(
                f"`groupby` column(s) {missing} are missing from obs of input {inp.name!r}. "
                "Add them to every input or choose other columns."
            )
    for col in groupby:
        _check_groupby_column(inputs, col)
    kinds = {inp.name: inp.elements["X"].kind for inp in inputs}
    if len(set(kinds.values())) > 1:
        raise InputError(
            f"X is sparse in some inputs and dense in others ({kinds}). Convert them to one kind first "
            "(e.g. `adata.X = scipy.sparse.csr_matrix(adata.X)`)."
        )


def _check_groupby_column(inputs: Sequence[InputAnnData], col: str) -> None:
    kinds = {inp.name: _column_kind(inp.obs[col]) for inp in inputs}
    if len(set(kinds.values())) > 1:
        raise InputError(
            f"`groupby` column {col!r} has conflicting types across inputs ({kinds}). "
            "Give it the same type everywhere, e.g. `adata.obs[col] = adata.obs[col].astype('category')`."
        )
    ordered = [inp.obs[col].cat for inp in inputs if isinstance(inp.obs[col].dtype, pd.CategoricalDtype)]
    ordered = [(c.categories.tolist(), c.ordered) for c in ordered if c.ordered]
    if ordered and any(o != ordered[0] for o in ordered):
        raise InputError(
            f"`groupby` column {col!r} is an ordered categorical with conflicting category orders across "
            "inputs. "
            "Use the same categories (`.cat.set_categories`) in every input."
        )


def _column_kind(series: pd.Series) -> str:
    if isinstance(series.dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    return "string"


def plan_var_space(
    inputs: Sequence[InputAnnData],
    *,
    join: Literal["outer", "inner"],
    var_subset: Sequence[str] | None,
    existing_var: pd.DataFrame | None,
    merge: Literal["same", "unique", "first", "only"] | None,
) -> VarSpace:
    """The output var space: the collection's own when appending, else the join of the inputs' vars."""
    if join not in ("outer", "inner"):
        raise ValueError(f"`join` must be 'outer' or 'inner', got {join!r}.")
    if existing_var is not None:
        names = existing_var.index
        dropped = {inp.name: int((~inp.var.index.isin(names)).sum()) for inp in inputs}
        dropped = {k: v for k, v in dropped.items() if v}
        if dropped:
            warnings.warn(
                f"Appending: var names not in the collection are dropped (count per input: {dropped}).",
                stacklevel=3,
            )
    elif var_subset is not None:
        if isinstance(var_subset, str):
            raise TypeError(f"`var_subset` must be a list of var names, got the string {var_subset!r}.")
        var_subset = list(var_subset)  # any iterable, such as a pandas Index or a generator
        if len(var_subset) == 0:
            raise InputError(
                "`var_subset` is empty: give the var names to keep, or leave it out to keep all."
            )
        names = pd.Index(var_subset)
        union = _union(inp.var.index for inp in inputs)
        absent = names[~names.isin(union)]
        if len(absent):
            raise InputError(f"`var_subset` names not found in any input: {absent[:10].tolist()}.")
    elif join == "outer":
        names = _union(inp.var.index for inp in inputs)
    else:
        names = inputs[0].var.index
        for inp in inputs[1:]:
            names = names[names.isin(inp.var.index)]
        if len(names) == 0:
            raise InputError("`join='inner'`: the inputs share no var names. Use `join='outer'`.")
    var = existing_var if existing_var is not None else _merge_var(inputs, pd.Index(names), merge)
    maps: list[np.ndarray | None] = []
    for inp in inputs:
        if inp.var.index.equals(var.index):
            maps.append(None)
        else:
            maps.append(var.index.get_indexer(inp.var.index).astype(np.int64))
    return VarSpace(var=var, column_maps=maps)


def _union(indexes) -> pd.Index:
    seen: dict[str, None] = {}
    for index in indexes:
        seen.update(dict.fromkeys(index))
    return pd.Index(list(seen), dtype=object)


MERGES = ("same", "unique", "first", "only")


def _merge_var(inputs: Sequence[InputAnnData], names: pd.Index, merge) -> pd.DataFrame:
    """The var columns kept by ``merge``, one of the strategies of :func:`anndata.concat`, over ``names``.

    Values are compared where inputs share a var name (elsewhere an input's values are missing):
    ``"same"`` keeps the columns every input has and that agree, ``"unique"`` those that agree however
    many inputs have them, ``"only"`` those only one input has; ``"first"`` keeps every column, each var
    name taking the first input's non-missing value.
    """
    var = pd.DataFrame(index=names)
    if merge is None:
        return var
    if merge not in MERGES:
        raise ValueError(f"`merge` must be None, 'same', 'unique', 'first' or 'only', got {merge!r}.")
    columns: dict[str, pd.Series] = {}
    holders: dict[str, int] = {}  # how many inputs have each column
    disagree: set[str] = set()
    for inp in inputs:
        for col in inp.var.columns:
            values = inp.var[col].reindex(names)
            holders[col] = holders.get(col, 0) + 1
            if col not in columns:
                columns[col] = values
                continue
            both = columns[col].notna() & values.notna()
            if not (columns[col][both].astype(object) == values[both].astype(object)).all():
                disagree.add(col)
            columns[col] = columns[col].combine_first(values)  # first non-missing value, dtype kept
    if merge == "same":
        dropped = disagree | {c for c, n in holders.items() if n < len(inputs)}
    elif merge == "unique":
        dropped = disagree
    elif merge == "only":
        dropped = {c for c, n in holders.items() if n > 1}
    else:
        dropped = set()
    for col in dropped:
        del columns[col]
    for col, values in columns.items():
        columns[col] = _restore_dtype(values, [inp.var[col] for inp in inputs if col in inp.var.columns])
    for col, values in columns.items():
        var[col] = values
    return var


def _restore_dtype(values: pd.Series, originals: list[pd.Series]) -> pd.Series:
    """Undo the object dtype that reindexing to the union introduces (bool columns stay bool).

    String columns with missing values become nullable strings, which keep them missing on disk
    (an object column would store them as the text ``"nan"``).
    """
    if all(pd.api.types.is_bool_dtype(o) for o in originals):
        return values.astype(bool) if values.notna().all() else values.astype("boolean")
    strings = all(
        pd.api.types.is_string_dtype(o) and not isinstance(o.dtype, pd.CategoricalDtype) for o in originals
    )
    if strings and values.isna().any():
        return values.astype("string")
    return values.infer_objects()


def plan_elements(
    inputs: Sequence[InputAnnData], n_vars: int, existing: dict[str, ElementSpec] | None
) -> dict[str, ElementSpec]:
    """Row-aligned elements to write, with promoted dtypes; warns about elements only some inputs have."""
    keys = [k for k in inputs[0].elements if all(k in inp.elements for inp in inputs)]
    partial = sorted({k for inp in inputs for k in inp.elements} - set(keys))
    if existing is not None:
        partial += [k for k in keys if k not in existing]
        keys = [k for k in keys if k in existing]
    if partial:
        warnings.warn(f"Elements present in only some inputs are not converted: {partial}.", stacklevel=3)
    specs = {}
    for key in keys:
        elems = [inp.elements[key] for inp in inputs]
        dtypes = {inp.name: e.dtype for inp, e in zip(inputs, elems, strict=True)}
        if existing is not None:
            dtypes["<collection>"] = existing[key].dtype
        dtype = np.result_type(*dtypes.values())
        if len(set(dtypes.values())) > 1:
            warnings.warn(f"{key} has different dtypes across inputs {_fmt(dtypes)}; promoting to {dtype}.",
                          stacklevel=3)  # fmt: skip
        width: tuple[int, ...]
        if key == "X" or key.startswith("layers/"):
            width = (n_vars,)
        else:
            widths = {e.shape[1:] for e in elems}
            if len(widths) > 1:
                raise InputError(
                    f"{key} has different widths across inputs ({widths}); it cannot be stacked."
                )
            width = widths.pop()
        specs[key] = ElementSpec(kind=elems[0].kind, dtype=np.dtype(dtype), width=width)
    return specs


def _fmt(dtypes: dict) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in dtypes.items()) + ")"


def plan_obs_schema(
    obs_frames: Sequence[pd.DataFrame], names: Sequence[str]
) -> dict[str, pd.CategoricalDtype]:
    """Shared categories for every categorical obs column: the union, first-seen order, unused kept.

    Computed once over all inputs (and the existing collection) so every dataset has identical categories
    and integer codes mean the same everywhere; existing categories keep their positions when appending.
    """
    columns = {c for frame in obs_frames for c in frame.columns}
    # src_path is ours: existing datasets have it, new inputs get it while being written.
    partial = sorted(c for c in columns - {SRC_PATH} if not all(c in f.columns for f in obs_frames))
    if partial:
        warnings.warn(
            f"obs columns present in only some inputs are filled with missing values elsewhere: {partial}.",
            stacklevel=3,
        )
    schema = {}
    for col in sorted(columns):
        series = [f[col] for f in obs_frames if col in f.columns]
        if not any(isinstance(s.dtype, pd.CategoricalDtype) for s in series):
            continue
        cats: dict = {}
        for s in series:
            values = s.cat.categories if isinstance(s.dtype, pd.CategoricalDtype) else pd.unique(s.dropna())
            cats.update(dict.fromkeys(values))
        ordered = any(getattr(s.dtype, "ordered", False) for s in series)
        schema[col] = pd.CategoricalDtype(list(cats), ordered=ordered)
    schema[SRC_PATH] = pd.CategoricalDtype(list(dict.fromkeys(names)))
    return schema


def assign_blocks(
    n_obs_per_source: Sequence[int],
    *,
    dataset_targets: Sequence[int],
    shuffle_chunk_size: int,
    rng: np.random.Generator | None,
) -> list[list[Block]]:
    """Cut every source into blocks of ``shuffle_chunk_size`` rows and deal them to datasets.

    ``dataset_targets`` is how many new rows each dataset should receive. With an ``rng`` the blocks are
    dealt in random order (each dataset draws from every source); without, in input order.
    """
    if isinstance(shuffle_chunk_size, bool) or not isinstance(shuffle_chunk_size, numbers.Integral):
        raise TypeError(f"`shuffle_chunk_size` must be an int (rows per block), got {shuffle_chunk_size!r}.")
    if shuffle_chunk_size < 1:
        raise ValueError(f"`shuffle_chunk_size` must be at least 1, got {shuffle_chunk_size}.")
    shuffle_chunk_size = int(shuffle_chunk_size)
    blocks = [
        Block(i, start, min(start + shuffle_chunk_size, n))
        for i, n in enumerate(n_obs_per_source)
        for start in range(0, n, shuffle_chunk_size)
    ]
    if rng is not None:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    # Deal by position along the (shuffled) row sequence; a block straddling two datasets is split, so
    # every dataset gets exactly its target.
    bounds = np.cumsum(dataset_targets)
    out: list[list[Block]] = [[] for _ in dataset_targets]
    pos = 0
    for block in blocks:
        start = block.start
        while start < block.stop:
            k = min(int(np.searchsorted(bounds, pos, side="right")), len(out) - 1)
            take = block.stop - start if k == len(out) - 1 else min(block.stop - start, int(bounds[k]) - pos)
            out[k].append(Block(block.source, start, start + take))
            start += take
            pos += take
    return out


def dataset_targets(n_new: int, existing_sizes: Sequence[int], rows_per_dataset: int) -> list[int]:
    """New rows per dataset so all datasets end up about equally large and at most ``rows_per_dataset``.

    Existing datasets are topped up first; new datasets are added when the total would not fit.
    """
    total = n_new + sum(existing_sizes)
    n_datasets = max(len(existing_sizes), -(-total // rows_per_dataset), 1)
    sizes = list(existing_sizes) + [0] * (n_datasets - len(existing_sizes))
    even = total / n_datasets
    room = np.array([max(even - s, 0.0) for s in sizes])
    if room.sum() == 0:
        room = np.ones(n_datasets)
    # Largest-remainder rounding of the share of new rows each dataset gets.
    raw = room / room.sum() * n_new
    targets = np.floor(raw).astype(int)
    targets[np.argsort(raw - targets)[::-1][: n_new - targets.sum()]] += 1
    return targets.tolist()
