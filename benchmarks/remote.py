"""Remote-read benchmark: loader throughput from S3 with added request latency, against local disk.

Starts a moto S3 server (a child process on 127.0.0.1) and, in another child process, a TCP proxy of
its own in front of it that holds back every request by ``--latency-ms`` (20 ms by default: a request
to a cloud object store from a nearby machine). A sparse collection (cached under ``benchmarks/data/``)
is uploaded to the server once per run. The loader then reads the same rows from local disk, from the
server directly, and through the proxy, for several ``chunk_size`` values at a fixed load size and
several request concurrencies (zarr's ``async.concurrency``). Printed: cells/s (median of the rounds)
and the share of the local-disk figure of the same round. First, the time a commit takes to move one
dataset through the proxy, by the number of objects copied at once.

moto is a Python server and slower than a real object store, so "S3 direct" is what this machine can
serve at all; the latency columns show what the added round trips cost on top of it.

Usage::

    python benchmarks/remote.py [--rounds 3] [--latency-ms 20] [--loads 6] [--n-obs-per-chunk 32] [--commit-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
BUCKET = "annbatch-bench"
KEYS = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}
LOAD_ROWS = 8192

_MOTO = textwrap.dedent(
    """
    import sys
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()
    server.stop()
    """
)


# -- the latency proxy (run as a child process: `remote.py --proxy UPSTREAM_PORT LATENCY_MS`) ------------
async def _pipe(reader, writer, state: dict, *, request_side: bool, latency: float) -> None:
    try:
        while data := await reader.read(1 << 16):
            if request_side and state["answered"]:
                # the first bytes of a new request on this connection: one round trip's worth of delay
                state["answered"] = False
                await asyncio.sleep(latency)
            if not request_side:
                state["answered"] = True
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _proxy(upstream_port: int, latency: float) -> None:
    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        state = {"answered": True}
        await asyncio.gather(
            _pipe(client_reader, server_writer, state, request_side=True, latency=latency),
            _pipe(server_reader, client_writer, state, request_side=False, latency=latency),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- the measurement -------------------------------------------------------------------------------------
def _collection(n_obs_per_chunk: int) -> Path:
    """A sparse collection of 60,000 cells × 4,000 genes (~400 non-zeros per row), built once."""
    import annbatch
    from annbatch.synthetic import make_adata

    path = DATA / f"remote_60000x4000_400_c{n_obs_per_chunk}.zarr"
    if not (path / "dataset_1").exists():
        adata = make_adata(60_000, 4_000, nnz_per_row=400, seed=0)
        annbatch.Collection(path, mode="w-").add_adatas([adata], seed=0, dataset_size=30_000, progress=False,
                                                        n_obs_per_chunk=n_obs_per_chunk)  # fmt: skip
    return path


def _upload(path: Path, endpoint: str) -> None:
    import boto3
    import obstore
    from obstore.store import S3Store

    boto3.client("s3", endpoint_url=endpoint, region_name=KEYS["region"], aws_access_key_id=KEYS["access_key_id"],
                 aws_secret_access_key=KEYS["secret_access_key"]).create_bucket(Bucket=BUCKET)  # fmt: skip
    store = S3Store(BUCKET, endpoint=endpoint, client_options={"allow_http": True}, **KEYS)
    for file in path.rglob("*"):
        if file.is_file() and ".lock" not in file.name:
            obstore.put(store, f"cells.zarr/{file.relative_to(path)}", file.read_bytes())


def _options(endpoint: str) -> dict:
    return {"endpoint": endpoint, **KEYS, "client_options": {"allow_http": True}}


def _rate(location, options, chunk_size: int, concurrency: int, loads: int) -> float:
    """Cells/s over the first ``loads`` loads of a shuffled epoch."""
    import zarr

    import annbatch

    with zarr.config.set({"async.concurrency": concurrency}):
        coll = annbatch.Collection(location, mode="r", storage_options=options)
        loader = coll.loader(batch_size=1024, chunk_size=chunk_size, preload_nchunks=LOAD_ROWS // chunk_size,
                             seed=0)  # fmt: skip
        start, rows = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            rows += batch["X"].shape[0]
            if i + 1 >= loads * (LOAD_ROWS // 1024):
                break
        return rows / (time.perf_counter() - start)


def _commit_seconds(url: str, options: dict, concurrency: int) -> float:
    """Seconds to move one dataset (server-side copies of its objects, then deletes) as a commit does."""
    import annbatch
    from annbatch import _staging

    coll = annbatch.Collection(url, storage_options=options)
    staging = _staging.Staging(coll._group)
    _staging._COPY_CONCURRENCY = concurrency
    start = time.perf_counter()
    staging._move("dataset_0", ".staging/moved")
    seconds = time.perf_counter() - start
    staging._move(".staging/moved", "dataset_0")  # put it back for the next measurement
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--loads", type=int, default=6, help="loads of 8,192 rows measured per configuration")
    parser.add_argument("--n-obs-per-chunk", type=int, default=32, help="rows per stored chunk (one GET each)")
    parser.add_argument("--commit-only", action="store_true", help="only time the commit's object copies")
    parser.add_argument("--proxy", nargs=2, type=float, metavar=("UPSTREAM_PORT", "LATENCY_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        asyncio.run(_proxy(int(args.proxy[0]), args.proxy[1] / 1000))
        return

    local = _collection(args.n_obs_per_chunk)
    moto = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    port = int(moto.stdout.readline())
    proxy = subprocess.Popen([sys.executable, __file__, "--proxy", str(port), str(args.latency_ms)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    proxy_port = int(proxy.stdout.readline())
    try:
        direct, delayed = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}"
        _upload(local, direct)
        url = f"s3://{BUCKET}/cells.zarr"
        commit: dict[int, list[float]] = {}
        for _ in range(args.rounds):
            for c in (1, 4, 16):
                commit.setdefault(c, []).append(_commit_seconds(f"s3://{BUCKET}/cells.zarr", _options(delayed), c))
        n_objects = sum(1 for f in (local / "dataset_0").rglob("*") if f.is_file())
        print(f"commit: moving one dataset ({n_objects} objects) through the +{args.latency_ms:g} ms proxy")
        for c, times in commit.items():
            print(f"  {c:>2} copies at once: {statistics.median(times):6.2f} s")
        if args.commit_only:
            return
        configs = [(cs, c) for cs in (256, 1024) for c in (10, 64) if cs >= args.n_obs_per_chunk]
        results: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for cs, c in configs:
                base = _rate(local, None, cs, c, args.loads)
                for name, endpoint in (("S3 direct", direct), (f"S3 +{args.latency_ms:g} ms", delayed)):
                    rate = _rate(url, _options(endpoint), cs, c, args.loads)
                    results.setdefault((name, cs, c), []).append(rate)
                    results.setdefault((name, cs, c, "share"), []).append(rate / base)
                results.setdefault(("local disk", cs, c), []).append(base)
        print(f"{args.rounds} rounds, {args.loads} loads of {LOAD_ROWS:,} rows each; "
              "cells/s medians, shares are medians of per-round ratios to local disk")  # fmt: skip
        print(f"{'source':<16} {'chunk_size':>10} {'concurrency':>11} {'cells/s':>10} {'of local':>9}")
        for name in ("local disk", "S3 direct", f"S3 +{args.latency_ms:g} ms"):
            for cs, c in configs:
                rate = statistics.median(results[(name, cs, c)])
                share = results.get((name, cs, c, "share"))
                shown = f"{statistics.median(share):>8.0%}" if share else f"{'':>8}"
                print(f"{name:<16} {cs:>10} {c:>11} {rate:>10,.0f} {shown}")
        print(json.dumps({f"{k[0]}|{k[1]}|{k[2]}": statistics.median(v) for k, v in results.items()
                          if len(k) == 3}))  # fmt: skip
    finally:
        proxy.terminate()
        moto.stdin.close()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
