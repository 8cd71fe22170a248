"""The oracle allocation bound: the best per-input k that a trained top-k dictionary allows at a mean budget.

A top-k dictionary ranks each row's latents by pre-activation; row ``i`` with ``k_i`` latents keeps its
``k_i`` largest (positive) ones. :func:`error_curves` measures every row's squared error ``e_i(k) =
‖x_i - x̂_i(k)‖²`` on a grid of k from ONE encode at the grid's largest k (the residual after each grid k,
in chunks of rows). :func:`oracle_allocation` then chooses ``k_i`` to minimise ``Σ e_i(k_i)`` at the mean
budget ``B`` (water-filling): for a multiplier ``μ`` each row takes ``argmin_k e_i(k) + μ·k``; ``μ`` is
bisected until the total ``Σ k_i`` brackets ``T = round(n·B)``, and the remainder between the two sides of
the bracket is filled greedily by marginal gain, so the mean equals ``T / n`` (``B`` up to ``1/(2n)``;
``mean_k`` reports what was spent when a coarse grid cannot make ``T``). The Lagrangian also gives a lower
bound on the error of ANY allocation at that budget (weak duality), reported as ``sse_bound``/``fve_bound``:
no per-input allocation with this dictionary can do better. FVE is :func:`adaptivek.evaluation.evaluate`'s
``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²``.

:func:`allocation_curves` puts the oracle, the fixed k (uniform) and given allocations rescaled to each
budget (rank-preserving, :func:`rescale_allocation`) on one table of ΔFVE vs budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor

from .checks import finite_number, finite_rows, int_at_least, matrix

_ELEMENTS = 2**24  # rows per chunk x d_sae: bounds the encoder's pre-activations
_BISECT_STEPS = 64


# ----------------------------------------------------------------------------- error curves
@dataclass(frozen=True)
class ErrorCurves:
    """Every row's squared reconstruction error at every grid k, and the set's total variance."""

    errors: Tensor
    """[n, G] float64: ``‖x_i - x̂_i(ks[g])‖²``."""
    ks: Tensor
    """[G] int64, strictly increasing: the grid of k."""
    total_variance: float
    """``Σ‖x - x̄‖²`` over the rows (float64, two passes): FVE's denominator."""

    def __post_init__(self) -> None:
        if self.errors.ndim != 2 or self.ks.ndim != 1 or self.errors.shape[1] != len(self.ks) or len(self.ks) == 0:
            raise ValueError(f"errors must be [n, G] with G = len(ks); got {tuple(self.errors.shape)} and "
                             f"{tuple(self.ks.shape)}")
        if (self.ks[1:] <= self.ks[:-1]).any() or not self.total_variance > 0:
            raise ValueError("ks must be strictly increasing and total_variance > 0 (use error_curves)")

    def _columns(self, k_rows: Any) -> Tensor:
        """The grid column of each row's k [n]; refuses a k off the grid."""
        k = _int_rows(k_rows, len(self.errors), "k_rows")
        col = torch.searchsorted(self.ks, k).clamp(max=len(self.ks) - 1)
        off = self.ks[col] != k
        if off.any():
            raise ValueError(f"k_rows holds {int(off.sum())} value(s) off the grid (first: {int(k[off][0])}; grid "
                             f"{_grid_text(self.ks)}); build the curves on a grid that holds them "
                             f"(error_curves(sae, X, ks=K) gives every k in 1..K)")
        return col

    def row_errors(self, k_rows: Any) -> Tensor:
        """``‖x_i - x̂_i(k_i)‖²`` [n] float64 of an allocation ``k_rows [n]`` (each on the grid)."""
        return self.errors.gather(1, self._columns(k_rows)[:, None]).squeeze(1)

    def fve(self, k_rows: Any) -> float:
        """FVE of the dictionary with row ``i`` keeping ``k_rows[i]`` latents."""
        return 1.0 - float(self.row_errors(k_rows).sum()) / self.total_variance


def _grid_text(ks: Tensor) -> str:
    return f"{ks.tolist()}" if len(ks) <= 8 else f"{int(ks[0])}..{int(ks[-1])} ({len(ks)} values)"


def _int_rows(k: Any, n: int, name: str) -> Tensor:
    """An integer tensor [n] (int64) or a clear error."""
    t = torch.as_tensor(k)
    if t.ndim != 1 or len(t) != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [n={n}] (one k per row), got {t.dtype} {tuple(t.shape)}")
    return t.long().cpu()


