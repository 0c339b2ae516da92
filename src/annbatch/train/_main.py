from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import config_dir
from ._run import TrainError, _report_and_exit, run

if TYPE_CHECKING:
    from omegaconf import DictConfig

# What Hydra sees as the program. Lightning's DDP launcher starts the other processes by running
# sys.argv[0] with sys.argv[1:] (plus a few hydra.* overrides), so it must be a runnable script that trains.
_SCRIPT = Path(__file__).with_name("__main__.py")


def _task(cfg: DictConfig) -> Any:
    from omegaconf import OmegaConf

    try:
        metrics = run(cfg)
    except TrainError as err:
        _report_and_exit(err)
    # Sweepers (-m with an optimizing sweeper) minimize or maximize the return value.
    return metrics.get(OmegaConf.select(cfg, "monitor", default=None) or "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``annbatch train``: compose the config from `argv` with Hydra and train.

    `argv` is what follows ``annbatch train`` on the command line: config overrides (``model=mlp``,
    ``data.path=cells.zarr``) and Hydra's flags (``--cfg job``, ``-m``, ``--help``, ``--hydra-help``, …).
    They are handed to a :func:`hydra.main` application whose config folder is :func:`config_dir`.

    Parameters
    ----------
    argv
        Arguments; ``None``: ``sys.argv[1:]``.

    Returns
    -------
    Exit status: 0 on success, 1 when Hydra rejects the overrides or the run fails, 2 for a bad collection
    path or a bad ``data.*``/``model.*`` setting (reported as one line on stderr, naming the config key).
    """
    import hydra

    overrides = list(sys.argv[1:] if argv is None else argv)

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _app(cfg: DictConfig) -> Any:
        return _task(cfg)

    saved = sys.argv
    sys.argv = [str(_SCRIPT), *overrides]
    try:
        _app()
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    finally:
        sys.argv = saved
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
