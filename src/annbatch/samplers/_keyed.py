"""The ``batch_sampler="homogeneous"`` and ``"balanced"`` shorthands: samplers made from a ``batch_key``.

A loader cannot build them when it is constructed, since they need the key's codes; it keeps a
:class:`KeySamplerSpec` and builds the sampler once data (and with it the codes) is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from annbatch.abc import Sampler
from annbatch.samplers._class import ClassSampler
from annbatch.samplers._weighted import WeightedClassSampler

KEY_SAMPLERS = ("homogeneous", "balanced")


@dataclass(frozen=True)
class KeySamplerSpec:
    """What a shorthand asked for; :meth:`build` makes the sampler from the key's codes."""

    kind: str
    batch_key: str
    batch_size: int
    chunk_size: int
    preload_nchunks: int
    shuffle: bool
    drop_last: bool
    rng: np.random.Generator | None
    seed: int | None
    class_weights: Mapping | Sequence[float] | None
    num_samples: int | None

    @classmethod
    def of(cls, batch_sampler: Any, batch_key: str | None, **settings: Any) -> KeySamplerSpec | None:
        """The spec for a shorthand ``batch_sampler`` (``None`` for a sampler object or ``None``)."""
        if not isinstance(batch_sampler, str):
            if settings["class_weights"] is not None or settings["num_samples"] is not None:
                raise ValueError(
                    "`class_weights`/`num_samples` apply to batch_sampler='homogeneous' or 'balanced'."
                )
            return None
        if batch_sampler not in KEY_SAMPLERS:
            raise ValueError(
                f"`batch_sampler` must be a Sampler, 'homogeneous' or 'balanced', got {batch_sampler!r}."
            )
        if batch_key is None:
            raise ValueError(f"`batch_sampler={batch_sampler!r}` samples by an obs column: give `batch_key`.")
        return cls(kind=batch_sampler, batch_key=batch_key, **settings)

    def build(self, codes: np.ndarray, categories: pd.Index | None) -> Sampler:
        """The sampler over rows whose ``batch_key`` codes are ``codes``."""
        if categories is None:
            raise TypeError(f"batch_key {self.batch_key!r} must be categorical to sample by it.")
        classes = pd.Categorical.from_codes(codes, categories=categories)
        if self.kind == "homogeneous":
            return ClassSampler(
                classes, self.batch_size, self.chunk_size, self.preload_nchunks,
                class_weights=self.class_weights, num_samples=self.num_samples, shuffle=self.shuffle,
                drop_last=self.drop_last, rng=self.rng, seed=self.seed,
            )  # fmt: skip
        # weighted draws are random by nature: no `shuffle`
        return WeightedClassSampler(
            classes, self.batch_size, self.chunk_size, self.preload_nchunks,
            class_weights=self.class_weights,
            num_samples=self.num_samples, drop_last=self.drop_last, rng=self.rng, seed=self.seed,
        )  # fmt: skip
