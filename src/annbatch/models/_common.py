"""Pieces shared by the reference models.

Sparse-aware preprocessing, a linear layer that takes CSR input, size resolution from a datamodule,
throughput logging and the optimiser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn
from torch.nn import functional as F

__all__: list[str] = []


# -- preprocessing ---------------------------------------------------------------------------------------------
def _is_csr(x: torch.Tensor) -> bool:
    return x.layout == torch.sparse_csr


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Any) -> torch.Tensor:
    # The parts come from a valid CSR tensor; saying so explicitly also silences torch's invariant warning.
    return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


def _as_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (e.g. integer counts or float64 collections), keeping a CSR layout."""
    if x.dtype == dtype:
        return x
    if _is_csr(x):
        return _csr(x.crow_indices(), x.col_indices(), x.values().to(dtype), x.shape)
    return x.to(dtype)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums (library sizes) of a dense or CSR batch, shape ``(n,)``."""
    if _is_csr(x):
        # Segment sums over the stored values: deterministic and a few ms for millions of non-zeros.
        lengths = x.crow_indices().diff()
        return torch.segment_reduce(x.values(), "sum", lengths=lengths)
    return x.sum(dim=1)


def _row_of_values(x: torch.Tensor) -> torch.Tensor:
    """For a CSR tensor, the row of every stored value (int64, length nnz)."""
    crow = x.crow_indices()
    rows = torch.arange(x.shape[0], device=x.device)
    return torch.repeat_interleave(rows, crow.diff(), output_size=x.values().numel())


def _normalize_log1p(
    x: torch.Tensor, target_sum: float, row_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """``log1p(x / row_sum * target_sum)`` per row, in ``x``'s layout; all-zero rows stay zero.

    For CSR input only the stored values are scaled and transformed (zeros stay zeros, so the sparsity
    pattern is unchanged) and nothing is densified.
    """
    sums = _row_sums(x) if row_sums is None else row_sums
    scale = torch.where(sums > 0, target_sum / sums.clamp_min(torch.finfo(sums.dtype).tiny), 0.0)
    if _is_csr(x):
        crow = x.crow_indices()
        per_value = torch.repeat_interleave(scale, crow.diff(), output_size=x.values().numel())
        values = torch.log1p(x.values() * per_value)
        return _csr(crow, x.col_indices(), values, x.shape)
    return torch.log1p(x * scale[:, None])


def _densify(x: torch.Tensor) -> torch.Tensor:
    """A dense copy of a CSR tensor (scatter into zeros: several times faster than ``to_dense`` on CPU)."""
    if not _is_csr(x):
        return x
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    out.index_put_((_row_of_values(x), x.col_indices().long()), x.values())
    return out


# -- a linear layer with sparse CSR input -------------------------------------------------------------------
def _transpose_csr(x: torch.Tensor) -> torch.Tensor:
    """``x.T`` as a CSR tensor, via scipy's counting-sort CSR→CSC conversion (CPU only).

    torch's own CSR transpose sorts on CPU and is ~4× slower (torch 2.13), which makes torch's sparse
    backward slower than densifying the batch.
    """
    n, m = x.shape
    crow, col, values = x.crow_indices().numpy(), x.col_indices().numpy(), x.values().detach().numpy()
    csc = sp.csr_matrix((values, col, crow), shape=(n, m)).tocsc()
    idx = np.result_type(csc.indptr, csc.indices)
    return _csr(
        torch.from_numpy(csc.indptr.astype(idx, copy=False)),
        torch.from_numpy(csc.indices.astype(idx, copy=False)),
        torch.from_numpy(csc.data),
        (m, n),
    )


class _CsrLinearFunction(torch.autograd.Function):
    """``x @ weight.T + bias`` for a CSR ``x`` that needs no gradient (a batch of data)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.x = x  # not saved with save_for_backward: sparse tensors are not supported there
        ctx.has_bias = bias is not None
        out = x @ weight.t()
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (_transpose_csr(ctx.x) @ grad_out).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=0)
        return None, grad_weight, grad_bias


class _SparseInputLinear(nn.Linear):
    """:class:`torch.nn.Linear` that also takes a sparse CSR input without densifying it on CPU.

    On CPU, the forward pass is a CSR × dense product and the weight gradient ``x.T @ grad`` a CSR × dense
    product with a scipy transpose of ``x``: for 2,048 × 20,000 batches at 7 % density and 128 outputs,
    forward + backward took ~95 ms, against ~145 ms densifying the batch first and ~270 ms with torch's
    own sparse autograd (torch 2.13, 2 cores). Elsewhere (CUDA) the batch is densified, where dense
    kernels are the safe default (not measured here). Gradients with respect to a sparse input are not
    computed (the input is data).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_csr(x):
            return F.linear(x, self.weight, self.bias)
        if x.device.type != "cpu":
            return F.linear(_densify(x), self.weight, self.bias)
        if x.requires_grad:
            raise ValueError("Gradients with respect to a sparse input are not supported.")
        return _CsrLinearFunction.apply(x, self.weight, self.bias)


# -- sizes ----------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Hyperparameter values as plain Python, so checkpoints load with ``weights_only=True``.

    Hydra passes sequences as ``ListConfig``.
    """
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return tuple(_plain(v) for v in value)
    return value


