"""Sampler code written the way a user of the scverse ``annbatch`` 0.3 package writes it runs here unchanged.

Custom samplers in that package's ABC style (``_sample``, ``n_batches``, ``validate``, ``batch_size``,
``shuffle``; requests without ``splits``; ``rng`` and ``mask`` properties), ``n_batches`` on the
built-in samplers, ``WeightedClassSampler`` and ``DistributedSampler(dist_info=...)``. Every epoch is
checked against the source values: each batch's X rows equal the source rows its index names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

import annbatch
from annbatch import Loader
from annbatch.abc import Sampler
from annbatch.samplers import (
    ClassSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedClassSampler,
)
from annbatch.synthetic import make_adata
from annbatch.testing import check_sampler
from annbatch.types import LoaderOutput, LoadRequest

N_OBS, N_VARS = 600, 12


@pytest.fixture(scope="module")
def adata():
    return make_adata(N_OBS, N_VARS, seed=9, dense=True)


def epoch_rows(loader: Loader, adata) -> list[np.ndarray]:
    """One epoch; asserts every batch's X equals the source rows its index names. Returns the indices."""
    out = []
    for batch in loader:
        np.testing.assert_array_equal(np.asarray(batch["X"]), adata.X[batch["index"]])
        out.append(batch["index"])
    assert len(out) == len(loader)
    return out


