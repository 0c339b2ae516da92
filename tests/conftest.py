"""Shared pytest fixtures built on :mod:`annbatch.synthetic`.

All data is small so tests stay fast, and deterministic (fixed seeds).

- ``rng``: ``np.random.default_rng(0)``, fresh per test.
- ``sparse_adata``: 1,000 × 300 AnnData, ``X`` a canonical float32 CSR matrix with
  the full synthetic obs/var/obsm annotation; fresh per test, so tests may mutate it.
- ``dense_adata``: 1,000 × 300 AnnData with a dense C-contiguous float32 ``X``; fresh per test.
- ``h5ad_files``: list of 3 :class:`~pathlib.Path` to h5ad files (400, 550 and 700 rows,
  200 genes each, 60 % of genes shared by all files, the rest file-specific), written
  once per session. Treat them as read-only.
- ``zarr_input``: :class:`~pathlib.Path` to a 600 × 250 sparse (CSR) AnnData written with
  ``AnnData.write_zarr`` in zarr format 3; fresh per test.
- ``s3``: an :class:`S3` bucket on a moto S3 server on 127.0.0.1, one per session, in a child process
  (so that the server's work does not share the test process's GIL and cores with what is measured;
  ``tests/test_urls.py`` hosts one in the reading process on purpose). ``prefix``: a key prefix of the
  test's own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import zarr

from annbatch.synthetic import make_adata, write_h5ad_files

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from obstore.store import S3Store
    from zarr.storage import ObjectStore


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def sparse_adata() -> ad.AnnData:
    return make_adata(1_000, 300, seed=0)


@pytest.fixture
def dense_adata() -> ad.AnnData:
    return make_adata(1_000, 300, dense=True, seed=1)


@pytest.fixture(scope="session")
def h5ad_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Different row counts per file catch code that assumes equal-sized inputs.
    return write_h5ad_files(
        tmp_path_factory.mktemp("h5ad_files"), 3, [400, 550, 700], 200, overlap=0.6, seed=10
    )


@pytest.fixture
def zarr_input(tmp_path: Path) -> Path:
    path = tmp_path / "input.zarr"
    # zarr v3 is anndata's upcoming default and what the zarr>=3 stack is built around.
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        make_adata(600, 250, seed=2).write_zarr(path)
    return path


BUCKET = "annbatch-test"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "s3cr3t-7f3a9", "region": "us-east-1"}

MOTO_SCRIPT = textwrap.dedent(
    """
    import sys
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # serve until the test process closes stdin (or dies)
    server.stop()
    """
)


# ---------------------------------------------------------------------------------------------------------
# the server and raw key access
# ---------------------------------------------------------------------------------------------------------
@dataclass
class S3:
    """One bucket on the local server; stores and raw key operations under a prefix."""

    endpoint: str
    bucket: str = BUCKET
    secret: str = CREDENTIALS["secret_access_key"]

    def storage_options(self) -> dict:
        """``Collection(url, storage_options=...)`` settings for this server."""
        return {"endpoint": self.endpoint, "access_key_id": CREDENTIALS["access_key_id"],
                "secret_access_key": self.secret, "region": CREDENTIALS["region"],
                "client_options": {"allow_http": True}}  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The standard AWS environment variables for this server, as users set them."""
        return {"AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"], "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": CREDENTIALS["region"], "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ALLOW_HTTP": "true"}  # fmt: skip

    def raw(self, prefix: str | None = None) -> S3Store:
        from obstore.store import S3Store

        return S3Store(BUCKET, prefix=prefix, endpoint=self.endpoint, client_options={"allow_http": True},
                       **CREDENTIALS)  # fmt: skip

    def store(self, prefix: str, *, read_only: bool = False) -> ObjectStore:
        """A fresh zarr store (own client, nothing cached) rooted at ``prefix``."""
        from zarr.storage import ObjectStore

        return ObjectStore(self.raw(prefix), read_only=read_only)

    def group(self, prefix: str, *, read_only: bool = False) -> zarr.Group:
        return zarr.open_group(self.store(prefix, read_only=read_only), mode="r" if read_only else "a")

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, relative to it, sorted."""
        import obstore

        metas = [m for batch in obstore.list(self.raw(), prefix=f"{prefix}/") for m in batch]
        return sorted(m["path"][len(prefix) + 1 :] for m in metas)

    def read(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` by relative key, with its bytes."""
        import obstore

        store = self.raw()
        return {k: obstore.get(store, f"{prefix}/{k}").bytes().to_bytes() for k in self.keys(prefix)}

    def write(self, prefix: str, objects: dict[str, bytes]) -> None:
        import obstore

        store = self.raw()
        for key, value in objects.items():
            obstore.put(store, f"{prefix}/{key}", value)

    def delete(self, prefix: str, keys: list[str]) -> None:
        import obstore

        obstore.delete(self.raw(), [f"{prefix}/{k}" for k in keys])

    def copy_tree(self, src: str, dst: str) -> None:
        import obstore

        store = self.raw()
        for key in self.keys(src):
            obstore.copy(store, f"{src}/{key}", f"{dst}/{key}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """One S3 server on 127.0.0.1 for the whole session (each test works under its own ``prefix``)."""
    pytest.importorskip("obstore")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as err:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-c", MOTO_SCRIPT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"moto server did not start: {log.read_text()}"
        endpoint = f"http://127.0.0.1:{int(line)}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["region"],
                              aws_access_key_id=CREDENTIALS["access_key_id"],
                              aws_secret_access_key=CREDENTIALS["secret_access_key"])  # fmt: skip
        client.create_bucket(Bucket=BUCKET)
        yield S3(endpoint)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of its own for every test."""
    return "test-" + re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
