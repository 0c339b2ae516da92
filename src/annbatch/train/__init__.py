"""Training on annbatch collections with Lightning, configured by Hydra: ``annbatch train``.

The configs live in the top-level ``configs/`` folder of the repository (shipped in the wheel as
``annbatch/configs``). :func:`main` runs the ``annbatch train`` command, :func:`run` trains once
from a composed config, and :func:`demo_collection` builds (or finds) the cached demo collection.

Importing this package needs neither Lightning nor torch; Hydra is imported when :func:`main` runs.
"""

from ._config import config_dir
from ._demo import demo_cache_dir, demo_collection
from ._main import main
from ._run import TrainError, build_datamodule, run

__all__ = ["TrainError", "build_datamodule", "config_dir", "demo_cache_dir", "demo_collection", "main", "run"]
