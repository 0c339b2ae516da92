"""The ``annbatch`` command line: convert, info, demo, and errors with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from annbatch import Collection
from annbatch.cli import main


def _names(paths) -> set[str]:
    return {n for p in paths for n in ad.read_h5ad(p, backed="r").obs_names}


def test_convert_and_info(tmp_path, h5ad_files, capsys):
    out = tmp_path / "out.zarr"
    rc = main(["convert", str(h5ad_files[0]), str(h5ad_files[1]), "-o", str(out), "--seed", "0",
               "--dataset-size", "300", "--shuffle-chunk-size", "50"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "950 obs" in printed and "datasets" in printed

    coll = Collection(out, mode="r")
    assert coll.n_obs == 950
    assert len(coll) >= 3  # 300 rows per dataset
    assert set(coll.obs([]).index) == _names(h5ad_files[:2])
    assert set(coll.obs(["src_path"])["src_path"].astype(str)) == {str(p) for p in h5ad_files[:2]}

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"{len(coll)} datasets" in info
    assert "950 obs" in info and f"{coll.n_vars} vars" in info
    assert "src_path" in info  # obs columns are listed

    # Converting into an existing collection appends.
    with pytest.warns(UserWarning, match="dropped"):  # genes of the new file outside the collection
        assert (
            main(["convert", str(h5ad_files[2]), "-o", str(out), "--seed", "1", "--dataset-size", "2000"])
            == 0
        )
    assert Collection(out).n_obs == 1650


def test_convert_options(tmp_path, h5ad_files, capsys):
    out = tmp_path / "grouped.zarr"
    rc = main(["convert", *map(str, h5ad_files), "-o", str(out), "--groupby", "donor", "--join", "inner",
               "--no-shuffle", "--dataset-size", "2000", "--shard-size", "1MB", "--n-obs-per-chunk", "32"])  # fmt: skip
    assert rc == 0
    coll = Collection(out, mode="r")
    assert coll.n_vars == 120  # shared genes only
    for g in coll:
        codes = ad.io.read_elem(g["obs"])["donor"].cat.codes.to_numpy()
        assert (codes[1:] >= codes[:-1]).all()
        assert g["obsm/X_pca"].chunks[0] == 32


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "{tmp}/missing.h5ad", "-o", "{tmp}/out.zarr"], "missing.h5ad"),
        (["convert", "{csc}", "-o", "{tmp}/out.zarr"], "tocsr"),
        (["convert", "{good}", "-o", "{tmp}/out.zarr", "--dataset-size", "lots"], "`--dataset-size lots`"),
        (["convert", "{good}", "-o", "{tmp}/out.zarr", "--groupby", "nope"], "nope"),
        (["info", "{tmp}/missing.zarr"], "No collection"),
        (["info", "{tmp}/plain"], "not an annbatch collection"),
    ],
)
def test_errors_exit_2(tmp_path, h5ad_files, capsys, argv, message):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    csc = ad.read_h5ad(h5ad_files[0])
    csc.X = csc.X.tocsc()
    csc.write_h5ad(tmp_path / "csc.h5ad")
    fmt = {"tmp": tmp_path, "csc": tmp_path / "csc.h5ad", "good": h5ad_files[0]}
    rc = main([a.format(**fmt) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"annbatch {argv[0]}: error: ")
    assert message in err[0]
    out = tmp_path / "out.zarr"
    if out.exists():
        assert not [p for p in out.iterdir() if p.name.startswith("dataset_")]


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "a.h5ad"])  # no -o
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_demo(tmp_path, capsys):
    rc = main(
        ["demo", "--output", str(tmp_path / "demo"), "--n-obs", "500", "--n-vars", "200", "--n-files", "2"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1,000 obs" in printed
    coll = Collection(tmp_path / "demo" / "demo.zarr", mode="r")
    assert coll.n_obs == 1000
    assert coll.n_vars >= 200
    obs = coll.obs(["donor", "src_path"])
    assert obs["src_path"].nunique() == 2
    for g in coll:  # the demo groups by donor
        codes = ad.io.read_elem(g["obs"])["donor"].cat.codes.to_numpy()
        assert (codes[1:] >= codes[:-1]).all()


def _console_script() -> str:
    script = Path(sys.executable).parent / ("annbatch.exe" if os.name == "nt" else "annbatch")
    return str(script) if script.exists() else shutil.which("annbatch")


def test_console_script(tmp_path, h5ad_files):
    exe = _console_script()
    assert exe, "the `annbatch` console script is not installed"
    out = tmp_path / "out.zarr"
    done = subprocess.run(
        [exe, "convert", str(h5ad_files[0]), "-o", str(out), "--seed", "0", "--dataset-size", "300",
         "--shuffle-chunk-size", "50"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "400 obs" in done.stdout and "2 datasets" in done.stdout
    assert Collection(out, mode="r").n_obs == 400


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    code = "import sys, annbatch.cli; sys.exit(annbatch.cli.main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, **kw)


def test_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("annbatch ")


def test_info_on_a_missing_collection_speaks_cli(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err
    assert "No collection at" in err and "annbatch convert" in err and "mode=" not in err
    assert not (tmp_path / "nope.zarr").exists()


def test_failed_convert_removes_the_folder_it_created(tmp_path, h5ad_files, capsys):
    out = tmp_path / "new.zarr"
    assert main(["convert", str(h5ad_files[0]), str(tmp_path / "missing.h5ad"), "-o", str(out)]) == 2
    assert "missing.h5ad" in capsys.readouterr().err
    assert not out.exists(), "nothing half-written is left behind"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    assert main(["convert", str(tmp_path / "missing.h5ad"), "-o", str(keep)]) == 2
    assert (keep / "mine.txt").read_text() == "x", "a folder the user had is not touched"


def test_no_progress_bars_off_a_terminal(tmp_path, h5ad_files):
    done = _cli("convert", str(h5ad_files[0]), "-o", str(tmp_path / "c.zarr"), "--seed", "0")
    assert done.returncode == 0, done.stderr
    assert "Writing datasets" not in done.stderr and "reading rows" not in done.stderr
    assert "obs" in done.stdout


def test_ctrl_c_during_an_append(tmp_path, h5ad_files):
    import signal
    import time

    from annbatch.synthetic import make_adata

    out = tmp_path / "c.zarr"
    assert main(["convert", str(h5ad_files[0]), "-o", str(out), "--seed", "0", "--quiet"]) == 0
    big = tmp_path / "big.h5ad"
    genes = ad.read_h5ad(h5ad_files[0], backed="r").var_names  # the same genes: an append without warnings
    make_adata(150_000, len(genes), var_names=genes, nnz_per_row=60, seed=4).write_h5ad(big)
    code = "import sys, annbatch.cli; sys.exit(annbatch.cli.main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", str(big), "-o", str(out), "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / ".staging").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the append finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"annbatch convert: interrupted; {out} unchanged, 400 rows"], err
    coll = Collection(out, mode="a")  # recovers whatever the interrupted run staged
    assert coll.n_obs == 400


# -- errors speak the command line: flags, not the Python API's parameter names ---------------------------
_API_NAMES = ("dataset_size", "shard_size", "memory_limit", "shuffle_chunk_size", "n_obs_per_chunk",
              "lock_timeout", "`groupby", "groupby=", "`join", "join=")  # fmt: skip


def _disjoint_h5ad(tmp_path: Path) -> Path:
    from annbatch.synthetic import make_adata

    path = tmp_path / "other_genes.h5ad"
    make_adata(50, 20, var_names=[f"other_{i}" for i in range(20)], obs_prefix="o", seed=5).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dataset-size", "10XB"], "`--dataset-size 10XB` is not a size"),
        (["--dataset-size", "0"], "`--dataset-size` must be at least 1 row, got 0"),
        (["--dataset-size", "-5"], "`--dataset-size` must be at least 1 row, got -5"),
        (["--shard-size", "0MB"], "`--shard-size` must be positive"),
        (["--shard-size", "lots"], "`--shard-size lots` is not a size"),
        (["--memory-limit", "10XB"], "`--memory-limit 10XB` is not a size"),
        (["--memory-limit", "0"], "`--memory-limit` must be positive"),
        (["--shuffle-chunk-size", "0"], "`--shuffle-chunk-size` must be at least 1"),
        (["--n-obs-per-chunk", "-1"], "`--n-obs-per-chunk` must be at least 1"),
        (["--groupby", "donor", "--groupby", "nope"], "`--groupby` column(s) ['nope'] are missing"),
        (["{disjoint}", "--join", "inner"],
         "`--join inner`: the inputs share no var names. Use `--join outer`."),  # fmt: skip
    ],
)
def test_errors_name_the_flags(tmp_path, h5ad_files, capsys, options, message):
    inputs = [str(h5ad_files[0]), *(str(_disjoint_h5ad(tmp_path)) for o in options if o == "{disjoint}")]
    options = [o for o in options if o != "{disjoint}"]
    assert main(["convert", *inputs, "-o", str(tmp_path / "out.zarr"), "-q", *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("annbatch convert: error: ") and message in err[0], err[0]
    assert not any(name in err[0] for name in _API_NAMES), err[0]


def test_a_locked_collection_names_lock_timeout_as_a_flag(tmp_path, h5ad_files, capsys):
    from annbatch._lock import WriteLock

    out = tmp_path / "c.zarr"
    assert main(["convert", str(h5ad_files[0]), "-o", str(out), "--seed", "0", "-q"]) == 0
    capsys.readouterr()
    lock = WriteLock(Collection(out).group)
    lock.acquire()
    try:
        assert main(["convert", str(h5ad_files[1]), "-o", str(out), "-q", "--lock-timeout", "0.1"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another process" in err[0], err
    assert "`--lock-timeout`" in err[0] and "lock_timeout" not in err[0]
    assert Collection(out, mode="r").n_obs == 400


def test_a_damaged_input_is_one_line(tmp_path, h5ad_files, capsys):
    damaged = tmp_path / "cut.h5ad"
    damaged.write_bytes(h5ad_files[0].read_bytes()[:5000])  # a copy that stopped short
    assert main(["convert", str(damaged), "-o", str(tmp_path / "out.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.h5ad" in err[0] and "damaged" in err[0], err
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "a.h5ad", "-o", "c.zarr", "--dataset-size", "1.5"], "argument --dataset-size: '1.5'"),
        (["convert", "a.h5ad", "-o", "c.zarr", "--seed", "-1"], "argument --seed: must be at least 0"),
        (["demo", "--n-files", "0"], "argument --n-files: must be at least 1, got 0"),
        (["demo", "--n-obs", "0"], "argument --n-obs: must be at least 1, got 0"),
        (["demo", "--n-vars", "-3"], "argument --n-vars: must be at least 1, got -3"),
    ],
)
def test_bad_numbers_are_refused_by_their_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.zarr").exists()


def test_demo_output_errors_name_the_flag(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "done" / "demo.zarr").mkdir(parents=True)
    for folder, message in (("afile", "is a file"), ("done", "already holds a demo.zarr")):
        assert main(["demo", "--output", str(tmp_path / folder), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"`--output {tmp_path / folder}` {message}" in err[0], err[0]
        assert "mode=" not in err[0]


def test_rename_parameters():
    from annbatch.errors import rename_parameters

    flags = {"dataset_size": "--dataset-size", "groupby": "--groupby", "join": "--join"}
    assert rename_parameters("`dataset_size='10XB'` no", flags) == "`--dataset-size 10XB` no"
    assert rename_parameters("`dataset_size` must be positive", flags) == "`--dataset-size` must be positive"
    assert (
        rename_parameters("converted with `groupby=['a', 'b c']`; `join='inner'`", flags)
        == "converted with `--groupby a --groupby 'b c'`; `--join inner`"
    )
    assert rename_parameters("`seed` and `adata.X = x` stay", flags) == "`seed` and `adata.X = x` stay"
    keys = {"batch_size": "data.batch_size"}
    assert rename_parameters("`batch_size=0` or `batch_size`", keys, flags=False) == (
        "`data.batch_size=0` or `data.batch_size`"
    )
