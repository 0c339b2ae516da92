"""Collections by URL: ``Collection("s3://...")``, the CLI and the DataModule on a real S3 server.

The server is conftest's moto ``s3`` fixture on 127.0.0.1. Stores are built by annbatch from the URL
(obstore's ``from_url``) with the settings given as ``storage_options`` or, as users set them, the
standard ``AWS_*`` environment variables. The reference for what was written is always the inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import Collection, CollectionError
from annbatch.synthetic import make_adata

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import S3

pytestmark = pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")

BUILD = {"seed": 0, "dataset_size": 300, "shuffle_chunk_size": 25, "n_obs_per_chunk": 16, "shard_size": 64,
         "progress": False}  # fmt: skip


def _url(prefix: str) -> str:
    return f"s3://annbatch-test/{prefix}/cells.zarr"


def _rows_by_name(coll: Collection) -> dict[str, np.ndarray]:
    """Every row of the collection by obs name, through an unshuffled loader."""
    loader = coll.loader(batch_size=64, chunk_size=16, preload_nchunks=4, shuffle=False, obs_columns=[])
    x = sp.vstack([batch["X"] for batch in loader]).toarray()
    names = coll.obs().index
    return dict(zip(names, x, strict=True))


def _assert_holds(coll: Collection, inputs) -> None:
    rows = _rows_by_name(coll)
    assert len(rows) == sum(a.n_obs for a in inputs)
    for adata in inputs:
        expected = adata.X.toarray()
        got = np.stack([rows[name] for name in adata.obs_names])
        np.testing.assert_array_equal(got, expected)


def test_create_append_and_read_by_url(s3: S3, prefix: str):
    first, second = make_adata(260, 30, seed=1, obs_prefix="a"), make_adata(140, 30, seed=2, obs_prefix="b")
    coll = Collection(_url(prefix), storage_options=s3.storage_options())
    coll.add_adatas([first], **BUILD)
    coll.add_adatas([second], **{**BUILD, "seed": 1})
    assert "cells.zarr/zarr.json" in s3.keys(prefix)
    again = Collection(_url(prefix), mode="r", storage_options=s3.storage_options())
    assert again.n_obs == 400
    _assert_holds(again, [first, second])
    shown = repr(again)
    assert shown.startswith(f"Collection('{_url(prefix)}')") and s3.secret not in shown


def test_credentials_from_the_environment(s3: S3, prefix: str, monkeypatch):
    adata = make_adata(150, 20, seed=3)
    Collection(_url(prefix), storage_options=s3.storage_options()).add_adatas([adata], **BUILD)
    for key, value in s3.environment().items():
        monkeypatch.setenv(key, value)
    coll = Collection(_url(prefix), mode="r")  # no storage_options: obstore reads AWS_*
    _assert_holds(coll, [adata])


def test_file_url_is_a_local_path(tmp_path: Path):
    adata = make_adata(120, 20, seed=4)
    coll = Collection(f"file://{tmp_path}/cells.zarr").add_adatas([adata], **BUILD)
    assert (tmp_path / "cells.zarr" / "dataset_0").is_dir()
    _assert_holds(Collection(tmp_path / "cells.zarr", mode="r"), [adata])
    assert coll.n_obs == 120


def test_missing_foreign_and_misconfigured_urls(s3: S3, prefix: str):
    options = s3.storage_options()
    with pytest.raises(CollectionError, match=r"No collection at 's3://.*/cells.zarr'.*annbatch convert"):
        Collection(_url(prefix), mode="r", storage_options=options)
    assert s3.keys(prefix) == []  # reading created nothing
    s3.write(f"{prefix}/cells.zarr", {"notes.txt": b"someone else's"})
    with pytest.raises(CollectionError, match=r"holds objects but is not an annbatch collection"):
        Collection(_url(prefix), storage_options=options)
    assert s3.keys(prefix) == ["cells.zarr/notes.txt"]  # nothing was changed
    with pytest.raises(CollectionError, match=r"'endpiont'.*not valid.*obstore") as err:
        Collection(_url(prefix), storage_options={**options, "endpiont": "x"})
    assert s3.secret not in str(err.value)
    with pytest.raises(ValueError, match=r"`storage_options` are for collections in object storage"):
        Collection("cells.zarr", storage_options=options)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annbatch.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_cli_convert_and_info_by_url(s3: S3, prefix: str, tmp_path: Path):
    paths = []
    for i in range(2):
        adata = make_adata(200, 25, seed=10 + i, obs_prefix=f"f{i}")
        paths.append(tmp_path / f"in{i}.h5ad")
        adata.write_h5ad(paths[-1])
    url, env = _url(prefix), s3.environment()
    done = _cli("convert", *map(str, paths), "-o", url, "--seed", "0", "-q", env=env)
    assert done.returncode == 0, done.stderr
    assert url in done.stdout and "400 obs" in done.stdout
    info = _cli("info", url, env=env)
    assert info.returncode == 0, info.stderr
    assert "400 obs × 25 vars" in info.stdout
    for out in (done, info):
        assert s3.secret not in out.stdout + out.stderr
    # settings as flags: an endpoint with a typo is an error that names the bad value's key, not the secret
    bad = _cli("info", url, "--storage-option", "endpiont=http://127.0.0.1:1", env=env)
    assert bad.returncode == 2 and "endpiont" in bad.stderr and s3.secret not in bad.stderr
    missing = _cli("info", _url(prefix + "-none"), env=env)
    assert missing.returncode == 2 and "No collection at" in missing.stderr


def test_failed_first_convert_leaves_no_collection_behind(s3: S3, prefix: str, tmp_path: Path):
    good = tmp_path / "good.h5ad"
    make_adata(100, 20, seed=1).write_h5ad(good)
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not an h5ad file")
    done = _cli("convert", str(good), str(broken), "-o", _url(prefix), "-q", env=s3.environment())
    assert done.returncode == 2 and "broken.h5ad" in done.stderr
    assert s3.keys(prefix) == []


def test_datamodule_by_url(s3: S3, prefix: str):
    pytest.importorskip("lightning")
    from annbatch.lightning import CollectionDataModule

    Collection(_url(prefix), storage_options=s3.storage_options()).add_adatas([make_adata(300, 20, seed=5)], **BUILD)
    dm = CollectionDataModule(_url(prefix), storage_options=s3.storage_options(), batch_size=32, chunk_size=16,
                              preload_nchunks=4, return_index=True, to=None)  # fmt: skip
    train = np.concatenate([np.asarray(b["index"]) for b in dm.train_dataloader()])
    val = np.concatenate([np.asarray(b["index"]) for b in dm.val_dataloader()])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(300))


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, lightning as L
    from annbatch.lightning import CollectionDataModule

    class Recorder(L.LightningModule):
        def __init__(self, n_vars):
            super().__init__()
            self.layer = torch.nn.Linear(n_vars, 1)
            self.seen = {}
        def training_step(self, batch, batch_idx):
            self.seen.setdefault(str(self.current_epoch), []).extend(np.asarray(batch["index"]).tolist())
            return self.layer(batch["X"].to_dense()).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    url, out = sys.argv[1], sys.argv[2]
    # 1,024 rows in loads of 64: 16 loads, 8 per rank, so no rank's share is truncated
    dm = CollectionDataModule(url, batch_size=64, chunk_size=16, preload_nchunks=4, val_fraction=0,
                              return_index=True)
    model = Recorder(dm.n_vars)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert torch.distributed.get_backend() == "gloo"
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(model.seen, f)
    """
)


