from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Part of the cache entry's name: bump it when the generator or the layout changes, so that old caches
# are not mistaken for the new demo.
_LAYOUT_VERSION = 1
_STALE_AFTER_S = 24 * 3600  # partial builds older than this were abandoned (a killed run)
_N_DATASETS = 4


def demo_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder the demo collection is cached in.

    Parameters
    ----------
    path
        Use this folder. ``None``: ``$ANNBATCH_DEMO_DIR`` if set, else ``$XDG_CACHE_HOME/annbatch/demo``,
        else ``~/.cache/annbatch/demo``.

    Returns
    -------
    The folder (not created).
    """
    if path is not None and str(path):
        return Path(path).expanduser()
    env = os.environ.get("ANNBATCH_DEMO_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "annbatch" / "demo"


def demo_collection(
    *,
    n_obs: int = 60_000,
    n_vars: int = 2_000,
    n_cell_types: int = 10,
    n_donors: int = 6,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The built-in demo collection of ``annbatch train``: built on first use, then read from the cache.

    Synthetic counts from :func:`annbatch.synthetic.make_adata` (skewed library sizes, cell-type marker
    programs, per-donor batch effects), one input per donor, converted into a preshuffled collection of
    four datasets. obs has ``cell_type`` and ``donor`` among its columns.

    The collection is built in a temporary folder next to its final place and moved there in one rename,
    so an interrupted build leaves nothing half-written behind under the final name, and two processes
    building at once both end up with a complete collection (the second to finish uses the first one's).

    Parameters
    ----------
    n_obs, n_vars, n_cell_types, n_donors, seed
        Size and randomness of the data; every combination is cached under its own name.
    cache_dir
        Cache folder, see :func:`demo_cache_dir`.

    Returns
    -------
    Path of the collection.
    """
    root = demo_cache_dir(cache_dir)
    name = f"demo-v{_LAYOUT_VERSION}-{n_obs}x{n_vars}-{n_cell_types}types-{n_donors}donors-seed{seed}.zarr"
    target = root / name
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    print(
        f"annbatch train: generating the demo collection ({n_obs:,} cells × {n_vars:,} genes) in {target};"
        " this happens once.",
        file=sys.stderr,
        flush=True,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    try:
        built = staging / name
        _build(built, n_obs=n_obs, n_vars=n_vars, n_cell_types=n_cell_types, n_donors=n_donors, seed=seed)
        try:
            os.rename(built, target)  # atomic; fails if another process put a collection there first
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    # The final name only ever appears through the rename of a finished build.
    return (path / "zarr.json").is_file()


def _remove_stale_builds(root: Path) -> None:
    now = time.time()
    for entry in root.glob(".*.partial"):
        try:
            if now - entry.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def _build(path: Path, *, n_obs: int, n_vars: int, n_cell_types: int, n_donors: int, seed: int) -> None:
    from annbatch.collection import Collection
    from annbatch.synthetic import make_adata

    adata = make_adata(n_obs, n_vars, n_cell_types=n_cell_types, n_donors=n_donors, seed=seed)
    adata.uns.clear()
    donors = adata.obs["donor"]
    # One input per donor, as when every donor was sequenced separately.
    inputs = [adata[(donors == d).to_numpy()].copy() for d in donors.cat.categories if (donors == d).any()]
    rows_per_dataset = max(1, math.ceil(n_obs / _N_DATASETS))
    # Shuffle quality wants ~2,000 dealt blocks or more per dataset.
    block = max(1, min(1000, rows_per_dataset // 2000))
    Collection(path, mode="w-").add_adatas(
        inputs, seed=seed, dataset_size=rows_per_dataset, shuffle_chunk_size=block, progress=False
    )
