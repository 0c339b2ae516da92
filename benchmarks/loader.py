"""Loader benchmark: shuffled-epoch throughput against the sequential limit, peak RSS, and a training loop.

Builds (once, cached under ``benchmarks/data/``) a sparse collection of 200,000 cells × 20,000 genes
(~1,500 nnz/row, float32) and a dense one of 200,000 × 512 float32. For chunk_size/preload_nchunks
256/32 and 32/256 at batch size 4096 it prints cells/s and the share of the *sequential limit*: reading
and decoding the same X front to back in large contiguous slices, by the faster of zarr-python with the
zarrs pipeline and annbatch's own engine (unshuffled 8192-row loads). This shared VM drifts by ±20 %
within a minute, so all modes run in one process, one epoch each per round, and shares are medians of
the per-round ratios. Peak RSS is measured per configuration in a fresh process. A last line drives a
small torch linear model with the loader and compares it with the model step alone and the loader alone.

Usage::

    python benchmarks/loader.py [--epochs 5] [--only sparse|dense] [--n-obs-per-chunk 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _child import run_child  # benchmarks/_child.py: scripts run from this folder

DATA = Path(__file__).parent / "data"
CONFIGS = [(256, 32), (32, 256)]


def build_collections(n_obs_per_chunk: int) -> dict[str, Path]:
    """The sparse and dense benchmark collections (generated once)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    import annbatch
    from annbatch.synthetic import make_adata

    out = {}
    sparse = DATA / f"loader_sparse_200k_c{n_obs_per_chunk}.zarr"
    if not (sparse / "dataset_0").exists():
        from convert import make_inputs  # the conversion benchmark's cached 4 × 50,000 inputs

        paths = make_inputs(4, 50_000, 20_000, 1500)
        annbatch.Collection(sparse, mode="w-").add_adatas(paths, seed=0, n_obs_per_chunk=n_obs_per_chunk)
    out["sparse"] = sparse
    dense = DATA / f"loader_dense_200k_c{n_obs_per_chunk}.zarr"
    if not (dense / "dataset_0").exists():
        obs = make_adata(200_000, 64, nnz_per_row=8, seed=0).obs  # same obs columns as the sparse data
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200_000, 512), dtype=np.float32)  # embedding-like: barely compressible
        adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"dim_{i}" for i in range(512)]))
        annbatch.Collection(dense, mode="w-").add_adatas([adata], seed=0, n_obs_per_chunk=n_obs_per_chunk)
    out["dense"] = dense
    return out


_CHILD = r"""
import json, statistics, sys, time
import numpy as np, zarr
import annbatch
from annbatch._zarr import zarrs_pipeline
task, path, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
coll = annbatch.Collection(path, mode="r")

def zarrs_front_to_back():  # zarr-python + zarrs, 2**24-element slices
    n = 0
    with zarrs_pipeline():
        for g in coll:
            x = g["X"]
            arrays = [x] if isinstance(x, zarr.Array) else [x["data"], x["indices"]]
            arrays = [zarr.open_array(a.store, path=a.path, mode="r") for a in arrays]
            step = 2**24 // max(1, int(np.prod(arrays[0].shape[1:])))
            for a in arrays:
                for s in range(0, a.shape[0], step):
                    a[s : s + step]
            n += x.shape[0] if isinstance(x, zarr.Array) else x.attrs["shape"][0]
    return n

def loader_epoch(loader):
    return lambda: sum(b["X"].shape[0] for b in loader)

def shuffled(chunk, preload, **kw):
    return coll.loader(batch_size=4096, chunk_size=chunk, preload_nchunks=preload, seed=0, **kw)

if task == "rates":  # every mode once per round, rounds repeated: ratios within a round are fair on a noisy box
    modes = {
        "sequential (zarrs)": zarrs_front_to_back,
        # our engine front to back: 8192-row contiguous loads, no in-memory shuffle
        "sequential (annbatch)": loader_epoch(coll.loader(batch_size=4096, chunk_size=8192, preload_nchunks=1,
                                                         shuffle=False)),
        "256/32": loader_epoch(shuffled(256, 32)),
        "32/256": loader_epoch(shuffled(32, 256)),
        "256/32+obs": loader_epoch(shuffled(256, 32, obs_keys=["cell_type", "n_counts", "n_genes", "is_doublet"],
                                            batch_key="donor")),
    }
    for fn in modes.values():  # warm-up: numba compilation, page cache, buffer pools
        fn()
    rates = {name: [] for name in modes}
    for _ in range(epochs):
        for name, fn in modes.items():
            t = time.perf_counter(); n = fn(); rates[name].append(n / (time.perf_counter() - t))
    print(json.dumps(rates))
else:  # peak RSS of one mode, alone in its process
    chunk, preload = map(int, task.split("/"))
    loader = shuffled(chunk, preload)
    for _ in range(epochs):
        sum(b["X"].shape[0] for b in loader)
    print(json.dumps({"peak_rss_gib": next(int(l.split()[1]) for l in open("/proc/self/status")
                                           if l.startswith("VmHWM:")) / 2**20}))
"""