def test_ddp_two_ranks_train_from_s3(s3: S3, prefix: str, tmp_path: Path):
    """Two gloo ranks read a collection on S3 by URL: every row once per epoch, across the ranks."""
    pytest.importorskip("lightning")
    Collection(_url(prefix), storage_options=s3.storage_options()).add_adatas([make_adata(1_024, 30, seed=6)], **BUILD)
    script = tmp_path / "ddp_s3.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, **s3.environment(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), _url(prefix), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = (np.array(r[epoch]) for r in ranks)
        assert len(a) == len(b) == 512
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(1_024))
    assert not np.array_equal(ranks[0]["0"], ranks[0]["1"]), "a new order each epoch"


def test_annbatch_train_from_a_url(s3: S3, prefix: str, tmp_path: Path):
    """`annbatch train data.path=s3://...`: the Hydra run reads the collection from object storage."""
    pytest.importorskip("lightning")
    pytest.importorskip("hydra")
    Collection(_url(prefix), storage_options=s3.storage_options()).add_adatas([make_adata(600, 40, seed=7)], **BUILD)
    args = [f"data.path={_url(prefix)}", "data.batch_size=64", "data.chunk_size=16", "data.preload_nchunks=8",
            "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", "import sys, annbatch.cli; sys.exit(annbatch.cli.main())",
                           "train", *args], cwd=tmp_path, env={**os.environ, **s3.environment()}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/acc" in done.stdout
    config = next(tmp_path.rglob(".hydra/config.yaml")).read_text()
    assert _url(prefix) in config and s3.secret not in config  # credentials stay in the environment


_IN_PROCESS_SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, sys, threading, time, warnings
    warnings.filterwarnings("ignore")
    faulthandler.dump_traceback_later(90, exit=True)  # a stall fails the test instead of hanging it
    import boto3
    from moto.server import ThreadedMotoServer
    import annbatch
    from annbatch.synthetic import make_adata

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # in this very process
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="b").create_bucket(Bucket="in-process")
    options = {"endpoint": endpoint, "access_key_id": "a", "secret_access_key": "b", "region": "us-east-1",
               "client_options": {"allow_http": True}}
    annbatch.Collection("s3://in-process/cells.zarr", storage_options=options).add_adatas(
        [make_adata(2_000, 200, seed=0)], seed=0, dataset_size=1_000, progress=False)

    ticks, done = [], threading.Event()
    def tick():  # another Python thread, as a training loop's or a logger's would be
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.01)
    threading.Thread(target=tick, daemon=True).start()
    coll = annbatch.Collection("s3://in-process/cells.zarr", mode="r", storage_options=options)
    start = time.perf_counter()
    rows = sum(b["X"].shape[0] for b in coll.loader(batch_size=256, chunk_size=32, preload_nchunks=8))
    seconds = time.perf_counter() - start
    done.set()
    gap = max(b - a for a, b in zip(ticks, ticks[1:]))
    print(json.dumps({"rows": rows, "seconds": seconds, "longest_gap": gap}))
    server.stop()
    """
)


def test_remote_reads_leave_the_gil_to_other_threads(tmp_path: Path):
    """An S3 server in the reading process itself answers while the loader reads from it.

    zarrs' pipeline fetched from object storage holding the GIL: the server's threads could not run
    until the request timed out (30-180 s per read). Remote arrays now read through zarr-python and
    obstore's async API, which waits without the GIL.
    """
    script = tmp_path / "in_process.py"
    script.write_text(_IN_PROCESS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2_000
    assert result["seconds"] < 30, result
    assert result["longest_gap"] < 2.0, result  # the other thread kept running throughout
