"""Worker benchmark: the loader inside ``torch.utils.data.DataLoader`` workers against the loader in-process.

Builds (once, cached under ``benchmarks/data/``) a sparse collection of 100,000 cells × 20,000 genes
(~1,000 nnz/row, float32, 2 datasets) and reads it with ``batch_size=4096, chunk_size=256,
preload_nchunks=32`` and ``obs_keys=["cell_type"]``, for ``to=None`` (scipy CSR) and ``to="torch"``
(sparse CSR tensors). Measured in one process, per round:

(a) in-process: one epoch of the loader in this process;
(b) batch transfer: the same epoch's batches, made beforehand in a spawned process, sent here the
    way torch moves tensors out of a DataLoader worker: every array as a torch tensor (scipy CSR X as
    its three arrays), ``(index, batch)`` put on a queue of torch's spawn context, so ``ForkingPickler``
    with torch's reductions copies each array into shared memory and passes its file descriptor;
(c) one epoch of ``DataLoader(loader, batch_size=None, num_workers=w, persistent_workers=True,
    multiprocessing_context="spawn")`` for each ``w`` (workers stay alive between rounds).

The first round warms up (numba compilation, page cache, buffer pools; for (c) it is epoch 1, which
starts the workers). This shared VM drifts within a minute, so every mode runs once per round and the
figures are medians over the later rounds; the ratio is the median of the per-round ratios
(c) / ((a) + (b)). The target is 1.10: after the first epoch, workers cost at most 10 % over the loader
plus the batch transfer. The CPU columns (user + system seconds of this process and its children: the
workers, the sender) are less sensitive to other load on the machine than wall time.

Usage::

    python benchmarks/workers.py [--rounds 5] [--workers 1 2] [--to none torch] [--n-obs 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

DATA = Path(__file__).parent / "data"
LOADER = {"batch_size": 4096, "chunk_size": 256, "preload_nchunks": 32, "obs_keys": ["cell_type"]}
TARGET = 1.10


def build_collection(n_obs: int, n_vars: int, nnz: int) -> Path:
    """The benchmark collection: 2 synthetic datasets of ``n_obs / 2`` cells (generated once)."""
    import annbatch
    from annbatch.synthetic import make_adata

    path = DATA / f"workers_{n_obs}x{n_vars}_{nnz}.zarr"
    if not (path / "dataset_0").exists():
        half = n_obs // 2
        adatas = [make_adata(half, n_vars, nnz_per_row=nnz, seed=s, obs_prefix=f"d{s}") for s in range(2)]
        annbatch.Collection(path, mode="w-").add_adatas(adatas, seed=0, progress=False)
    return path


def _loader(path: str, to: str | None):
    import annbatch

    return annbatch.Collection(path, mode="r").loader(seed=0, to=to, **LOADER)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children: DataLoader workers, the sender."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _epoch(batches, ready=None) -> tuple[float, float, int]:
    """Wall and CPU seconds of one pass over ``batches``, and the rows it yielded."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    if ready is not None:
        ready()
    rows = sum(_rows(b) for b in batches)
    return time.perf_counter() - start, _cpu_seconds() - cpu, rows


def _as_tensors(batch: dict) -> dict:
    """A batch as a DataLoader worker would send it if every array were a torch tensor."""
    import scipy.sparse as sp
    import torch
    from torch.utils.data._utils.collate import default_convert  # what DataLoader applies in the worker

    x = batch["X"]
    if sp.issparse(x):  # not shareable as it is: its three arrays, zero-copy
        x = [torch.from_numpy(a) for a in (x.indptr, x.indices, x.data)]
    return default_convert({**batch, "X": x})


def _rows(batch: dict) -> int:
    x = batch["X"]
    return len(x[0]) - 1 if isinstance(x, list) else x.shape[0]


def _transfer_worker(path: str, to: str | None, results, control) -> None:
    """(b)'s sender, in a spawned process: per round, one epoch of batches made first, then sent."""
    warnings.simplefilter("ignore")  # torch's sparse-CSR beta warnings
    loader = _loader(path, to)
    while control.get() == "next":
        # A new epoch every round: torch moves a sent tensor's memory into shared memory, so sending it
        # again would cost nothing. Batches stay valid while held (the loader then reads into new buffers).
        batches = [_as_tensors(b) for b in loader]
        results.put(len(batches))
        control.get()  # go
        for i, b in enumerate(batches):
            results.put((i, b))
        del batches
    # returning only now keeps this process's fd sharer alive until every tensor was received


