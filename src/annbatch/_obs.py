"""obs columns encoded once for fast per-batch lookup: categoricals as integer codes, others as arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from annbatch._convert import Target, convert

if TYPE_CHECKING:
    from annbatch.types import Batch


class ObsTable:
    """Selected obs columns over all rows of a loader, as numpy arrays indexed by global row.

    Categorical columns are stored as codes with their categories (``-1`` marks a missing value), in the
    smallest signed integer dtype pandas keeps codes in for that many categories (int8 below 127, then
    int16, ...: :func:`codes_dtype`), so 100M rows of a key cost 100 MB, not 800; :meth:`take` widens
    the codes of a batch to int64. Numeric and boolean columns keep their dtype. String columns are encoded as codes like categoricals
    (``strings="encode"``; categories are the sorted distinct values, so a collection need not be
    converted again) or kept as object arrays (``strings="keep"``, for DataFrame output). Encoding
    happens once, when the loader is built, so batches never go through pandas unless a DataFrame is
    asked for.
    """

    def __init__(
        self, obs: pd.DataFrame, columns: Sequence[str], *, strings: Literal["encode", "keep"] = "encode"
    ):
        missing = [c for c in columns if c not in obs.columns]
        if missing:
            raise KeyError(f"obs column(s) {missing} not found; available: {list(obs.columns)}.")
        self.columns = list(columns)
        self.arrays: dict[str, np.ndarray] = {}
        self.categories: dict[str, pd.Index] = {}
        for col in self.columns:
            values = obs[col]
            if strings == "encode" and not isinstance(values.dtype, pd.CategoricalDtype):
                if not (pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values)):
                    # strings (object or pandas' string dtype): codes of the sorted distinct values
                    values = values.astype("category")
            if isinstance(values.dtype, pd.CategoricalDtype):
                categories = values.cat.categories
                # pandas' own codes dtype: a Categorical rebuilt from them (a key sampler's) shares them
                codes = values.cat.codes.to_numpy()
                self.arrays[col] = codes.astype(codes_dtype(len(categories)), copy=False)
                self.categories[col] = categories
            elif strings == "keep":  # DataFrame output: any column, as pandas would give it
                self.arrays[col] = values.to_numpy()
            else:
                self.arrays[col] = _numeric(values, col)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Column arrays for ``rows`` (global row ids); categorical codes as int64."""
        return {
            col: arr[rows].astype(np.int64) if col in self.categories else arr[rows]
            for col, arr in self.arrays.items()
        }

    def frame(self, rows: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        """A pandas DataFrame for ``rows``, categoricals rebuilt from their codes."""
        out = {}
        for col, arr in self.arrays.items():
            values = arr[rows]
            if col in self.categories:
                values = pd.Categorical.from_codes(values, categories=self.categories[col])
            out[col] = values
        return pd.DataFrame(out, index=index)


class BatchObs:
    """The obs a loader yields with each batch, as asked for; :meth:`encode` encodes it for the data.

    ``columns`` come as a pandas DataFrame under ``"obs"``; ``keys`` as arrays (categorical codes)
    under ``"obs"``; ``batch_key`` as codes under ``"batch"``.
    """

    def __init__(self, columns: Sequence[str] | None, keys: Sequence[str] | None, batch_key: str | None):
        if columns is not None and keys is not None:
            raise ValueError(
                "Give `obs_columns` (a pandas DataFrame per batch) or `obs_keys` (arrays per batch), not both."
            )
        # one column name is a list of one, not of its characters
        columns = [columns] if isinstance(columns, str) else columns
        keys = [keys] if isinstance(keys, str) else keys
        self.columns = list(columns) if columns is not None else None
        self.keys = list(keys) if keys is not None else []
        self.batch_key = batch_key
        self.key_columns = list(dict.fromkeys(self.keys + ([batch_key] if batch_key is not None else [])))
        self._frame: ObsTable | None = None
        self._codes: ObsTable | None = None

    def encode(
        self, reader: Callable[[list[str]], pd.DataFrame] | None, frames: Sequence[pd.DataFrame | None]
    ) -> BatchObs:
        """A copy encoded for the data: obs read by ``reader(columns)`` (a collection's), else ``frames``.

        Data added without obs (``None`` frames) can yield none; in-memory frames yield all their
        columns as a DataFrame when neither ``columns`` nor keys were asked for.
        """
        out = BatchObs(self.columns, self.keys or None, self.batch_key)
        default = None
        if reader is not None:
            read = reader
        elif all(f is not None for f in frames):
            frame = concat_obs(frames)
            read, default = (lambda columns: frame), list(frame.columns)
        else:
            if self.columns or self.key_columns:
                raise ValueError("obs columns were requested but some datasets were added without obs.")
            return out
        if self.key_columns:
            out._codes = ObsTable(read(self.key_columns), self.key_columns)
        columns = self.columns
        if columns is None and not self.key_columns:
            columns = default
        if columns:
            out._frame = ObsTable(read(columns), columns, strings="keep")
        return out

    @property
    def categories(self) -> dict[str, pd.Index]:
        """Labels of the codes of categorical key columns."""
        return dict(self._codes.categories) if self._codes is not None else {}

    def codes(self, column: str) -> np.ndarray:
        """The codes (or values) of a key column over all rows."""
        if self._codes is None:
            raise KeyError(f"obs column {column!r} was not asked for as a key")
        return self._codes.arrays[column]

    def fill(self, item: Batch, rows: np.ndarray, to: Target) -> None:
        """Put the obs of ``rows`` into a batch dict (``"obs"``, and ``"batch"`` with a ``batch_key``)."""
        if self._frame is not None:
            item["obs"] = self._frame.frame(rows)
        if self._codes is not None:
            arrays = self._codes.take(rows)
            if self.keys:
                item["obs"] = {k: convert(arrays[k], to) for k in self.keys}
            if self.batch_key is not None:
                item["batch"] = convert(arrays[self.batch_key], to)


def codes_dtype(n_categories: int) -> np.dtype:
    """The smallest signed integer dtype for the codes of ``n_categories`` categories and ``-1``.

    The rule pandas applies to a Categorical's codes (int8 for fewer than 127 categories, int16 for fewer
    than 32,767, ...), so that codes in it are shared, not copied, by ``pd.Categorical.from_codes``.
    """
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def concat_obs(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
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


def _numeric(values: pd.Series, col: str) -> np.ndarray:
    """A plain numpy array for a numeric or boolean column, including pandas' nullable dtypes.

    Nullable integers with missing values become float64 with NaN; nullable booleans with missing
    values have no numpy equivalent and raise.
    """
    if not isinstance(values.dtype, pd.api.extensions.ExtensionDtype):
        return values.to_numpy()
    if not values.isna().any():
        return values.to_numpy(dtype=values.dtype.numpy_dtype)
    if pd.api.types.is_bool_dtype(values):
        raise TypeError(
            f"obs column {col!r} is a nullable boolean with missing values, which has no numpy type. Fill "
            f"them (`.fillna(False)`) or make it categorical (`.astype('category')`; missing values get code -1)."
        )
    return values.to_numpy(dtype=np.float64, na_value=np.nan)
