from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from annbatch.models._common import _hidden_dims, _SparseInputLinear

__all__ = ["MLP"]


class MLP(nn.Module):
    """A feed-forward network whose first layer also takes sparse CSR input.

    ``Linear → ReLU → Dropout`` per hidden layer, then a final ``Linear``. With no hidden layers it is
    a single linear layer (logistic regression when trained with cross-entropy).

    Parameters
    ----------
    n_in
        Input features (genes).
    n_out
        Output features (classes, or whatever the last layer predicts).
    hidden_dims
        Widths of the hidden layers, in order; empty for a single linear layer.
    dropout
        Dropout probability after every hidden layer.
    n_covariates
        Number of categories of an optional categorical covariate (e.g. a batch or donor). Its one-hot
        encoding is an extra input of the first layer, implemented as a learned per-category offset of
        that layer's output (the same function, without building the one-hot). ``0``: no covariate.

    Notes
    -----
    The input may be dense or a :class:`torch.sparse_csr` tensor. On CPU a sparse input is multiplied
    as CSR × dense, and the weight gradient is computed from a transposed CSR copy, never densifying
    the batch (about 2× faster than densifying it for 2,048 × 20,000 batches at 7 % density). On other
    devices the first layer densifies sparse input.

    Examples
    --------
    >>> import torch
    >>> from annbatch.models import MLP
    >>> net = MLP(300, 8, hidden_dims=(64,), dropout=0.1)
    >>> net(torch.rand(4, 300)).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        *,
        n_covariates: int = 0,
    ):
        super().__init__()
        if n_in <= 0 or n_out <= 0:
            raise ValueError(f"`n_in` and `n_out` must be positive, got {n_in} and {n_out}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        if n_covariates < 0:
            raise ValueError(f"`n_covariates` must be 0 or more, got {n_covariates}.")
        dims = (int(n_in), *_hidden_dims(hidden_dims), int(n_out))
        self.n_in, self.n_out, self.n_covariates = dims[0], dims[-1], int(n_covariates)
        #: The first layer, taking dense or sparse CSR input.
        self.input = _SparseInputLinear(dims[0], dims[1])
        #: Per-category offsets of the first layer's output (one-hot covariate × weight), or None.
        self.covariate = nn.Embedding(n_covariates, dims[1]) if n_covariates else None
        if self.covariate is not None:
            nn.init.zeros_(self.covariate.weight)  # start as if there were no covariate
        layers: list[nn.Module] = []
        for i in range(1, len(dims) - 1):
            layers += [nn.ReLU(), nn.Dropout(dropout)] if dropout > 0 else [nn.ReLU()]
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        #: The layers after the first (empty without hidden layers).
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, covariate: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the network.

        Parameters
        ----------
        x
            Shape ``(n, n_in)``, dense or sparse CSR.
        covariate
            Integer codes of the covariate, shape ``(n,)``, in ``[0, n_covariates)``; ``-1`` (missing)
            adds nothing. Required when ``n_covariates > 0``, ignored otherwise.

        Returns
        -------
        Dense tensor of shape ``(n, n_out)``.
        """
        h = self.input(x)
        if self.covariate is not None:
            if covariate is None:
                raise ValueError(f"This MLP has a covariate with {self.n_covariates} categories: pass codes.")
            known = covariate >= 0
            h = h + self.covariate(covariate.clamp_min(0)) * known.unsqueeze(1).to(h.dtype)
        return self.body(h)
