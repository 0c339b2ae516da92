"""Parsing of user-facing size settings such as ``"1GB"`` or a number of rows."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int, *, name: str) -> int:
    """Parse a size string like ``"1GB"`` or ``"512MiB"`` (or an int of bytes) into bytes."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a size string like '1GB' or an integer, got {value!r}.")
    if isinstance(value, int):
        n = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"`{name}`={value!r} is not a size: use a number with a unit such as '512MB', '1GB' or '2GiB'."
            )
        n = int(float(match.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return n


def rows_for(size: str | int, bytes_per_row: float, *, name: str) -> int:
    """Number of rows that ``size`` stands for.

    An ``int`` is a row count already; a string is a byte size divided by ``bytes_per_row``.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"`{name}` must be at least 1 row, got {size}.")
        return size
    return max(1, int(parse_bytes(size, name=name) // max(bytes_per_row, 1.0)))
