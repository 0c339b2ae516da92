"""The errors annbatch raises on purpose, under one root: ``except annbatch.errors.AnnbatchError``.

Each is also the fitting built-in (:class:`ValueError` for bad input or settings, :class:`OSError`
for a failed write), so code that catches those keeps working. Messages name the file, element or
parameter at fault and what to do.
"""

from __future__ import annotations

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