def _check_grid(ks: int | Sequence[int] | Tensor, d_sae: int) -> Tensor:
    """The grid as a strictly increasing int64 tensor inside [1, d_sae]; an int K means every k in 1..K."""
    if isinstance(ks, int) and not isinstance(ks, bool):
        int_at_least(ks, "ks", why="an int K is the grid 1..K")
        ks = torch.arange(1, ks + 1)
    grid = torch.as_tensor(ks)
    if grid.ndim != 1 or len(grid) == 0 or grid.is_floating_point() or grid.dtype == torch.bool:
        raise ValueError(f"ks must be an int K (every k in 1..K) or a non-empty 1-D sequence of ints, got {ks!r}")
    grid = grid.long()
    if (grid[1:] <= grid[:-1]).any():
        raise ValueError(f"ks must be strictly increasing, got {_grid_text(grid)}")
    if int(grid[0]) < 1 or int(grid[-1]) > d_sae:
        raise ValueError(f"the k grid {_grid_text(grid)} leaves the dictionary: every k must lie in [1, d_sae="
                         f"{d_sae}] (a row keeps at least one latent and at most all of them); clip the grid")
    return grid


def _check_dictionary(sae: Any) -> None:
    """A top-k family SAE (its latents ranked by pre-activation); the oracle's premise."""
    from .sae import SparseAutoencoder

    if not isinstance(sae, SparseAutoencoder) or type(sae).encode_sparse is not SparseAutoencoder.encode_sparse:
        raise TypeError(f"the oracle needs a top-k dictionary (a SparseAutoencoder whose encode_sparse ranks latents "
                        f"by pre-activation: TopKSAE, AdaptiveKSAE, BatchTopKSAE), got {type(sae).__name__}")


def _total_variance(X: Tensor) -> float:
    """``Σ‖x - x̄‖²`` in float64, two passes over row chunks (no cancellation from a common offset)."""
    chunks = X.split(8192)
    mean = sum(c.double().sum(0) for c in chunks) / len(X)
    return float(sum((c.double() - mean).pow(2).sum() for c in chunks))


