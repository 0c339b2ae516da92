"""``annbatch train``: real Hydra runs of real Lightning training on (small) demo collections.

Every training run is a subprocess of the installed ``annbatch`` command, in a temporary working
directory, with ``ANNBATCH_DEMO_DIR`` pointing at a demo collection built once for the session. The demo
is kept small through ``data.demo.*`` overrides (each setting of those is its own cache entry).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the train extra
pytest.importorskip("lightning")
import annbatch
from annbatch.train import demo_cache_dir, demo_collection

# A small demo: a few seconds per run on two cores. As many genes as the default demo (fewer would mean
# few detected genes per cell, hard to classify) but few cells, in small batches to have enough steps.
SMALL = {"n_obs": 4000, "n_vars": 2000, "n_cell_types": 8, "n_donors": 4, "seed": 0}
DEMO = [f"data.demo.{k}={v}" for k, v in SMALL.items()]
FAST = [*DEMO, "data.batch_size=128", "trainer.max_steps=56", "callbacks.progress_bar.refresh_rate=0"]
# Columns that depend on timing, not on the computation.
TIMING = re.compile(r"cells_per_s")


def _annbatch() -> list[str]:
    script = Path(sys.executable).parent / ("annbatch.exe" if os.name == "nt" else "annbatch")
    found = str(script) if script.exists() else shutil.which("annbatch")
    return (
        [found]
        if found
        else [sys.executable, "-c", "import sys, annbatch.cli; sys.exit(annbatch.cli.main())"]
    )


def _train(args, *, cwd: Path, demo_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANNBATCH_DEMO_DIR": str(demo_dir)}
    env.pop("HYDRA_FULL_ERROR", None)  # Hydra's short error messages, as a user sees them
    return subprocess.run(
        [*_annbatch(), "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _computed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """metrics.csv without the timing columns, which differ between otherwise identical runs."""
    return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in rows]


def _last(rows: list[dict[str, str]], column: str) -> float:
    return float([row[column] for row in rows if row.get(column)][-1])


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-cache")
    demo_collection(**SMALL, cache_dir=root)
    return root


@pytest.fixture(scope="session")
def small_demo(demo_dir) -> Path:
    return demo_collection(**SMALL, cache_dir=demo_dir)  # from the cache


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, demo_dir, small_demo):
    """One run on an explicit data.path (the demo collection, as a user's collection), seed 0."""
    cwd = tmp_path_factory.mktemp("user-run")
    before = _snapshot(small_demo)
    done = _train(
        [*FAST, f"data.path={small_demo}", "seed=0", "hydra.run.dir=run"], cwd=cwd, demo_dir=demo_dir
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"done": done, "run": cwd / "run", "before": before}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_dir):
    """A multirun over two seeds on the demo collection (data.path null)."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = _train(["-m", *FAST, "seed=0,1", "hydra.sweep.dir=sweep"], cwd=cwd, demo_dir=demo_dir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"done": done, "dir": cwd / "sweep"}


def test_run_directory_and_printed_metrics(user_run, small_demo):
    run, out = user_run["run"], user_run["done"].stdout
    assert (run / ".hydra" / "config.yaml").is_file()
    assert "data.path=" in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    best = list((run / "checkpoints").glob("epoch*.ckpt"))
    assert len(best) == 1
    rows = _metrics(run / "csv" / "metrics.csv")
    assert {"train/loss_step", "train/acc_step", "val/loss", "val/acc", "train/cells_per_s_step"} <= set(
        rows[0]
    )
    assert int(rows[-1]["step"]) <= 56 and {row["epoch"] for row in rows} == {"0", "1"}

    # The summary at the end: validation accuracy and throughput, as logged.
    acc = float(re.search(r"val/acc\s+([0-9.]+)", out).group(1))
    assert acc == pytest.approx(_last(rows, "val/acc"), abs=1e-4)
    assert acc >= 0.8
    rate = float(re.search(r"train/cells_per_s\s+([0-9,]+)", out).group(1).replace(",", ""))
    assert rate > 0
    assert str(run.resolve()) in out

    # Read only: nothing was written into the collection.
    assert _snapshot(small_demo) == user_run["before"]


def test_multirun_and_reproducibility(sweep, user_run):
    jobs = sweep["dir"]
    assert sorted(p.name for p in jobs.iterdir() if p.is_dir()) == ["0", "1"]
    assert (jobs / "multirun.yaml").is_file()
    for job in ("0", "1"):
        assert (jobs / job / ".hydra" / "config.yaml").is_file()
        assert (jobs / job / "checkpoints" / "last.ckpt").is_file()
    assert sweep["done"].stdout.count("val/acc") >= 2

    single = _computed(_metrics(user_run["run"] / "csv" / "metrics.csv"))
    seed0 = _computed(_metrics(jobs / "0" / "csv" / "metrics.csv"))
    seed1 = _computed(_metrics(jobs / "1" / "csv" / "metrics.csv"))
    # Same seed (and the same collection, once as data.path, once as the demo): identical step by step.
    assert seed0 == single
    assert len(seed0) > 4 and any(row["train/loss_step"] for row in seed0)
    # Another seed: different batches, different initialization, different losses.
    assert [r["train/loss_step"] for r in seed1] != [r["train/loss_step"] for r in seed0]


def test_resume_mid_epoch_continues_step_for_step(tmp_path, demo_dir, small_demo, user_run):
    # interrupted at step 40 (inside the second epoch) with a checkpoint there, then resumed with ckpt_path
    data = [f"data.path={small_demo}", "seed=0"]
    first = _train([*FAST, *data, "trainer.max_steps=40", "+callbacks.model_checkpoint.every_n_train_steps=40",
                    "hydra.run.dir=first"], cwd=tmp_path, demo_dir=demo_dir)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = _train([*FAST, *data, f"ckpt_path={ckpt}", "hydra.run.dir=resumed"], cwd=tmp_path, demo_dir=demo_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def losses(run: Path) -> dict[str, str]:
        rows = _metrics(run / "csv" / "metrics.csv")
        return {r["step"]: r["train/loss_step"] for r in rows if r.get("train/loss_step")}

    after = losses(tmp_path / "resumed")
    assert after and min(map(int, after)) >= 40, "the resumed run starts where the first stopped"
    reference = losses(user_run["run"])
    assert {step: reference[step] for step in after} == after, "same losses as the uninterrupted run"


def test_cfg_job_prints_the_config_and_trains_nothing(tmp_path, demo_dir):
    done = _train(["--cfg", "job", "model=mlp", "data.path=cells.zarr", "trainer=gpu"], cwd=tmp_path,
                  demo_dir=demo_dir, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "_target_: annbatch.models.Classifier" in done.stdout
    assert "- 256" in done.stdout and "accelerator: gpu" in done.stdout and "path: cells.zarr" in done.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_lists_the_config_groups(tmp_path, demo_dir):
    done = _train(["--help"], cwd=tmp_path, demo_dir=demo_dir, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("annbatch train:")
    assert "model: classifier, mlp, vae" in done.stdout
    assert "trainer: cpu, ddp, ddp_cpu, default, gpu" in done.stdout
    assert "experiment: mlp_cell_type, vae_donors" in done.stdout


def test_missing_collection(tmp_path, demo_dir):
    missing = tmp_path / "no" / "such.zarr"
    done = _train([f"data.path={missing}"], cwd=tmp_path, demo_dir=demo_dir, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("annbatch train: error: data.path=")
    assert str(missing) in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not missing.exists() and not missing.parent.exists()


def test_unknown_obs_key(tmp_path, demo_dir, small_demo):
    done = _train([*DEMO, "data.obs_keys=[cell_typ]"], cwd=tmp_path, demo_dir=demo_dir, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cell_typ" in lines[0]
    for column in ("cell_type", "donor"):  # the available columns are listed
        assert column in lines[0]
    assert "Traceback" not in done.stderr


def test_config_group_typo(tmp_path, demo_dir):
    done = _train(["model=mpl"], cwd=tmp_path, demo_dir=demo_dir, timeout=60)
    assert done.returncode == 1
    assert "Could not find 'model/mpl'" in done.stderr
    assert "Available options in 'model':" in done.stderr
    for option in ("classifier", "mlp", "vae"):
        assert f"\t{option}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_demo_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ANNBATCH_DEMO_DIR", str(tmp_path / "here"))
    assert demo_cache_dir() == tmp_path / "here"
    assert demo_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("ANNBATCH_DEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_cache_dir() == tmp_path / "xdg" / "annbatch" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_cache_dir() == tmp_path / "home" / ".cache" / "annbatch" / "demo"


def test_demo_collection_content(small_demo, demo_dir):
    coll = annbatch.Collection(small_demo, mode="r")
    assert coll.n_obs == SMALL["n_obs"] and coll.n_vars == SMALL["n_vars"]
    obs = coll.obs(["cell_type", "donor"])
    assert obs["cell_type"].nunique() == SMALL["n_cell_types"]
    assert obs["donor"].nunique() == SMALL["n_donors"]
    # A second call finds the cache and rebuilds nothing.
    before = _snapshot(small_demo)
    assert demo_collection(**SMALL, cache_dir=demo_dir) == small_demo
    assert _snapshot(small_demo) == before
    assert not list(demo_dir.glob(".*.partial"))


def test_concurrent_demo_builds(tmp_path):
    # Two processes build the same demo at once: both get the same complete collection, and no partial
    # build is left behind.
    code = (
        "from annbatch.train import demo_collection; "
        "print(demo_collection(n_obs=600, n_vars=50, n_cell_types=8, n_donors=4, seed=3))"
    )
    env = {**os.environ, "ANNBATCH_DEMO_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {Path(out.strip()) for out, _ in outputs}
    assert len(paths) == 1
    (path,) = paths
    assert annbatch.Collection(path, mode="r").n_obs == 600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_vae_experiment(tmp_path, demo_dir):
    # The worked example end to end: a VAE with the donors as batch covariate, monitored by val/elbo.
    done = _train([*FAST, "experiment=vae_donors", "trainer.max_steps=10", "hydra.run.dir=run"], cwd=tmp_path,
                  demo_dir=demo_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"val/elbo\s+[0-9.]+", done.stdout)
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/elbo_step" in header and "val/elbo" in header
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_core_import_stays_light():
    code = (
        "import sys, annbatch, annbatch.cli, annbatch.train; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra', 'omegaconf', 'torch'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_from_python(tmp_path, small_demo, capsys):
    # The docs' recipe: compose in-process (no Hydra run), set paths.output_dir, call run().
    from hydra import compose, initialize_config_dir

    from annbatch.train import config_dir, run

    overrides = [*FAST, f"data.path={small_demo}", "trainer.max_steps=5", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = run(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["val/loss"] > 0
    assert f"outputs in {tmp_path}" in capsys.readouterr().out
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "`data.batch_size` must be at least 1, got 0"),
        (["data.layer=counts"], "`data.layer='counts'`: no such layer"),
        (["+data.nope=1"], "`data.nope` is not a setting of data"),
        (["model.hidden_dims=[-1]"], "`model.hidden_dims` must be positive"),
        (["model.label_key=donor"], "`model.label_key='donor'` is not one of the datamodule's obs_keys"),
    ],
)
def test_bad_settings_are_one_line_naming_the_config_key(tmp_path, demo_dir, small_demo, overrides, message):
    done = _train([*DEMO, *overrides, "trainer.max_steps=1"], cwd=tmp_path, demo_dir=demo_dir, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("annbatch train: error: "), done.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in done.stderr
