"""Prefetch: run a producer in a background thread, at most ``depth`` items ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a background thread with a bounded queue.

    Memory is bounded: at most ``depth`` finished items wait in the queue, plus the one being produced.
    Errors in the producer are re-raised in the consumer. :meth:`close` (also called when the consumer
    stops early, e.g. ``break``) stops the producer and joins the thread.
    """

    def __init__(self, source: Iterator[T], depth: int = 1):
        if depth < 1:
            raise ValueError(f"`depth` must be at least 1, got {depth}.")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="annbatch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(err))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer and wait for its thread."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
