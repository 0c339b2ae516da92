"""Loader.state_dict / load_state_dict on real collections: exact and elastic resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

import annbatch
from annbatch.samplers import ClassSampler, DistributedSampler, RandomSampler
from annbatch.synthetic import make_adata

N_OBS = 1_200


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> annbatch.Collection:
    path = tmp_path_factory.mktemp("resume") / "cells.zarr"
    adata = make_adata(N_OBS, 30, n_donors=3, seed=5)
    return annbatch.Collection(path).add_adatas([adata], seed=0, groupby="donor", progress=False)


def _loader(coll, sampler=None, **kw):
    sampler = sampler if sampler is not None else RandomSampler(32, 16, 5, seed=7)  # 80-row loads carry
    return coll.loader(batch_sampler=sampler, return_index=True, **kw)


def _take(it, n):
    return [next(it)["index"].copy() for _ in range(n)]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("stop", [0, 1, 7, 20])
def test_exact_resumption_batch_for_batch(coll, prefetch, stop):
    reference = _loader(coll, prefetch=prefetch)
    epochs = [[b["index"] for b in reference] for _ in range(2)]
    interrupted = _loader(coll, prefetch=prefetch)
    list(interrupted)  # epoch 0 complete
    it = iter(interrupted)
    head = _take(it, stop)
    state = interrupted.state_dict()
    assert state == {"version": 1, "epoch": 1, "runs": [[1, stop]] if stop else []}
    json.dumps(state)
    resumed = _loader(coll, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert len(resumed) == len(epochs[1])
    rest = [b["index"] for b in resumed]
    got = head + rest
    assert len(got) == len(epochs[1])
    assert all(np.array_equal(a, b) for a, b in zip(got, epochs[1], strict=True))
    # and the next epoch is epoch 2, as if never interrupted
    assert resumed.state_dict() == {"version": 1, "epoch": 2, "runs": []}
    nxt = [b["index"] for b in resumed]
    assert all(np.array_equal(a, b) for a, b in zip(nxt, [b["index"] for b in reference], strict=True))


def test_resumed_batches_hold_the_right_rows(coll):
    loader = _loader(coll, obs_keys=["donor"])
    it = iter(loader)
    _take(it, 3)
    resumed = _loader(coll, obs_keys=["donor"])
    resumed.load_state_dict(loader.state_dict())
    donors = coll.obs(["donor"])["donor"]
    x_all = np.asarray(coll.loader(batch_size=N_OBS, chunk_size=N_OBS, preload_nchunks=1, shuffle=False)
                       .__iter__().__next__()["X"].todense())  # fmt: skip
    for b in resumed:
        np.testing.assert_array_equal(b["X"].toarray(), x_all[b["index"]])
        np.testing.assert_array_equal(b["obs"]["donor"], donors.cat.codes.to_numpy()[b["index"]])


def _rank_loaders(coll, world, inner_factory, equal=True):
    return [
        _loader(coll, DistributedSampler(inner_factory(), rank=r, world_size=world, equal_batches=equal))
        for r in range(world)
    ]


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("kind", ["random", "class"])
def test_elastic_resumption_never_repeats_a_row(coll, before, after, kind):
    codes = coll.obs(["donor"])["donor"]

    def inner():
        if kind == "random":
            return RandomSampler(32, 16, 5, seed=11)
        return ClassSampler(codes.to_numpy(), 32, 16, 5, seed=11)

    old = _rank_loaders(coll, before, inner)
    n_old = len(old[0])
    stop = n_old // 2
    seen = []
    for loader in old:
        it = iter(loader)
        seen.extend(_take(it, stop))
    state = old[0].state_dict()  # a checkpoint holds rank 0's state only
    assert state["runs"] == [[before, stop]]
    new = _rank_loaders(coll, after, inner)
    counts = []
    for loader in new:
        loader.load_state_dict(state)
        length = len(loader)  # as the consumer counts: the batches of the earlier run included
        batches = [b["index"] for b in loader]
        assert length == stop + len(batches)
        counts.append(len(batches))
        seen.extend(batches)
    assert len(set(counts)) == 1, "equal batches on the new ranks"
    rows = np.concatenate(seen)
    assert len(np.unique(rows)) == len(rows), "no row twice in the epoch"
    if kind == "random":
        # rows are left out only by the equal-batches truncation: at most about a load per rank
        assert len(rows) >= N_OBS - (before + after) * (32 + 80)


def test_elastic_resumption_twice_without_truncation(coll):
    seen = []
    history_state = None
    for world, frac in ((2, 0.3), (3, 0.5), (1, 1.0)):
        loaders = _rank_loaders(coll, world, lambda: RandomSampler(32, 16, 5, seed=2), equal=False)
        for loader in loaders:
            if history_state is not None:
                loader.load_state_dict(history_state)
        n = min(len(x) for x in loaders)
        stop = int(frac * n) if frac < 1 else None
        for loader in loaders:
            it = iter(loader)
            seen.extend([b["index"] for b in it] if stop is None else _take(it, stop))
        history_state = loaders[0].state_dict()
    rows = np.concatenate(seen)
    assert np.array_equal(np.sort(rows), np.arange(N_OBS)), "every row exactly once over three runs"


def test_bad_states_are_refused(coll):
    loader = _loader(coll)
    with pytest.raises(ValueError, match="runs"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"version": 99, "epoch": 0, "runs": []})
    with pytest.raises(ValueError, match="negative"):
        loader.load_state_dict({"version": 1, "epoch": -1, "runs": []})


def test_set_epoch_and_state(coll):
    loader = _loader(coll)
    loader.set_epoch(4)
    assert loader.state_dict() == {"version": 1, "epoch": 4, "runs": []}
    first = [b["index"] for b in loader]
    other = _loader(coll)
    other.load_state_dict({"version": 1, "epoch": 4, "runs": []})
    assert all(np.array_equal(a, b["index"]) for a, b in zip(first, other, strict=True))


def test_sampler_keyword_is_deprecated(coll):
    with pytest.warns(FutureWarning, match="batch_sampler"):
        loader = coll.loader(sampler=RandomSampler(32, 16, 5, seed=7))
    assert isinstance(loader.batch_sampler, RandomSampler)
    with pytest.raises(ValueError, match="batch_sampler"):
        coll.loader(sampler=RandomSampler(32, 16, 5, seed=7), batch_sampler=RandomSampler(32, 16, 5))
