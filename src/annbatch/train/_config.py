from __future__ import annotations

from pathlib import Path

_ENTRY = "train.yaml"


def config_dir() -> Path:
    """The folder holding ``train.yaml`` and the config groups of ``annbatch train``.

    An installed wheel carries the configs inside the package (``annbatch/configs``); an editable install
    or a source checkout uses the repository's top-level ``configs/`` folder.

    Returns
    -------
    Absolute path of the config folder.

    Raises
    ------
    FileNotFoundError
        Neither location has a ``train.yaml``.
    """
    package = Path(__file__).resolve().parent.parent  # .../annbatch
    candidates = (package / "configs", package.parent.parent / "configs")  # wheel; <repo>/src/annbatch
    for candidate in candidates:
        if (candidate / _ENTRY).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"annbatch's training configs were not found (looked for {_ENTRY} in {tried}).")
