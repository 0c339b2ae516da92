"""The registry scvi-tools builds a model from: what ``setup_anndata`` records about an AnnData.

scvi-tools models built with ``registry=`` (instead of an AnnData) read their sizes from it: genes,
batches, labels and covariates, with the categories in code order. It is saved with the model, so a
saved model loads from it alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["scvi_registry"]

# scvi-tools' REGISTRY_KEYS that scVI-style modules read from a batch of tensors
X, BATCH, LABELS = "X", "batch", "labels"
CAT_COVS, CONT_COVS = "extra_categorical_covs", "extra_continuous_covs"


def _field(attr_name: str | None, attr_key: str | None, state: dict, stats: dict) -> dict[str, Any]:
    data = {"attr_name": attr_name, "attr_key": attr_key} if attr_name is not None else {}
    return {"data_registry": data, "state_registry": state, "summary_stats": stats}


def scvi_registry(
    *,
    model_name: str,
    n_obs: int,
    var_names: np.ndarray,
    layer: str | None,
    batch: tuple[str | None, np.ndarray],
    labels: tuple[str | None, np.ndarray],
    categorical_covariates: Mapping[str, np.ndarray],
    continuous_covariates: Sequence[str],
) -> dict[str, Any]:
    """A ``setup_method_name="setup_datamodule"`` registry.

    ``batch`` and ``labels`` are ``(obs column or None, categories in code order)``;
    ``categorical_covariates`` maps each column to its categories.
    """
    import scvi

    n_vars = len(var_names)
    cats, conts = list(categorical_covariates), list(continuous_covariates)
    cat_field = _field(None, None, {}, {"n_extra_categorical_covs": 0})
    if cats:
        cat_state = {
            "field_keys": cats,
            "mapping": dict(categorical_covariates),
            "n_cats_per_key": [len(m) for m in categorical_covariates.values()],
        }
        cat_field = _field(
            "obsm", "_scvi_extra_categorical_covs", cat_state, {"n_extra_categorical_covs": len(cats)}
        )
    cont_field = _field(None, None, {}, {"n_extra_continuous_covs": 0})
    if conts:
        cont_state = {"columns": np.array(conts, dtype=object)}
        cont_field = _field(
            "obsm", "_scvi_extra_continuous_covs", cont_state, {"n_extra_continuous_covs": len(conts)}
        )
    (batch_key, batch_labels), (labels_key, label_names) = batch, labels
    return {
        "scvi_version": scvi.__version__,
        "model_name": model_name,
        "setup_args": {
            "layer": layer,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "size_factor_key": None,
            "categorical_covariate_keys": cats or None,
            "continuous_covariate_keys": conts or None,
        },
        "field_registries": {
            X: _field(
                "layers" if layer else "X",
                layer,
                {"n_obs": n_obs, "n_vars": n_vars, "column_names": var_names},
                {"n_vars": n_vars, "n_cells": n_obs},
            ),
            BATCH: _field(
                "obs",
                "_scvi_batch",
                {"categorical_mapping": batch_labels, "original_key": batch_key},
                {"n_batch": len(batch_labels)},
            ),
            LABELS: _field(
                "obs",
                "_scvi_labels",
                {"categorical_mapping": label_names, "original_key": labels_key},
                {"n_labels": len(label_names)},
            ),
            "size_factor": _field(None, None, {}, {}),
            CAT_COVS: cat_field,
            CONT_COVS: cont_field,
        },
        "setup_method_name": "setup_datamodule",
    }
