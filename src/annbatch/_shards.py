"""A direct reader for the sharded arrays annbatch writes, on a local file system.

zarr-python spends ~0.3–0.8 ms of Python per read call, which dominates when a load is hundreds of
small contiguous runs (``chunk_size=32``). For the layout our writer produces — 1-D or row-chunked
arrays, ``sharding_indexed`` with the index at the end, inner codecs ``bytes`` + optional ``blosc`` —
this module opens each array's shards once per epoch (checking their index checksums) and reads a
load without Python per chunk:

- :class:`SpanReader` hands whole lists of element spans to a numba kernel that reads each inner
  chunk with ``pread``, decodes it with c-blosc (the copy numcodecs bundles, called through its C
  API) into a per-thread scratch buffer and copies the spans' parts to their destinations while the
  chunk is still in cache — no GIL held, so the thread pool really runs in parallel;
- raw (uncompressed) rows are read by ``preadv`` straight into place; the calls are planned and
  issued from numba too (:meth:`ShardedReader.plan_raw_reads`, :class:`RawReads`).

:class:`ShardLayout` (from :func:`shard_layout`) describes the layout; the same arrays in object storage
are read by :mod:`annbatch._object_shards`. Anything else returns ``None`` from :func:`sharded_reader`
and is read through zarr.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
import zarr
from numba.core import types
from numcodecs import blosc
from numcodecs.checksum32 import CRC32C
from numpy.typing import DTypeLike
from zarr.storage import LocalStore

from annbatch._zarr import metadata_dict

NOT_STORED = np.uint64(2**64 - 1)  # a shard index's offset of a chunk zarr did not store
_CRC32C = CRC32C()


@dataclass(frozen=True)
class ShardLayout:
    """Our writer's layout of one array: row-chunked inner chunks, bundled into shards along rows.

    Inner chunks are ``bytes`` (little-endian) plus optional ``blosc``; each shard ends with its index
    (``(offset, nbytes)`` per inner chunk, ``bytes`` + ``crc32c``); chunk keys are ``c/<shard>/0/…``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    shard_rows: int
    compressed: bool
    fill_value: object

    @property
    def per_shard(self) -> int:
        """Inner chunks per shard."""
        return self.shard_rows // self.chunk_rows

    @property
    def row_items(self) -> int:
        """Items per row (1 for 1-d arrays)."""
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def chunk_items(self) -> int:
        """Items per inner chunk."""
        return self.chunk_rows * self.row_items

    @property
    def n_items(self) -> int:
        """Items of the whole array (rows times items per row)."""
        return self.shape[0] * self.row_items

    @property
    def n_chunks(self) -> int:
        """Inner chunks of the whole array."""
        return -(-self.shape[0] // self.chunk_rows)

    @property
    def n_shards(self) -> int:
        """Shards of the whole array."""
        return -(-self.n_chunks // self.per_shard)

    def shard_key(self, s: int) -> str:
        """The key of shard ``s`` below the array (chunk keys name every dimension)."""
        return "/".join(["c", str(s), *["0"] * (len(self.shape) - 1)])

    def parse_index(self, raw: bytes | memoryview, where: object) -> np.ndarray:
        """A shard's index (its last ``16 * per_shard + 4`` bytes) as ``(per_shard, 2)`` offsets and sizes."""
        try:
            payload = _CRC32C.decode(np.frombuffer(raw, dtype="u1"))
        except RuntimeError as err:
            raise OSError(f"Shard {where} is corrupt (index checksum mismatch): {err}") from err
        return np.frombuffer(payload, dtype="<u8").reshape(-1, 2)

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard's index, its checksum included."""
        return 16 * self.per_shard + 4


def missing_index(layout: ShardLayout) -> np.ndarray:
    """The index of a shard zarr did not store (it holds only the fill value): every chunk missing."""
    return np.full((layout.per_shard, 2), NOT_STORED, dtype=np.uint64)


def shard_layout(arr: zarr.Array) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``arr`` when it is one our readers read directly, else ``None``."""
    if arr.metadata.zarr_format != 3:
        return None
    meta = metadata_dict(arr)
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
    return ShardLayout(
        shape, np.dtype(arr.dtype), inner[0], outer[0], len(names) == 2, arr.metadata.fill_value
    )


class ShardedReader:
    """One local sharded zarr array: where its shards are and how its inner chunks are laid out.

    It holds no open files: :meth:`open` gives each caller (a fetcher, for one epoch) its own file
    descriptors, so concurrent iterations never close each other's files.
    """

    def __init__(self, root: Path, layout: ShardLayout, complete: bool = False):
        self._root = root
        self._layout = layout
        self._complete = complete  # every shard was written (annbatch collections): a missing one is damage
        self.shape, self.dtype = layout.shape, layout.dtype

    def shard_path(self, s: int) -> Path:
        """The file of shard ``s``."""
        return self._root / self._layout.shard_key(s)

    def chunk_path(self, k: int) -> Path:
        """The file holding inner chunk ``k``."""
        return self.shard_path(k // self._layout.per_shard)

    @property
    def compressed(self) -> bool:
        """Whether chunks need decoding (else they are raw little-endian rows)."""
        return self._layout.compressed

    @property
    def row_items(self) -> int:
        """Items per row (1 for 1-d arrays)."""
        return self._layout.row_items

    @property
    def fill_value(self):
        """The value of chunks the writer did not store."""
        return self._layout.fill_value

    @property
    def chunk_items(self) -> int:
        """Items per inner chunk."""
        return self._layout.chunk_items

    def open(self) -> ChunkIndex:
        """Open every shard and read its (checksum-verified) index."""
        layout = self._layout
        fds: list[int] = []
        try:
            indexes = [self._open_shard(s, fds) for s in range(layout.n_shards)]
        except BaseException:
            for opened in fds:
                os.close(opened)
            raise
        # a shard zarr did not write holds only the fill value
        index = np.concatenate(indexes)[: layout.n_chunks]
        missing = index[:, 0] == NOT_STORED
        offset = np.where(missing, 0, index[:, 0]).astype(np.int64)
        offset[missing] = -1
        fd = np.repeat(np.array(fds, dtype=np.int64), layout.per_shard)[: layout.n_chunks]
        paths = {f: self.shard_path(s) for s, f in enumerate(fds) if f >= 0}
        return ChunkIndex(offset, index[:, 1].astype(np.int64), fd, fds, paths)

    def _open_shard(self, s: int, fds: list[int]) -> np.ndarray:
        path = self.shard_path(s)
        if not path.exists():
            if self._complete:  # our writer stores every chunk, so a missing shard is damage, not zeros
                raise FileNotFoundError(
                    f"Shard {path} is missing; the collection is damaged. Rebuild it from its inputs."
                )
            fds.append(-1)  # zarr skips writing shards that hold only the fill value
            return missing_index(self._layout)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        n = self._layout.index_nbytes
        return self._layout.parse_index(os.pread(fd, n, os.fstat(fd).st_size - n), path)

    def plan_raw_reads(
        self, index: ChunkIndex, ranges: np.ndarray, dest: np.ndarray, out: np.ndarray
    ) -> RawReads:
        """Vectored reads placing raw (uncompressed) rows straight at their destinations.

        ``index`` is this array, opened; ``ranges`` is an ``(n, 3)`` array of ``(lo, hi, pos)``: rows
        ``lo:hi`` go to ``out[dest[pos + i]]`` (``< 0``: discarded). Rows that follow each other in a
        shard file share one ``preadv`` call, so the read itself does the shuffle with a single copy.
        Chunks the writer did not store are filled with the fill value right away.
        """
        n_rows = int((ranges[:, 1] - ranges[:, 0]).sum())
        iov = np.empty((n_rows, 2), dtype=np.uint64)
        calls = np.empty((n_rows, 4), dtype=np.int64)  # fd, first iovec, iovecs, file offset
        rows_out = out.reshape(len(out), -1)
        fill = np.array(self._layout.fill_value, dtype=out.dtype)
        n_calls = _plan_preadv(ranges, dest, self._layout.chunk_rows, index.offset, index.fd, rows_out, fill,
                               _sink(rows_out.shape[1] * out.itemsize), iov, calls)  # fmt: skip
        fd, first, count, offset = calls[:n_calls].T
        return RawReads(iov, fd, first, count, offset, index.paths)


@dataclass
class ChunkIndex:
    """Open shard files of one array and where each inner chunk lies in them; :meth:`close` when done."""

    offset: np.ndarray  # file offset of every chunk (-1: not stored, it holds the fill value)
    nbytes: np.ndarray  # stored size of every chunk
    fd: np.ndarray  # file descriptor of every chunk's shard
    files: list[int]  # the open descriptors
    paths: dict[int, Path]  # the file of each descriptor, for error messages

    def close(self) -> None:
        """Close the shard files."""
        files, self.files = self.files, []
        for fd in files:
            if fd >= 0:
                os.close(fd)

    def __del__(self):
        self.close()


@dataclass
class RawReads:
    """``preadv`` calls: call ``c`` fills ``iov[first[c]:first[c] + count[c]]`` from ``fd[c]`` at ``offset[c]``."""

    iov: np.ndarray
    fd: np.ndarray
    first: np.ndarray
    count: np.ndarray
    offset: np.ndarray
    paths: dict[int, Path]  # file of each descriptor

    @classmethod
    def concat(cls, parts: Sequence[RawReads]) -> RawReads:
        """All calls of ``parts`` as one set."""
        base = np.cumsum([0] + [len(p.iov) for p in parts[:-1]])
        return cls(
            np.concatenate([p.iov for p in parts]),
            np.concatenate([p.fd for p in parts]),
            np.concatenate([p.first + b for p, b in zip(parts, base, strict=True)]),
            np.concatenate([p.count for p in parts]),
            np.concatenate([p.offset for p in parts]),
            {fd: path for p in parts for fd, path in p.paths.items()},
        )

    def split(self, n: int) -> list[RawReads]:
        """The calls in ``n`` groups of about equal size (fewer when there are fewer calls)."""
        cuts = np.searchsorted(np.cumsum(self.count), np.linspace(0, self.count.sum(), n + 1)[1:-1])
        groups = [np.arange(a, b) for a, b in zip([0, *cuts], [*cuts, len(self.first)], strict=True)]
        return [
            RawReads(self.iov, self.fd[g], self.first[g], self.count[g], self.offset[g], self.paths)
            for g in groups
            if len(g)
        ]

    def run(self) -> None:
        """Make the calls (in numba, without the GIL)."""
        failed = _run_preadv(self.iov, self.fd, self.first, self.count, self.offset)
        if failed >= 0:
            path = self.paths.get(int(self.fd[failed]), "a shard")
            raise OSError(
                f"Short read from {path} at byte {int(self.offset[failed])}: the shard is truncated or "
                "being rewritten; rebuild the collection from its inputs."
            )


@numba.njit(nogil=True, cache=True)
def _plan_preadv(
    ranges, dest, chunk_rows, chunk_offset, chunk_fd, out, fill, sink, iov, calls
):  # pragma: no cover
    """Fill ``iov`` (one per row) and ``calls`` (fd, first iovec, count, file offset); return the call count."""
    row_bytes = out.shape[1] * out.itemsize
    n_iov = n_calls = 0
    for r in range(ranges.shape[0]):
        lo, hi, pos = ranges[r, 0], ranges[r, 1], ranges[r, 2]
        for row in range(lo, hi):
            d = dest[pos + row - lo]
            k = row // chunk_rows
            if chunk_offset[k] < 0:  # a chunk the writer did not store holds the fill value
                if d >= 0:
                    out[d, :] = fill
                continue
            at = chunk_offset[k] + (row - k * chunk_rows) * row_bytes
            iov[n_iov, 0] = out[max(d, 0)].ctypes.data if d >= 0 else sink.ctypes.data
            iov[n_iov, 1] = row_bytes
            last = n_calls - 1
            if (
                n_calls == 0
                or calls[last, 0] != chunk_fd[k]
                or calls[last, 3] + calls[last, 2] * row_bytes != at
                or calls[last, 2] == _IOV_MAX
            ):
                calls[n_calls, 0] = chunk_fd[k]
                calls[n_calls, 1] = n_iov
                calls[n_calls, 2] = 0
                calls[n_calls, 3] = at
                n_calls += 1
            calls[n_calls - 1, 2] += 1
            n_iov += 1
    return n_calls


@numba.njit(nogil=True, cache=True)
def _run_preadv(iov, fds, first, count, offset):  # pragma: no cover - numba
    """Run the calls; the index of the first that read short, or -1."""
    for c in range(len(first)):
        want = 0
        for i in range(first[c], first[c] + count[c]):
            want += iov[i, 1]
        if _preadv(fds[c], iov.ctypes.data + first[c] * 16, count[c], offset[c]) != want:
            return c
    return -1


class SpanReader:
    """Reads element spans of a set of sharded arrays (one per dataset, one dtype) with a numba kernel.

    The arrays are seen as flat runs of elements: a CSR ``data``/``indices`` array as it is, a dense
    array as its rows laid end to end. A span ``j`` of dataset ``d`` is elements ``lo[j]:hi[j]`` and
    goes to ``out[dest[j]:]`` (``dest[j] < 0``: skipped), cast to ``out``'s dtype.
    """

    def __init__(self, readers: Sequence[ShardedReader | None]):
        present = [r for r in readers if r is not None]
        if len({r.dtype for r in present}) > 1:
            raise ValueError("A SpanReader reads arrays of one dtype.")
        self.dtype = present[0].dtype
        self._readers = list(readers)
        self._indexes: list[ChunkIndex] = []
        try:
            for r in present:
                self._indexes.append(r.open())
        except BaseException:
            self.close()
            raise
        opened = iter(self._indexes)
        tables = [next(opened) if r is not None else _EMPTY_INDEX for r in readers]
        sizes = [len(t.offset) for t in tables]
        self._base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._offset, self._nbytes, self._fd = (
            np.concatenate([getattr(t, f) for t in tables]) for f in ("offset", "nbytes", "fd")
        )
        self._chunk = np.array([r.chunk_items if r is not None else 1 for r in readers], dtype=np.int64)
        self._n_items = np.array(
            [r.shape[0] * r.row_items if r is not None else 0 for r in readers], np.int64
        )
        self._compressed = np.array([r is not None and r.compressed for r in readers], dtype=np.bool_)
        self._fill = np.array([r.fill_value if r is not None else 0 for r in readers], dtype=self.dtype)
        self._max_nbytes = int(self._nbytes.max(initial=0))
        self._max_chunk = int(self._chunk.max(initial=1))

    def close(self) -> None:
        """Close the shard files."""
        for index in self._indexes:
            index.close()

    def read(
        self, spans: np.ndarray, lo: np.ndarray, hi: np.ndarray, dest: np.ndarray, out: np.ndarray
    ) -> None:
        """Read spans: ``spans[i] = (dataset, first, stop)`` covers elements ``lo[first:stop]`` to ``hi[…]``.

        Within one span, element runs must be increasing and not overlap (rows of a range, in order).
        """
        comp = _scratch(max(self._max_nbytes, 1), np.uint8, "compressed")
        chunk = _scratch(self._max_chunk, self.dtype, "decoded")
        status = np.zeros(2, dtype=np.int64)
        _read_spans(spans, lo, hi, dest, self._base, self._chunk, self._n_items, self._compressed,
                    self._offset, self._nbytes, self._fd, self._fill, comp, chunk, out, status)  # fmt: skip
        if status[0]:
            code, k = int(status[0] & 0xFF), int(status[0] >> 8)
            what = {1: "short read", 2: "invalid blosc header", 3: "blosc cannot decode it"}[code]
            reader = self._readers[int(spans[status[1], 0])]
            assert reader is not None  # only arrays with a reader have chunks to read
            path = reader.chunk_path(k)
            raise OSError(
                f"Chunk {k} in shard {path} is corrupt ({what}); rebuild the collection from its inputs."
            )


_EMPTY_INDEX = ChunkIndex(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), [], {})

_libc = ctypes.CDLL(None)
_IOV_MAX = 1024


def _c_function(library: ctypes.CDLL, name: str, signature):
    """A C function the numba kernel can call, or ``None`` when ``library`` lacks it.

    The function is registered with LLVM under a private name and declared as an external function,
    so the compiled kernel refers to it by name and numba can cache it (a ctypes pointer would not).
    """
    try:
        address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    except AttributeError:
        return None
    llvm.add_symbol(f"annbatch_{name}", address)
    return types.ExternalFunction(f"annbatch_{name}", signature)


def _blosc_library() -> ctypes.CDLL | None:
    # numcodecs compiles c-blosc into its extension module and exports c-blosc's C API from it.
    try:
        return ctypes.CDLL(blosc.__file__)
    except OSError:
        return None


_pread = _c_function(_libc, "pread", types.intp(types.intc, types.uintp, types.uintp, types.int64))
_preadv = _c_function(_libc, "preadv", types.intp(types.intc, types.uintp, types.intc, types.int64))
_blosc = _blosc_library()
# ``blosc_decompress_ctx`` does not use c-blosc's global state, so threads may call it concurrently.
_decompress = _blosc and _c_function(
    _blosc, "blosc_decompress_ctx", types.intc(types.uintp, types.uintp, types.uintp, types.intc)
)
_validate = _blosc and _c_function(
    _blosc, "blosc_cbuffer_validate", types.intc(types.uintp, types.uintp, types.uintp)
)


@numba.njit(nogil=True, cache=True)
def _read_spans(spans, lo, hi, dest, base, chunk_items, n_items, compressed, offset, nbytes, fds, fill,
                comp, chunk, out, status):  # fmt: skip  # pragma: no cover - numba
    """Read, decode and place spans; on failure set ``status = (code | chunk << 8, span)`` and stop."""
    itemsize = chunk.itemsize
    size_out = np.zeros(1, dtype=np.uint64)
    for s in range(spans.shape[0]):
        d, first, stop = spans[s, 0], spans[s, 1], spans[s, 2]
        if stop <= first or hi[stop - 1] <= lo[first]:
            continue
        n = chunk_items[d]
        i = first
        for k in range(lo[first] // n, (hi[stop - 1] - 1) // n + 1):
            c0 = k * n
            c1 = min(c0 + n, n_items[d])
            g = base[d] + k
            if offset[g] < 0:  # a chunk the writer did not store holds the fill value
                chunk[: c1 - c0] = fill[d]
            elif compressed[d]:
                m = nbytes[g]
                if m > comp.size or _pread(fds[g], comp.ctypes.data, m, offset[g]) != m:
                    status[0], status[1] = 1 | (k << 8), s
                    return
                if _validate(comp.ctypes.data, m, size_out.ctypes.data) != 0 or size_out[0] != n * itemsize:
                    status[0], status[1] = 2 | (k << 8), s
                    return
                if _decompress(comp.ctypes.data, chunk.ctypes.data, n * itemsize, 1) != n * itemsize:
                    status[0], status[1] = 3 | (k << 8), s
                    return
            elif _pread(fds[g], chunk.ctypes.data, (c1 - c0) * itemsize, offset[g]) != (c1 - c0) * itemsize:
                status[0], status[1] = 1 | (k << 8), s
                return
            while i < stop and hi[i] <= c0:  # spans are ordered: skip the ones that end before this chunk
                i += 1
            j = i
            while j < stop and lo[j] < c1:
                if dest[j] >= 0:
                    a, b = max(lo[j], c0), min(hi[j], c1)
                    o = dest[j] + a - lo[j]
                    for t in range(b - a):
                        out[o + t] = chunk[a - c0 + t]
                j += 1


_local = threading.local()
_sinks: dict[int, np.ndarray] = {}


def _sink(nbytes: int) -> np.ndarray:
    """A shared, never-freed buffer for rows that are read but not used (its content is meaningless)."""
    if nbytes not in _sinks:
        _sinks[nbytes] = np.empty(nbytes, dtype=np.uint8)
    return _sinks[nbytes]


def _scratch(n: int, dtype: DTypeLike, role: str) -> np.ndarray:
    """A per-thread buffer of at least ``n`` items, reused across loads (fresh pages are slow to fault in)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (role, np.dtype(dtype).str)
    if key not in cache or cache[key].size < n:
        cache[key] = np.empty(n, dtype=dtype)
    return cache[key]


def sharded_reader(arr: zarr.Array, *, complete: bool = False) -> ShardedReader | None:
    """A :class:`ShardedReader` for ``arr`` when it is on a local disk in our layout, else ``None``.

    ``complete``: every shard was written (true of annbatch collections), so a missing shard file is
    reported as damage instead of read as the fill value, as zarr would.
    """
    if _decompress is None or _validate is None:  # numcodecs without c-blosc's C API: read through zarr
        return None
    if not isinstance(arr.store, LocalStore):
        return None
    layout = shard_layout(arr)
    if layout is None:
        return None
    return ShardedReader(Path(arr.store.root) / arr.path, layout, complete)
