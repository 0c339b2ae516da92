"""Conversion benchmark: wall time and peak RSS of ``Collection.add_adatas`` on large sparse h5ad inputs.

Generates (once, cached under ``benchmarks/data/``) 4 sparse .h5ad files of 50,000 cells × 20,000 genes
with ~1,500 non-zeros per row (float32), then converts them in a fresh subprocess per run, so peak RSS
is the conversion's own. Prints every run and the median.

Usage::

    python benchmarks/convert.py [--runs 3] [--n-obs 50000] [--n-vars 20000] [--nnz 1500]
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
paths, out = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
annbatch.Collection(out).add_adatas(paths, seed=0, progress=False)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "peak_rss_gib": peak_rss_gib()}))
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
    args = parser.parse_args()
    paths = make_inputs(args.n_files, args.n_obs, args.n_vars, args.nnz)
    input_bytes = sum(p.stat().st_size for p in paths)
    print(f"inputs: {args.n_files} × {args.n_obs:,} cells × {args.n_vars:,} genes, ~{args.nnz} nnz/row, "
          f"{input_bytes / 1e9:.2f} GB of .h5ad")  # fmt: skip
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(dir=DATA) as tmp:
            out = Path(tmp) / "collection.zarr"
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(p) for p in paths]), str(out)],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        results.append(result)
        print(f"run {run + 1}: {result['wall_s']:6.2f} s   peak RSS {result['peak_rss_gib']:.2f} GiB   "
              f"output {size / 1e9:.2f} GB")  # fmt: skip
    wall = statistics.median(r["wall_s"] for r in results)
    rss = statistics.median(r["peak_rss_gib"] for r in results)
    print(f"median of {args.runs}: {wall:.2f} s, peak RSS {rss:.2f} GiB "
          f"({args.n_files * args.n_obs / wall:,.0f} cells/s)")  # fmt: skip


if __name__ == "__main__":
    main()
