"""Realistic synthetic single-cell data for tests, examples and benchmarks.

The generator produces raw-count-like matrices with the structure that matters for
a data loader's performance and correctness: skewed library sizes, power-law gene
expression, cell-type marker programs, donor batch effects and a realistic sparsity
pattern (sorted, distinct column indices per row, no explicit zeros).

Examples
--------
>>> from annbatch.synthetic import make_adata
>>> adata = make_adata(1_000, 500, seed=0)
>>> adata.shape
(1000, 500)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from os import PathLike

    from numpy.typing import DTypeLike

__all__ = ["make_adata", "write_h5ad_files"]

# Ordered roughly by abundance in blood/tissue atlases, so the first types are the common ones.
_CELL_TYPE_NAMES = (
    "T cell",
    "CD14+ monocyte",
    "B cell",
    "NK cell",
    "CD16+ monocyte",
    "dendritic cell",
    "plasma cell",
    "megakaryocyte",
    "plasmacytoid dendritic cell",
    "macrophage",
    "neutrophil",
    "erythrocyte",
    "mast cell",
    "endothelial cell",
    "fibroblast",
    "epithelial cell",
    "keratinocyte",
    "hepatocyte",
    "smooth muscle cell",
    "pericyte",
    "hematopoietic stem cell",
    "basophil",
    "eosinophil",
    "astrocyte",
)
_SYMBOL_PREFIXES = ("RPL", "RPS", "MT-ND", "CD", "IL", "KRT", "COL", "ZNF", "SLC", "TMEM", "HLA-D", "CCL")

_N_PCS = 16
_DOUBLET_RATE = 0.03
_NNZ_SIGMA = 0.35  # spread of per-cell detected-gene counts (log scale)
_COUNT_RATIO_MEDIAN = 2.5  # median UMIs per detected gene
_COUNT_RATIO_SIGMA = 0.3
_MARKER_FOLD = 8.0  # typical up-weighting of a cell type's marker genes
_DONOR_SIGMA = 0.3  # per-donor, per-gene multiplicative noise (log scale)

# splitmix64 constants; typed as uint64 so numba never promotes the bit arithmetic to float.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S58 = np.uint64(58)
_ONE = np.uint64(1)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DEBRUIJN_TABLE = np.zeros(64, dtype=np.int64)
for _bit in range(64):
    _DEBRUIJN_TABLE[int(((1 << _bit) * 0x03F79D71B4CB0A89) % (1 << 64)) >> 58] = _bit
del _bit
_INV_2_53 = 1.0 / 9007199254740992.0


def make_adata(
    n_obs: int = 2000,
    n_vars: int = 1000,
    *,
    nnz_per_row: float | None = None,
    n_cell_types: int = 8,
    n_donors: int = 4,
    dense: bool = False,
    dtype: DTypeLike = np.float32,
    seed: int | None = 0,
    var_names: Sequence[str] | None = None,
    obs_prefix: str = "cell",
) -> anndata.AnnData:
    """Generate a realistic synthetic single-cell count matrix.

    Parameters
    ----------
    n_obs
        Number of cells (rows).
    n_vars
        Number of genes (columns).
    nnz_per_row
        Mean number of non-zero entries per row. Each row's count varies around it
        (lognormally) and is capped at `n_vars`, so very dense requests end up slightly
        below the target. Defaults to ``0.07 * n_vars`` (7 % density).
    n_cell_types
        Number of cell types, each with its own marker-gene program and frequency.
    n_donors
        Number of donors, each with its own per-gene multiplicative batch effect.
    dense
        Return `X` as a dense C-contiguous array instead of CSR.
    dtype
        Dtype of `X`. Non-zero values are positive integers, generated as float32 (exact
        below 2**24) and cast, so narrow integer dtypes may wrap rare huge counts.
    seed
        Seed for :func:`numpy.random.default_rng`; the output is a pure function of it
        (per-row random streams are seeded from that generator, so the number of numba
        threads does not matter).
    var_names
        Gene names; defaults to ``gene_{j}``. Must have length `n_vars`.
    obs_prefix
        Cells are named ``f"{obs_prefix}_{i}"``.

    Returns
    -------
    AnnData with

    - `X`: counts, :class:`scipy.sparse.csr_matrix` (canonical: sorted distinct indices,
      no explicit zeros, int32 index arrays unless nnz needs int64) or dense array.
    - `obs`: ``cell_type`` and ``donor`` (categorical), ``n_counts`` (float64 row sum),
      ``n_genes`` (int64 row nnz), ``is_doublet`` (bool, ~3 %), ``barcode`` (str).
    - `var`: ``gene_symbol`` (str) and ``highly_variable`` (bool).
    - `obsm["X_pca"]`: float32 embedding (``n_obs × 16``) clustered by cell type.
    - `uns["cell_type_markers"]`: mapping from cell type to its marker gene names.
    """
    _check_sizes(n_obs, n_vars, n_cell_types, n_donors)
    if nnz_per_row is None:
        nnz_per_row = 0.07 * n_vars
    if not nnz_per_row > 0:
        raise ValueError(f"nnz_per_row must be positive, got {nnz_per_row}.")
    if var_names is None:
        var_index = pd.Index([f"gene_{j}" for j in range(n_vars)])
    else:
        var_index = pd.Index([str(v) for v in var_names])
        if len(var_index) != n_vars:
            raise ValueError(f"var_names has length {len(var_index)}, expected n_vars={n_vars}.")
    dtype = np.dtype(dtype)

    rng = np.random.default_rng(seed)
    weights, sel_weights, markers = _gene_programs(rng, n_vars, n_cell_types, n_donors)
    cell_type, donor = _assign_groups(rng, n_obs, n_cell_types, n_donors)
    is_doublet = rng.random(n_obs) < _DOUBLET_RATE
    row_nnz, extra_counts = _row_sizes(rng, n_obs, n_vars, nnz_per_row, is_doublet)

    indptr = np.zeros(n_obs + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    # int32 keeps the matrix compact and is what most readers expect; only widen when forced to.
    index_dtype = np.int32 if indptr[-1] <= np.iinfo(np.int32).max else np.int64
    indptr = indptr.astype(index_dtype)
    indices = np.empty(int(indptr[-1]), dtype=index_dtype)
    # The kernel always writes float32 (exact for counts below 2**24), so it compiles once
    # rather than once per requested dtype.
    data = np.empty(int(indptr[-1]), dtype=np.float32)
    n_counts = np.empty(n_obs, dtype=np.float64)
    prob, alias = _alias_tables(sel_weights)
    row_table = (cell_type * n_donors + donor).astype(np.int64)
    row_seeds = rng.integers(0, np.iinfo(np.uint64).max, size=n_obs, dtype=np.uint64, endpoint=True)
    # A few chunks per thread balance the load; results do not depend on the chunking.
    n_chunks = min(n_obs, 8 * numba.get_num_threads())
    _fill_rows(
        indptr,
        row_seeds,
        row_table,
        extra_counts,
        prob,
        alias,
        weights,
        _DEBRUIJN_TABLE,
        n_chunks,
        indices,
        data,
        n_counts,
    )

    X = sp.csr_matrix((data.astype(dtype, copy=False), indices, indptr), shape=(n_obs, n_vars))
    # Rows are built sorted and duplicate-free; flagging it spares scipy a re-check.
    X.has_sorted_indices = True
    X.has_canonical_format = True
    if dtype != np.float32:
        # Narrow dtypes may round or wrap large counts: n_counts must describe the stored values.
        n_counts = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()

    names = _cell_type_names(n_cell_types)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, categories=names),
            "donor": pd.Categorical.from_codes(donor, categories=[f"donor_{d}" for d in range(n_donors)]),
            "n_counts": n_counts,
            "n_genes": np.diff(indptr).astype(np.int64),
            "is_doublet": is_doublet,
            "barcode": _barcodes(rng, n_obs),
        },
        index=pd.Index([f"{obs_prefix}_{i}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(
        {
            "gene_symbol": _gene_symbols(n_vars),
            "highly_variable": _highly_variable(weights),
        },
        index=var_index,
    )
    return anndata.AnnData(
        X=X.toarray() if dense else X,
        obs=obs,
        var=var,
        obsm={"X_pca": _embedding(rng, cell_type, donor, n_cell_types, n_donors)},
        uns={"cell_type_markers": {names[t]: var_index[m].to_numpy() for t, m in enumerate(markers)}},
    )


def write_h5ad_files(
    directory: str | PathLike[str],
    n_files: int,
    n_obs: int | Sequence[int],
    n_vars: int,
    *,
    overlap: float = 1.0,
    seed: int = 0,
    **kwargs: Any,
) -> list[Path]:
    """Write a collection of synthetic h5ad files, as from several datasets.

    Each file comes from :func:`make_adata` with its own seed and its own donors
    (``donor_{k}`` numbering continues across files) and cells named
    ``f"file{i}_{obs_prefix}_{j}"`` so obs names are unique across the collection.

    Parameters
    ----------
    directory
        Output directory, created if missing.
    n_files
        Number of files.
    n_obs
        Cells per file, or one count per file.
    n_vars
        Genes per file.
    overlap
        Fraction of each file's genes shared by all files. With ``overlap < 1``, a random
        ``round(overlap * n_vars)`` genes of a shared universe ``gene_0 …`` are common to
        every file and the rest are drawn, without repetition across files, from the
        remaining universe. Genes stay sorted by universe position.
    seed
        Seed for the whole collection.
    **kwargs
        Passed on to :func:`make_adata` (not `var_names` or `seed`).

    Returns
    -------
    Paths of the written files, ``synthetic_{i:03d}.h5ad``, in order.
    """
    if n_files < 0:
        raise ValueError(f"n_files must be non-negative, got {n_files}.")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}.")
    for key in ("var_names", "seed"):
        if key in kwargs:
            raise TypeError(f"write_h5ad_files() sets {key!r} itself.")
    rows = [n_obs] * n_files if isinstance(n_obs, int | np.integer) else [int(n) for n in n_obs]
    if len(rows) != n_files:
        raise ValueError(f"Got {len(rows)} row counts for n_files={n_files}.")
    obs_prefix = kwargs.pop("obs_prefix", "cell")
    n_donors = kwargs.get("n_donors", 4)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    n_shared = round(overlap * n_vars)
    n_own = n_vars - n_shared
    n_universe = n_shared + n_files * n_own
    universe = np.array([f"gene_{u}" for u in range(n_universe)], dtype=object)
    symbols = _gene_symbols(n_universe)
    perm = rng.permutation(n_universe)
    shared = perm[:n_shared]
    file_seeds = rng.integers(0, 2**63, size=n_files)

    paths = []
    for i in range(n_files):
        own = perm[n_shared + i * n_own : n_shared + (i + 1) * n_own]
        keep = np.sort(np.concatenate([shared, own]))
        adata = make_adata(
            rows[i],
            n_vars,
            seed=int(file_seeds[i]),
            var_names=universe[keep],
            obs_prefix=f"file{i}_{obs_prefix}",
            **kwargs,
        )
        adata.var["gene_symbol"] = symbols[keep]
        adata.obs["donor"] = adata.obs["donor"].cat.rename_categories(
            [f"donor_{i * n_donors + d}" for d in range(n_donors)]
        )
        path = directory / f"synthetic_{i:03d}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


def _check_sizes(n_obs: int, n_vars: int, n_cell_types: int, n_donors: int) -> None:
    if n_obs < 0:
        raise ValueError(f"n_obs must be non-negative, got {n_obs}.")
    for name, value in (("n_vars", n_vars), ("n_cell_types", n_cell_types), ("n_donors", n_donors)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")


def _cell_type_names(n: int) -> list[str]:
    names = list(_CELL_TYPE_NAMES[:n])
    names += [f"cell type {k}" for k in range(len(names), n)]
    return names


def _gene_symbols(n: int) -> np.ndarray:
    # Unique by construction (the number suffix), so anndata keeps the column as strings.
    prefixes = _SYMBOL_PREFIXES
    return np.array(
        [f"{prefixes[j % len(prefixes)]}{j // len(prefixes) + 1}" for j in range(n)], dtype=object
    )


def _gene_programs(
    rng: np.random.Generator, n_vars: int, n_cell_types: int, n_donors: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per (cell type, donor) expression profiles.

    Returns
    -------
    weights
        ``(n_cell_types * n_donors, n_vars)`` expected expression shares (rows sum to 1),
        row ``t * n_donors + d`` for type ``t`` and donor ``d``.
    sel_weights
        Flattened (square-root) shares used to decide which genes are detected: highly
        expressed genes saturate in detection, so detection is less skewed than counts.
    markers
        Marker gene positions of each cell type.
    """
    # Zipf-like means over a random gene order: a few very high genes, a long tail.
    ranks = rng.permutation(n_vars) + 1.0
    base = ranks**-0.9 * rng.lognormal(0.0, 0.25, n_vars)

    # Markers avoid the very top genes, whose fold changes would be invisible.
    n_markers = int(np.clip(n_vars // (4 * n_cell_types), 1, 100))
    candidates = np.flatnonzero(ranks > max(1.0, 0.01 * n_vars))
    if candidates.size < n_markers:
        candidates = np.arange(n_vars)
    order = rng.permutation(candidates)
    programs = np.ones((n_cell_types, n_vars))
    markers = []
    for t in range(n_cell_types):
        lo = (t * n_markers) % max(order.size - n_markers + 1, 1)
        m = np.sort(order[lo : lo + n_markers])
        programs[t, m] *= rng.lognormal(math.log(_MARKER_FOLD), 0.4, m.size)
        markers.append(m)

    donor_effect = rng.lognormal(-0.5 * _DONOR_SIGMA**2, _DONOR_SIGMA, (n_donors, n_vars))
    weights = (programs[:, None, :] * donor_effect[None, :, :] * base).reshape(-1, n_vars)
    weights /= weights.sum(axis=1, keepdims=True)
    sel_weights = np.sqrt(weights)
    sel_weights /= sel_weights.sum(axis=1, keepdims=True)
    return weights, sel_weights, markers


def _assign_groups(
    rng: np.random.Generator, n_obs: int, n_cell_types: int, n_donors: int
) -> tuple[np.ndarray, np.ndarray]:
    type_p = np.exp(-0.35 * np.arange(n_cell_types)) * rng.lognormal(0.0, 0.2, n_cell_types)
    type_p /= type_p.sum()
    donor_p = rng.dirichlet(np.full(n_donors, 5.0))
    cell_type = rng.choice(n_cell_types, size=n_obs, p=type_p)
    donor = rng.choice(n_donors, size=n_obs, p=donor_p)
    return cell_type, donor


def _row_sizes(
    rng: np.random.Generator, n_obs: int, n_vars: int, nnz_per_row: float, is_doublet: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Detected genes per row and the counts to spread on top of one count per gene."""
    # Lognormal with mean exactly nnz_per_row; stochastic rounding keeps the mean unbiased.
    z = rng.lognormal(-0.5 * _NNZ_SIGMA**2, _NNZ_SIGMA, n_obs) * nnz_per_row
    row_nnz = np.clip(np.floor(z + rng.random(n_obs)), 1, n_vars).astype(np.int64)
    ratio = rng.lognormal(math.log(_COUNT_RATIO_MEDIAN), _COUNT_RATIO_SIGMA, n_obs)
    # Doublets carry two cells' worth of RNA.
    library = row_nnz * ratio * np.where(is_doublet, 1.7, 1.0)
    return row_nnz, np.maximum(library - row_nnz, 0.0)


def _barcodes(rng: np.random.Generator, n_obs: int) -> np.ndarray:
    codes = rng.choice(4**16, size=n_obs, replace=False).astype(np.uint64)
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    digits = (codes[:, None] >> shifts) & np.uint64(3)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits]
    seqs = np.ascontiguousarray(letters).view("S16").ravel().astype(str)
    return np.char.add(seqs, "-1").astype(object)


def _highly_variable(weights: np.ndarray) -> np.ndarray:
    # Genes whose share varies most across cell types and donors, ~10 % of them.
    spread = np.log(weights).std(axis=0)
    n_hv = max(1, round(0.1 * weights.shape[1]))
    hv = np.zeros(weights.shape[1], dtype=bool)
    hv[np.argsort(-spread, kind="stable")[:n_hv]] = True
    return hv


def _embedding(
    rng: np.random.Generator, cell_type: np.ndarray, donor: np.ndarray, n_cell_types: int, n_donors: int
) -> np.ndarray:
    # Cheap stand-in for a PCA: type clusters, a small donor shift and per-cell noise.
    centroids = rng.normal(0.0, 3.0, (n_cell_types, _N_PCS))
    shifts = rng.normal(0.0, 0.5, (n_donors, _N_PCS))
    noise = rng.normal(0.0, 1.0, (cell_type.size, _N_PCS))
    return (centroids[cell_type] + shifts[donor] + noise).astype(np.float32)


@numba.njit(cache=True)
def _alias_tables(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables, one per row of `weights`, for O(1) weighted draws."""
    n_tables, n = weights.shape
    prob = np.ones((n_tables, n))
    alias = np.arange(n).repeat(n_tables).reshape(n, n_tables).T.copy()
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    for t in range(n_tables):
        scaled = weights[t] * (n / weights[t].sum())
        n_small = 0
        n_large = 0
        for j in range(n):
            if scaled[j] < 1.0:
                small[n_small] = j
                n_small += 1
            else:
                large[n_large] = j
                n_large += 1
        while n_small > 0 and n_large > 0:
            n_small -= 1
            s = small[n_small]
            g = large[n_large - 1]
            prob[t, s] = scaled[s]
            alias[t, s] = g
            scaled[g] = scaled[g] + scaled[s] - 1.0
            if scaled[g] < 1.0:
                n_large -= 1
                small[n_small] = g
                n_small += 1
        # Leftovers are 1 up to rounding: keep prob 1 and their own index.
    return prob, alias


@numba.njit(cache=True, inline="always")
def _next_u64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return state, z ^ (z >> _S31)


@numba.njit(cache=True, inline="always")
def _next_uniform(state: np.uint64) -> tuple[np.uint64, float]:
    state, z = _next_u64(state)
    return state, float(z >> _S11) * _INV_2_53


@numba.njit(cache=True, inline="always")
def _poisson(state: np.uint64, lam: float) -> tuple[np.uint64, int]:
    if lam <= 0.0:
        return state, 0
    if lam < 12.0:
        # Inversion by sequential search: one uniform and one exp for the small means that dominate.
        state, u = _next_uniform(state)
        # Most means are tiny: a Taylor lower bound of exp(-lam) settles k = 0 without an exp.
        if u <= 1.0 - lam * (1.0 - lam * (0.5 - lam / 6.0)):
            return state, 0
        p = math.exp(-lam)
        cdf = p
        k = 0
        while u > cdf and k < 64:
            k += 1
            p *= lam / k
            cdf += p
        return state, k
    # Normal approximation is accurate enough for large means and O(1).
    state, u1 = _next_uniform(state)
    state, u2 = _next_uniform(state)
    z = math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
    return state, max(0, int(math.floor(lam + math.sqrt(lam) * z + 0.5)))


@numba.njit(cache=True, parallel=True)
def _fill_rows(
    indptr: np.ndarray,
    row_seeds: np.ndarray,
    row_table: np.ndarray,
    extra_counts: np.ndarray,
    prob: np.ndarray,
    alias: np.ndarray,
    weights: np.ndarray,
    debruijn_table: np.ndarray,
    n_chunks: int,
    indices: np.ndarray,
    data: np.ndarray,
    n_counts: np.ndarray,
) -> None:
    """Fill CSR rows: distinct sorted gene indices per row, then their counts.

    Every row draws from its own seeded stream, so results do not depend on threading.
    """
    n_obs = indptr.shape[0] - 1
    n_vars = weights.shape[1]
    n_words = (n_vars + 63) // 64
    for c in numba.prange(n_chunks):
        # One bitmap per chunk: marks chosen genes and yields them in sorted order without a sort.
        words = np.zeros(n_words, dtype=np.uint64)
        for i in range(c * n_obs // n_chunks, (c + 1) * n_obs // n_chunks):
            start = indptr[i]
            stop = indptr[i + 1]
            k = stop - start
            t = row_table[i]
            state = row_seeds[i]
            if 2 * k <= n_vars:
                count = 0
                draws = 0
                max_draws = 16 * k + 64
                while count < k and draws < max_draws:
                    state, u = _next_uniform(state)
                    u *= n_vars
                    j = min(int(u), n_vars - 1)
                    if u - j >= prob[t, j]:
                        j = alias[t, j]
                    bit = _ONE << np.uint64(j & 63)
                    if (words[j >> 6] & bit) == 0:
                        words[j >> 6] |= bit
                        count += 1
                    draws += 1
                # Weighted draws keep hitting the same genes on rare extreme rows: finish uniformly.
                while count < k:
                    state, u = _next_uniform(state)
                    j = min(int(u * n_vars), n_vars - 1)
                    bit = _ONE << np.uint64(j & 63)
                    if (words[j >> 6] & bit) == 0:
                        words[j >> 6] |= bit
                        count += 1
            else:
                # Dense rows: start from all genes and drop a uniform subset, which stays cheap.
                for w in range(n_words):
                    words[w] = _ALL_BITS
                if n_vars & 63:
                    words[n_words - 1] = (_ONE << np.uint64(n_vars & 63)) - _ONE
                n_drop = n_vars - k
                while n_drop > 0:
                    state, u = _next_uniform(state)
                    j = min(int(u * n_vars), n_vars - 1)
                    bit = _ONE << np.uint64(j & 63)
                    if (words[j >> 6] & bit) != 0:
                        words[j >> 6] ^= bit
                        n_drop -= 1
            p = start
            for w in range(n_words):
                x = words[w]
                while x != 0:
                    low = x & (~x + _ONE)
                    indices[p] = w * 64 + debruijn_table[(low * _DEBRUIJN) >> _S58]
                    p += 1
                    x ^= low
                words[w] = 0
            share = 0.0
            for p in range(start, stop):
                share += weights[t, indices[p]]
            scale = extra_counts[i] / share if share > 0.0 else 0.0
            total = 0.0
            for p in range(start, stop):
                state, extra = _poisson(state, scale * weights[t, indices[p]])
                data[p] = 1 + extra
                total += data[p]
            n_counts[i] = total