_TRAIN = r"""
import json, statistics, sys, time
import numpy as np, torch
import annbatch
path, epochs = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
coll = annbatch.Collection(path, mode="r")
loader = coll.loader(batch_size=4096, chunk_size=256, preload_nchunks=32, seed=0, to="torch")
model = torch.nn.Linear(coll.n_vars, 32)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
def step(x):
    opt.zero_grad(); loss = model(x).square().mean(); loss.backward(); opt.step()
def run(fn):
    rates = []
    for _ in range(epochs):
        t = time.perf_counter(); n = fn(); rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)
first = next(iter(loader))["X"]
n_batches = len(loader)
def model_only():
    for _ in range(n_batches): step(first)
    return n_batches * first.shape[0]
def loader_only():
    return sum(b["X"].shape[0] for b in loader)
def both():
    n = 0
    for b in loader:
        step(b["X"]); n += b["X"].shape[0]
    return n
print(json.dumps({"model": run(model_only), "loader": run(loader_only), "both": run(both)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="rounds (one epoch of every mode each)")
    parser.add_argument("--only", choices=["sparse", "dense"], default=None)
    parser.add_argument("--n-obs-per-chunk", type=int, default=32)
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    collections = build_collections(args.n_obs_per_chunk)
    print(f"{args.epochs} rounds; cells/s are medians over rounds, shares are medians of the per-round ratio to "
          "the faster sequential reader of that round")  # fmt: skip
    print(f"{'data':7s} {'mode':22s} {'cells/s':>10s} {'of limit':>9s} {'peak RSS':>9s}")
    for kind, path in collections.items():
        if args.only and kind != args.only:
            continue
        rates = run_child(_CHILD, "rates", str(path), str(args.epochs))
        limit = [
            max(a, b)
            for a, b in zip(rates["sequential (zarrs)"], rates["sequential (annbatch)"], strict=True)
        ]
        for mode, r in rates.items():
            share = statistics.median(100 * x / lim for x, lim in zip(r, limit, strict=True))
            rss = (f"{run_child(_CHILD, mode, str(path), '2')['peak_rss_gib']:5.2f} GiB"
                   if mode in ("256/32", "32/256") else "")  # fmt: skip
            print(f"{kind:7s} {mode:22s} {statistics.median(r):10,.0f} {share:7.0f} % {rss:>9s}", flush=True)
    if not args.no_train and args.only != "dense":
        r = run_child(_TRAIN, str(collections["sparse"]), str(args.epochs))
        slower = min(r["model"], r["loader"])
        print(f"\ntraining (sparse, 256/32, torch Linear({20_000}→32), cells/s): model step alone "
              f"{r['model']:,.0f}; loader alone {r['loader']:,.0f}; loader + model {r['both']:,.0f} "
              f"({100 * r['both'] / slower:.0f} % of the slower of the two)")  # fmt: skip


if __name__ == "__main__":
    main()