class Transfer:
    """(b): sends one epoch of the loader's batches from a spawned process to this one, per call."""

    def __init__(self, path: str, to: str | None):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # what DataLoader(multiprocessing_context="spawn") uses
        self._results, self._control = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(
            target=_transfer_worker, args=(path, to, self._results, self._control), daemon=True
        )
        self._proc.start()

    def epoch(self) -> tuple[float, float, int]:
        self._control.put("next")
        n = self._results.get()  # the sender has its batches ready
        return _epoch((self._results.get()[1] for _ in range(n)), ready=lambda: self._control.put("go"))

    def close(self) -> None:
        self._control.put("stop")
        self._proc.join(timeout=10)
        if self._proc.is_alive():  # stopped mid-round (an error here): it waits for a "go"
            self._proc.terminate()
        for queue in (self._results, self._control):
            queue.close()
            queue.join_thread()


def run(path: Path, to: str | None, workers: list[int], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per epoch of every mode, one list per mode (round 0 first)."""
    from torch.utils.data import DataLoader

    loader = _loader(str(path), to)
    transfer = Transfer(str(path), to)
    loaders = {
        w: DataLoader(
            _loader(str(path), to),
            batch_size=None,
            num_workers=w,
            persistent_workers=True,
            multiprocessing_context="spawn",
        )  # fmt: skip
        for w in workers
    }
    modes = {"a": lambda: _epoch(loader), "b": transfer.epoch}
    modes.update({f"c{w}": (lambda dl=dl: _epoch(dl)) for w, dl in loaders.items()})
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for _ in range(rounds + 1):
            for mode, fn in modes.items():
                seconds, cpu, rows = fn()
                if rows != loader.n_obs:
                    raise RuntimeError(f"{mode}: {rows} rows in an epoch of {loader.n_obs}")
                times[mode].append((seconds, cpu))
    finally:
        transfer.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds, after one warm-up round")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--to", nargs="+", choices=["none", "torch"], default=["none", "torch"])
    parser.add_argument("--n-obs", type=int, default=100_000)
    parser.add_argument("--n-vars", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=1000, help="mean non-zeros per row")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # torch's sparse-CSR beta warnings, DataLoader's length warning
    path = build_collection(args.n_obs, args.n_vars, args.nnz)
    print(f"{args.n_obs:,} cells × {args.n_vars:,} genes, ~{args.nnz:,} nnz/row (CSR float32); "
          f"{', '.join(f'{k}={v}' for k, v in LOADER.items())}; DataLoader: spawn, persistent_workers=True; "
          f"seconds per epoch, medians over {args.rounds} rounds after a warm-up round")  # fmt: skip
    print(f"{'to':6s} {'mode':28s} {'epoch 1':>8s} {'epochs 2+':>10s} {'CPU 2+':>8s} {'c / (a + b)':>12s} "
          f"{'CPU c / (a + b)':>16s}")  # fmt: skip
    med = statistics.median
    for to_name in args.to:
        t = run(path, None if to_name == "none" else to_name, args.workers, args.rounds)
        rows = {"(a) loader in-process": t["a"][1:], "(b) batch transfer": t["b"][1:]}
        rows["(a) + (b)"] = [(wa + wb, ca + cb) for (wa, ca), (wb, cb) in zip(*rows.values(), strict=True)]
        ab = rows["(a) + (b)"]
        for name, r in rows.items():
            print(
                f"{to_name:6s} {name:28s} {'':8s} {med(w for w, _ in r):9.2f}s {med(c for _, c in r):7.2f}s"
            )
        for w in args.workers:
            c = t[f"c{w}"]
            wall = med(x[0] / y[0] for x, y in zip(c[1:], ab, strict=True))
            cpu = med(x[1] / y[1] for x, y in zip(c[1:], ab, strict=True))
            verdict = "within" if wall <= TARGET else "OVER"
            name = f"(c) DataLoader, {w} worker" + "s" * (w > 1)
            print(f"{to_name:6s} {name:28s} {c[0][0]:7.2f}s {med(x[0] for x in c[1:]):9.2f}s "
                  f"{med(x[1] for x in c[1:]):7.2f}s {wall:6.2f} {verdict:>6s} {cpu:16.2f}", flush=True)  # fmt: skip
    print(f"target: (c) / ((a) + (b)) <= {TARGET:.2f} for epochs 2+ (medians of the per-round ratios)")


if __name__ == "__main__":  # needed with spawn: the transfer process and the workers import this module
    main()