# -- custom samplers in the 0.3 ABC style ------------------------------------------------------------------
class InOrderSampler(Sampler):
    """Reads chunk after chunk in order; leaves the splits to Sampler.sample."""

    def __init__(self, batch_size: int, chunk_size: int):
        self._batch_size = batch_size
        self._chunk_size = chunk_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        return False

    def validate(self, n_obs: int) -> None:
        if self._chunk_size > n_obs:
            raise ValueError("chunk_size exceeds n_obs")

    def n_batches(self, n_obs: int) -> int:
        return sum(
            -(-min(self._chunk_size, n_obs - s) // self._batch_size)
            for s in range(0, n_obs, self._chunk_size)
        )

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        for start in range(0, n_obs, self._chunk_size):
            yield {"requests": [slice(start, min(start + self._chunk_size, n_obs))]}


class ShuffledChunkSampler(Sampler):
    """Random chunk order drawn from ``self.rng``, explicit splits, honours ``self.mask``."""

    def __init__(self, batch_size: int, chunk_size: int, rng: np.random.Generator | None = None):
        self._batch_size = batch_size
        self._chunk_size = chunk_size
        self._rng = rng or np.random.default_rng()

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        return True

    def _bounds(self, n_obs: int) -> tuple[int, int]:
        start, stop, _ = self.mask.indices(n_obs)
        return start, stop

    def validate(self, n_obs: int) -> None:
        start, stop = self._bounds(n_obs)
        if stop <= start:
            raise ValueError(f"mask {self.mask} selects no rows")

    def n_batches(self, n_obs: int) -> int:
        start, stop = self._bounds(n_obs)
        return sum(
            -(-min(self._chunk_size, stop - s) // self._batch_size)
            for s in range(start, stop, self._chunk_size)
        )

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        start, stop = self._bounds(n_obs)
        starts = np.arange(start, stop, self._chunk_size)
        for s in self.rng.permutation(starts):
            n = min(self._chunk_size, stop - int(s))
            order = self.rng.permutation(n)
            yield {
                "requests": [slice(int(s), int(s) + n)],
                "splits": [order[i : i + self._batch_size] for i in range(0, n, self._batch_size)],
            }


def test_peer_style_sampler_without_splits(adata):
    sampler = InOrderSampler(batch_size=25, chunk_size=100)
    check_sampler(sampler, N_OBS, covers="mask", use_every_loaded_row=True)
    loader = Loader(batch_sampler=sampler, return_index=True).add_adata(adata)
    rows = epoch_rows(loader, adata)
    assert [len(r) for r in rows] == [25] * 24
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(N_OBS)), "shuffle=False keeps row order"


def test_peer_style_sampler_rng_and_mask(adata):
    sampler = ShuffledChunkSampler(batch_size=16, chunk_size=64, rng=np.random.default_rng(3))
    sampler.mask = slice(100, 500)
    assert sampler.mask == slice(100, 500)
    check_sampler(sampler, N_OBS, covers="mask")
    loader = Loader(batch_sampler=sampler, return_index=True).add_adata(adata)
    rows = np.concatenate(epoch_rows(loader, adata))
    np.testing.assert_array_equal(np.sort(rows), np.arange(100, 500))
    # the same generator state gives the same epoch
    again = ShuffledChunkSampler(batch_size=16, chunk_size=64)
    again.rng = np.random.default_rng(3)
    again.mask = slice(100, 500)
    other = Loader(batch_sampler=again, return_index=True).add_adata(adata)
    np.testing.assert_array_equal(np.concatenate(epoch_rows(other, adata)), rows)


def test_abstract_methods_are_required():
    class NoSample(Sampler):
        batch_size = 4
        shuffle = False

        def validate(self, n_obs):
            return None

        def n_batches(self, n_obs):
            return 0

    with pytest.raises(TypeError, match="_sample"):
        NoSample()

    class NoValidate(InOrderSampler):
        validate = Sampler.validate  # back to abstract

    with pytest.raises(TypeError, match="validate"):
        NoValidate(4, 8)


def test_splits_need_a_batch_size():
    class Unsized(InOrderSampler):
        @property
        def batch_size(self) -> None:
            return None

    with pytest.raises(ValueError, match="without 'splits' but its batch_size is None"):
        list(Unsized(4, 8).sample(16))


def test_carry_needs_splits():
    class CarryOnly(InOrderSampler):
        def _sample(self, n_obs):
            yield {"requests": [slice(0, 8)], "carry": np.arange(2)}

    with pytest.raises(ValueError, match="'carry' but without 'splits'"):
        list(CarryOnly(4, 8).sample(16))


# -- deprecated spellings ----------------------------------------------------------------------------------
def test_n_iters_is_a_deprecated_alias():
    s = RandomSampler(batch_size=8, chunk_size=4, preload_nchunks=4, seed=0)
    with pytest.warns(FutureWarning, match="n_batches"):
        assert s.n_iters(100) == s.n_batches(100) == 13


def test_sampler_written_against_the_old_abc_still_works(adata):
    with pytest.warns(FutureWarning, match="rename it n_batches"):

        class Legacy(Sampler):  # sample() and n_iters(), as this package's ABC had them
            @property
            def batch_size(self) -> int:
                return 50

            def sample(self, n_obs):
                for start in range(0, n_obs, 50):
                    yield {"requests": [slice(start, start + 50)], "splits": [np.arange(50)]}

            def n_iters(self, n_obs):
                return n_obs // 50

    s = Legacy()
    assert s.n_batches(N_OBS) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # using it warns no more
        loader = Loader(batch_sampler=s, return_index=True).add_adata(adata)
        assert len(epoch_rows(loader, adata)) == 12


# -- built-in samplers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RandomSampler, SequentialSampler])
def test_builtin_mask_and_rng_are_settable(cls, adata):
    sampler = cls(batch_size=32, chunk_size=16, preload_nchunks=4)
    assert sampler.mask == slice(0, None)
    sampler.mask = slice(50, 450)
    sampler.rng = np.random.default_rng(11)
    check_sampler(sampler, N_OBS, num_workers=2, covers="mask")
    loader = Loader(batch_sampler=sampler, return_index=True).add_adata(adata)
    rows = np.concatenate(epoch_rows(loader, adata))
    np.testing.assert_array_equal(np.sort(rows), np.arange(50, 450))
    randomness = (
        {"rng": np.random.default_rng(11)} if cls is RandomSampler else {}
    )  # sequential: no randomness
    twin = cls(batch_size=32, chunk_size=16, preload_nchunks=4, mask=slice(50, 450), **randomness)
    twin_loader = Loader(batch_sampler=twin, return_index=True).add_adata(adata)
    np.testing.assert_array_equal(np.concatenate(epoch_rows(twin_loader, adata)), rows)
    with pytest.raises(ValueError, match="mask"):
        sampler.mask = slice(10, 5)


def test_class_sampler_peer_keywords_and_mask(adata):
    classes = pd.Categorical(np.repeat(["a", "b", "c"], [200, 250, 150]))
    sampler = ClassSampler(
        chunk_size=25, preload_nchunks=4, batch_size=20, classes=classes, rng=np.random.default_rng(0)
    )
    sampler.mask = slice(100, 400)
    check = check_sampler(sampler, N_OBS, covers="mask")
    for batch in (b for worker in check.batches for b in worker):
        assert len(set(classes[batch])) == 1, "every batch holds one class"
    assert sampler.n_batches(N_OBS) == sum(map(len, check.batches))


def test_weighted_class_sampler_mixes_classes_by_weight(adata):
    classes = pd.Categorical(np.repeat(["a", "b", "c"], [400, 150, 50]))
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    sampler = WeightedClassSampler(
        classes,
        batch_size=40,
        chunk_size=10,
        preload_nchunks=8,
        class_weights=weights,
        num_samples=20_000,
        seed=0,
    )
    check = check_sampler(sampler, N_OBS)
    codes = np.asarray(classes.codes)
    for request in check.requests[0]:
        for s in request["requests"]:
            assert len(set(codes[s])) == 1, "every read lies within one class"
    batches = check.batches[0]
    mixed = np.mean([len(set(codes[b])) > 1 for b in batches])
    assert mixed > 0.9, "the rows of a load are shuffled together, so batches mix classes"
    share = np.bincount(codes[check.rows], minlength=3) / len(check.rows)
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=0.04)
    assert sampler.class_weights.tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="class_weights"):
        WeightedClassSampler(classes, 40, 10, 8, class_weights={"z": 1.0})
    # in a loader, against the source
    loader = Loader(batch_sampler=sampler, return_index=True).add_adata(adata)
    assert len(epoch_rows(loader, adata)) == 500