def _hidden_dims(dims: Iterable[int] | int) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) else tuple(int(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise ValueError(f"`hidden_dims` must be positive, got {dims}.")
    return dims


def _datamodule(module: L.LightningModule) -> Any | None:
    trainer = module._trainer  # the `trainer` property raises when detached
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def _resolve(
    module: L.LightningModule,
    name: str,
    derive: Callable[[Any], Any],
    needs: str,
) -> Any:
    """Fill hyperparameter ``name`` from the trainer's datamodule when it was not given.

    ``derive(datamodule)`` computes it; ``needs`` names the datamodule attribute(s) it reads, for the
    error message. A given value that disagrees with the datamodule is an error, not silently kept.
    """
    given = module.hparams.get(name)
    datamodule = _datamodule(module)
    derived = None
    if datamodule is not None:
        try:
            derived = derive(datamodule)
        except (AttributeError, KeyError, IndexError) as e:
            if given is None:
                raise ValueError(
                    f"{type(module).__name__} could not derive `{name}` from the datamodule "
                    f"(needs {needs}: {e!r}); pass `{name}=...`."
                ) from e
    if given is None and derived is None:
        raise ValueError(
            f"{type(module).__name__} needs `{name}`: pass `{name}=...`, or train it with a datamodule "
            f"that has {needs}."
        )
    if given is not None and derived is not None and _plain(given) != _plain(derived):
        raise ValueError(
            f"{type(module).__name__} was given `{name}={given!r}` but the datamodule has {derived!r}."
        )
    value = _plain(given if given is not None else derived)
    module.hparams[name] = value
    return value


def _names(values: Iterable[Any] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


# -- the shared LightningModule -------------------------------------------------------------------------------
class _CellModule(L.LightningModule):
    """Throughput logging, size resolution and the AdamW optimiser shared by the reference models.

    Subclasses implement ``_resolve_sizes`` (called from :meth:`setup`, fills ``self.hparams``),
    ``_build`` (creates the network from ``self.hparams``; idempotent) and ``_step`` (the loss of a
    batch, logged under ``"train"``, ``"val"`` or ``"test"``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._tick: tuple[float, int] | None = None
        #: Gene names the model was trained on, where the datamodule knew them (kept in checkpoints).
        self.var_names: pd.Index | None = None

    @property
    def _hp(self) -> AttributeDict:
        """:attr:`hparams`, typed as the :class:`AttributeDict` that ``save_hyperparameters()`` makes.

        Its entries read and write as attributes. Lightning types :attr:`hparams` as a plain
        ``MutableMapping`` too, which it is only for hyperparameters given as one.
        """
        hparams = self.hparams
        assert isinstance(hparams, AttributeDict)
        return hparams

    # sizes ------------------------------------------------------------------------------------------------
    def _resolve_sizes(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of a training batch (logged under ``train/``)."""
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of a validation batch (logged under ``val/``)."""
        return self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of a test batch (logged under ``test/``)."""
        return self._step(batch, "test")

    def setup(self, stage: str) -> None:
        """Fill the sizes not given from ``trainer.datamodule`` and build the network (once).

        Lightning calls this before :meth:`configure_optimizers` and before restoring a checkpoint.
        """
        self._resolve_sizes()
        names = getattr(_datamodule(self), "var_names", None)
        if names is not None:
            names = pd.Index(_names(names))
            if self.var_names is None:
                self.var_names = names
            elif not self.var_names.equals(names):
                # Same count, different genes or order: the weights would silently mean other genes.
                raise ValueError(
                    f"{type(self).__name__} was trained on other genes (or another gene order) than the "
                    "datamodule's `var_names`."
                )
        self._build()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain lists, so a checkpoint loads with torch.load(weights_only=True).
        checkpoint["annbatch"] = self._labels_to_save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._labels_loaded(checkpoint.get("annbatch", {}))

    def _labels_to_save(self) -> dict[str, Any]:
        return {"var_names": _names(self.var_names)}

    def _labels_loaded(self, saved: Mapping[str, Any]) -> None:
        if saved.get("var_names") is not None:
            self.var_names = pd.Index(saved["var_names"])

    # throughput -------------------------------------------------------------------------------------------
    def _log_throughput(self, n_cells: int) -> None:
        """Log ``train/cells_per_s``, training throughput in cells per second.

        It is the previous batch's cells over the wall time from its ``training_step`` to this one. That
        interval covers the whole pipeline for one batch (forward, backward, optimiser step, hooks,
        logging and waiting for the loader), so it is the end-to-end training rate of this process; with
        DDP multiply by the world size for the total. The first batch of each epoch and the first after
        validation are not timed, so validation and epoch boundaries do not count.
        """
        now = time.perf_counter()
        if self._tick is not None:
            start, n_prev = self._tick
            if now > start:
                self.log(
                    "train/cells_per_s", n_prev / (now - start), on_step=True, on_epoch=True, batch_size=1
                )
        self._tick = (now, n_cells)

    def on_train_epoch_start(self) -> None:
        self._tick = None

    def on_validation_start(self) -> None:
        self._tick = None

    # optimiser --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the module's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(
            self.parameters(), lr=self._hp.lr, weight_decay=self._hp.get("weight_decay", 0.0)
        )

    # batches ----------------------------------------------------------------------------------------------
    def _x(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch["X"]
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} expects torch batches: build the loader with `to='torch'` "
                f"(got X of type {type(x).__name__})."
            )
        dtype = self.dtype
        assert isinstance(dtype, torch.dtype)  # Lightning also allows a str, set only by `.type("...")`
        return _as_float(x, torch.float32 if not dtype.is_floating_point else dtype)
