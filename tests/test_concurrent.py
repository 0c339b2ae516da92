"""Concurrent writers: appends from several processes at once are serialised by the collection's lock.

Worker processes (``python -c``) import annbatch once and then run append jobs read from stdin, so the
start-up cost is paid once per worker, not per append. Each job appends ``make_adata(N_OBS, N_VARS)``
with obs names unique to the job, so afterwards every reported append can be checked row by row. Some
rounds SIGKILL a worker mid-append (also while it holds the lock); its append is then either fully
present or absent, never partly, and the next writer takes its lock over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from annbatch import Collection
from annbatch._lock import LOCK, WriteLock
from annbatch.collection import CollectionLockedError
from annbatch.synthetic import make_adata

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock semantics")

N_OBS, N_VARS, N_WORKERS = 2000, 50, 3

WORKER = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # appending needs no torch; importing it would double the start-up time
    import annbatch
    from annbatch.collection import CollectionLockedError
    from annbatch.synthetic import make_adata

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        adata = make_adata(job["n_obs"], job["n_vars"], seed=job["seed"], obs_prefix=job["name"])
        adata.obs["job"] = job["name"]
        print(json.dumps({"started": job["name"]}), flush=True)
        try:
            annbatch.Collection(job["path"]).add_adatas(
                adata, seed=job["seed"], progress=False, lock_timeout=job["lock_timeout"]
            )
        except CollectionLockedError as err:
            print(json.dumps({"locked": job["name"], "message": str(err)}), flush=True)
        else:
            print(json.dumps({"done": job["name"]}), flush=True)
    """
)


