"""Property tests for the samplers: coverage, disjointness, batch sizes, determinism, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from annbatch.abc import Sampler
from annbatch.samplers import DistributedSampler, RandomSampler, SequentialSampler
from annbatch.testing import check_requests, check_sampler

FAST = settings(max_examples=60, deadline=None)


def resolve(stream, *, every_row: bool = True) -> tuple[list[np.ndarray], list[dict]]:
    """Batches of global rows of a stream of LoadRequests, checked by annbatch.testing.

    ``every_row=False`` allows loads that read rows they do not use (a distributed sampler's loads
    re-read the rows carried into them, which their origin load reads too).
    """
    requests = list(stream)
    return check_requests(requests, use_every_loaded_row=every_row), requests


def worker_batches(sampler: Sampler, n_obs: int, num_workers: int) -> list[list[np.ndarray]]:
    every_row = not isinstance(sampler, DistributedSampler)
    check = check_sampler(
        sampler, n_obs, epoch=sampler.epoch, num_workers=num_workers, use_every_loaded_row=every_row
    )
    return check.batches


def check_sizes(batches: list[np.ndarray], batch_size: int, drop_last: bool) -> None:
    for b in batches[:-1]:
        assert len(b) == batch_size
    if batches:
        assert 0 < len(batches[-1]) <= batch_size
        if drop_last:
            assert len(batches[-1]) == batch_size


def flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)


@st.composite
def configs(draw, max_n: int = 5000):
    n_obs = draw(st.integers(1, max_n))
    chunk_size = draw(st.integers(1, 400))
    preload = draw(st.integers(1, 8))
    batch_size = draw(st.integers(1, min(chunk_size * preload, 1024)))
    start = draw(st.integers(0, n_obs - 1))
    stop = draw(st.integers(start + 1, n_obs))
    mask = draw(st.sampled_from([None, slice(start, stop), slice(start, None), slice(None, stop)]))
    return {
        "n_obs": n_obs,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "preload_nchunks": preload,
        "mask": mask,
        "drop_last": draw(st.booleans()),
        "num_workers": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**32)),
        "shuffle": draw(st.booleans()),
    }


def masked_rows(n_obs: int, mask: slice | None) -> np.ndarray:
    return np.arange(n_obs)[mask or slice(None)]


def make(cfg: dict, **kw) -> RandomSampler:
    args = {k: v for k, v in cfg.items() if k not in ("n_obs", "num_workers")}
    return RandomSampler(**{**args, **kw})


@FAST
@given(cfg=configs())
def test_each_row_once_per_epoch(cfg):
    n_obs, w, bs = cfg["n_obs"], cfg["num_workers"], cfg["batch_size"]
    expected = masked_rows(n_obs, cfg["mask"])
    full = worker_batches(make(cfg, drop_last=False), n_obs, w)
    all_rows = flat([flat(b) for b in full])
    assert np.array_equal(np.sort(all_rows), expected)
    for batches in full:
        check_sizes(batches, bs, drop_last=False)
    # drop_last only removes each worker's final partial batch; everything before is identical
    dropped = worker_batches(make(cfg, drop_last=True), n_obs, w)
    missing = 0
    for b_full, b_drop in zip(full, dropped, strict=True):
        check_sizes(b_drop, bs, drop_last=True)
        keep = b_full if not b_full or len(b_full[-1]) == bs else b_full[:-1]
        assert len(b_drop) == len(keep)
        assert all(np.array_equal(x, y) for x, y in zip(b_drop, keep, strict=True))
        missing_here = sum(map(len, b_full)) - sum(map(len, b_drop))
        assert missing_here < bs
        missing += missing_here
    dropped_rows = flat([flat(b) for b in dropped])
    assert len(np.unique(dropped_rows)) == len(dropped_rows) == len(expected) - missing


@FAST
@given(cfg=configs())
def test_workers_disjoint_and_counts_seed_independent(cfg):
    n_obs, w = cfg["n_obs"], cfg["num_workers"]
    per_worker = [flat(b) for b in worker_batches(make(cfg), n_obs, w)]
    for i in range(w):
        for j in range(i + 1, w):
            assert not np.intersect1d(per_worker[i], per_worker[j]).size
    # how many rows (and batches) each worker gets does not depend on the seed
    other = make(cfg, seed=cfg["seed"] + 1)
    for i in range(w):
        other.set_worker(i, w)
        assert sum(1 for r in other.sample(n_obs) for _ in r["splits"]) == other.n_batches(n_obs)
        assert len(flat(resolve(other.sample(n_obs))[0])) == len(per_worker[i])


def shares(ds: DistributedSampler, n_obs: int, world: int, num_workers: int) -> list[list[np.ndarray]]:
    """Batches of every (rank, worker) share of a distributed sampler, as global rows."""
    out = []
    for rank in range(world):
        ds._rank, ds._world_size = rank, world
        out.extend(worker_batches(ds, n_obs, num_workers))
    return out


def global_rows(cfg: dict, n_obs: int, epoch: int = 0) -> np.ndarray:
    inner = make(cfg)
    inner.set_epoch(epoch)
    return flat(resolve(inner.sample(n_obs))[0])


@FAST
@given(cfg=configs(), world=st.integers(1, 4), equal=st.booleans())
def test_distributed_shards(cfg, world, equal):
    n_obs, w, bs = cfg["n_obs"], cfg["num_workers"], cfg["batch_size"]
    user = make(cfg)
    ds = DistributedSampler(user, rank=0, world_size=world, equal_batches=equal)
    ds.set_epoch(1)
    assert user.epoch == 1 and user.mask == (cfg["mask"] or slice(0, None)), "wrapped sampler keeps its settings"
    per_share = shares(ds, n_obs, world, w)
    for batches in per_share:
        check_sizes(batches, bs, cfg["drop_last"])
    rows = flat([flat(b) for b in per_share])
    assert len(np.unique(rows)) == len(rows), "shares overlap"
    everything = global_rows(cfg, n_obs, epoch=1)  # one global order, whatever the world size
    assert np.isin(rows, everything).all()
    if equal:
        assert len({len(b) for b in per_share}) == 1
    else:
        assert np.array_equal(np.sort(rows), np.sort(everything))


class _Labelled(Sampler):
    """A custom sampler whose loads carry rows into the next: any sampler can be distributed."""

    def __init__(self, n_loads: int, rows: int, batch_size: int, seed: int):
        self._n, self._rows, self._bs, self._seed = n_loads, rows, batch_size, seed

    @property
    def batch_size(self) -> int:
        return self._bs

    def sample(self, n_obs):
        rng = np.random.default_rng([self._seed, self._epoch])
        carried = 0
        for i in range(self._n):
            start = i * self._rows
            loaded = carried + self._rows
            order = rng.permutation(loaded)
            n_full = loaded // self._bs
            req = {"requests": [slice(start, start + self._rows)],
                   "splits": [order[j * self._bs : (j + 1) * self._bs] for j in range(n_full)]}
            rest = order[n_full * self._bs :]
            if i == self._n - 1:
                if len(rest):
                    req["splits"].append(rest)
            elif len(rest):
                req["carry"] = rest
            carried = len(rest) if i < self._n - 1 else 0
            yield req

    def n_batches(self, n_obs):
        return -(-self._n * self._rows // self._bs)


@FAST
@given(n_loads=st.integers(1, 12), rows=st.integers(3, 40), bs=st.integers(1, 3), world=st.integers(1, 4))
def test_distributed_wraps_custom_samplers(n_loads, rows, bs, world):
    bs = min(bs * 5, rows)
    n_obs = n_loads * rows
    ds = DistributedSampler(_Labelled(n_loads, rows, bs, seed=3), rank=0, world_size=world, equal_batches=False)
    per_share = shares(ds, n_obs, world, 1)
    rows_ = flat([flat(b) for b in per_share])
    assert np.array_equal(np.sort(rows_), np.arange(n_obs)), "carried rows reach exactly one rank"


def test_distributed_wraps_class_and_weighted_samplers():
    from annbatch.samplers import ClassSampler, WeightedSampler

    labels = np.repeat(np.array(["a", "b", "c"]), [300, 500, 200])
    for inner in (ClassSampler(labels, 16, 8, 4, seed=1), WeightedSampler(labels, 16, 8, 4, num_samples=640, seed=1)):
        per_share = shares(DistributedSampler(inner, rank=0, world_size=3), len(labels), 3, 1)
        assert len({len(b) for b in per_share}) == 1 and len(per_share[0]) > 0
        if isinstance(inner, ClassSampler):
            rows = flat([flat(b) for b in per_share])
            assert len(np.unique(rows)) == len(rows)
            for b in (x for share in per_share for x in share):
                assert len(set(labels[b])) == 1, "batches stay homogeneous"


def consume(ds: DistributedSampler, n_obs: int, world: int, k: int | None, history=()) -> list[np.ndarray]:
    """Rows of the first ``k`` (``None``: all) batches of every rank of a (possibly resumed) run."""
    out = []
    for rank in range(world):
        ds._rank, ds._world_size = rank, world
        batches, _ = resolve(ds._resumed(history).sample(n_obs), every_row=False)
        out.extend(batches[:k])
    return out


@FAST
@given(cfg=configs(max_n=3000), worlds=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       fracs=st.lists(st.floats(0, 1), min_size=3, max_size=3), equal=st.booleans())
def test_elastic_resumption_never_repeats_a_row(cfg, worlds, fracs, equal):
    cfg = {**cfg, "num_workers": 1}
    n_obs = cfg["n_obs"]
    ds = DistributedSampler(make(cfg), rank=0, world_size=1, equal_batches=equal)
    seen, history = [], []
    for i, world in enumerate(worlds):
        ds._rank, ds._world_size = 0, world
        n = ds._resumed(history).n_batches(n_obs)
        last = i == len(worlds) - 1
        k = None if last else int(fracs[i] * n)  # the last run goes to the end on every rank
        seen.extend(consume(ds, n_obs, world, k, history))
        history.append((world, k))
    rows = flat(seen)
    assert len(np.unique(rows)) == len(rows), "a row was yielded twice in the epoch"
    everything = global_rows(cfg, n_obs)
    assert np.isin(rows, everything).all()
    if not equal:
        assert np.array_equal(np.sort(rows), np.sort(everything)), "rows are lost only by truncation"


@FAST
@given(cfg=configs(max_n=2000), epoch=st.integers(0, 50))
def test_deterministic_per_seed_and_epoch(cfg, epoch):
    n_obs, w = cfg["n_obs"], cfg["num_workers"]
    a, b = make(cfg), make(cfg)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    ba, bb = worker_batches(a, n_obs, w), worker_batches(b, n_obs, w)
    assert all(
        np.array_equal(x, y) for xs, ys in zip(ba, bb, strict=True) for x, y in zip(xs, ys, strict=True)
    )
    # rng given: the base seed is drawn once, so two generators with the same seed agree
    args = {k: v for k, v in cfg.items() if k != "seed"}
    c = make(args, rng=np.random.default_rng(0))
    d = make(args, rng=np.random.default_rng(0))
    assert c.seed == d.seed
    c.set_epoch(epoch)
    d.set_epoch(epoch)
    assert all(
        np.array_equal(x, y)
        for xs, ys in zip(worker_batches(c, n_obs, w), worker_batches(d, n_obs, w), strict=True)
        for x, y in zip(xs, ys, strict=True)
    )


def test_new_epoch_new_order_and_repeatable():
    s = RandomSampler(64, 32, 4, seed=3)
    by_epoch = {}
    for epoch in (0, 1, 2, 0, 1):
        s.set_epoch(epoch)
        batches, _ = resolve(s.sample(10_000))
        order = flat(batches)
        assert np.array_equal(np.sort(order), np.arange(10_000))
        if epoch in by_epoch:
            assert np.array_equal(by_epoch[epoch], order)
        by_epoch[epoch] = order
    assert not np.array_equal(by_epoch[0], by_epoch[1])
    assert not np.array_equal(by_epoch[1], by_epoch[2])
    # and different seeds differ
    other, _ = resolve(RandomSampler(64, 32, 4, seed=4).sample(10_000))
    assert not np.array_equal(flat(other), by_epoch[0])


def test_unseeded_samplers_differ_but_are_stable():
    a, b = RandomSampler(16, 8, 4), RandomSampler(16, 8, 4)
    assert a.seed != b.seed
    assert np.array_equal(flat(resolve(a.sample(5000))[0]), flat(resolve(a.sample(5000))[0]))


def test_shuffle_really_shuffles_within_loads():
    batches, requests = resolve(RandomSampler(100, 50, 4, seed=0).sample(1000))
    # chunk order is permuted
    starts = [s.start for r in requests for s in r["requests"]]
    assert starts != sorted(starts)
    # rows within a batch are not one contiguous run
    assert not all(np.array_equal(np.sort(b), np.arange(b.min(), b.min() + len(b))) for b in batches)


def test_global_random_state_untouched():
    torch = pytest.importorskip("torch")

    np.random.seed(1)
    torch.manual_seed(1)
    state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    first = flat(resolve(RandomSampler(32, 16, 4, seed=7, replacement=True).sample(3000))[0])
    first_nr = flat(resolve(RandomSampler(32, 16, 4, seed=7).sample(3000))[0])
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    assert torch.equal(torch_state, torch.random.get_rng_state())
    np.random.seed(2)
    torch.manual_seed(2)
    assert np.array_equal(
        first, flat(resolve(RandomSampler(32, 16, 4, seed=7, replacement=True).sample(3000))[0])
    )
    assert np.array_equal(first_nr, flat(resolve(RandomSampler(32, 16, 4, seed=7).sample(3000))[0]))


@FAST
@given(cfg=configs(), num_samples=st.integers(1, 12_000), replacement=st.booleans())
def test_num_samples(cfg, num_samples, replacement):
    n_obs, w = cfg["n_obs"], cfg["num_workers"]
    expected = masked_rows(n_obs, cfg["mask"])
    cfg = {**cfg, "shuffle": cfg["shuffle"] or replacement}
    if not replacement and num_samples > len(expected):
        with pytest.raises(ValueError, match="num_samples"):
            make(cfg, num_samples=num_samples).validate(n_obs)
        return
    s = make(cfg, num_samples=num_samples, replacement=replacement, drop_last=False)
    per_worker = worker_batches(s, n_obs, w)
    for batches in per_worker:
        check_sizes(batches, cfg["batch_size"], drop_last=False)
    rows = flat([flat(b) for b in per_worker])
    assert len(rows) == num_samples
    assert np.isin(rows, expected).all()
    if not replacement:
        assert len(np.unique(rows)) == num_samples
        if not cfg["shuffle"] and w == 1:
            assert np.array_equal(rows, expected[:num_samples])


def test_replacement_repeats_rows():
    s = RandomSampler(10, 5, 2, replacement=True, num_samples=500, seed=0)
    rows = flat(resolve(s.sample(50))[0])
    assert len(rows) == 500 and np.array_equal(np.unique(rows), np.arange(50))


@FAST
@given(cfg=configs())
def test_sequential_in_order(cfg):
    n_obs, w = cfg["n_obs"], cfg["num_workers"]
    s = SequentialSampler(
        cfg["batch_size"], cfg["chunk_size"], cfg["preload_nchunks"], mask=cfg["mask"], drop_last=False
    )
    assert not s.shuffle
    per_worker = worker_batches(s, n_obs, w)
    for batches in per_worker:
        rows = flat(batches)
        assert np.all(np.diff(rows) > 0)
    expected = masked_rows(n_obs, cfg["mask"])
    if w == 1:
        assert np.array_equal(flat(per_worker[0]), expected)
        _, requests = resolve(s.sample(n_obs))
        # contiguous chunks of a load are merged into one read
        assert all(len(r["requests"]) == 1 for r in requests)
    assert np.array_equal(np.sort(flat([flat(b) for b in per_worker])), expected)
    # RandomSampler(shuffle=False) is the same thing
    s.set_worker(0, 1)
    same = make(cfg, shuffle=False, drop_last=False)
    assert np.array_equal(flat(resolve(same.sample(n_obs))[0]), flat(resolve(s.sample(n_obs))[0]))


def test_load_size_bounded():
    s = RandomSampler(100, 30, 4, seed=1)
    _, requests = resolve(s.sample(9_999))
    carried = 0
    for r in requests:
        new = sum(x.stop - x.start for x in r["requests"])
        assert carried + new <= s.max_load_rows
        carried = len(r.get("carry", []))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"preload_nchunks": 0}, "preload_nchunks"),
        ({"batch_size": 1.5}, "batch_size"),
        (
            {"batch_size": 100, "chunk_size": 10, "preload_nchunks": 2},
            "increase preload_nchunks or chunk_size",
        ),
        ({"mask": slice(0, 10, 2)}, "mask"),
        ({"mask": slice(-5, None)}, "mask"),
        ({"mask": slice(5, 5)}, "mask"),
        ({"mask": [1, 2]}, "mask"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"seed": 1, "rng": np.random.default_rng(0)}, "seed or rng"),
        ({"replacement": True, "shuffle": False}, "shuffle"),
    ],
)
def test_construction_errors(kwargs, match):
    args = {"batch_size": 4, "chunk_size": 4, "preload_nchunks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        RandomSampler(**args)


@pytest.mark.parametrize(
    ("kwargs", "n_obs", "match"),
    [
        ({}, 0, "n_obs"),
        ({"mask": slice(0, 200)}, 100, "mask"),
        ({"mask": slice(150, None)}, 100, "mask"),
        ({"mask": slice(100, None)}, 100, "mask"),
        ({"num_samples": 101}, 100, "num_samples"),
        ({"num_samples": 11, "mask": slice(0, 10)}, 100, "num_samples"),
    ],
)
def test_validate_errors(kwargs, n_obs, match):
    s = RandomSampler(4, 4, 2, seed=0, **kwargs)
    with pytest.raises(ValueError, match=match):
        s.validate(n_obs)
    with pytest.raises(ValueError, match=match):
        next(iter(s.sample(n_obs)))
    with pytest.raises(ValueError, match=match):
        s.n_batches(n_obs)


def test_epoch_worker_errors():
    s = RandomSampler(4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    with pytest.raises(ValueError, match="worker_id"):
        s.set_worker(2, 2)
    with pytest.raises(ValueError, match="num_workers"):
        s.set_worker(0, 0)


def test_distributed_rank_resolution():
    inner = RandomSampler(4, 4, 2, seed=0)
    assert DistributedSampler(inner, rank=1, world_size=3).rank_world() == (1, 3)
    assert DistributedSampler(inner, get_rank_world=lambda: (2, 4)).rank_world() == (2, 4)
    assert DistributedSampler(inner, rank=0, get_rank_world=lambda: (2, 4)).rank_world() == (0, 4)
    # no initialised torch.distributed and no jax: a single process
    assert DistributedSampler(inner).rank_world() == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        DistributedSampler(inner, rank=3, world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        DistributedSampler(inner, rank=0, world_size=0)
    with pytest.raises(TypeError, match="sampler"):
        DistributedSampler(object())  # type: ignore[arg-type]
    ds = DistributedSampler(inner, rank=1, world_size=2)
    ds.set_worker(1, 2)
    assert (inner.worker_id, inner.num_workers) == (1, 2)
    assert ds.batch_size == 4 and ds.shuffle


def test_distributed_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # make `import torch` fail
        from annbatch.samplers import DistributedSampler, RandomSampler
        ds = DistributedSampler(RandomSampler(4, 4, 2, seed=0))
        assert ds.rank_world() == (0, 1)
        assert sum(len(r["splits"]) for r in ds.sample(10)) == ds.n_batches(10) == 3
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_distributed_num_samples_shared():
    n_obs, world = 1000, 3
    rows = []
    for rank in range(world):
        inner = RandomSampler(7, 5, 3, num_samples=301, seed=0)
        ds = DistributedSampler(inner, rank=rank, world_size=world, equal_batches=False)
        rows.append(flat(resolve(ds.sample(n_obs), every_row=False)[0]))
    assert sum(map(len, rows)) == 301
    assert len(np.unique(np.concatenate(rows))) == 301


def test_docstring_example_sampler():
    # the example is the docstring's last block
    src = textwrap.dedent(Sampler.__doc__.split(".. code-block:: python\n")[1])
    ns: dict = {}
    exec(src, ns)
    s = ns["RangeSampler"]([(0, 3), (5, 9), (9, 10)], batch_size=3)
    check = check_sampler(s, 10, num_workers=2, covers=[0, 1, 2, 5, 6, 7, 8, 9])
    assert [len(b) for b in check.batches[1]] == [3, 1], "sample() cut the request without splits"
    assert set(np.concatenate(check.batches[1]).tolist()) == {5, 6, 7, 8}
    with pytest.raises(ValueError, match="ranges"):
        s.validate(5)


def test_load_request_keys():
    from annbatch.types import LoadRequest

    assert LoadRequest.__required_keys__ == {"requests"}
    assert LoadRequest.__optional_keys__ == {"splits", "carry"}


@FAST
@given(n_obs=st.integers(1, 3000), density=st.floats(0.01, 1.0), chunk=st.integers(1, 300),
       preload=st.integers(1, 6), bs=st.integers(1, 500), workers=st.integers(1, 3), shuffle=st.booleans(),
       seed=st.integers(0, 2**32), drop_last=st.booleans())  # fmt: skip
@example(n_obs=3, density=1.0, chunk=2, preload=1, bs=2, workers=1, shuffle=False, seed=0, drop_last=False)
def test_subset_sampler_reads_each_selected_row_once(n_obs, density, chunk, preload, bs, workers, shuffle, seed,
                                                     drop_last):  # fmt: skip
    from annbatch.samplers import SubsetSampler

    bs = min(bs, chunk * preload)
    mask = np.random.default_rng(seed).random(n_obs) < density
    if not mask.any():
        mask[0] = True
    s = SubsetSampler(mask, bs, chunk, preload, shuffle=shuffle, seed=seed, drop_last=drop_last)
    per_worker = worker_batches(s, n_obs, workers)
    rows = flat([flat(b) for b in per_worker])
    assert len(np.unique(rows)) == len(rows) and mask[rows].all()
    for batches in per_worker:
        check_sizes(batches, bs, drop_last)
    if not drop_last:
        assert np.array_equal(np.sort(rows), np.flatnonzero(mask))
        if not shuffle and workers == 1:
            assert np.array_equal(rows, np.flatnonzero(mask)), "unshuffled: row order"
    # A load of short chunks (a subset's runs) takes further chunks until it completes a batch: then it
    # holds fewer than a batch plus one chunk.
    most = max(chunk * preload, bs - 1 + chunk)
    for _, req in ((0, r) for r in SubsetSampler(mask, bs, chunk, preload, seed=seed).sample(n_obs)):
        for sl in req["requests"]:
            assert mask[sl].all() and sl.stop - sl.start <= most, "reads only selected runs"


def test_subset_sampler_errors():
    from annbatch.samplers import SubsetSampler

    with pytest.raises(ValueError, match="selects no rows"):
        SubsetSampler(np.zeros(10, bool), 2, 2, 2)
    with pytest.raises(ValueError, match="mask of 10 rows"):
        SubsetSampler(np.ones(10, bool), 2, 2, 2).validate(12)
    with pytest.raises(ValueError, match="names row 20"):
        SubsetSampler(np.array([3, 20]), 2, 2, 2).validate(12)
    with pytest.raises(ValueError, match="boolean mask or integer"):
        SubsetSampler(np.array([0.5]), 2, 2, 2)


def test_distributed_short_epoch_still_feeds_every_rank():
    # one load of 8 batches for 3 ranks: the last round is dealt batch by batch
    inner = RandomSampler(10, 20, 4, seed=0)
    per_share = shares(DistributedSampler(inner, rank=0, world_size=3), 80, 3, 1)
    assert [len(b) for b in per_share] == [2, 2, 2]
    rows = flat([flat(b) for b in per_share])
    assert len(np.unique(rows)) == len(rows) == 60


def test_custom_samplers_doc_examples():
    """The sampler classes of docs/custom_samplers.md and its check_sampler block run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "custom_samplers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    runnable = [b for b in blocks if "coll" not in b]  # the others need a collection on disk
    assert any("class FixedRangeSampler" in b for b in runnable) and any("check_sampler(" in b for b in runnable)
    namespace: dict = {}
    for block in runnable:
        exec(compile(block, "custom_samplers.md", "exec"), namespace)


# -- planning at scale (issue 10): no per-row or per-chunk Python objects -------------------------------------
def test_worker_chunks_are_arrays_and_requests_plain_slices():
    """An epoch's chunks stay two int64 arrays; slices (of Python ints) are made per load only."""
    sampler = RandomSampler(64, 16, 4, seed=0)
    starts, stops = sampler._worker_chunks(10_000, np.random.default_rng(0))
    assert starts.dtype == stops.dtype == np.int64 and len(starts) == len(stops) == 625
    np.testing.assert_array_equal(np.sort(starts), np.arange(0, 10_000, 16))
    for request in sampler.sample(10_000):
        for s in request["requests"]:
            assert type(s.start) is int and type(s.stop) is int


def test_planning_an_epoch_holds_under_a_byte_per_row():
    """Planning 20M rows holds no per-row array (8 bytes a row) nor a slice object per chunk (~0.5)."""
    import tracemalloc

    n_obs = 20_000_000
    sampler = RandomSampler(4096, 256, 32, seed=0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        requests = sampler.sample(n_obs)
        next(requests)  # the epoch's plan is made before the first request
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * n_obs
