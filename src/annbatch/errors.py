"""The errors annbatch raises on purpose, under one root: ``except annbatch.errors.AnnbatchError``.

Each is also the fitting built-in (:class:`ValueError` for bad input or settings, :class:`OSError`
for a failed write), so code that catches those keeps working. Messages name the file, element or
parameter at fault and what to do; parameters in backticks (`` `name` `` or `` `name=value` ``), so
that front ends can write them as their users spell them (:func:`rename_parameters`).
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Mapping

__all__ = [
    "AnnbatchError",
    "BackingError",
    "CollectionChangedError",
    "CollectionError",
    "CollectionLockedError",
    "CommitError",
    "InputError",
    "TrainError",
]


class AnnbatchError(Exception):
    """Root of every error annbatch raises on purpose."""


class InputError(AnnbatchError, ValueError):
    """An input cannot be converted; the message names the input and the remedy."""


class CollectionError(AnnbatchError, ValueError):
    """A path or group cannot be used as a collection; the message says why and what to do."""


class CollectionLockedError(CollectionError):
    """Another process is writing to the collection; :attr:`holder` says which (host, pid, since)."""

    def __init__(self, message: str, holder: dict) -> None:
        super().__init__(message)
        self.holder = holder


class CollectionChangedError(AnnbatchError, RuntimeError):
    """An append rewrote datasets a loader reads; build a new loader. :attr:`changed` names them.

    ``changed`` maps each rewritten dataset to its version when the loader was built and now.
    """

    def __init__(self, message: str, changed: dict[str, tuple[int, int]]) -> None:
        super().__init__(message)
        self.changed = changed


class CommitError(AnnbatchError, OSError):
    """Moving committed datasets into place failed; the journal finishes it on the next write-open."""


class BackingError(AnnbatchError, ValueError):
    """Data that a loader cannot read; the message says what to do."""


class TrainError(AnnbatchError, ValueError):
    """A problem with a training configuration or its data; ``annbatch train`` prints it as one line."""


_PARAMETER = re.compile(r"`(?P<name>[A-Za-z_]\w*)(?:=(?P<value>[^`]*))?`")


def rename_parameters(message: str, spelled: Mapping[str, str], *, flags: bool = True) -> str:
    """``message`` with the parameters it names written as the user gave them.

    The Python API's messages name a parameter in backticks, alone or with a value. Each name in
    ``spelled`` becomes its spelling there: a command-line flag (``flags=True``: `dataset_size` →
    `--dataset-size`, `join='inner'` → `--join inner`, `groupby=['a', 'b']` → `--groupby a --groupby b`)
    or a config key (``flags=False``: `batch_size=0` → `data.batch_size=0`). Other names stay as they are.
    """

    def spell(match: re.Match) -> str:
        name, value = match["name"], match["value"]
        if name not in spelled:
            return match[0]
        key = spelled[name]
        if value is None:
            return f"`{key}`"
        return f"`{_as_flag(key, value)}`" if flags else f"`{key}={value}`"

    return _PARAMETER.sub(spell, message)


def _as_flag(flag: str, value: str) -> str:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return f"{flag} {value}"
    items = list(parsed) if isinstance(parsed, list | tuple) else [parsed]
    if not items:
        return f"no {flag}"
    return " ".join(f"{flag} {shlex.quote(str(item))}" for item in items)
