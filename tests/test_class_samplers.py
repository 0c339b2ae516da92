"""Property tests for the label-keyed samplers: ClassSampler (homogeneous) and WeightedSampler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from annbatch.abc import Sampler
from annbatch.samplers import ClassSampler, WeightedSampler
from annbatch.testing import check_requests, check_sampler

FAST = settings(max_examples=50, deadline=None)


def resolve(stream) -> tuple[list[np.ndarray], list[dict]]:
    """Batches of global rows of a stream of LoadRequests, checked by annbatch.testing."""
    requests = list(stream)
    return check_requests(requests, use_every_loaded_row=True), requests


def worker_batches(sampler: Sampler, n_obs: int, num_workers: int) -> list[tuple[list[np.ndarray], list]]:
    check = check_sampler(sampler, n_obs, epoch=sampler.epoch, num_workers=num_workers, use_every_loaded_row=True)
    return list(zip(check.batches, check.requests, strict=True))


def flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)


def runs_of(labels: list, lengths: list[int]) -> pd.Categorical:
    """Label vector made of runs; ``None`` is a missing label."""
    values = [lab for lab, n in zip(labels, lengths, strict=True) for _ in range(n)]
    return pd.Categorical(values, categories=sorted({x for x in labels if x is not None}))


def same_batches(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@st.composite
def class_configs(draw):
    chunk_size = draw(st.integers(1, 64))
    preload = draw(st.integers(1, 6))
    batch_size = draw(st.integers(1, chunk_size * preload))
    n_values = draw(st.integers(1, 5))
    n_runs = draw(st.integers(1, 25))
    # every run is at least chunk_size / 4 long, so the short-run rule always passes
    min_len = -(-chunk_size // 4)
    labels = draw(st.lists(st.sampled_from([None, *"abcde"[:n_values]]), min_size=n_runs, max_size=n_runs))
    lengths = draw(st.lists(st.integers(min_len, 3 * chunk_size + 5), min_size=n_runs, max_size=n_runs))
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    i = draw(st.integers(0, n_runs - 1))
    j = draw(st.integers(i + 1, n_runs))
    mask = draw(st.sampled_from([None, slice(bounds[i], bounds[j]), slice(bounds[i], None)]))
    return {
        "classes": runs_of(labels, lengths),
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "preload_nchunks": preload,
        "mask": mask,
        "drop_last": draw(st.booleans()),
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32)),
        "num_workers": draw(st.integers(1, 4)),
        "epoch": draw(st.integers(0, 5)),
    }


def labelled_rows(classes: pd.Categorical, mask: slice | None) -> np.ndarray:
    rows = np.arange(len(classes))[mask or slice(None)]
    return rows[np.asarray(classes.codes)[rows] >= 0]


def check_requests_in_runs(requests: list[dict], codes: np.ndarray) -> None:
    for req in requests:
        for s in req["requests"]:
            c = codes[s]
            assert (c >= 0).all() and (c == c[0]).all(), "a read spans one run of one label"


# -- ClassSampler ------------------------------------------------------------------------------


@FAST
@given(cfg=class_configs())
def test_class_sampler_each_labelled_row_once(cfg):
    classes, w, bs = cfg["classes"], cfg["num_workers"], cfg["batch_size"]
    codes = np.asarray(classes.codes)
    n_obs = len(classes)
    expected = labelled_rows(classes, cfg["mask"])
    args = {k: v for k, v in cfg.items() if k not in ("num_workers", "epoch")}
    s = ClassSampler(**args)
    s.set_epoch(cfg["epoch"])
    if len(expected) == 0:
        with pytest.raises(ValueError, match="no row"):
            s.validate(n_obs)
        return
    per_worker = worker_batches(s, n_obs, w)
    rows_by_worker = []
    for batches, requests in per_worker:
        check_requests_in_runs(requests, codes)
        for req in requests:
            assert "carry" not in req
            assert sum(x.stop - x.start for x in req["requests"]) <= s.max_load_rows
        for b in batches:
            assert (codes[b] >= 0).all() and len(np.unique(codes[b])) == 1, "homogeneous batch"
            assert 0 < len(b) <= bs
            if cfg["drop_last"]:
                assert len(b) == bs
        rows_by_worker.append(flat(batches))
    rows = flat(rows_by_worker)
    assert len(np.unique(rows)) == len(rows), "no row twice, workers disjoint"
    short = sum(len(b) < bs for batches, _ in per_worker for b in batches)
    per_label = np.bincount(codes[expected], minlength=len(classes.categories))
    if cfg["drop_last"]:
        assert len(rows) == int((per_label // bs * bs).sum())
        assert np.isin(rows, expected).all()
    else:
        assert np.array_equal(np.sort(rows), expected)
        assert short <= int((per_label % bs > 0).sum()), "at most one short batch per label"


def sorted_labels() -> pd.Categorical:
    # a collection of 3 datasets written with groupby: each sorted by donor, so donors form runs
    sizes = {"d1": [700, 300, 500], "d2": [400, 0, 650], "d3": [250, 900, 120], "d4": [60, 80, 30]}
    values = []
    for ds in range(3):
        for donor, n in sizes.items():
            values += [donor] * n[ds]
    return pd.Categorical(values)


def test_class_sampler_homogeneous_on_groupby_layout():
    classes = sorted_labels()
    codes = np.asarray(classes.codes)
    s = ClassSampler(classes, batch_size=64, chunk_size=100, preload_nchunks=4, seed=1)
    batches, requests = resolve(s.sample(len(classes)))
    check_requests_in_runs(requests, codes)
    assert all(len(np.unique(codes[b])) == 1 for b in batches)
    assert np.array_equal(np.sort(flat(batches)), np.arange(len(classes)))
    # loads of different labels are interleaved, not one label after the other
    load_labels = [codes[r["requests"][0].start] for r in requests]
    changes = sum(a != b for a, b in zip(load_labels, load_labels[1:], strict=False))
    assert changes > len(classes.categories)
    # rows within a batch come from several reads (shuffled within the load)
    assert any(len(np.unique(b // 100)) > 1 for b in batches)
    assert s.n_batches(len(classes)) == len(batches) == sum(-(-c // 64) for c in [1500, 1050, 1270, 170])


def test_class_sampler_missing_labels_never_yielded():
    n = 2000
    base = np.repeat(np.array(["x", "y", "z", "w"], dtype=object), n // 4)
    as_object = base.copy()
    as_object[100:300] = None
    as_object[1500:1550] = np.nan
    for classes in (as_object, pd.Series(as_object), pd.Categorical(as_object)):
        s = ClassSampler(classes, 32, 64, 2, seed=0)
        rows = flat(resolve(s.sample(n))[0])
        missing = np.r_[100:300, 1500:1550]
        assert not np.isin(rows, missing).any()
        assert np.array_equal(np.sort(rows), np.setdiff1d(np.arange(n), missing))
    # float codes with NaN, as numbers
    numeric = np.repeat(np.arange(4, dtype=float), 500)
    numeric[:500] = np.nan
    s = ClassSampler(numeric, 50, 50, 2, seed=0)
    assert list(s.categories) == [1.0, 2.0, 3.0]
    rows = flat(resolve(s.sample(2000))[0])
    assert np.array_equal(np.sort(rows), np.arange(500, 2000))


@FAST
@given(cfg=class_configs())
def test_class_sampler_deterministic(cfg):
    classes, w = cfg["classes"], cfg["num_workers"]
    n_obs = len(classes)
    if len(labelled_rows(classes, cfg["mask"])) == 0:
        return
    args = {k: v for k, v in cfg.items() if k not in ("num_workers", "epoch")}
    a, b = ClassSampler(**args), ClassSampler(**args)
    a.set_epoch(cfg["epoch"])
    b.set_epoch(cfg["epoch"])
    for (ba, _), (bb, _) in zip(worker_batches(a, n_obs, w), worker_batches(b, n_obs, w), strict=True):
        assert same_batches(ba, bb)


def test_class_sampler_new_order_per_epoch():
    classes = sorted_labels()
    n = len(classes)
    s = ClassSampler(classes, 64, 100, 4, seed=3)
    by_epoch = {}
    for epoch in (0, 1, 2, 0, 1):
        s.set_epoch(epoch)
        order = flat(resolve(s.sample(n))[0])
        assert np.array_equal(np.sort(order), np.arange(n))
        if epoch in by_epoch:
            assert np.array_equal(by_epoch[epoch], order)
        by_epoch[epoch] = order
    assert not np.array_equal(by_epoch[0], by_epoch[1])
    assert not np.array_equal(by_epoch[1], by_epoch[2])
    other = ClassSampler(classes, 64, 100, 4, seed=4)
    assert not np.array_equal(flat(resolve(other.sample(n))[0]), by_epoch[0])
    # rng given: base seed drawn once, equal generators agree
    c = ClassSampler(classes, 64, 100, 4, rng=np.random.default_rng(5))
    d = ClassSampler(classes, 64, 100, 4, rng=np.random.default_rng(5))
    assert c.seed == d.seed and same_batches(resolve(c.sample(n))[0], resolve(d.sample(n))[0])


def test_class_sampler_unshuffled_in_category_order():
    classes = sorted_labels()
    codes = np.asarray(classes.codes)
    s = ClassSampler(classes, 64, 100, 4, shuffle=False)
    rows = flat(resolve(s.sample(len(classes)))[0])
    assert np.all(np.diff(codes[rows]) >= 0), "labels in category order"
    for c in range(len(classes.categories)):
        assert np.all(np.diff(rows[codes[rows] == c]) > 0), "rows in order within a label"


def test_class_sampler_weights_follow_batches():
    classes = sorted_labels()  # d1..d4 with 1500/1050/1270/170 rows
    n = len(classes)
    codes = np.asarray(classes.codes)
    weights = {"d1": 1.0, "d2": 2.0, "d3": 0.0, "d4": 5.0}
    bs, num_samples = 16, 16 * 5000 - 5
    s = ClassSampler(classes, bs, 40, 4, class_weights=weights, num_samples=num_samples, seed=11)
    per_worker = worker_batches(s, n, 3)
    batches = [b for bw, _ in per_worker for b in bw]
    assert sum(map(len, batches)) == num_samples, "num_samples honoured exactly"
    assert sum(len(b) < bs for b in batches) == 1, "a single short batch"
    for _, requests in per_worker:
        check_requests_in_runs(requests, codes)
    labels = np.array([codes[b[0]] for b in batches])
    assert all(len(np.unique(codes[b])) == 1 for b in batches)
    observed = np.bincount(labels, minlength=4)
    assert observed[2] == 0, "weight 0 is never drawn"
    p = np.array([1, 2, 5]) / 8
    assert chisquare(observed[[0, 1, 3]], p * len(batches)).pvalue > 1e-3
    # rows of the rare donor are all reachable (chunks drawn at random, not always the same)
    d4_rows = np.flatnonzero(codes == 3)
    assert np.isin(d4_rows, flat(batches)).all()
    # drop_last: whole batches only
    s = ClassSampler(
        classes, bs, 40, 4, class_weights=weights, num_samples=num_samples, drop_last=True, seed=11
    )
    batches = resolve(s.sample(n))[0]
    assert all(len(b) == bs for b in batches) and len(batches) == num_samples // bs == s.n_batches(n)


def test_class_sampler_num_samples_only_follows_label_sizes():
    classes = sorted_labels()
    n = len(classes)
    codes = np.asarray(classes.codes)
    s = ClassSampler(classes, 8, 64, 2, num_samples=8 * 8000, seed=2)
    batches = resolve(s.sample(n))[0]
    observed = np.bincount([codes[b[0]] for b in batches], minlength=4)
    sizes = np.bincount(codes)
    assert chisquare(observed, sizes / sizes.sum() * len(batches)).pvalue > 1e-3
    # sequence weights aligned with categories
    s = ClassSampler(classes, 8, 64, 2, class_weights=[1, 1, 1, 1], num_samples=8 * 8000, seed=2)
    observed = np.bincount([codes[b[0]] for b in resolve(s.sample(n))[0]], minlength=4)
    assert chisquare(observed).pvalue > 1e-3


def test_class_sampler_workers_disjoint_and_cover():
    classes = sorted_labels()
    n = len(classes)
    s = ClassSampler(classes, 50, 64, 3, seed=9)
    total = s.n_batches(n)
    per_worker = [flat(b) for b, _ in worker_batches(s, n, 4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.intersect1d(per_worker[i], per_worker[j]).size
    assert np.array_equal(np.sort(flat(per_worker)), np.arange(n))
    # loads are independent, so the workers' batch counts add up to the single-process count
    per_worker_iters = []
    for i in range(4):
        s.set_worker(i, 4)
        per_worker_iters.append(s.n_batches(n))
    assert sum(per_worker_iters) == total


# -- WeightedSampler ---------------------------------------------------------------------------


def imbalanced(chunk_size: int) -> pd.Categorical:
    """70/20/10 % labels in runs that are multiples of chunk_size, interleaved, with missing rows."""
    labels, lengths = [], []
    for _ in range(10):
        labels += ["a", "b", None, "c"]
        lengths += [7 * 3 * chunk_size, 2 * 3 * chunk_size, 5, 3 * chunk_size]
    return runs_of(labels, lengths)


def row_shares(sampler: WeightedSampler, n_obs: int, codes: np.ndarray, workers: int = 1) -> np.ndarray:
    rows = flat([flat(b) for b, _ in worker_batches(sampler, n_obs, workers)])
    assert (codes[rows] >= 0).all(), "missing labels never drawn"
    return np.bincount(codes[rows], minlength=codes.max() + 1)


def test_weighted_balanced_on_imbalanced_labels():
    cs = 8
    classes = imbalanced(cs)
    codes = np.asarray(classes.codes)
    n = len(classes)
    assert np.allclose(np.bincount(codes[codes >= 0]) / (codes >= 0).sum(), [0.7, 0.2, 0.1])
    num_samples = cs * 30_000
    s = WeightedSampler(classes, 64, cs, 16, num_samples=num_samples, seed=0)
    counts = row_shares(s, n, codes)
    assert counts.sum() == num_samples
    # every chunk holds cs rows, so counts / cs are independent chunk draws
    chunk_counts = counts // cs
    assert chisquare(chunk_counts, np.full(3, chunk_counts.sum() / 3)).pvalue > 1e-3
    assert np.all(np.abs(counts / num_samples - 1 / 3) < 0.03)
    assert np.allclose(s.probabilities(n), 1 / 3)


@pytest.mark.parametrize(
    "weights", [{"a": 1.0, "b": 2.0, "c": 5.0}, [1.0, 2.0, 5.0], np.array([1.0, 2.0, 5.0]), {"a": 1, "c": 3}]
)
def test_weighted_user_weights(weights):
    cs = 8
    classes = imbalanced(cs)
    codes = np.asarray(classes.codes)
    num_samples = cs * 20_000
    s = WeightedSampler(classes, 32, cs, 8, weights=weights, num_samples=num_samples, seed=5)
    counts = row_shares(s, len(classes), codes, workers=2)
    w = np.array([weights.get(k, 0.0) for k in "abc"]) if isinstance(weights, dict) else np.asarray(weights)
    p = w / w.sum()
    assert counts.sum() == num_samples
    assert np.all(counts[p == 0] == 0)
    keep = p > 0
    chunk_counts = counts[keep] // cs
    assert chisquare(chunk_counts, p[keep] * chunk_counts.sum()).pvalue > 1e-3


def test_weighted_uneven_chunks_still_follow_weights():
    # label a in runs of 10 rows (chunks of 5 with chunk_size 8), b in long runs of 64 (chunks of 8),
    # c in runs of 13 rows (chunks of 6 and 7): row shares still follow the weights
    labels, lengths = [], []
    for _ in range(30):
        labels += ["a", "b", "c", "a", "c"]
        lengths += [10, 64, 13, 10, 13]
    classes = runs_of(labels, lengths)
    codes = np.asarray(classes.codes)
    s = WeightedSampler(classes, 64, 8, 8, num_samples=150_000, seed=3)
    counts = row_shares(s, len(classes), codes)
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.03)
    s = WeightedSampler(classes, 64, 8, 8, weights={"a": 3, "b": 1, "c": 1}, num_samples=150_000, seed=3)
    counts = row_shares(s, len(classes), codes)
    assert np.all(np.abs(counts / counts.sum() - np.array([0.6, 0.2, 0.2])) < 0.03)
    # every row of a label is reachable (chunks drawn in proportion to their length)
    assert np.isin(np.flatnonzero(codes >= 0), flat(resolve(s.sample(len(classes)))[0])).all()


@FAST
@given(cfg=class_configs(), num_samples=st.one_of(st.none(), st.integers(1, 5000)))
def test_weighted_num_samples_batches_and_workers(cfg, num_samples):
    classes, w, bs = cfg["classes"], cfg["num_workers"], cfg["batch_size"]
    n_obs = len(classes)
    codes = np.asarray(classes.codes)
    expected = labelled_rows(classes, cfg["mask"])
    args = {k: v for k, v in cfg.items() if k not in ("num_workers", "epoch", "shuffle")}
    s = WeightedSampler(**args, num_samples=num_samples)
    s.set_epoch(cfg["epoch"])
    if len(expected) == 0:
        with pytest.raises(ValueError, match="no row"):
            s.n_batches(n_obs)
        return
    per_worker = worker_batches(s, n_obs, w)
    total = 0
    for batches, _ in per_worker:
        for b in batches[:-1]:
            assert len(b) == bs
        if batches:
            assert 0 < len(batches[-1]) <= bs and (len(batches[-1]) == bs or not cfg["drop_last"])
        rows = flat(batches)
        assert np.isin(rows, expected).all(), "only labelled rows in the mask"
        total += len(rows)
    target = len(expected) if num_samples is None else num_samples
    if not cfg["drop_last"]:
        assert total == target, "num_samples honoured exactly"
    else:
        assert target - w * bs < total <= target
    # deterministic per seed and epoch
    t = WeightedSampler(**args, num_samples=num_samples)
    t.set_epoch(cfg["epoch"])
    for (ba, _), (bb, _) in zip(per_worker, worker_batches(t, n_obs, w), strict=True):
        assert same_batches(ba, bb)
    del codes


def test_weighted_new_order_per_epoch_and_workers_differ():
    classes = imbalanced(8)
    n = len(classes)
    s = WeightedSampler(classes, 32, 8, 4, seed=1)
    first = flat(resolve(s.sample(n))[0])
    s.set_epoch(1)
    second = flat(resolve(s.sample(n))[0])
    s.set_epoch(0)
    assert np.array_equal(flat(resolve(s.sample(n))[0]), first)
    assert not np.array_equal(first, second)
    per_worker = [flat(b) for b, _ in worker_batches(s, n, 2)]
    assert len(per_worker[0]) + len(per_worker[1]) == (np.asarray(classes.codes) >= 0).sum()
    assert not np.array_equal(per_worker[0][:100], per_worker[1][:100])


def test_global_random_state_untouched():
    np.random.seed(1)
    state = np.random.get_state()
    classes = sorted_labels()
    resolve(ClassSampler(classes, 32, 64, 2, seed=0).sample(len(classes)))
    resolve(ClassSampler(classes, 32, 64, 2, num_samples=1000, seed=0).sample(len(classes)))
    resolve(WeightedSampler(classes, 32, 64, 2, seed=0).sample(len(classes)))
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ClassSampler, WeightedSampler])
def test_short_runs_name_the_values(cls):
    rng = np.random.default_rng(0)
    # "scattered" and "mixed" interleave at random (no groupby); "grouped" is one long run
    scattered = rng.choice(np.array(["scattered", "mixed"], dtype=object), size=3000)
    labels = np.concatenate([scattered, np.full(2000, "grouped", dtype=object)])
    s = cls(labels, 32, 64, 4, seed=0)
    with pytest.raises(ValueError, match="groupby") as err:
        s.validate(len(labels))
    msg = str(err.value)
    assert "'scattered'" in msg and "'mixed'" in msg and "'grouped'" not in msg
    assert "chunk_size" in msg
    with pytest.raises(ValueError, match="groupby"):
        s.n_batches(len(labels))
    with pytest.raises(ValueError, match="groupby"):
        next(iter(s.sample(len(labels))))
    # a lower chunk_size is accepted: mean run ~2 >= min(4, rows) / 4
    cls(labels, 8, 4, 4, seed=0).validate(len(labels))
    # values with zero weight are not read and not checked
    kw = {"class_weights": {"grouped": 1}} if cls is ClassSampler else {"weights": {"grouped": 1}}
    s = cls(labels, 32, 64, 4, seed=0, **kw)
    rows = flat(resolve(s.sample(len(labels)))[0])
    assert (rows >= 3000).all()


def test_short_run_rule_boundary():
    # chunk_size 16: mean run 4 rows is exactly 16 / 4 (accepted), 3 rows is too short
    ok = runs_of(["a", "b"] * 50, [4] * 100)
    ClassSampler(ok, 4, 16, 2, seed=0).validate(len(ok))
    bad = runs_of(["a", "b"] * 50, [3] * 100)
    with pytest.raises(ValueError, match="'a'.*'b'"):
        ClassSampler(bad, 4, 16, 2, seed=0).validate(len(bad))
    # a small value in one run is never "too short", whatever chunk_size
    tiny = runs_of(["a", "b"], [1000, 2])
    ClassSampler(tiny, 4, 512, 2, seed=0).validate(len(tiny))


@pytest.mark.parametrize("cls", [ClassSampler, WeightedSampler])
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"d1": 1, "nope": 2, "other": 1}, r"not among the classes: 'nope', 'other'"),
        ({"d1": -1.0, "d2": 1.0}, r"non-negative.*'d1'"),
        ({"d1": float("nan"), "d2": 1.0}, r"non-negative.*'d1'"),
        ({"d1": 0, "d2": 0}, "all zero"),
        ([1, 2], "one weight per category"),
        ({"d1": "x"}, "numbers"),
    ],
)
def test_weight_errors(cls, weights, match):
    classes = sorted_labels()
    kw = {"class_weights": weights} if cls is ClassSampler else {"weights": weights}
    with pytest.raises(ValueError, match=match):
        cls(classes, 16, 64, 2, seed=0, **kw)


@pytest.mark.parametrize("cls", [ClassSampler, WeightedSampler])
def test_validate_errors(cls):
    classes = sorted_labels()
    n = len(classes)
    with pytest.raises(ValueError, match=f"{n} labels but the collection has {n + 1} rows"):
        cls(classes, 16, 64, 2, seed=0).validate(n + 1)
    with pytest.raises(ValueError, match="mask"):
        cls(classes, 16, 64, 2, seed=0, mask=slice(0, n + 5)).validate(n)
    # d4's rows all lie after row 1500 (dataset 0 has d1 first) -- weight on a label outside the mask
    d4_first = int(np.flatnonzero(np.asarray(classes.codes) == 3)[0])
    kw = {"class_weights": {"d1": 1, "d4": 1}} if cls is ClassSampler else {"weights": {"d1": 1, "d4": 1}}
    with pytest.raises(ValueError, match="without rows in mask.*'d4'"):
        cls(classes, 16, 64, 2, seed=0, mask=slice(0, d4_first), **kw).validate(n)
    missing = pd.Categorical([None] * 100, categories=["a"])
    with pytest.raises(ValueError, match="no row"):
        cls(missing, 16, 64, 2, seed=0).validate(100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"batch_size": 200, "chunk_size": 10, "preload_nchunks": 4}, "increase preload_nchunks"),
        ({"mask": slice(0, 10, 2)}, "mask"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": 1, "rng": np.random.default_rng(0)}, "seed or rng"),
        ({"class_weights": {"d1": 1}, "shuffle": False}, "shuffle"),
        ({"num_samples": 10, "shuffle": False}, "shuffle"),
        ({"classes": np.zeros((4, 4))}, "one-dimensional"),
        ({"classes": np.array([])}, "empty"),
    ],
)
def test_construction_errors(kwargs, match):
    args = {"classes": sorted_labels(), "batch_size": 4, "chunk_size": 4, "preload_nchunks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassSampler(**args)


def test_weighted_construction_errors():
    with pytest.raises(ValueError, match="balanced"):
        WeightedSampler(sorted_labels(), 4, 4, 2, weights="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="increase preload_nchunks"):
        WeightedSampler(sorted_labels(), 100, 4, 2)
