"""obs columns encoded once for fast per-batch lookup: categoricals as integer codes, others as arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd


class ObsTable:
    """Selected obs columns over all rows of a loader, as numpy arrays indexed by global row.

    Categorical columns are stored as int64 codes with their categories (``-1`` marks a missing value);
    numeric and boolean columns keep their dtype. String columns are encoded as codes like categoricals
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
                self.arrays[col] = values.cat.codes.to_numpy().astype(np.int64)
                self.categories[col] = values.cat.categories
            elif strings == "keep":  # DataFrame output: any column, as pandas would give it
                self.arrays[col] = values.to_numpy()
            else:
                self.arrays[col] = _numeric(values, col)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Column arrays for ``rows`` (global row ids)."""
        return {col: arr[rows] for col, arr in self.arrays.items()}

    def frame(self, rows: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        """A pandas DataFrame for ``rows``, categoricals rebuilt from their codes."""
        out = {}
        for col, arr in self.arrays.items():
            values = arr[rows]
            if col in self.categories:
                values = pd.Categorical.from_codes(values, categories=self.categories[col])
            out[col] = values
        return pd.DataFrame(out, index=index)


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
