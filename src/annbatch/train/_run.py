from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from annbatch.errors import TrainError

from ._demo import demo_collection

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from omegaconf import DictConfig

# Printed at the end of a run besides every val/* metric.
_THROUGHPUT = "train/cells_per_s"


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The data module of a composed ``annbatch train`` config, from its ``data`` node.

    ``data.path`` and ``data.demo`` are the command's own keys: a null ``path`` means the demo collection
    (built or found in the cache by :func:`~annbatch.train.demo_collection` with the ``data.demo``
    settings, in ``paths.demo_dir``). The rest of ``data`` is instantiated from its ``_target_`` with
    ``collection`` set to that path.

    Parameters
    ----------
    cfg
        The composed config.

    Returns
    -------
    The data module, not yet set up.

    Raises
    ------
    TrainError
        The collection cannot be opened, or asks for obs columns it does not have.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)  # the `data` node is a mapping
    settings = _settings("data", data) | {"collection": "data.path"}
    path = data.pop("path", None)
    demo = data.pop("demo", None) or {}
    if path is None:
        demo_dir = OmegaConf.select(cfg, "paths.demo_dir", default=None)
        data["collection"] = str(demo_collection(**demo, cache_dir=demo_dir))
    else:
        data["collection"] = str(path)
    try:
        return instantiate(data, _convert_="all")
    except InstantiationException as err:
        problem = _user_error(err.__cause__, path, settings)
        if problem is None:
            raise
        raise problem from err.__cause__


def _settings(section: str, node: Mapping[Any, Any]) -> dict[str, str]:
    """The keys of a config node (the parameters its ``_target_`` gets) → their dotted config keys."""
    return {str(key): f"{section}.{key}" for key in node if not str(key).startswith("_")}


def _user_error(err: BaseException | None, path: Any, settings: Mapping[str, str]) -> TrainError | None:
    """The one-line error for a bad collection path, obs key or data setting; None for anything else.

    ``settings`` maps the data module's parameters to their config keys: a message naming a parameter
    (`batch_size`) names the key the user sets (`data.batch_size`).
    """
    from annbatch import CollectionError

    if isinstance(err, CollectionError | FileNotFoundError):
        where = "the demo collection" if path is None else f"data.path={path}"
        return TrainError(f"{where}: {_message(err, settings)}")
    return _setting_error(err, "data", settings)


def _setting_error(err: BaseException | None, section: str, settings: Mapping[str, str]) -> TrainError | None:
    """A one-line error for a bad setting of the config node ``section``; None if ``err`` is not about one.

    A ValueError or KeyError raised while building the node's object is about its settings; a TypeError
    only when it names one of them (or is an unknown keyword, a key the object does not take).
    """
    if not isinstance(err, KeyError | ValueError | TypeError):
        return None
    message = _message(err, settings)
    if message != _message(err, {}):  # names a setting, now as its config key
        return TrainError(message)
    unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
    if isinstance(err, TypeError) and unknown:
        known = ", ".join(sorted({key for name, key in settings.items() if name != unknown[1]}))
        return TrainError(
            f"`{section}.{unknown[1]}` is not a setting of {section}; its settings are {known}."
        )
    return TrainError(f"{section}: {message}") if not isinstance(err, TypeError) else None


def _message(err: BaseException, settings: Mapping[str, str]) -> str:
    from annbatch.errors import rename_parameters

    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)  # no repr quotes
    return rename_parameters(str(text), settings, flags=False)


def _instantiate_group(node: Any) -> list[Any]:
    """Instantiate every entry of a group node like ``callbacks`` or ``logger`` that has a ``_target_``."""
    from hydra.utils import instantiate

    if not isinstance(node, Mapping):
        return []
    return [
        instantiate(entry) for entry in node.values() if isinstance(entry, Mapping) and "_target_" in entry
    ]


def run(cfg: DictConfig) -> dict[str, float]:
    """Train once as the composed config says, then print and return the final metrics.

    Seeds everything with ``cfg.seed``, builds the data module (:func:`build_datamodule`), the model,
    the callbacks, the loggers and the trainer from their ``_target_`` and fits, resuming from
    ``cfg.ckpt_path`` when set. If no validation ran
    during the fit (a ``trainer.max_steps`` within the first epoch), one validation pass runs after it,
    so the printed and logged metrics always include the validation metrics.

    Parameters
    ----------
    cfg
        A config composed from ``train.yaml`` (inside a Hydra run, since paths refer to its output
        directory).

    Returns
    -------
    The trainer's final scalar metrics, by name (``val/acc``, ``val/loss``, ``train/cells_per_s``, …).
    """
    import lightning
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    _log_through_hydra(lightning)
    start = time.perf_counter()
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    model_settings = _settings("model", cfg.model)
    try:
        model = instantiate(cfg.model)
    except InstantiationException as err:
        problem = _setting_error(err.__cause__, "model", model_settings)
        if problem is None:
            raise
        raise problem from err.__cause__
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except (KeyError, ValueError) as err:
        # Checks that need the data (a label_key among the obs_keys) run when the model is set up.
        settings = model_settings | _settings("data", cfg.data)
        if _message(err, settings) == _message(err, {}):
            raise
        raise TrainError(_message(err, settings)) from err
    if not any(key.startswith("val/") for key in trainer.callback_metrics):
        trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if getattr(value, "numel", lambda: 1)() == 1
    }
    if trainer.is_global_zero:
        print(_summary(metrics, time.perf_counter() - start, trainer), flush=True)
    return metrics


def _log_through_hydra(lightning: Any) -> None:
    """Drop the console handler of the ``lightning`` logger when the root logger has handlers (Hydra's).

    Its records reach Hydra's console and ``train.log`` handlers anyway; with both, every Lightning
    message would be printed twice.
    """
    handler = getattr(lightning, "_console", None)
    if handler is not None and logging.getLogger().handlers:
        logging.getLogger("lightning").removeHandler(handler)


def _summary(metrics: Mapping[str, float], seconds: float, trainer: pl.Trainer) -> str:
    shown = sorted(key for key in metrics if key.startswith("val/"))
    if _THROUGHPUT in metrics:
        shown.append(_THROUGHPUT)
    width = max((len(key) for key in shown), default=0)
    lines = [
        f"annbatch train: {trainer.current_epoch} epochs, {trainer.global_step} steps in {seconds:.1f} s; "
        f"outputs in {trainer.default_root_dir}"
    ]
    for key in shown:
        value = metrics[key]
        text = f"{value:,.0f}" if key == _THROUGHPUT and math.isfinite(value) else f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)


def _report_and_exit(err: TrainError) -> None:
    print(f"annbatch train: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