def test_balanced_shorthand_names_class_weights(adata):
    with pytest.raises(ValueError, match="class_weights names labels"):
        Loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_sampler="balanced", batch_key="cell_type",
               class_weights={"nope": 1.0}).add_adata(adata)  # fmt: skip


# -- DistributedSampler(dist_info=...) ---------------------------------------------------------------------
@pytest.mark.parametrize("enforce", [True, False])
def test_distributed_dist_info_callable(enforce, adata):
    base = RandomSampler(chunk_size=16, preload_nchunks=4, batch_size=32, rng=np.random.default_rng(1))
    per_rank = []
    for rank in range(3):
        ds = DistributedSampler(base, dist_info=lambda rank=rank: (rank, 3), enforce_equal_batches=enforce)
        assert ds.rank_world() == (rank, 3) and ds.equal_batches is enforce
        loader = Loader(batch_sampler=ds, return_index=True).add_adata(adata)
        per_rank.append(np.concatenate(epoch_rows(loader, adata)))
    everything = np.concatenate(per_rank)
    assert len(np.unique(everything)) == len(everything), "ranks read disjoint rows"
    if enforce:
        assert len({len(r) for r in per_rank}) == 1
    else:
        np.testing.assert_array_equal(np.sort(everything), np.arange(N_OBS))


def test_distributed_forwards_mask_and_rng():
    inner = RandomSampler(batch_size=8, chunk_size=8, preload_nchunks=2, seed=0)
    ds = DistributedSampler(inner, dist_info=lambda: (0, 2))
    ds.mask = slice(0, 100)
    assert inner.mask == ds.mask == slice(0, 100)
    gen = np.random.default_rng(4)
    ds.rng = gen
    assert inner.rng is gen and ds.rng is gen
    rows = [
        check_sampler(DistributedSampler(inner, dist_info=lambda r=r: (r, 2)), N_OBS).rows for r in (0, 1)
    ]
    assert np.concatenate(rows).max() < 100


def test_distributed_dist_info_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    ds = DistributedSampler(RandomSampler(8, 8, 2, seed=0), dist_info="torch")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ds.rank_world()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert ds.rank_world() == (0, 1)
        assert torch.distributed.is_initialized()
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="dist_info"):
        DistributedSampler(RandomSampler(8, 8, 2), dist_info="mpi")
    with pytest.raises(ValueError, match="not both"):
        DistributedSampler(RandomSampler(8, 8, 2), dist_info="torch", rank=0)


# -- annbatch.testing and annbatch.types ---------------------------------------------------------------------
def test_check_sampler_reports_broken_samplers():
    class WrongCount(InOrderSampler):
        def n_batches(self, n_obs: int) -> int:
            return 1

    with pytest.raises(AssertionError, match=r"n_batches\(100\) returned 1"):
        check_sampler(WrongCount(10, 20), 100)

    class Unseeded(InOrderSampler):
        def _sample(self, n_obs):
            for s in np.random.default_rng().permutation(np.arange(0, n_obs, self._chunk_size)):
                yield {"requests": [slice(int(s), int(s) + self._chunk_size)]}

    # 100 chunks: two unseeded orders coincide with probability 1/100! (5 chunks made it 1/120, and flaky)
    with pytest.raises(AssertionError, match="different requests"):
        check_sampler(Unseeded(10, 20), 2_000)

    class OutOfRange(InOrderSampler):
        def _sample(self, n_obs):
            yield {"requests": [slice(n_obs - 5, n_obs + 5)]}

    with pytest.raises(AssertionError, match="outside"):
        check_sampler(OutOfRange(10, 20), 100)

    class Twice(InOrderSampler):
        def _sample(self, n_obs):
            yield from super()._sample(n_obs)
            yield {"requests": [slice(0, 10)]}

        def n_batches(self, n_obs: int) -> int:
            return super().n_batches(n_obs) + 1

    with pytest.raises(AssertionError, match="came twice"):
        check_sampler(Twice(10, 20), 100)


def test_types_of_the_peer_api():
    assert LoadRequest.__required_keys__ == {"requests"}
    assert set(LoaderOutput.__required_keys__) >= {"X", "obs", "index"}
    assert LoaderOutput[np.ndarray] is not None  # generic in the type of X
    for alias in ("BackingArray_T", "InputInMemoryArray_T", "OutputInMemoryArray_T"):
        assert hasattr(annbatch.types, alias)
