"""Kill -9 during a conversion or an append: the collection stays readable and never shows partial data.

Conversions run in a separate ``python -c`` process that is killed with SIGKILL at chosen moments: as soon
as the staging area appears, after a few datasets are staged, while the append's journal is being applied,
and at a random moment. Importing annbatch takes a few seconds, so the next process is started (and
imports) while the current one runs; it then waits on stdin for its job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import Collection
from annbatch.synthetic import write_h5ad_files

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL semantics")

N_FILES, N_OBS, N_VARS, NNZ = 4, 8_000, 1_000, 100
CREATE = {"seed": 0, "dataset_size": 4_000, "shuffle_chunk_size": 100}  # 8 datasets
APPEND = {"seed": 1, "dataset_size": 8_000, "shuffle_chunk_size": 100}  # rewrites all 4 existing

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # conversion needs no torch; importing it would double the start-up time
    import annbatch
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    job = json.loads(line)
    annbatch.Collection(job.pop("path")).add_adatas(job.pop("inputs"), progress=False, **job)
    print("done", flush=True)
    """
)


class Launcher:
    """Runs conversion jobs in fresh interpreters, keeping one spare interpreter imported ahead."""

    def __init__(self, log_dir: Path):
        self._log_dir = log_dir
        self._count = 0
        self._spare: subprocess.Popen | None = None

    def _spawn(self) -> subprocess.Popen:
        self._count += 1
        log_path = self._log_dir / f"proc_{self._count}.log"
        with open(log_path, "w") as log:  # the child keeps its own handle
            proc = subprocess.Popen(
                [sys.executable, "-c", SCRIPT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        proc.log_path = log_path
        return proc

    def start(self, path: Path, inputs: list[Path], **kwargs) -> subprocess.Popen:
        proc = self._spare if self._spare is not None else self._spawn()
        assert proc.stdout.readline().strip() == "ready", Path(proc.log_path).read_text()
        job = {"path": str(path), "inputs": [str(p) for p in inputs], **kwargs}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        self._spare = self._spawn()
        return proc

    def close(self) -> None:
        if self._spare is not None:  # idle, waiting for a job: nothing to lose
            _reap(self._spare)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launch = Launcher(tmp_path_factory.mktemp("logs"))
    launch._spare = launch._spawn()  # imports while the inputs are generated
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory, launcher) -> list[Path]:
    return write_h5ad_files(
        tmp_path_factory.mktemp("big"), N_FILES, N_OBS, N_VARS, nnz_per_row=NNZ, overlap=0.9, seed=3
    )


@pytest.fixture(scope="module")
def input_names(big_inputs) -> set[str]:
    return {n for p in big_inputs for n in ad.read_h5ad(p, backed="r").obs_names}


@pytest.fixture(scope="module")
def base_collection(tmp_path_factory, big_inputs) -> Path:
    path = tmp_path_factory.mktemp("base") / "coll.zarr"
    Collection(path).add_adatas(big_inputs[:2], progress=False, **CREATE)
    return path


def _staging(path: Path) -> Path:
    return path / ".staging"


TRIGGERS = {
    "staging": lambda p: _staging(p).exists(),
    "mid-way": lambda p: (_staging(p) / "dataset_2").exists(),  # dataset_0 and _1 staged
    "journal": lambda p: (_staging(p) / "journal.json").exists(),
}


def run_and_kill(proc: subprocess.Popen, path: Path, trigger: str, delay: float = 0.0) -> bool:
    """Wait for ``trigger`` (then ``delay`` s) and SIGKILL the process; whether it was killed mid-run."""
    deadline = time.monotonic() + 120
    while not TRIGGERS[trigger](path):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    if delay:
        time.sleep(delay)
    killed = proc.poll() is None
    _reap(proc)
    if not killed:
        assert proc.returncode == 0, Path(proc.log_path).read_text()
    return killed


def _reap(proc: subprocess.Popen) -> None:
    """SIGKILL (a no-op once it has exited), wait, and close our ends of its pipes."""
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            pipe.close()


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _without_partial(snap: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in snap.items() if not k.endswith(".partial")}


def _read_all(path: Path, coll: Collection) -> ad.AnnData:
    """Every dataset through plain anndata (fails on a half-written one), concatenated."""
    parts = [ad.read_zarr(path / key) for key in coll.dataset_keys]
    for part in parts:
        assert part.X.shape == (part.n_obs, coll.n_vars)
        assert part.X.indptr[-1] == len(part.X.data)
    X = sp.vstack(
        [sp.csr_matrix((p.X.data, p.X.indices.astype(np.int64), p.X.indptr), shape=p.X.shape) for p in parts],
        format="csr",
    )
    return ad.AnnData(X=X, obs=ad.concat([ad.AnnData(obs=p.obs) for p in parts]).obs)


def check_recovered(path: Path) -> tuple[Collection, ad.AnnData | None]:
    """Open read-only, then with recovery; every dataset must read whole and staging must be gone."""
    readonly = Collection(path, mode="r")
    for key in readonly.dataset_keys:  # whatever is visible is complete, even before recovery
        ad.read_zarr(path / key)
    coll = Collection(path)  # mode "a": finishes or drops what the kill left in staging
    assert not _staging(path).exists()
    # zarr's temporary files (``zarr.<hex>.partial``) can be left in the root by a kill: see
    # test_recovery_removes_zarr_temp_files. Anything else must be a dataset or the root metadata.
    names = sorted(n for n in os.listdir(path) if not n.endswith(".partial"))
    assert names == sorted(["zarr.json", *coll.dataset_keys]), names
    assert coll.dataset_keys == [f"dataset_{i}" for i in range(len(coll))]
    data = _read_all(path, coll) if len(coll) else None
    return coll, data


@pytest.mark.parametrize("trigger", ["staging", "mid-way"])
def test_kill_during_create(tmp_path, launcher, big_inputs, trigger):
    path = tmp_path / "coll.zarr"
    proc = launcher.start(path, big_inputs, **CREATE)
    killed = run_and_kill(proc, path, trigger)
    assert killed, "the conversion finished before the kill: make the inputs larger"

    coll, _ = check_recovered(path)
    assert coll.n_obs == 0  # killed before the commit: an empty collection, no partial dataset
    assert len(coll) == 0

    if trigger == "mid-way":  # the path is still a usable collection
        coll.add_adatas(big_inputs[0], progress=False, **CREATE)
        assert coll.n_obs == N_OBS


@pytest.mark.parametrize(("trigger", "delay"), [("staging", 0.0), ("journal", 0.0), ("staging", "random")])
def test_kill_during_append(tmp_path, launcher, big_inputs, input_names, base_collection, trigger, delay):
    path = tmp_path / "coll.zarr"
    shutil.copytree(base_collection, path)
    before = snapshot(path)
    old = _read_all(path, Collection(path, mode="r"))
    if delay == "random":  # anywhere from the first staged dataset to after the commit
        delay = float(np.random.default_rng().uniform(0.0, 1.5))
        print(f"killing {delay:.3f} s after staging appeared")  # shown if the test fails

    proc = launcher.start(path, big_inputs[2:], **APPEND)
    killed = run_and_kill(proc, path, trigger, delay)
    if trigger == "staging" and not delay:
        assert killed, "the append finished before the kill: make the inputs larger"

    coll, data = check_recovered(path)
    if _without_partial(snapshot(path)) == before:
        assert coll.n_obs == old.n_obs  # the previous collection, exactly
        assert trigger != "journal", "the journal was written: recovery must complete the append"
    else:
        # The kill came after the journal was written: recovery completed the append.
        assert not (trigger == "staging" and not delay), (
            "killed before the commit, yet the collection changed"
        )
        assert coll.n_obs == len(input_names)
        assert set(data.obs_names) == input_names and data.obs_names.is_unique
        mine = data[old.obs_names]
        assert (mine.X != old.X).nnz == 0  # old rows unchanged
        assert mine.obs["src_path"].astype(str).equals(old.obs["src_path"].astype(str))


def test_recovery_removes_zarr_temp_files(base_collection, tmp_path):
    path = tmp_path / "coll.zarr"
    shutil.copytree(base_collection, path)
    # What a kill leaves behind: zarr's LocalStore writes the temp file, then fails to link it over the
    # existing root zarr.json, and would have unlinked it had it not been killed in between.
    (path / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes((path / "zarr.json").read_bytes())
    (path / ".staging").mkdir()
    Collection(path)
    assert not (path / ".staging").exists()
    assert sorted(os.listdir(path)) == sorted(["zarr.json", *Collection(path).dataset_keys])
