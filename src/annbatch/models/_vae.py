from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from annbatch.models._common import (
    _CellModule,
    _datamodule,
    _hidden_dims,
    _is_csr,
    _names,
    _normalize_log1p,
    _plain,
    _resolve,
    _row_of_values,
    _row_sums,
)
from annbatch.models._mlp import MLP

__all__ = ["VAE"]


def _nb_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Negative-binomial log-likelihood per cell, summed over genes.

    ``x``: counts ``(n, g)``, dense or CSR; ``log_mu``: log means ``(n, g)``; ``log_theta``: log inverse
    dispersions ``(g,)``. With ``p = mu / (mu + theta)`` the per-entry term is
    ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) + theta log(1 - p) + x log p``.

    For a zero count only ``theta log(1 - p)`` remains, so for CSR ``x`` that part is summed densely
    (it depends on ``mu``, which is dense anyway) and the count-dependent part only over the stored
    values: ``x`` is never densified and ``lgamma`` runs on the non-zeros alone.
    """
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu), stable for tiny or huge mu
    zero_part = (theta * (log_theta - log_theta_mu)).sum(dim=1)
    if _is_csr(x):
        rows, cols = _row_of_values(x), x.col_indices().long()
        counts, th = x.values(), theta[cols]
        count_part = (
            torch.lgamma(counts + th)
            - torch.lgamma(th)
            - torch.lgamma(counts + 1)
            + counts * (log_mu[rows, cols] - log_theta_mu[rows, cols])
        )
        # Values are in row order, so per-cell sums are segment sums (deterministic, unlike index_add_ on GPU).
        return zero_part + torch.segment_reduce(count_part, "sum", lengths=x.crow_indices().diff())
    count_part = (
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1) + x * (log_mu - log_theta_mu)
    )
    return zero_part + count_part.sum(dim=1)


class VAE(_CellModule):
    """A small scVI-style variational autoencoder of raw counts with an optional batch covariate.

    - Encoder: :class:`~annbatch.models.MLP` of ``log1p`` of counts normalised to ``target_sum`` per
      cell (plus the batch code one-hot) → mean and variance of a Gaussian posterior over ``n_latent``
      dimensions; ``z`` is drawn with the reparameterisation trick.
    - Decoder: MLP of ``z`` (plus the batch one-hot) → softmax over genes, times the cell's observed
      library size (its total count): the negative-binomial mean. A learned inverse dispersion per gene.
    - Loss: negative-binomial negative log-likelihood of the counts plus ``kl_weight`` times the KL
      divergence of the posterior from a standard normal prior, per cell, averaged over the batch.

    Parameters
    ----------
    n_vars
        Number of genes. ``None``: ``trainer.datamodule.n_vars``, filled in :meth:`setup`.
    n_batches
        Categories of the batch covariate (``batch["batch"]`` codes; ``-1`` adds nothing). ``None``:
        ``len(trainer.datamodule.categories[batch_key])`` when there is a batch key, else ``0``.
        ``0``: no covariate.
    batch_key
        obs column of the batch covariate, used to look up ``n_batches`` in the datamodule's
        categories. ``None``: ``trainer.datamodule.batch_key``.
    n_latent
        Latent dimensions.
    hidden_dims
        Hidden layer widths of the encoder; the decoder mirrors them.
    dropout
        Dropout after each hidden layer of the encoder (the decoder has none).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    kl_weight
        Weight of the KL term in the loss.
    kl_warmup_steps
        Ramp the KL weight linearly from 0 to ``kl_weight`` over this many optimiser steps (``0``: none),
        which keeps the posterior from collapsing early in training.
    target_sum
        Counts per cell of the encoder's normalised input.

    Notes
    -----
    ``X`` must hold raw counts. The encoder's first layer takes CSR batches without densifying them (see
    :class:`~annbatch.models.MLP`); the likelihood needs the mean of every gene, a dense
    ``(batch, n_vars)`` tensor, but evaluates the count-dependent terms only at the non-zeros of a CSR
    batch, so ``X`` itself is never densified.

    Logged, per cell and averaged over cells: ``train/elbo`` and ``val/elbo`` (the *negative* evidence
    lower bound, ``reconstruction + kl``: lower is better, without ``kl_weight``),
    ``train/reconstruction``, ``val/reconstruction`` (negative log-likelihood), ``train/kl``,
    ``val/kl``; and ``train/cells_per_s`` as for :class:`~annbatch.models.Classifier`. Validation values
    are per epoch and synchronised across processes. :meth:`predict_step` returns the posterior means
    (the latent embedding).

    Sizes are resolved and stored as for :class:`~annbatch.models.Classifier`, so
    ``VAE.load_from_checkpoint(path)`` needs no arguments.
    """

    def __init__(
        self,
        n_vars: int | None = None,
        n_batches: int | None = None,
        *,
        batch_key: str | None = None,
        n_latent: int = 10,
        hidden_dims: Sequence[int] = (128,),
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        kl_weight: float = 1.0,
        kl_warmup_steps: int = 0,
        target_sum: float = 1e4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams["hidden_dims"] = _hidden_dims(hidden_dims)
        self.hparams.update({k: _plain(v) for k, v in self.hparams.items()})
        if n_latent <= 0:
            raise ValueError(f"`n_latent` must be positive, got {n_latent}.")
        if n_batches is not None and n_batches < 0:
            raise ValueError(f"`n_batches` must be 0 or more, got {n_batches}.")
        if n_batches == 0 and batch_key is not None:
            raise ValueError("`n_batches=0` turns the batch covariate off: give no `batch_key` with it.")
        if kl_weight < 0 or kl_warmup_steps < 0:
            raise ValueError("`kl_weight` and `kl_warmup_steps` must be 0 or more.")
        if target_sum <= 0:
            raise ValueError(f"`target_sum` must be positive, got {target_sum}.")
        #: Encoder MLP: normalised log counts → posterior mean and (pre-softplus) variance.
        self.encoder: MLP | None = None
        #: Decoder MLP: latent → gene logits.
        self.decoder: MLP | None = None
        #: Log inverse dispersion per gene.
        self.log_theta: nn.Parameter | None = None
        #: Labels of the batch codes, where the datamodule knew them (kept in checkpoints).
        self.batch_categories: pd.Index | None = None
        if n_vars is not None and n_batches is not None:
            self._build()

    # sizes ------------------------------------------------------------------------------------------------
    def _resolve_sizes(self) -> None:
        _resolve(self, "n_vars", lambda dm: int(dm.n_vars), "`n_vars`")
        hp, datamodule = self._hp, _datamodule(self)
        if hp.n_batches == 0:
            return
        if hp.batch_key is None and datamodule is not None:
            hp.batch_key = getattr(datamodule, "batch_key", None)
        key = hp.batch_key
        if key is None:
            # No key anywhere: no covariate, unless n_batches was given (codes still come in batch["batch"]).
            hp.n_batches = 0 if hp.n_batches is None else hp.n_batches
            return
        _resolve(self, "n_batches", lambda dm: len(dm.categories[key]), f"`categories[{key!r}]`")
        categories = getattr(datamodule, "categories", None)
        if self.batch_categories is None and categories is not None and key in categories:
            self.batch_categories = pd.Index(_names(categories[key]))

    def _build(self) -> None:
        if self.encoder is not None:
            return
        hp = self._hp
        self.encoder = MLP(hp.n_vars, 2 * hp.n_latent, hp.hidden_dims, hp.dropout, n_covariates=hp.n_batches)
        self.decoder = MLP(hp.n_latent, hp.n_vars, hp.hidden_dims[::-1], 0.0, n_covariates=hp.n_batches)
        self.log_theta = nn.Parameter(torch.zeros(hp.n_vars))

    def _labels_to_save(self) -> dict[str, Any]:
        return {**super()._labels_to_save(), "batch_categories": _names(self.batch_categories)}

    def _labels_loaded(self, saved: Mapping[str, Any]) -> None:
        super()._labels_loaded(saved)
        if saved.get("batch_categories") is not None:
            self.batch_categories = pd.Index(saved["batch_categories"])

    # model ------------------------------------------------------------------------------------------------
    def _built(self) -> tuple[MLP, MLP, nn.Parameter]:
        """The encoder, decoder and log inverse dispersions (built together by :meth:`_build`)."""
        if self.encoder is None or self.decoder is None or self.log_theta is None:
            raise RuntimeError(
                "The network is not built yet: pass `n_vars` and `n_batches`, or let a Trainer call `setup`."
            )
        return self.encoder, self.decoder, self.log_theta

    def _covariate(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        if not self._hp.n_batches:
            return None
        if batch.get("batch") is None:
            raise KeyError("This VAE has a batch covariate: build the loader with `batch_key=...`.")
        return torch.as_tensor(batch["batch"], device=self.device).long()

    def encode(
        self, x: torch.Tensor, covariate: torch.Tensor | None = None, library: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance, each ``(n, n_latent)``, of raw counts ``x`` (dense or CSR).

        ``library`` (row sums of ``x``) is computed when not given.
        """
        encoder, _, _ = self._built()
        x = _normalize_log1p(x, self._hp.target_sum, library)
        mean, raw_var = encoder(x, covariate).chunk(2, dim=1)
        return mean, F.softplus(raw_var) + 1e-4  # floor: keeps log(var) in the KL finite

    def decode(
        self, z: torch.Tensor, library: torch.Tensor, covariate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log negative-binomial means ``(n, n_vars)`` for latents ``z`` and library sizes ``library``."""
        _, decoder, _ = self._built()
        log_rho = torch.log_softmax(decoder(z, covariate), dim=1)
        return log_rho + library.clamp_min(torch.finfo(library.dtype).tiny).log()[:, None]

    def forward(self, x: torch.Tensor, covariate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-cell ``reconstruction`` (NB negative log-likelihood), ``kl`` and latent ``z`` and ``mean``."""
        library = _row_sums(x)
        mean, var = self.encode(x, covariate, library)
        _, _, log_theta = self._built()
        z = mean + var.sqrt() * torch.randn_like(mean)
        log_mu = self.decode(z, library, covariate)
        reconstruction = -_nb_log_likelihood(x, log_mu, log_theta)
        kl = 0.5 * (mean.pow(2) + var - 1.0 - var.log()).sum(dim=1)
        return {"reconstruction": reconstruction, "kl": kl, "z": z, "mean": mean}

    def _kl_weight(self) -> float:
        warmup = self._hp.kl_warmup_steps
        ramp = min(1.0, self.global_step / warmup) if warmup else 1.0
        return self._hp.kl_weight * ramp

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        x = self._x(batch)
        n = x.shape[0]
        if stage == "train":
            self._log_throughput(n)
        out = self(x, self._covariate(batch))
        reconstruction, kl = out["reconstruction"].mean(), out["kl"].mean()
        train = stage == "train"
        values = {"elbo": reconstruction + kl, "reconstruction": reconstruction, "kl": kl}
        for name, value in values.items():
            self.log(
                f"{stage}/{name}", value, on_step=train, on_epoch=True, sync_dist=not train,
                prog_bar=name == "elbo", batch_size=n,
            )  # fmt: skip
        return reconstruction + self._kl_weight() * kl

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Posterior means ``(n, n_latent)``: the latent embedding of the batch."""
        return self.encode(self._x(batch), self._covariate(batch))[0]
