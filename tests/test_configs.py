"""The Hydra config tree of ``annbatch train`` (top-level ``configs/``): composition, targets, the wheel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the train extra
pytest.importorskip("lightning")
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from annbatch.train import config_dir
from annbatch.train._run import _instantiate_group

REPO = Path(__file__).resolve().parent.parent
CONFIGS = config_dir()

# Every option of every group; a file added to or removed from configs/ must show up here too.
GROUPS = {
    "data": {"collection"},
    "model": {"classifier", "mlp", "vae"},
    "trainer": {"default", "cpu", "gpu", "ddp", "ddp_cpu"},
    "callbacks": {"default", "model_checkpoint", "early_stopping", "progress_bar", "none"},
    "logger": {"csv", "tensorboard", "many", "none"},
    "paths": {"default"},
    "experiment": {"vae_donors", "mlp_cell_type"},
}
PUBLIC_PREFIXES = ("annbatch.lightning.", "annbatch.models.", "lightning.pytorch.")


def _compose(*overrides: str, output_dir: Path | str = "/nonexistent/run") -> DictConfig:
    # Outside a Hydra run ${hydra:runtime.output_dir} has no value: point it somewhere explicitly.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    return cfg


def _targets(node) -> list[str]:
    if isinstance(node, DictConfig):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for key in node if key != "_target_" for t in _targets(node[key])]
    if isinstance(node, ListConfig):
        return [t for item in node for t in _targets(item)]
    return []


def _all_compositions() -> list[tuple[str, ...]]:
    return [(f"{group}={option}",) for group, options in GROUPS.items() for option in sorted(options)]


def test_config_dir_is_the_top_level_folder():
    # An editable install (this test environment) and a source checkout use <repo>/configs.
    assert CONFIGS == REPO / "configs"
    assert (CONFIGS / "train.yaml").is_file()


def test_groups_on_disk_are_the_documented_ones():
    on_disk = {group: {p.stem for p in (CONFIGS / group).glob("*.yaml")} for group in GROUPS}
    assert on_disk == GROUPS
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == {*GROUPS, "hydra"}


def test_defaults():
    cfg = _compose()
    assert cfg.seed == 0
    assert cfg.data._target_ == "annbatch.lightning.CollectionDataModule"
    assert cfg.data.path is None and cfg.data.collection is None  # null: the demo collection
    assert cfg.data.seed == cfg.seed
    assert list(cfg.data.obs_keys) == ["cell_type"]
    assert cfg.data.demo.n_cell_types >= 8 and cfg.data.demo.n_donors >= 4
    assert cfg.model._target_ == "annbatch.models.Classifier"
    assert list(cfg.model.hidden_dims) == []  # logistic regression
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.deterministic is True
    assert set(cfg.callbacks) == {"model_checkpoint", "early_stopping", "progress_bar"}
    assert set(cfg.logger) == {"csv"}
    assert cfg.callbacks.model_checkpoint.dirpath == "/nonexistent/run/checkpoints"
    assert cfg.callbacks.model_checkpoint.monitor == cfg.callbacks.early_stopping.monitor == "val/loss"


@pytest.mark.parametrize("overrides", _all_compositions(), ids=lambda o: " ".join(o))
def test_every_option_composes_with_public_targets(overrides):
    cfg = _compose(*overrides)
    targets = _targets(cfg)
    assert targets, "no object built from a _target_"
    for target in targets:
        assert target.startswith(PUBLIC_PREFIXES), target
        assert not any(part.startswith("_") for part in target.split(".")), target
    for target in targets:
        if target.startswith("lightning."):
            assert callable(get_object(target))


def test_annbatch_targets_resolve():
    # The data module and model classes the configs name are public attributes of their packages.
    for overrides in [(), ("model=mlp",), ("model=vae",)]:
        cfg = _compose(*overrides)
        for target in (cfg.data._target_, cfg.model._target_):
            obj = get_object(target)
            module, _, name = target.rpartition(".")
            assert name in importlib.import_module(module).__all__
            assert callable(obj)


def test_user_facing_overrides():
    cfg = _compose("data.path=cells.zarr", "data.obs_keys=[cell_type]", "model=mlp", "trainer=gpu")
    assert cfg.data.collection == "cells.zarr"
    assert list(cfg.data.obs_keys) == ["cell_type"]
    assert cfg.model._target_ == "annbatch.models.Classifier" and list(cfg.model.hidden_dims) == [256, 128]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert _compose("seed=7").data.seed == 7


def test_trainer_options():
    cfg = _compose("trainer=ddp_cpu")
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.devices) == ("cpu", "ddp", 2)
    cfg = _compose("trainer=ddp")
    assert (cfg.trainer.accelerator, cfg.trainer.strategy) == ("gpu", "ddp")
    # Every trainer option is the default one with a few keys changed.
    default = OmegaConf.to_container(_compose().trainer)
    for option in GROUPS["trainer"]:
        trainer = OmegaConf.to_container(_compose(f"trainer={option}").trainer)
        same = {k for k in default if trainer.get(k) == default[k]}
        assert {"max_epochs", "deterministic", "default_root_dir", "_target_"} <= same, option


def test_experiments():
    cfg = _compose("experiment=vae_donors")
    assert cfg.model._target_ == "annbatch.models.VAE"
    assert cfg.data.batch_key == "donor" and cfg.model.batch_key == "donor"
    assert "donor" in cfg.data.obs_keys
    # The VAE logs no val/loss: it brings its own monitored metric, and the command line still wins.
    assert cfg.callbacks.model_checkpoint.monitor == cfg.callbacks.early_stopping.monitor == "val/elbo"
    assert _compose("model=vae").monitor == "val/elbo"
    assert _compose("model=vae", "monitor=val/kl").callbacks.early_stopping.monitor == "val/kl"
    cfg = _compose("experiment=mlp_cell_type")
    assert cfg.model._target_ == "annbatch.models.Classifier" and len(cfg.model.hidden_dims) == 2
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"
    assert cfg.callbacks.early_stopping.mode == "max"
    # Command-line overrides still win over an experiment's values.
    assert _compose("experiment=vae_donors", "trainer.max_epochs=2").trainer.max_epochs == 2


@pytest.mark.parametrize("option", ["default", "cpu", "ddp_cpu"])
def test_trainer_instantiates(option, tmp_path):
    import lightning.pytorch as pl

    cfg = _compose(f"trainer={option}", output_dir=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert Path(trainer.default_root_dir) == tmp_path
    if option == "ddp_cpu":
        assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


def test_callbacks_and_loggers_instantiate(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cfg = _compose(output_dir=tmp_path)
    callbacks = _instantiate_group(cfg.callbacks)
    assert [type(c) for c in callbacks] == [ModelCheckpoint, EarlyStopping, TQDMProgressBar]
    assert Path(callbacks[0].dirpath) == tmp_path / "checkpoints"
    assert _instantiate_group(_compose("callbacks=none").callbacks) == []
    single = _instantiate_group(_compose("callbacks=early_stopping").callbacks)
    assert [type(c) for c in single] == [EarlyStopping]

    (csv,) = _instantiate_group(cfg.logger)
    assert isinstance(csv, CSVLogger)
    assert Path(csv.log_dir) == tmp_path / "csv"  # <run>/csv/metrics.csv
    assert _instantiate_group(_compose("logger=none").logger) == []

    many = _compose("logger=many", output_dir=tmp_path).logger
    assert set(many) == {"csv", "tensorboard"}
    tb_installed = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    if tb_installed:
        tb = instantiate(many.tensorboard)
        assert isinstance(tb, TensorBoardLogger)
        assert Path(tb.log_dir) == tmp_path / "tensorboard"
    else:
        assert get_object(many.tensorboard._target_) is TensorBoardLogger


def test_hydra_settings():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.job.name == "train"
    assert cfg.hydra.run.dir.startswith("outputs/")  # paths.log_dir
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")
    assert "Config groups" in cfg.hydra.help.template


def test_wheel_ships_the_configs(tmp_path):
    pytest.importorskip("hatchling")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(wheels),
         "-q"],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("annbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"annbatch/configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert expected <= names
    assert "annbatch/configs/train.yaml" in names and "annbatch/train/__main__.py" in names
    assert not any(n.startswith("configs/") for n in names)

    # Installed from the wheel (not editable), the command finds the configs inside the package.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel),
         "-q"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, annbatch.train as t; print(t.config_dir()); "
        "sys.exit(t.main(['--cfg', 'job', 'model=vae']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, rest = done.stdout.split("\n", 1)
    assert Path(first) == site / "annbatch" / "configs"
    assert "_target_: annbatch.models.VAE" in rest
