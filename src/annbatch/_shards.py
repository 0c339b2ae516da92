"""A direct reader for the sharded arrays annbatch writes, on a local file system.

zarr-python spends ~0.3–0.8 ms of Python per read call, which dominates when a load is hundreds of
small contiguous runs (``chunk_size=32``). For the layout our writer produces — 1-D or row-chunked
arrays, ``sharding_indexed`` with the index at the end, inner codecs ``bytes`` + optional ``blosc`` —
this reader keeps each shard's index in memory, reads the inner chunks a range touches with
``os.pread`` and decodes them with numcodecs' blosc straight into the caller's buffer, from a thread
pool (both release the GIL). Anything else returns ``None`` from :func:`sharded_reader` and is read
through zarr.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import zarr
from numcodecs import blosc
from numcodecs.checksum32 import CRC32C
from zarr.storage import LocalStore

_MISSING = np.uint64(2**64 - 1)
_CRC32C = CRC32C()


class ShardedReader:
    """Reads row ranges of one local sharded zarr array into caller-provided buffers."""

    def __init__(self, root: Path, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, shard_rows: int,
                 compressed: bool, fill_value):  # fmt: skip
        self._root = root
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._chunk_rows, self._per_shard = chunk_rows, shard_rows // chunk_rows
        self._row_items = int(np.prod(shape[1:], dtype=np.int64))
        self._compressed = compressed
        self._fill = fill_value
        self._indexes: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the shard files (they are reopened on the next read)."""
        with self._lock:
            for fd in self._fds.values():
                if fd >= 0:
                    os.close(fd)
            self._fds, self._indexes = {}, {}

    def __del__(self):
        if getattr(self, "_fds", None):
            for fd in self._fds.values():
                if fd >= 0:
                    os.close(fd)

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = self.__dict__.copy()
        state.update(_indexes={}, _fds={}, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shard(self, s: int) -> tuple[int, np.ndarray]:
        with self._lock:
            if s not in self._fds:
                self._fds[s], self._indexes[s] = self._open_shard(s)
            return self._fds[s], self._indexes[s]

    def _open_shard(self, s: int) -> tuple[int, np.ndarray]:
        # Chunk keys name every dimension: c/<shard>/0/… for row-chunked N-d arrays.
        path = self._root.joinpath("c", str(s), *["0"] * (len(self.shape) - 1))
        if not path.exists():  # our writer stores every chunk, so a missing shard is damage, not zeros
            raise FileNotFoundError(
                f"Shard {path} is missing; the collection is damaged. Rebuild it from its inputs."
            )
        fd = os.open(path, os.O_RDONLY)
        n = 16 * self._per_shard
        raw = os.pread(fd, n + 4, os.fstat(fd).st_size - n - 4)  # the index, then its 4-byte crc32c
        try:
            payload = _CRC32C.decode(np.frombuffer(raw, dtype="u1"))
        except RuntimeError as err:
            os.close(fd)
            raise OSError(f"Shard {path} is corrupt (index checksum mismatch): {err}") from err
        return fd, np.frombuffer(payload, dtype="<u8").reshape(-1, 2)

    @property
    def chunk_len(self) -> int:
        """Rows (elements, for 1-d arrays) per inner chunk."""
        return self._chunk_rows

    @property
    def compressed(self) -> bool:
        """Whether chunks need decoding (else they are raw little-endian rows)."""
        return self._compressed

    def chunk_range(self, start: int, stop: int) -> range:
        """Inner chunks holding rows ``start:stop``."""
        return (
            range(start // self._chunk_rows, (stop - 1) // self._chunk_rows + 1) if stop > start else range(0)
        )

    def decode(self, k: int) -> np.ndarray:
        """Inner chunk ``k``, decoded into a buffer reused by the calling thread."""
        buf = _scratch(self._chunk_rows * self._row_items, self.dtype)
        fd, index = self._shard(k // self._per_shard)
        offset, nbytes = index[k % self._per_shard]
        if offset == _MISSING:
            buf[...] = self._fill
        elif self._compressed:
            blosc.decompress(os.pread(fd, int(nbytes), int(offset)), buf)
        else:
            got = os.preadv(fd, [memoryview(buf).cast("B")], int(offset))
            buf[got // self.dtype.itemsize :] = self._fill
        return buf.reshape(-1, *self.shape[1:])

    def plan_raw_reads(self, ranges: list[tuple[int, int, np.ndarray]], out: np.ndarray) -> list[tuple]:
        """Vectored reads placing raw (uncompressed) rows straight at their destinations.

        ``ranges`` holds ``(lo, hi, dest)``: rows ``lo:hi`` go to ``out[dest[i]]`` (``dest[i] < 0``:
        discarded). Returns ``preadv`` calls ``(fd, iovecs, file_offset)`` to run with :func:`run_raw_read`:
        rows that follow each other in a shard file share one call, so the read itself does the shuffle
        with a single copy. The iovec table is built with numpy and handed to libc through ctypes:
        Python's ``os.preadv`` would need one buffer object per row.
        """
        row_bytes = self._row_items * self.dtype.itemsize
        rows = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi, _ in ranges])
        dest = np.concatenate([d for *_, d in ranges]).astype(np.int64)
        chunk = rows // self._chunk_rows
        shard, slot = chunk // self._per_shard, chunk % self._per_shard
        chunk_offset = np.empty(len(rows), dtype=np.uint64)
        fds = np.empty(len(rows), dtype=np.int64)
        for s in np.unique(shard):
            fd, index = self._shard(int(s))
            here = shard == s
            chunk_offset[here], fds[here] = index[slot[here], 0], fd
        missing = chunk_offset == _MISSING
        if missing.any():  # chunks a writer skipped hold the fill value
            out[dest[missing & (dest >= 0)]] = self._fill
            rows, dest, chunk, fds, chunk_offset = (
                a[~missing] for a in (rows, dest, chunk, fds, chunk_offset)
            )
        file_offset = chunk_offset.astype(np.int64) + (rows - chunk * self._chunk_rows) * row_bytes
        iov = np.empty((len(rows), 2), dtype=np.uint64)
        sink = _sink(row_bytes)  # discarded rows land here
        iov[:, 0] = np.where(dest >= 0, out.ctypes.data + np.maximum(dest, 0) * row_bytes, sink.ctypes.data)
        iov[:, 1] = row_bytes
        breaks = np.flatnonzero((np.diff(file_offset) != row_bytes) | (np.diff(fds) != 0)) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(rows)]])
        calls = []
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            for s in range(a, b, _IOV_MAX):
                calls.append((int(fds[s]), iov[s : min(b, s + _IOV_MAX)], int(file_offset[s])))
        return calls


