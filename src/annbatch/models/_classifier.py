from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch.nn import functional as F

from annbatch.models._common import (
    _CellModule,
    _datamodule,
    _hidden_dims,
    _names,
    _normalize_log1p,
    _plain,
    _resolve,
)
from annbatch.models._mlp import MLP

__all__ = ["Classifier"]


class Classifier(_CellModule):
    """Predict a categorical obs column (e.g. cell type) from expression.

    Logistic regression without hidden layers, an :class:`~annbatch.models.MLP` otherwise, trained with
    cross-entropy on ``batch["obs"][label_key]`` (the int64 codes a loader yields with
    ``obs_keys=[label_key]``). Cells with a missing label (code ``-1``) count in neither loss nor
    accuracy.

    Parameters
    ----------
    n_vars
        Number of genes (columns of ``X``). ``None``: ``trainer.datamodule.n_vars``, filled in
        :meth:`setup`.
    n_classes
        Number of classes. ``None``: ``len(trainer.datamodule.categories[label_key])``.
    label_key
        obs column to predict, one of the loader's ``obs_keys``. ``None``:
        ``trainer.datamodule.obs_keys[0]``.
    hidden_dims
        Hidden layer widths; empty for logistic regression.
    dropout
        Dropout after each hidden layer (unused without hidden layers).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    normalize
        Scale each cell to ``target_sum`` counts and apply ``log1p`` before the network; ``False``
        feeds ``X`` as it is (for data that is already normalised).
    target_sum
        Counts per cell after normalisation.

    Notes
    -----
    Sizes not given are filled in :meth:`setup` from ``trainer.datamodule`` (attributes ``n_vars``,
    ``categories``, ``obs_keys``, and ``var_names`` where present) and written to ``self.hparams``, so a
    checkpoint records them and ``Classifier.load_from_checkpoint(path)`` needs no arguments. Class
    labels and gene names are kept in the checkpoint too (:attr:`classes`, :attr:`var_names`).

    Normalisation is sparse-aware: for a CSR batch only the stored values are scaled and log-transformed
    and the first layer multiplies CSR × dense, so batches are not densified on CPU.

    Logged: ``train/loss``, ``train/acc`` (per step and epoch), ``val/loss``, ``val/acc`` (per epoch,
    synchronised across processes) and ``train/cells_per_s``. Loss and accuracy are weighted by the number
    of labelled cells.

    ``train/cells_per_s`` is the previous batch's cells over the wall time from its ``training_step`` to
    this one: forward, backward, optimiser step, hooks and the wait for the next batch, i.e. the
    end-to-end training rate of one process (multiply by the world size under DDP). The first step of
    each epoch and the first after a validation run are not timed.

    :meth:`predict_step` returns class probabilities.

    Examples
    --------
    >>> import lightning as L
    >>> model = Classifier(n_vars=2000, n_classes=8, label_key="cell_type", hidden_dims=(128,))
    >>> L.Trainer(max_epochs=1).fit(model, train_dataloaders=loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        n_vars: int | None = None,
        n_classes: int | None = None,
        *,
        label_key: str | None = None,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        normalize: bool = True,
        target_sum: float = 1e4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams["hidden_dims"] = _hidden_dims(hidden_dims)
        self.hparams.update({k: _plain(v) for k, v in self.hparams.items()})
        if target_sum <= 0:
            raise ValueError(f"`target_sum` must be positive, got {target_sum}.")
        #: The network (an :class:`~annbatch.models.MLP`), or None until the sizes are known.
        self.net: MLP | None = None
        #: Labels of the class codes, where the datamodule knew them (kept in checkpoints).
        self.classes: pd.Index | None = None
        if n_vars is not None and n_classes is not None:
            self._build()

    # sizes ------------------------------------------------------------------------------------------------
    def _resolve_sizes(self) -> None:
        label_key, obs_keys = self._hp.label_key, getattr(_datamodule(self), "obs_keys", None)
        if label_key is None:
            label_key = _resolve(self, "label_key", lambda dm: dm.obs_keys[0], "`obs_keys`")
        elif obs_keys is not None and label_key not in obs_keys:
            raise ValueError(
                f"`label_key={label_key!r}` is not one of the datamodule's obs_keys {list(obs_keys)}."
            )
        _resolve(self, "n_vars", lambda dm: int(dm.n_vars), "`n_vars`")
        _resolve(self, "n_classes", lambda dm: len(dm.categories[label_key]), f"`categories[{label_key!r}]`")
        categories = getattr(_datamodule(self), "categories", None)
        if self.classes is None and categories is not None and label_key in categories:
            self.classes = pd.Index(_names(categories[label_key]))

    def _build(self) -> None:
        if self.net is None:
            hp = self._hp
            self.net = MLP(hp.n_vars, hp.n_classes, hp.hidden_dims, hp.dropout)

    def _labels_to_save(self) -> dict[str, Any]:
        return {**super()._labels_to_save(), "classes": _names(self.classes)}

    def _labels_loaded(self, saved: Mapping[str, Any]) -> None:
        super()._labels_loaded(saved)
        if saved.get("classes") is not None:
            self.classes = pd.Index(saved["classes"])

    # model ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(n, n_classes)``, for a dense or CSR batch of raw ``X``."""
        if self.net is None:
            raise RuntimeError(
                "The network is not built yet: pass `n_vars` and `n_classes`, or let a Trainer with a "
                "datamodule call `setup` first."
            )
        if self._hp.normalize:
            x = _normalize_log1p(x, self._hp.target_sum)
        return self.net(x)

    def _labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        key = self._hp.label_key
        if key is None:
            raise ValueError(
                "Classifier needs `label_key`: pass it, or train with a datamodule with `obs_keys`."
            )
        obs = batch.get("obs")
        if not isinstance(obs, Mapping) or key not in obs:
            raise KeyError(f"The batch has no obs[{key!r}]: build the loader with `obs_keys=[{key!r}]`.")
        return torch.as_tensor(obs[key], device=self.device).long()

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        x = self._x(batch)
        y = self._labels(batch)
        if stage == "train":
            self._log_throughput(x.shape[0])
        logits = self(x)
        known = y >= 0
        n = int(known.sum())
        if n:
            loss = F.cross_entropy(logits[known], y[known])
            acc = (logits[known].argmax(dim=1) == y[known]).float().mean()
        else:  # keep the graph so every parameter still gets a (zero) gradient
            loss, acc = logits.sum() * 0.0, torch.zeros((), device=logits.device)
        if stage == "train":
            if n:  # an unlabelled batch would log a meaningless step value
                self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
                self.log("train/acc", acc, on_step=True, on_epoch=True, batch_size=n)
        else:
            # Always logged, weighted by labelled cells (0 here), so every DDP process syncs the same keys.
            self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
            self.log(f"{stage}/acc", acc, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        return loss

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Class probabilities, shape ``(n, n_classes)``; codes index :attr:`classes`."""
        return torch.softmax(self(self._x(batch)), dim=1)