@torch.no_grad()
def error_curves(sae: Any, X: Tensor, ks: int | Sequence[int] | Tensor) -> ErrorCurves:
    """Every row's squared error ``‖x - x̂(k)‖²`` at every grid k, from one encode at the grid's largest k.

    ``sae``: a top-k family SAE; ``X [n, d_in]``: the vectors it sees (already scaled); ``ks``: an int K
    (every k in 1..K) or increasing ints in [1, d_sae]. Rows go in chunks (the encoder's ``[rows, d_sae]``).
    """
    _check_dictionary(sae)
    n = len(matrix(X, "X", d=sae.d_in))
    if n < 2:
        raise ValueError(f"X has {n} row(s): FVE needs at least 2 vectors (the variance of one is 0/0)")
    finite_rows(X, "X", "drop them")
    grid = _check_grid(ks, sae.d_sae)
    total = _total_variance(X)
    if not total > 0:
        raise ValueError("every row of X is the same vector: Σ‖x - mean(x)‖² = 0, so FVE is undefined")
    rows = max(1, _ELEMENTS // sae.d_sae)  # the encoder's [rows, d_sae] pre-activations bound the chunk
    parts = [_chunk_errors(sae, xb, grid) for xb in X.split(rows)]
    return ErrorCurves(torch.cat(parts), grid, total)


def _chunk_errors(sae: Any, x: Tensor, grid: Tensor) -> Tensor:
    """Squared errors [B, G] of one chunk: the residual after each grid k, the ranks between grid points
    subtracted with one embedding_bag each (no [B, G, d] tensor)."""
    import torch.nn.functional as F

    xb = x.to(device=sae.device, dtype=sae.dtype)
    code = sae.encode_sparse(xb, k=int(grid[-1]))  # [B, K] sorted descending, masked beyond k and where <= 0
    acts = code.top_acts * code.mask
    resid = xb - sae.b_dec  # [B, d]: x - x̂ with no latent
    errors, lo = [], 0
    for hi in grid.tolist():
        resid = resid - F.embedding_bag(code.top_indices[:, lo:hi], sae.W_dec, mode="sum",
                                        per_sample_weights=acts[:, lo:hi])  # minus ranks lo..hi-1
        errors.append((resid * resid).sum(1).double().cpu())  # [B]
        lo = hi
    return torch.stack(errors, 1)  # [B, G]


@torch.no_grad()
def allocation_fve(sae: Any, X: Tensor, k_rows: Any) -> float:
    """FVE of ``sae``'s dictionary when row ``i`` keeps ``k_rows[i]`` latents (inference only, no retraining).

    E.g. AdaptiveK's probe allocation applied to a TopK dictionary. ``k_rows``: an integer tensor [n] in
    [1, d_sae] (or one int). Same formula and streaming as :func:`adaptivek.evaluation.evaluate`.
    """
    from .evaluation import evaluate

    _check_dictionary(sae)
    n = len(matrix(X, "X", d=sae.d_in))
    k = torch.full((n,), int(k_rows)) if isinstance(k_rows, int) and not isinstance(k_rows, bool) else k_rows
    k = _int_rows(k, n, "k_rows")
    if n and (int(k.min()) < 1 or int(k.max()) > sae.d_sae):
        raise ValueError(f"k_rows must lie in [1, d_sae={sae.d_sae}] (the dictionary's range), got values in "
                         f"[{int(k.min())}, {int(k.max())}]; clip the allocation")
    return float(evaluate(sae, X, k=k)["fve"])


# ----------------------------------------------------------------------------- the oracle
class OracleAllocation(NamedTuple):
    """The oracle's allocation at one budget, its error and the lower bound on any allocation's error."""

    k: Tensor  # [n] int64: each row's k (grid values)
    budget: float  # the requested mean k
    mean_k: float  # the mean k spent (T / n with T = round(n · budget), unless the grid cannot make T)
    sse: float  # Σ e_i(k_i)
    fve: float  # 1 - sse / Σ‖x - x̄‖²
    sse_bound: float  # Lagrangian lower bound on Σ e_i(k_i) of ANY allocation with Σ k_i = T
    fve_bound: float  # 1 - sse_bound / Σ‖x - x̄‖²: no allocation at this budget reaches more
    mu: float  # the multiplier (error per unit of k) where the bisection stopped


def _check_budget(budget: Any, ks: Tensor) -> float:
    b = finite_number(budget, "budget")
    lo, hi = int(ks[0]), int(ks[-1])
    if not lo <= b <= hi:
        raise ValueError(f"budget {b} is a mean k no allocation on the grid can meet: every row's k lies in "
                         f"[{lo}, {hi}]; choose a budget in that range or extend the grid (ks)")
    return b


def _choose(E: Tensor, kf: Tensor, mu: float) -> Tensor:
    """Each row's grid column minimising ``e + μ·k`` (ties: the smaller k) [n]."""
    return (E + mu * kf).argmin(1)


def oracle_allocation(curves: ErrorCurves, budget: float) -> OracleAllocation:
    """Minimise ``Σ e_i(k_i)`` with mean k = ``budget`` (module docstring): water-filling by bisection on μ,
    then the remainder filled greedily by marginal gain. ``budget`` must lie in the grid's range."""
    E, ks = curves.errors, curves.ks
    b = _check_budget(budget, ks)
    n, kf = len(E), ks.double()
    target = min(max(round(n * b), n * int(ks[0])), n * int(ks[-1]))  # T: the total k to spend
    span = float(E.max() - E.min()) / float((ks[1:] - ks[:-1]).min()) + 1.0 if len(ks) > 1 else 1.0
    mu_lo, mu_hi = -span, span  # at -span every row takes the largest k, at +span the smallest
    for _ in range(_BISECT_STEPS):
        mid = (mu_lo + mu_hi) / 2
        total = int(ks[_choose(E, kf, mid)].sum())
        if total == target:
            mu_lo = mu_hi = mid
            break
        mu_lo, mu_hi = (mid, mu_hi) if total > target else (mu_lo, mid)
    col = _fill(E, ks, _choose(E, kf, mu_hi), _choose(E, kf, mu_lo), target)
    sse = float(E.gather(1, col[:, None]).sum())
    bound = max(float((E + mu * kf).min(1).values.sum()) - mu * target for mu in (mu_lo, mu_hi))
    var = curves.total_variance
    return OracleAllocation(ks[col], b, float(ks[col].sum()) / n, sse, 1 - sse / var, bound, 1 - bound / var,
                            (mu_lo + mu_hi) / 2)


def _fill(E: Tensor, ks: Tensor, low: Tensor, high: Tensor, target: int) -> Tensor:
    """From ``low`` (total <= T) towards ``high`` (total >= T): whole moves by gain per unit of k while they
    fit, then single moves of largest gain per unit of k that fit the rest (grid columns [n])."""
    col = low.clone()
    rest = target - int(ks[col].sum())
    moving = (high != low).nonzero().flatten()
    if rest > 0 and len(moving):
        cost = (ks[high[moving]] - ks[low[moving]]).double()
        gain = E[moving, low[moving]] - E[moving, high[moving]]
        order = torch.argsort(gain / cost, descending=True, stable=True)
        fits = cost[order].cumsum(0) <= rest  # a prefix of the moves, best first
        take = moving[order[fits]]
        col[take] = high[take]
        rest = target - int(ks[col].sum())
    while rest > 0:  # each step spends at least one grid gap, and rest < one whole move
        step = (ks[None, :] - ks[col][:, None]).double()  # [n, G] extra k of moving row i to column g
        ratio = ((E.gather(1, col[:, None]) - E) / step).masked_fill((step <= 0) | (step > rest), -math.inf)
        best = int(ratio.flatten().argmax())
        if not math.isfinite(float(ratio.flatten()[best])):
            break  # the grid cannot spend the rest exactly: mean_k reports what was spent
        col[best // len(ks)] = best % len(ks)
        rest = target - int(ks[col].sum())
    return col


# ----------------------------------------------------------------------------- allocations at a budget
def uniform_allocation(n: int, budget: float, *, seed: int = 0) -> Tensor:
    """The fixed-k allocation with mean ``round(n·budget)/n``: every row ``floor(budget)``, a seeded random
    set of rows one more [n] int64 (for an integer budget: every row the budget)."""
    int_at_least(n, "n")
    b = finite_number(budget, "budget", low=1)
    base, target = math.floor(b), round(n * b)
    k = torch.full((n,), base, dtype=torch.int64)
    extra = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: target - n * base]
    k[extra] += 1
    return k


def rescale_allocation(k_rows: Any, budget: float, *, k_min: int = 1, k_max: int) -> Tensor:
    """A per-row allocation rescaled to mean ``round(n·budget)/n``, rank-preserving: ``clamp(s·k, k_min, k_max)``
    with ``s`` bisected to spend the total, then rounded by largest remainder (integers [n] int64; rows with
    equal k may end one apart, a larger k never gets a smaller one)."""
    k = torch.as_tensor(k_rows).double().cpu()
    if k.ndim != 1 or len(k) == 0 or not torch.isfinite(k).all() or (k < 0).any():
        raise ValueError(f"k_rows must be a 1-D tensor of finite, non-negative k (one per row), got {tuple(k.shape)}")
    int_at_least(k_min, "k_min")
    int_at_least(k_max, "k_max", k_min)
    n, b = len(k), finite_number(budget, "budget", low=k_min, high=k_max)
    target = round(n * b)
    reach = float(torch.where(k > 0, float(k_max), float(k_min)).sum())
    if target > reach:
        raise ValueError(f"budget {b} cannot be reached by rescaling this allocation: its {int((k == 0).sum())} "
                         f"rows with k = 0 stay at k_min={k_min}, so the mean is at most {reach / n:.4g}")
    lo, hi = 0.0, k_max / float(k[k > 0].min()) if (k > 0).any() else 1.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * k).clamp(k_min, k_max).sum()) < target else (lo, mid)
    c = (hi * k).clamp(k_min, k_max)
    out = c.floor()
    rest = target - int(out.sum())
    frac = torch.where(out < k_max, c - out, torch.full_like(c, -1.0))  # rows at k_max take no more
    out[torch.argsort(frac, descending=True, stable=True)[:max(rest, 0)]] += 1
    return out.long()