def run_raw_reads(calls: list[tuple]) -> None:
    """Run ``preadv`` calls planned by :meth:`ShardedReader.plan_raw_reads`."""
    for fd, iov, offset in calls:
        want = int(iov[:, 1].sum())
        got = _libc.preadv(fd, iov.ctypes.data, len(iov), offset)  # ctypes drops the GIL for the call
        if got != want:
            err = ctypes.get_errno() if got < 0 else 0
            raise OSError(err, f"Short read from a shard: {got} of {want} bytes ({os.strerror(err)})")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong]
_libc.preadv.restype = ctypes.c_ssize_t
_IOV_MAX = 1024


_local = threading.local()
_sinks: dict[int, np.ndarray] = {}


def _sink(nbytes: int) -> np.ndarray:
    """A shared, never-freed buffer for rows that are read but not used (its content is meaningless)."""
    if nbytes not in _sinks:
        _sinks[nbytes] = np.empty(nbytes, dtype=np.uint8)
    return _sinks[nbytes]


def _scratch(n: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer of ``n`` items, reused across chunks (fresh pages are slow to fault in)."""
    key = (n, np.dtype(dtype).str)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    if key not in cache:
        cache[key] = np.empty(n, dtype=dtype)
    return cache[key]


def sharded_reader(arr: zarr.Array) -> ShardedReader | None:
    """A :class:`ShardedReader` for ``arr`` when its layout is one we read directly, else ``None``."""
    if not isinstance(arr.store, LocalStore) or arr.metadata.zarr_format != 3:
        return None
    meta = arr.metadata.to_dict()
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    if conf.get("index_location", "end") != "end" or meta["chunk_key_encoding"]["name"] != "default":
        return None
    if meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/":
        return None
    names = [c["name"] for c in conf["codecs"]]
    if names not in (["bytes"], ["bytes", "blosc"]) or [c["name"] for c in conf["index_codecs"]] != [
        "bytes",
        "crc32c",
    ]:
        return None
    if any(c.get("configuration", {}).get("endian", "little") != "little" for c in conf["codecs"][:1]):
        return None
    shape = tuple(meta["shape"])
    inner, outer = conf["chunk_shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if list(inner[1:]) != list(shape[1:]) or list(outer[1:]) != list(shape[1:]):
        return None  # chunked along rows only
    root = Path(arr.store.root) / arr.path
    return ShardedReader(root, shape, arr.dtype, inner[0], outer[0], len(names) == 2, arr.metadata.fill_value)
