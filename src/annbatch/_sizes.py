"""Parsing of user-facing size settings such as ``"1GB"`` or a number of rows.

Messages name the setting as ``name`` or ``name=value`` in backticks, the form the command line
rewrites into its own flags (see :func:`annbatch.cli.user_names`).
"""

from __future__ import annotations

import math
import numbers
import re

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_EXAMPLES = "such as '512MB', '1GB' or '2GiB'"


def parse_bytes(value: str | int | float, *, name: str) -> int:
    """Parse a size string like ``"1GB"`` or ``"512MiB"`` (or a number of bytes) into bytes."""
    if isinstance(value, bool) or not isinstance(value, str | numbers.Real):
        raise TypeError(f"`{name}` must be a size string like '1GB' or a number of bytes, got {value!r}.")
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None or match.group(2).upper() not in _UNITS | {"": 1}:
            raise ValueError(f"`{name}={value!r}` is not a size: use a number with a unit {_EXAMPLES}.")
        if not match.group(2):
            raise ValueError(f"`{name}={value!r}` has no unit: write it with one, {_EXAMPLES}.")
        n = float(match.group(1)) * _UNITS[match.group(2).upper()]
    else:
        n = value
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return int(n)


def rows_for(size: str | int, bytes_per_row: float, *, name: str) -> int:
    """Number of rows that ``size`` stands for.

    An ``int`` is a row count already; a string is a byte size divided by ``bytes_per_row``.
    """
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"`{name}` must be at least 1 row, got {size}.")
        return int(size)
    if not isinstance(size, str):  # a float would be ambiguous: 1e6 rows, or a million bytes?
        raise TypeError(
            f"`{name}` must be rows as an int (e.g. 100000) or a size string like '1GB', got {size!r}."
        )
    return max(1, int(parse_bytes(size, name=name) // max(bytes_per_row, 1.0)))