def allocation_curves(curves: ErrorCurves, budgets: Sequence[float],
                      allocations: Mapping[str, Any] | None = None, *, seed: int = 0) -> pd.DataFrame:
    """ΔFVE vs budget for the oracle, the fixed k and each allocation rescaled to every budget (one table).

    ``curves``: :func:`error_curves` on a grid of every k in its range (``ks=K``); ``allocations``: name ->
    per-row k [n] (e.g. the probe's k), rescaled rank-preservingly to each budget. Columns: ``budget``,
    ``method`` ("oracle", "uniform", or the allocation's name), ``mean_k``, ``fve``, ``delta_fve`` (minus the
    uniform FVE at that budget), ``fve_bound`` (the oracle's upper bound on any allocation; NaN for others).
    """
    ks = curves.ks
    if not torch.equal(ks, torch.arange(int(ks[0]), int(ks[-1]) + 1)):
        raise ValueError(f"allocation curves need every integer k of the grid's range (got {_grid_text(ks)}): "
                         f"rescaled and uniform allocations take any k; build the curves with ks=K")
    allocations = dict(allocations or {})
    if "oracle" in allocations or "uniform" in allocations:
        raise ValueError("allocations must not be named 'oracle' or 'uniform' (the table's own methods)")
    n, rows = len(curves.errors), []
    for budget in budgets:
        o = oracle_allocation(curves, budget)
        fixed = uniform_allocation(n, o.budget, seed=seed)
        base = curves.fve(fixed)
        named = {"oracle": (o.k, o.fve_bound), "uniform": (fixed, math.nan)}
        named |= {name: (rescale_allocation(k, o.budget, k_min=int(ks[0]), k_max=int(ks[-1])), math.nan)
                  for name, k in allocations.items()}
        for name, (k, bound) in named.items():
            fve = curves.fve(k)
            rows.append({"budget": o.budget, "method": name, "mean_k": float(k.double().mean()), "fve": fve,
                         "delta_fve": fve - base, "fve_bound": bound})
    return pd.DataFrame(rows)


__all__ = ["ErrorCurves", "OracleAllocation", "error_curves", "oracle_allocation", "allocation_fve",
           "uniform_allocation", "rescale_allocation", "allocation_curves"]
