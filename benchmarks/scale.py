"""Scale benchmark: the loader's own cost (construction, resident memory, per-epoch planning) at 1M–100M rows.

What a loader costs before it reads any X must stay small, and grow linearly, as a collection grows:

- **construction**: ``Collection(path, mode="r").loader(..., obs_keys=KEYS)``: opening every dataset,
  reading the CSR row pointers and the obs key columns and encoding them, building the sampler;
- **resident memory** the loader then holds beyond its load buffers, per row and per obs key. It is
  measured with tracemalloc (numpy reports its allocations to it) as the memory still allocated once
  the loader is built, minus the CSR row pointers (``indptr``, 8 bytes a row, the X format's own cost,
  shown separately); the peak while building is shown too;
- **planning**: what an epoch costs without I/O, as ``iter(loader)`` does it: copying the sampler
  for the epoch, ``validate``, ``n_batches`` and drawing all of its load requests (row ranges and the
  permutations that cut them into mini-batches), per epoch;
- **first batch**: ``next(iter(loader))`` on a fresh loader, reads included.

Samplers: the default ``RandomSampler``, and the key-aware ``batch_sampler="homogeneous"`` and
``"balanced"`` keyed on ``donor`` (where per-row arrays hide: codes, runs, chunks). Four categorical obs
keys: ``donor`` (1,000 values, rows sorted by it within a dataset as ``groupby="donor"`` writes them),
``cell_type`` (24), ``tissue`` (60) and ``assay`` (8).

Data (generated once, cached under ``benchmarks/data/``): rows are tiny (one non-zero among 16 genes) so
100M rows fit on disk. One template dataset of ``--rows-per-dataset`` rows (default 2,000,000, about
what a 20 GB dataset of real cells holds) is written with annbatch's own writer
(:func:`annbatch.writer.write_anndata`), and each collection is made of hard-linked copies of it
(``dataset_0``, ``dataset_1``, …), so building the 100M-row collection takes seconds and no extra disk.
The loader's costs do not depend on the values of the rows.

Every size runs in a fresh process per sampler; times are medians of ``--rounds`` (each round builds a
new loader; planning times each epoch). Targets at 100M rows: construction ≤ 10 s, planning ≤ 1 s per
epoch, ≤ 2 bytes per row per obs key.

Usage::

    python benchmarks/scale.py [--sizes 1e6,1e7,1e8] [--rounds 3] [--samplers random,homogeneous,balanced]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _child import run_child  # benchmarks/_child.py: scripts run from this folder

DATA = Path(__file__).parent / "data"
KEYS = ["donor", "cell_type", "tissue", "assay"]
N_CATEGORIES = {"donor": 1000, "cell_type": 24, "tissue": 60, "assay": 8}
N_VARS = 16


def _template(n_obs: int) -> Path:
    """One dataset of ``n_obs`` tiny rows, written by annbatch's writer (cached)."""
    import numpy as np
    import pandas as pd
    import zarr

    from annbatch._csr import RawCSR
    from annbatch.writer import write_anndata

    path = DATA / f"scale_template_{n_obs}.zarr"
    if (path / "zarr.json").exists():
        return path
    tmp = path.with_suffix(".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    obs = {}
    for key, n in N_CATEGORIES.items():
        codes = rng.integers(0, n, n_obs).astype(np.int16)
        if key == "donor":
            codes.sort()  # as groupby="donor" stores them: long runs of one donor
        obs[key] = pd.Categorical.from_codes(codes, categories=[f"{key}_{i}" for i in range(n)])
    obs_df = pd.DataFrame(obs, index=pd.Index(np.char.mod("c%d", np.arange(n_obs)).astype(object)))
    x = RawCSR(
        np.ones(n_obs, dtype=np.float32),
        rng.integers(0, N_VARS, n_obs).astype(np.uint8),
        np.arange(n_obs + 1, dtype=np.int64),
        (n_obs, N_VARS),
    )
    var = pd.DataFrame(index=[f"gene_{i}" for i in range(N_VARS)])
    group = zarr.open_group(tmp, mode="w-", zarr_format=3)
    write_anndata(group, obs=obs_df, var=var, rows={"X": x})
    tmp.rename(path)
    print(f"wrote template dataset of {n_obs:,} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def build_collection(n_obs: int, rows_per_dataset: int) -> Path:
    """A collection of ``n_obs`` rows: hard-linked copies of one template dataset (cached)."""
    import zarr

    import annbatch

    per = min(n_obs, rows_per_dataset)
    if n_obs % per:
        raise SystemExit(f"{n_obs:,} rows is not a multiple of --rows-per-dataset {per:,}")
    path = DATA / f"scale_{n_obs}_d{per}.zarr"
    n_datasets = n_obs // per
    if (path / f"dataset_{n_datasets - 1}" / "zarr.json").exists():
        return path
    template = _template(per)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    annbatch.Collection(path, mode="w-")
    for d in range(n_datasets):
        target = path / f"dataset_{d}"
        for root, _, files in os.walk(template):
            rel = Path(root).relative_to(template)
            (target / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                os.link(Path(root) / f, target / rel / f)
    zarr.open_group(path, mode="r")  # a readable zarr group
    return path


_CHILD = r"""
import copy, gc, json, statistics, sys, time, tracemalloc
import numpy as np
import annbatch
from annbatch.loader import Loader  # imports torch: not part of the loader's construction
path, sampler, rounds, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")

def build():
    coll = annbatch.Collection(path, mode="r")
    kw = dict(batch_size=4096, chunk_size=256, preload_nchunks=32, seed=0, obs_keys=keys)
    if sampler != "random":
        kw.update(batch_sampler=sampler, batch_key="donor")
    return coll.loader(**kw)

def plan(loader, epoch):  # what iter(loader) does before and besides reading
    loader.set_epoch(epoch)
    s = loader._epoch_sampler()
    n = loader.n_obs
    s.validate(n)
    n_batches = s.n_batches(n)
    n_requests = sum(1 for _ in s.sample(n))
    return n_batches, n_requests

out = {"construct_s": [], "plan_s": []}
for r in range(rounds):
    gc.collect()
    t = time.perf_counter(); loader = build(); out["construct_s"].append(time.perf_counter() - t)
    t = time.perf_counter(); out["n_batches"], out["n_requests"] = plan(loader, r)
    out["plan_s"].append(time.perf_counter() - t)
    if r < rounds - 1:
        del loader
t = time.perf_counter(); next(iter(loader)); out["first_batch_s"] = time.perf_counter() - t
out["n_obs"] = loader.n_obs
out["indptr_bytes"] = sum(b.indptr.nbytes for b in loader._backings if b.indptr is not None)
del loader
gc.collect()
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
loader = build()
gc.collect()
held, peak = tracemalloc.get_traced_memory()
out["held_bytes"], out["build_peak_bytes"] = held - base, peak - base
tracemalloc.reset_peak()
plan(loader, 0)
out["plan_peak_bytes"] = tracemalloc.get_traced_memory()[1] - held
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="rows per collection, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="loaders built (and epochs planned) per size")
    parser.add_argument("--samplers", default="random,homogeneous,balanced")
    parser.add_argument("--rows-per-dataset", type=float, default=2e6)
    args = parser.parse_args()
    import statistics

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    samplers = args.samplers.split(",")
    paths = {n: build_collection(n, int(args.rows_per_dataset)) for n in sizes}
    print(f"{len(KEYS)} obs keys ({', '.join(KEYS)}); batch 4096, chunk 256 × 32; times are medians of "
          f"{args.rounds} rounds; B/row/key: held by the loader beyond load buffers and X's indptr")  # fmt: skip
    print(f"{'rows':>12s} {'sampler':12s} {'construct s':>11s} {'plan s/epoch':>12s} {'1st batch s':>11s} "
          f"{'B/row/key':>9s} {'indptr B/row':>12s} {'build peak B/row':>16s} {'plan peak B/row':>15s}")  # fmt: skip
    for path in paths.values():
        for sampler in samplers:
            r = run_child(_CHILD, str(path), sampler, str(args.rounds), ",".join(KEYS))
            rows = r["n_obs"]
            per_key = (r["held_bytes"] - r["indptr_bytes"]) / rows / len(KEYS)
            print(f"{rows:12,d} {sampler:12s} {statistics.median(r['construct_s']):11.2f} "
                  f"{statistics.median(r['plan_s']):12.3f} {r['first_batch_s']:11.2f} {per_key:9.2f} "
                  f"{r['indptr_bytes'] / rows:12.2f} {r['build_peak_bytes'] / rows:16.2f} "
                  f"{r['plan_peak_bytes'] / rows:15.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