class Worker:
    """One interpreter running append jobs in turn."""

    def __init__(self, log: Path):
        with open(log, "w") as err:  # the child keeps its own handle
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        self.log = log
        self._ready = False

    def wait_ready(self) -> None:
        if not self._ready:
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}, self.log.read_text()
            self._ready = True

    def submit(self, path: Path, name: str, seed: int, *, lock_timeout: float = 60.0, n_obs: int = N_OBS):
        job = {"path": str(path), "name": name, "seed": seed, "lock_timeout": lock_timeout,
               "n_obs": n_obs, "n_vars": N_VARS}  # fmt: skip
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        """The job's outcome (after its "started" line); fails if the worker died."""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"worker died: {self.log.read_text()}"
            msg = json.loads(line)
            if "started" not in msg:
                return msg

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class Pool:
    """``N_WORKERS`` warm workers; a killed one is replaced (importing in the background)."""

    def __init__(self, log_dir: Path):
        self._log_dir = log_dir
        self._count = 0
        self.workers = [self._spawn() for _ in range(N_WORKERS)]

    def _spawn(self) -> Worker:
        self._count += 1
        return Worker(self._log_dir / f"worker_{self._count}.log")

    def replace(self, worker: Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = self._spawn()

    def ready(self) -> list[Worker]:
        for w in list(self.workers):
            if w.proc.poll() is not None:  # died in a failed test: do not fail the next ones too
                self.replace(w)
        for w in self.workers:
            w.wait_ready()
        return self.workers

    def close(self) -> None:
        for w in self.workers:
            w.kill()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    workers = Pool(tmp_path_factory.mktemp("logs"))
    yield workers
    workers.close()


def _base(path: Path) -> set[str]:
    adata = make_adata(N_OBS, N_VARS, seed=0, obs_prefix="base")
    adata.obs["job"] = "base"
    Collection(path).add_adatas(adata, seed=0, progress=False)
    return set(adata.obs_names)


def _names(job: str, n_obs: int = N_OBS) -> set[str]:
    return set(make_adata(n_obs, N_VARS, seed=0, obs_prefix=job).obs_names)


def _check(path: Path, present: set[str], maybe: dict[str, set[str]]) -> None:
    """``present`` rows all there, each row once, each ``maybe`` job wholly there or wholly absent."""
    coll = Collection(path)  # opening for writing recovers what a kill left
    assert not (path / ".staging").exists() and not (path / LOCK).exists()
    obs = coll.obs(["job"])
    assert obs.index.is_unique
    names = set(obs.index)
    for job, rows in maybe.items():
        got = names & rows
        assert not got or got == rows, f"{job}: {len(got)} of {len(rows)} rows"
        present |= got
    assert names == present
    assert coll.n_obs == len(present)
    for key in coll.dataset_keys:  # every dataset reads whole through plain anndata
        part = ad.read_zarr(path / key)
        assert part.X.shape == (part.n_obs, N_VARS)
        assert (part.obs["job"].astype(str) == [n.rsplit("_", 1)[0] for n in part.obs_names]).all()


@pytest.mark.parametrize("stagger", [0.0, 0.05, 0.3])
def test_concurrent_appends_all_land(tmp_path, pool, stagger):
    path = tmp_path / "coll.zarr"
    expected = _base(path)
    workers = pool.ready()
    for i, w in enumerate(workers):
        w.submit(path, f"s{i}", seed=i + 1)
        time.sleep(stagger)
    results = [w.result() for w in workers]
    assert all("done" in r for r in results), results
    for i in range(N_WORKERS):
        expected |= _names(f"s{i}")
    _check(path, expected, {})


@pytest.mark.parametrize(("victim", "delay"), [(0, 0.2), (1, 0.8), (0, "random")])
def test_kill_among_concurrent_appends(tmp_path, pool, victim, delay):
    path = tmp_path / "coll.zarr"
    expected = _base(path)
    if delay == "random":
        delay = float(np.random.default_rng().uniform(0.0, 2.0))
        print(f"killing worker {victim} {delay:.3f} s after the start")  # shown if the test fails
    workers = pool.ready()
    for i, w in enumerate(workers):
        w.submit(path, f"k{i}", seed=i + 1)
    time.sleep(delay)
    killed = workers[victim]
    pool.replace(killed)  # SIGKILL, wherever it was: waiting, writing, committing or done
    results = [w.result() for i, w in enumerate(workers) if i != victim]
    assert all("done" in r for r in results), results
    for i in range(N_WORKERS):
        if i != victim:
            expected |= _names(f"k{i}")
    _check(path, expected, {f"k{victim}": _names(f"k{victim}")})


def test_stale_lock_of_killed_writer_is_taken_over(tmp_path, pool):
    path = tmp_path / "coll.zarr"
    expected = _base(path)
    worker = pool.ready()[0]
    pid = worker.proc.pid
    worker.submit(path, "dead", seed=1, n_obs=20_000)
    deadline = time.monotonic() + 30
    while not (path / ".staging").exists():  # staging appears only under the lock
        assert time.monotonic() < deadline and worker.proc.poll() is None
        time.sleep(0.002)
    pool.replace(worker)
    holder = json.loads((path / LOCK).read_bytes())
    assert holder["pid"] == pid and holder["host"] == socket.gethostname()

    # The killed writer's lock is left behind; the next writer takes it over (no timeout needed).
    extra = make_adata(N_OBS, N_VARS, seed=5, obs_prefix="after")
    extra.obs["job"] = "after"
    assert Collection(path, mode="r").n_obs == N_OBS  # killed before its commit; readers ignore the lock
    Collection(path).add_adatas(extra, progress=False, lock_timeout=0)
    _check(path, expected | set(extra.obs_names), {})


def test_refused_writer_names_holder(tmp_path, pool):
    path = tmp_path / "coll.zarr"
    expected = _base(path)
    lock = WriteLock(Collection(path).group)
    lock.acquire()
    try:
        worker = pool.ready()[1]
        worker.submit(path, "refused", seed=1, lock_timeout=0.5)
        result = worker.result()
        assert "locked" in result, result
        message = result["message"]
        assert str(path) in message
        assert socket.gethostname() in message and f"pid {os.getpid()}" in message and "since" in message
        assert "lock_timeout" in message  # what to do
        # In this process too (a second flock on its own file handle is refused as well).
        with pytest.raises(CollectionLockedError, match=f"pid {os.getpid()}") as info:
            Collection(path).add_adatas(make_adata(10, N_VARS), progress=False, lock_timeout=0)
        assert info.value.holder["pid"] == os.getpid()
        # Opening for writing neither waits nor touches a running writer's staging.
        (path / ".staging").mkdir()
        Collection(path)
        assert (path / ".staging").exists()
    finally:
        threading.Timer(0.5, lock.release).start()  # a waiting writer gets it once it is released
    extra = make_adata(N_OBS, N_VARS, seed=5, obs_prefix="waited")
    extra.obs["job"] = "waited"
    Collection(path).add_adatas(extra, progress=False, lock_timeout=30)
    _check(path, expected | set(extra.obs_names), {})


@pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")
def test_object_store_lock(s3, prefix):
    """Conditional create, a refused writer, and exactly one taker of a stale lock, on a local S3 server."""
    import obstore
    import zarr
    from zarr.storage import ObjectStore

    from annbatch._lock import LockHeld

    raw = s3.raw
    coll = f"{prefix}/coll"

    def group():  # each writer with its own client, as separate processes would have
        return zarr.open_group(ObjectStore(raw()), path=coll, mode="a")

    Collection(group()).add_adatas(make_adata(50, N_VARS), progress=False)
    first, second = WriteLock(group()), WriteLock(group())
    first.acquire()
    assert not second.try_acquire()
    with pytest.raises(CollectionLockedError, match=f"pid {os.getpid()}"):
        Collection(group()).add_adatas(make_adata(10, N_VARS), progress=False, lock_timeout=0)
    first.release()
    assert second.try_acquire()
    second.release()

    # A stale lock of another host (heartbeat long ago): of four writers at once, one takes it over.
    stale = {"host": "elsewhere", "pid": 1, "since": "2000-01-01T00:00:00+00:00", "heartbeat": 0.0,
             "token": "old"}  # fmt: skip
    obstore.put(raw(), f"{coll}/{LOCK}", json.dumps(stale).encode())
    takers = [WriteLock(group()) for _ in range(4)]
    barrier = threading.Barrier(len(takers))
    won = [False] * len(takers)

    def take(i):
        barrier.wait()
        won[i] = takers[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1, won
    winner = takers[won.index(True)]
    with pytest.raises(LockHeld) as info:  # the others now see a fresh lock, naming the winner
        takers[won.index(False)].acquire(timeout=0.3)
    assert info.value.holder["pid"] == os.getpid() and info.value.holder["token"] != "old"
    winner.release()

    # A lock of this host whose process is gone is stale at once, whatever its heartbeat.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fresh = {**stale, "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}
    obstore.put(raw(), f"{coll}/{LOCK}", json.dumps(fresh).encode())
    Collection(group()).add_adatas(make_adata(10, N_VARS, obs_prefix="late"), progress=False, lock_timeout=0)
    assert Collection(group(), mode="r").n_obs == 60
    with pytest.raises(FileNotFoundError):
        obstore.head(raw(), f"{coll}/{LOCK}")  # released: deleted
