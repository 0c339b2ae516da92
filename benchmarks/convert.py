"""Conversion benchmark: wall time and peak RSS of ``Collection.add_adatas`` on large sparse h5ad inputs.

Generates (once, cached under ``benchmarks/data/``) 4 sparse .h5ad files of 50,000 cells × 20,000 genes
with ~1,500 non-zeros per row (float32), then converts them in a fresh subprocess per run, so peak RSS
is the conversion's own. Prints every run and the median.

``--workers 0,1,2`` instead compares building the datasets here (0) with a dask ``LocalCluster`` of 1 and
2 worker processes (``add_adatas(executor=client)``), at ``--dataset-size`` rows per dataset so there
are several datasets to build at once; the peak RSS is then this process's and the largest worker's.

Usage::

    python benchmarks/convert.py [--runs 3] [--n-obs 50000] [--n-vars 20000] [--nnz 1500]
    python benchmarks/convert.py --workers 0,1,2 [--dataset-size 50000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"

_CHILD = """
def peak_rss_gib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
import json, sys, time
import annbatch
paths, out, workers, size = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
kwargs = {"seed": 0, "progress": False} | ({"dataset_size": size} if size is not None else {})
if workers == 0:
    start = time.perf_counter()
    annbatch.Collection(out).add_adatas(paths, **kwargs)
    wall, workers_rss = time.perf_counter() - start, 0.0
else:
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(__import__, "annbatch.preshuffle._executor")  # as the serial run, imports are not counted
        start = time.perf_counter()  # nor is the cluster's start-up
        annbatch.Collection(out).add_adatas(paths, executor=client, **kwargs)
        wall = time.perf_counter() - start
        workers_rss = max(client.run(peak_rss_gib).values())
print(json.dumps({"wall_s": wall, "peak_rss_gib": peak_rss_gib(), "worker_rss_gib": workers_rss}))
"""


def make_inputs(n_files: int, n_obs: int, n_vars: int, nnz: int) -> list[Path]:
    """The benchmark's input files, generated with the project's synthetic generator (cached)."""
    from annbatch.synthetic import write_h5ad_files

    folder = DATA / f"convert_{n_files}x{n_obs}x{n_vars}_{nnz}"
    paths = sorted(folder.glob("*.h5ad"))
    if len(paths) == n_files:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    paths = write_h5ad_files(folder, n_files, n_obs, n_vars, nnz_per_row=nnz, seed=0)
    print(f"generated inputs in {time.perf_counter() - start:.1f} s: {folder}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n-files", type=int, default=4)
    parser.add_argument("--n-obs", type=int, default=50_000)
    parser.add_argument("--n-vars", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=1500)
    parser.add_argument("--workers", help="comma-separated dask worker counts to compare (0: no executor)")
    parser.add_argument("--dataset-size", type=int, help="rows per output dataset (default with --workers: --n-obs)")
    args = parser.parse_args()
    paths = make_inputs(args.n_files, args.n_obs, args.n_vars, args.nnz)
    input_bytes = sum(p.stat().st_size for p in paths)
    print(f"inputs: {args.n_files} × {args.n_obs:,} cells × {args.n_vars:,} genes, ~{args.nnz} nnz/row, "
          f"{input_bytes / 1e9:.2f} GB of .h5ad")  # fmt: skip
    if args.workers is None:
        _report(_runs(paths, args.runs, 0, args.dataset_size), args)
        return
    size = args.dataset_size or args.n_obs
    print(f"{size:,} rows per dataset: {args.n_files * args.n_obs // size} datasets")
    medians = {}
    for workers in (int(w) for w in args.workers.split(",")):
        print(f"-- {'no executor' if workers == 0 else f'dask LocalCluster, {workers} worker(s)'}")
        medians[workers] = _report(_runs(paths, args.runs, workers, size), args)
    if 1 in medians and 2 in medians:
        print(f"2 vs 1 dask workers: {medians[1] / medians[2]:.2f}x faster")


def _runs(paths: list[Path], runs: int, workers: int, dataset_size: int | None) -> list[dict]:
    results = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(dir=DATA) as tmp:
            out = Path(tmp) / "collection.zarr"
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(p) for p in paths]), str(out),
                                   str(workers), json.dumps(dataset_size)],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        results.append(result)
        worker = f"  largest worker {result['worker_rss_gib']:.2f} GiB" if workers else ""
        print(f"run {run + 1}: {result['wall_s']:6.2f} s   peak RSS {result['peak_rss_gib']:.2f} GiB{worker}   "
              f"output {size / 1e9:.2f} GB")  # fmt: skip
    return results


def _report(results: list[dict], args) -> float:
    wall = statistics.median(r["wall_s"] for r in results)
    rss = statistics.median(r["peak_rss_gib"] for r in results)
    print(f"median of {len(results)}: {wall:.2f} s, peak RSS {rss:.2f} GiB "
          f"({args.n_files * args.n_obs / wall:,.0f} cells/s)")  # fmt: skip
    return wall

if __name__ == "__main__":
    main()
