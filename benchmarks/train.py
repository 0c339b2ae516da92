"""Training benchmark: the bare loader against Lightning fits through CollectionDataModule.

On the loader benchmark's sparse collection (200,000 cells × 20,000 genes, ~1,500 nnz/row, built
once by ``benchmarks/loader.py``'s builder and cached under ``benchmarks/data/``), batch 4096,
chunk_size 256, preload_nchunks 32, it measures cells/s of one training epoch for:

(a) the bare loader: ``CollectionDataModule.train_dataloader()`` iterated, nothing done per batch;
(b) a Lightning fit through the DataModule with a model that only touches X (one parameter times the
    sum of the batch's values), so the figure is the data path plus Lightning's per-step work;
(c) the reference classifier (``annbatch.models.Classifier``, logistic regression on cell_type).

The three run in one process, one epoch each per round, in a rotating order, because this shared VM
drifts by ±20 % within a minute; "of (a)" is the median over rounds of the per-round ratio. An epoch
is timed from its first batch request to its end (a Lightning callback for (b) and (c)), so Trainer
start-up is not counted. torch uses one thread (the loader's decoding threads use the other core).

Usage::

    python benchmarks/train.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n-obs-per-chunk", type=int, default=32)
    args = parser.parse_args()

    from loader import build_collections

    path = build_collections(args.n_obs_per_chunk)["sparse"]

    import lightning as L
    import torch

    from annbatch.lightning import CollectionDataModule
    from annbatch.models import Classifier

    torch.set_num_threads(1)

    class TouchX(L.LightningModule):
        """One parameter times the sum of the batch's stored values: the least a model can do with X."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            x = batch["X"]
            values = x.values() if x.layout != torch.strided else x
            return self.w * values.sum() * 1e-9

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    def datamodule() -> CollectionDataModule:
        return CollectionDataModule(path, batch_size=4096, chunk_size=256, preload_nchunks=32,
                                    obs_keys=["cell_type"], val_fraction=0, seed=0)  # fmt: skip

    dms = {mode: datamodule() for mode in "abc"}
    n_cells = len(dms["a"].train_rows)
    dms["a"].setup("fit")

    def bare() -> float:
        start = time.perf_counter()
        for _ in dms["a"].train_dataloader():
            pass
        return time.perf_counter() - start

    def fit(mode: str) -> float:
        model = TouchX() if mode == "b" else Classifier(label_key="cell_type")
        timer = EpochTimer()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(model, datamodule=dms[mode])
        return timer.seconds

    runs = {"a": bare, "b": lambda: fit("b"), "c": lambda: fit("c")}
    runs["b"]()  # warm-up: numba kernels, Lightning imports
    seconds: dict[str, list[float]] = {m: [] for m in "abc"}
    for r in range(args.rounds):
        order = "abc"[r % 3 :] + "abc"[: r % 3]
        for mode in order:
            seconds[mode].append(runs[mode]())
        print(f"round {r + 1}: " + ", ".join(f"({m}) {n_cells / seconds[m][-1]:,.0f}" for m in "abc"), flush=True)

    names = {"a": "bare loader", "b": "Lightning fit, model touches X", "c": "Lightning fit, Classifier"}
    print(f"\n{n_cells:,} cells per epoch, batch 4096, chunk 256 × 32, {args.rounds} rounds (medians)")
    print(f"{'mode':<36} {'cells/s':>12} {'of (a)':>8}")
    for m in "abc":
        rate = statistics.median(n_cells / s for s in seconds[m])
        share = statistics.median(a / s for a, s in zip(seconds["a"], seconds[m], strict=True))
        print(f"({m}) {names[m]:<32} {rate:>12,.0f} {share:>8.0%}")


if __name__ == "__main__":
    main()
