"""Statistics used across the library: correlations, ranks, regression metrics, bootstraps and folds.

One home for every statistic, so that a number in the book means the same thing wherever it is
computed. All functions work on torch tensors (anything array-like is converted to float64) and reduce
along the last dimension, so a batch of bootstrap replicates ``[B, n]`` is one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


def _as_metric_tensor(a: Any) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def rmse(pred: Any, y: Any) -> torch.Tensor:
    """Root mean squared error along the last dim ([..., n] -> [...])."""
    p, t = _as_metric_tensor(pred), _as_metric_tensor(y)
    return ((p - t.to(p.device)) ** 2).mean(-1).sqrt()


def r2(pred: Any, y: Any) -> torch.Tensor:
    """Coefficient of determination ``1 - SSE/SST`` along the last dim (SST around the mean of y)."""
    p = _as_metric_tensor(pred)
    t = _as_metric_tensor(y).to(p.device)
    sse = ((t - p) ** 2).sum(-1)
    sst = ((t - t.mean(-1, keepdim=True)) ** 2).sum(-1)
    return 1 - sse / sst


def pearson(a: Any, b: Any) -> torch.Tensor:
    """Pearson correlation along the last dim ([..., n] -> [...]); NaN where either side is constant."""
    x, z = _as_metric_tensor(a), _as_metric_tensor(b)
    z = z.to(x.device)
    x = x - x.mean(-1, keepdim=True)
    z = z - z.mean(-1, keepdim=True)
    return (x * z).sum(-1) / ((x * x).sum(-1) * (z * z).sum(-1)).sqrt()


def rankdata(a: Any) -> torch.Tensor:
    """1-based ranks along the last dim with ties given their average rank (as scipy's 'average')."""
    x = _as_metric_tensor(a).contiguous()
    s = x.sort(-1).values
    lo = torch.searchsorted(s, x, right=False)  # how many are smaller
    hi = torch.searchsorted(s, x, right=True)  # how many are smaller or equal
    return (lo + hi + 1).to(torch.float64) / 2


def spearman(a: Any, b: Any) -> torch.Tensor:
    """Spearman rank correlation along the last dim (Pearson of tie-averaged ranks)."""
    return pearson(rankdata(a), rankdata(b))


class CI(NamedTuple):
    estimate: float  # the statistic on the full data
    lo: float  # percentile-bootstrap lower bound
    hi: float  # percentile-bootstrap upper bound


def bootstrap_ci(fn: Callable[..., Any], *arrays: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 vectorized: bool = True, max_elements: int = 2**24) -> CI:
    """Percentile bootstrap CI of ``fn(*arrays)``, resampling the rows of all arrays jointly.

    With ``vectorized=True`` ``fn`` receives arrays with an extra leading dim of replicates
    (``a[idx]`` with ``idx [B, n]``: 1-D arrays become ``[B, n]``) and must return ``[B]``; the
    metric functions here (``rmse``, ``r2``, ``pearson``, ``spearman``) all do. Otherwise ``fn``
    is called once per replicate. Replicates are drawn from ``seed`` alone, so two calls with the
    same seed and ``n`` resample the same rows (paired comparisons). NaN replicates are ignored.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ts = [_as_metric_tensor(a) for a in arrays]
    n = len(ts[0])
    if any(len(t) != n for t in ts):
        raise ValueError(f"arrays to bootstrap have different lengths: {[len(t) for t in ts]}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to bootstrap, got {n}")
    est = float(torch.as_tensor(fn(*ts)))
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)  # [B, n]
    if vectorized:
        per_row = sum(t[0].numel() for t in ts)
        chunk = max(1, max_elements // max(1, n * per_row))
        stats = torch.cat([torch.as_tensor(fn(*[t[i] for t in ts])).reshape(-1).double().cpu()
                           for i in idx.split(chunk)])
        if len(stats) != n_boot:
            raise ValueError(f"fn returned {len(stats)} values for {n_boot} replicates; it must reduce over "
                             f"dim 1 of [B, n] inputs, or pass vectorized=False")
    else:
        stats = torch.tensor([float(torch.as_tensor(fn(*[t[i] for t in ts]))) for i in idx], dtype=torch.float64)
    stats = stats[torch.isfinite(stats)]
    if stats.numel() == 0:
        return CI(est, math.nan, math.nan)
    q = torch.quantile(stats, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return CI(est, float(q[0]), float(q[1]))


def regression_metrics(pred: Any, y: Any) -> dict[str, float]:
    """``rmse``, ``pearson``, ``spearman``, ``r2`` and ``n`` of predictions against labels."""
    p, t = _as_metric_tensor(pred).flatten(), _as_metric_tensor(y).flatten()
    if len(p) != len(t):
        raise ValueError(f"predictions and labels have different lengths: {len(p)} vs {len(t)}")
    return {"rmse": float(rmse(p, t)), "pearson": float(pearson(p, t)), "spearman": float(spearman(p, t)),
            "r2": float(r2(p, t)), "n": len(t)}



# ----------------------------------------------------------------------------- folds and bootstraps
def kfold_indices(n: int, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """Validation indices of a seeded, shuffled k-fold split of ``n`` samples (sizes differ by <= 1)."""
    g = torch.Generator().manual_seed(int(seed))
    return list(torch.randperm(n, generator=g).tensor_split(folds))


def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> Tensor:
    """Row counts of ``n_boot`` bootstrap resamples of ``n`` rows: float64 [n_boot, n], each row sums to n."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


def interpolate(x: Tensor, xp: Tensor, fp: Tensor, *, log: bool = True) -> Tensor:
    """Piecewise-linear interpolation per replicate: ``x [R]`` in the points ``xp, fp [R, m]`` (xp sorted
    along dim 1); NaN outside ``[xp[:, 0], xp[:, -1]]``. ``log``: interpolate in log x."""
    if log:
        x, xp = x.clamp_min(1e-12).log(), xp.clamp_min(1e-12).log()
    j = torch.searchsorted(xp.contiguous(), x[:, None].contiguous()).clamp(1, xp.shape[1] - 1)  # [R, 1]
    x0, x1 = xp.gather(1, j - 1)[:, 0], xp.gather(1, j)[:, 0]
    f0, f1 = fp.gather(1, j - 1)[:, 0], fp.gather(1, j)[:, 0]
    t = (x - x0) / (x1 - x0)
    out = f0 + t * (f1 - f0)
    inside = (x >= xp[:, 0]) & (x <= xp[:, -1])
    return torch.where(inside, out, torch.full_like(out, math.nan))


def pareto_mask(l0: Sequence[float], value: Sequence[float], higher_better: bool = True) -> list[bool]:
    """Points not dominated by another (lower or equal L0 and a better or equal value, one strictly)."""
    l0a, v = np.asarray(l0, float), np.asarray(value, float) * (1 if higher_better else -1)
    dom = ((l0a[None, :] <= l0a[:, None]) & (v[None, :] >= v[:, None])
           & ((l0a[None, :] < l0a[:, None]) | (v[None, :] > v[:, None])))  # [i, j]: j dominates i
    return (~dom.any(1)).tolist()


def percentile_summary(est: Tensor, boot: Tensor, alpha: float = 0.05) -> dict[str, float]:
    """Full-sample estimate and percentile CI of a statistic ([1] and [R] tensors; NaN replicates dropped)."""
    b = boot[torch.isfinite(boot)]
    lo, hi = (torch.quantile(b, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=b.dtype)).tolist()
              if b.numel() and torch.isfinite(est[0]) else (math.nan, math.nan))
    return {"estimate": float(est[0]), "lo": lo, "hi": hi}


