"""Ridge probe for complexity and the paper's complexity-to-k map (metrics: :mod:`adaptivek.stats`).

The paper (its linearity evaluation, Table 1) predicts a context's complexity from the
last-token residual ``x`` with ridge regression, picks λ from {0.01, 0.1, 1, 10, 100, 1000} by
5-fold cross-validation and clamps predictions to the label range. Two things are worth knowing:

* **Scaling.** The paper writes the loss as ``(1/n) Σ (y - wᵀx - b)² + (λ/2)‖w‖²`` but solves
  ``ŵ = (AᵀA + λI)⁻¹Aᵀy``, which minimises ``Σ (y - wᵀx - b)² + λ‖w‖²`` (no 1/n, no 1/2). The
  reference code does the same. We follow that closed form, so our λ means what the code's λ
  means (the paper's λ would be ``2λ/n`` of ours).
* **Refit.** After cross-validation the probe is refit on the whole training split it was
  given (the reference code logs "all dataset" but also fits on its 80 % training split).

The solve is float64 and spectral: one SVD of the centred design matrix (via a QR first when
it is tall; for very tall matrices an eigendecomposition of its Gram matrix) per fold gives the solution for every λ
at once, ``w(λ) = V diag(1 / (s² + λ)) Vᵀ Xᵀy``; no matrix is ever inverted explicitly. The
intercept is not penalised: X and y are centred, solved, and ``b = ȳ - x̄ᵀw``. For very tall
inputs with disjoint folds (token-level probes: ~10⁵ rows) the Gram sums of every fold are taken
in one pass, and each training part's Gram matrix is their sum over the other folds: a CV, a nested
CV or a grid extension then costs small ``d × d`` eigendecompositions, not passes over the rows.

Beyond the paper: ``groups=`` makes the folds document-grouped (rows cut from one document are
near-copies of each other, so a row CV flatters the probe and tends to pick too small a λ);
``extend_grid=True`` widens the grid while its edge wins; :func:`out_of_fold_predict` gives
every row a prediction from a probe that never saw its fold (AdaptiveK's training k).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .checks import finite_rows, integer, one_of, real_tensor
from .io import save_tensors, write_json
from .stats import regression_metrics, validation_folds

LAMBDAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the paper's grid
PROBE_FORMAT = 1
MAX_GRID_EXTENSIONS = 6  # extend_grid: at most this many factors of 10 beyond the given grid
_SVD_MAX_ELEMENTS = 2**25  # above this many entries in X (268 MB in float64) use the Gram route
_CHUNK_ROWS = 4096  # rows cast to float64 at a time on the Gram route (19 MB at d = 576: reused heap, no mmap)
_NOT_FINITE = ("a failed label or a broken activation cannot be probed: drop those rows "
               "(e.g. keep = torch.isfinite(y)) before fitting")


# ----------------------------------------------------------------------------- input checks
def _check_xy(X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired features X [n, d] and labels y [n] (or [n, 1]): finite, n >= 2, y not constant.

    y becomes float64; a floating torch X keeps its dtype (the solver casts it to float64 a block of rows
    at a time, so a large float32 X is never copied whole), anything else becomes float64.
    """
    floating = isinstance(X, torch.Tensor) and X.is_floating_point() and X.device.type != "mps"
    X = X.detach() if floating else real_tensor(X, "X")
    y = real_tensor(y, "y")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_samples, n_features], got shape {tuple(X.shape)}; "
                         f"for one feature use X[:, None]")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D [n_samples], got shape {tuple(y.shape)}")
    if len(X) != len(y):
        raise ValueError(f"X and y have different lengths: X has {len(X)} rows, y has {len(y)}; "
                         f"they must be paired row by row")
    if len(y) < 2:
        raise ValueError(f"need at least 2 samples to fit a probe, got {len(y)}")
    finite_rows(X, "X", _NOT_FINITE)
    finite_rows(y, "y", _NOT_FINITE)
    if bool((y == y[0]).all()):
        raise ValueError(f"y is constant (every label is {float(y[0])}); there is nothing to regress, "
                         f"check the labels")
    return X, y.to(X.device)


def _check_lambdas(lambdas: Any) -> torch.Tensor:
    try:
        lam = torch.as_tensor(np.asarray(list(lambdas), dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise TypeError(f"lambdas must be a sequence of numbers, got {lambdas!r}") from e
    if lam.numel() == 0:
        raise ValueError("lambdas is empty; pass at least one ridge penalty, e.g. (0.01, 0.1, 1, 10, 100, 1000)")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"lambdas must be finite and >= 0 (a negative ridge penalty is not a ridge), "
                         f"got {lam.tolist()}")
    return lam


# ----------------------------------------------------------------------------- the solver
def _standardizer(X: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature mean [d] and scale [d]; constant features keep scale 1 (their weight ends up 0)."""
    mean = X.mean(0)
    if not standardize:
        return mean, torch.ones_like(mean)
    std = X.std(0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on one thread: a d x d eigendecomposition (d ~ 10³) gains nothing from threads,
    and with a busy core LAPACK's threads wait on each other (577 x 577: 0.06 s on one thread, 2.9 s on
    two when another process holds a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(A)
    finally:
        torch.set_num_threads(n)


def _spectral(Xc: torch.Tensor, Yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V [d, r], e = s² [r], B = Vᵀ Xcᵀ Yc [r, m]) for a centred design Xc [n, d] and targets Yc [n, m]."""
    n, d = Xc.shape
    if n <= d:  # wide: thin SVD directly
        U, s, Vh = torch.linalg.svd(Xc, full_matrices=False)  # U [n, n], s [n], Vh [n, d]
        return Vh.T, s * s, s[:, None] * (U.T @ Yc)
    if n * d <= _SVD_MAX_ELEMENTS:  # tall: Xc = QR, then SVD of the small R (~5x faster than SVD of Xc)
        Q, R = torch.linalg.qr(Xc)  # Q [n, d], R [d, d]
        Ur, s, Vh = torch.linalg.svd(R)  # Xc = (Q Ur) diag(s) Vh
        return Vh.T, s * s, s[:, None] * (Ur.T @ (Q.T @ Yc))
    e, V = _eigh(Xc.T @ Xc)  # very tall: Gram [d, d], O(d²) memory
    return V, e.clamp_min(0), V.T @ (Xc.T @ Yc)


def _ridge_weights(V: torch.Tensor, e: torch.Tensor, B: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ridge weights for every λ and target at once: [d, L, m]. λ = 0 gives the minimum-norm fit."""
    tol = e.max().clamp_min(1e-300) * max(V.shape) * torch.finfo(e.dtype).eps
    denom = e[:, None] + lam[None, :]  # [r, L]
    keep = (e[:, None] > tol) | (lam[None, :] > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, denom, 1.0), 0.0)  # [r, L]
    coef = inv[:, :, None] * B[:, None, :]  # [r, L, m]
    return (V @ coef.reshape(len(e), -1)).reshape(V.shape[0], len(lam), B.shape[1])  # one matmul


class _Factors(NamedTuple):
    """One training part's decomposition: the ridge fit for any λ without touching its rows again."""

    V: torch.Tensor  # [d, r] right singular vectors of the centred (scaled) design
    e: torch.Tensor  # [r] their squared singular values
    B: torch.Tensor  # [r, m] Vᵀ Xcᵀ Yc
    mean: torch.Tensor  # [d] feature mean of the part
    scale: torch.Tensor  # [d] feature scale (ones without standardize)
    y_mean: torch.Tensor  # [m]
    y_lo: torch.Tensor  # [m] label range of the part: predictions are clamped to it
    y_hi: torch.Tensor  # [m]


def _direct_factors(X: torch.Tensor, Y: torch.Tensor, standardize: bool) -> _Factors:
    """Decompose the training part X [n, d], Y [n, m] from its rows (:func:`_spectral`)."""
    mean, scale = _standardizer(X, standardize)
    y_mean = Y.mean(0)  # [m]
    V, e, B = _spectral((X - mean) / scale, Y - y_mean)
    return _Factors(V, e, B, mean, scale, y_mean, Y.min(0).values, Y.max(0).values)


def _weights(f: _Factors, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [d, L, m] in raw feature units and biases [L, m] for every λ."""
    W = _ridge_weights(f.V, f.e, f.B, lam) / f.scale[:, None, None]
    return W, f.y_mean - (f.mean @ W.reshape(W.shape[0], -1)).reshape(W.shape[1:])


def _predict_rows(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, f: _Factors) -> torch.Tensor:
    """Predictions [n, L, m] for rows X [n, d], clamped to the part's label range (as ``predict``)."""
    pred = (X @ W.reshape(W.shape[0], -1)).reshape(len(X), *b.shape) + b
    return pred.clamp(f.y_lo, f.y_hi)


class _BlockSums(NamedTuple):
    """Sums over row blocks (the validation folds, then the rows in no fold), in coordinates shifted by
    the overall means so that ``Σxxᵀ - n x̄x̄ᵀ`` loses nothing to cancellation."""

    x_shift: torch.Tensor  # [d]
    y_shift: torch.Tensor  # [m]
    n: torch.Tensor  # [K] rows per block
    sx: torch.Tensor  # [K, d] Σ x
    G: torch.Tensor  # [K, d, d] Σ x xᵀ
    sy: torch.Tensor  # [K, m] Σ y
    xy: torch.Tensor  # [K, d, m] Σ x yᵀ
    y_lo: torch.Tensor  # [K, m] label range per block
    y_hi: torch.Tensor  # [K, m]


def _rows64(X: torch.Tensor, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices [c], float64 rows X[indices] [c, d]) for chunks of ``idx``: X is never cast whole."""
    for c in idx.split(_CHUNK_ROWS):
        yield c, X[c].to(torch.float64)


def _block_sums(X: torch.Tensor, Y: torch.Tensor, blocks: list[torch.Tensor]) -> _BlockSums:
    """The sufficient statistics of every block: one pass over the rows for the Gram sums."""
    f64 = {"dtype": torch.float64, "device": X.device}
    d, m = X.shape[1], Y.shape[1]
    x_shift = sum(x.sum(0) for _, x in _rows64(X, torch.arange(len(X), device=X.device))) / len(X)
    y_shift = Y.mean(0)
    per = []
    for idx in blocks:
        sx, G, xy = torch.zeros(d, **f64), torch.zeros(d, d, **f64), torch.zeros(d, m, **f64)
        for c, x in _rows64(X, idx):
            x, yc = x - x_shift, Y[c] - y_shift  # [c, d], [c, m]
            sx += x.sum(0)
            G.addmm_(x.T, x)
            xy.addmm_(x.T, yc)
        Yb = Y[idx]  # [n_b, m]
        per.append((len(idx), sx, G, (Yb - y_shift).sum(0), xy, Yb.min(0).values, Yb.max(0).values))
    n, sx, G, sy, xy, lo, hi = zip(*per, strict=True)
    return _BlockSums(x_shift, y_shift, torch.tensor(n, **f64), *map(torch.stack, (sx, G, sy, xy, lo, hi)))


def _sum_factors(s: _BlockSums, keep: torch.Tensor, standardize: bool) -> _Factors:
    """Decompose the part made of the blocks in ``keep`` [K] from their sums (eigh of its Gram matrix)."""
    n = s.n[keep].sum()
    mx, my = s.sx[keep].sum(0) / n, s.sy[keep].sum(0) / n  # [d], [m] in shifted coordinates
    second = s.G[keep].sum(0)  # [d, d]
    C = second - n * torch.outer(mx, mx)  # Xcᵀ Xc
    Cxy = s.xy[keep].sum(0) - n * torch.outer(mx, my)  # Xcᵀ Yc [d, m]
    var = C.diagonal() / n
    scale = torch.ones_like(mx)
    if standardize:  # a feature whose variance is rounding noise of its second moment is constant
        live = var > 1e-12 * second.diagonal() / n
        scale = torch.where(live, var.clamp_min(0).sqrt(), scale)
    e, V = _eigh(C / torch.outer(scale, scale))
    return _Factors(V, e.clamp_min(0), V.T @ (Cxy / scale[:, None]), mx + s.x_shift, scale, my + s.y_shift,
                    s.y_lo[keep].min(0).values, s.y_hi[keep].max(0).values)


class _Parts:
    """The training parts of a cross-validation (all rows minus some validation folds), decomposed on
    demand and cached by the folds left out. Large tall problems with disjoint folds (any tall one with
    ``gram_first``, for callers that need many parts) are decomposed from per-fold sums: one pass over the
    rows serves every part, nested CV included. The rest are decomposed from their rows."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, val_sets: list[torch.Tensor], standardize: bool,
                 gram_first: bool = False) -> None:
        self.Y, self.standardize = Y, standardize
        self.val_sets = [v.to(X.device) for v in val_sets]
        self.cache: dict[frozenset[int], _Factors] = {}
        self.X, self.sums = X, None
        counts = torch.bincount(torch.cat(self.val_sets), minlength=len(Y))  # [n] folds holding each row
        n, d = X.shape
        if n > d and (gram_first or n * d > _SVD_MAX_ELEMENTS) and int(counts.max()) <= 1:
            rest = (counts == 0).nonzero().flatten()
            self.sums = _block_sums(X, Y, self.val_sets + ([rest] if len(rest) else []))
        else:  # small enough to decompose from the rows, in float64
            self.X = X.to(torch.float64)

    def factors(self, out: frozenset[int]) -> _Factors:
        """The decomposition of all rows but those of the folds in ``out``."""
        if out not in self.cache:
            if self.sums is not None:
                keep = torch.ones(len(self.sums.n), dtype=torch.bool, device=self.X.device)
                keep[list(out)] = False
                self.cache[out] = _sum_factors(self.sums, keep, self.standardize)
            elif not out:
                self.cache[out] = _direct_factors(self.X, self.Y, self.standardize)
            else:
                mask = torch.ones(len(self.Y), dtype=torch.bool, device=self.X.device)
                mask[torch.cat([self.val_sets[f] for f in out])] = False
                self.cache[out] = _direct_factors(self.X[mask], self.Y[mask], self.standardize)
        return self.cache[out]

    def predict(self, idx: torch.Tensor, W: torch.Tensor, b: torch.Tensor, fac: _Factors) -> torch.Tensor:
        """Clamped predictions [len(idx), L, m] for the rows ``idx`` (cast to float64 a chunk at a time)."""
        return torch.cat([_predict_rows(x, W, b, fac) for _, x in _rows64(self.X, idx)])

    def rmse(self, lam: torch.Tensor, outer: frozenset[int] = frozenset()) -> torch.Tensor:
        """Validation RMSE [F', L, m] of every fold not in ``outer``, trained on the rest minus ``outer``."""
        per_fold = []
        for f, val in enumerate(self.val_sets):
            if f in outer:
                continue
            fac = self.factors(outer | {f})
            pred = self.predict(val, *_weights(fac, lam), fac)  # [n_val, L, m]
            per_fold.append(((pred - self.Y[val][:, None, :]) ** 2).mean(0).sqrt())  # [L, m]
        return torch.stack(per_fold)


def _beyond_edge(lam: torch.Tensor, best: int) -> torch.Tensor:
    """The λ values one factor of 10 past the grid's edge when the edge wins ([0], [1] or [2] values).
    λ = 0 is a final edge: no penalty is as far as the small side goes."""
    out = []  # 12 significant digits: repeated factors of 10 stay 1e-08, not 1.0000000000000002e-08
    if lam[best] == lam.max() and lam.max() > 0:
        out.append(float(f"{float(lam.max()) * 10:.12g}"))
    if lam[best] == lam.min() and lam.min() > 0:
        out.append(float(f"{float(lam.min()) / 10:.12g}"))
    return torch.tensor(out, dtype=lam.dtype, device=lam.device)


class _Choice(NamedTuple):
    lambdas: torch.Tensor  # [L] the final grid (extensions appended)
    fold_rmse: torch.Tensor  # [F, L]
    best: int  # index of the chosen λ
    extensions: int  # how many times the grid was extended
    at_edge: bool  # the chosen λ is still the largest (or smallest non-zero) of the final grid


def _choose(parts: _Parts, lam: torch.Tensor, extend: bool, outer: frozenset[int] = frozenset()) -> _Choice:
    """λ with the lowest mean validation RMSE (first of equals); with ``extend``, while an edge wins,
    add λ one factor of 10 beyond it (at most MAX_GRID_EXTENSIONS times, then warn)."""
    fold_rmse = parts.rmse(lam, outer)[..., 0]  # [F, L]
    extensions = 0
    while True:
        best = int(torch.argmin(fold_rmse.mean(0)))
        new = _beyond_edge(lam, best)
        if not (extend and len(new)) or extensions == MAX_GRID_EXTENSIONS:
            break
        lam = torch.cat([lam, new])
        fold_rmse = torch.cat([fold_rmse, parts.rmse(new, outer)[..., 0]], dim=1)
        extensions += 1
    if extend and len(new):
        warnings.warn(f"ridge probe: the λ grid's edge still wins after {MAX_GRID_EXTENSIONS} extensions by "
                      f"factors of 10 (chosen λ = {float(lam[best]):g}, grid {float(lam.min()):g} .. "
                      f"{float(lam.max()):g}); a huge λ means the features predict almost nothing, a tiny "
                      f"one that no penalty is needed", stacklevel=3)
    return _Choice(lam, fold_rmse, best, extensions, bool(len(new)))


# ----------------------------------------------------------------------------- the probe
class _hybridmethod:
    """``RidgeProbe.fit(X, y)`` builds and fits a new probe; ``probe.fit(X, y)`` fits ``probe`` in place."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, cls: type) -> Callable:
        if obj is None:
            @functools.wraps(self.func)
            def fit(X, y, *, standardize: bool | None = None, **kw):
                return self.func(cls(standardize=bool(standardize)), X, y, **kw)
            return fit
        return functools.partial(self.func, obj)


class RidgeProbe:
    """Closed-form ridge probe ``y ≈ clamp(X @ weight + bias, y_min, y_max)`` with λ chosen by k-fold CV.

    Build with ``RidgeProbe.fit(X, y)`` (or ``RidgeProbe(standardize=True).fit(X, y)``). After
    fitting: ``lambda_`` (chosen λ), ``lambdas`` [L] and ``cv_rmse`` [L] (mean validation RMSE per
    λ; ``cv_rmse_folds`` [F, L]), ``weight`` [d] and ``bias`` (0-d) in float64 and in the units of
    the raw features, ``y_min``/``y_max`` (the training label range used to clamp), and, when
    ``standardize=True``, the training ``x_mean``/``x_scale`` the fit used (folded into ``weight``
    and ``bias``, so ``predict`` is always one affine map: nothing to re-apply by hand);
    ``grid_extensions`` (how often ``extend_grid`` widened the grid) and ``lambda_at_edge`` (the chosen
    λ is the final grid's largest or smallest non-zero value: the best λ may lie beyond the grid).
    """

    def __init__(self, standardize: bool = False) -> None:
        self.standardize = bool(standardize)
        self.lambda_: float | None = None
        self.lambdas: torch.Tensor | None = None
        self.cv_rmse: torch.Tensor | None = None
        self.cv_rmse_folds: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.x_mean: torch.Tensor | None = None
        self.x_scale: torch.Tensor | None = None
        self.y_min: float | None = None
        self.y_max: float | None = None
        self.n_train: int | None = None
        self.grid_extensions: int = 0
        self.lambda_at_edge: bool | None = None

    @property
    def is_fitted(self) -> bool:
        return self.weight is not None

    @property
    def d(self) -> int:
        self._require_fitted()
        return len(self.weight)

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"RidgeProbe(standardize={self.standardize}, unfitted)"
        return (f"RidgeProbe(d={self.d}, lambda_={self.lambda_:g}, standardize={self.standardize}, "
                f"n_train={self.n_train}, y_range=[{self.y_min:g}, {self.y_max:g}])")

    def _require_fitted(self) -> None:
        if self.weight is None:
            raise RuntimeError("this RidgeProbe is not fitted; build it with RidgeProbe.fit(X, y) or load it")

    @_hybridmethod
    def fit(self, X: Any, y: Any, *, lambdas: Sequence[float] = LAMBDAS, folds: int | Sequence = 5,
            seed: int = 0, groups: Any = None, extend_grid: bool = False,
            standardize: bool | None = None) -> RidgeProbe:
        """Choose λ by k-fold CV (lowest mean validation RMSE), then refit on all of (X, y).

        Args:
            X: [n, d] features (tensor on any device, or array); y: [n] labels. Solved in float64.
            lambdas: the ridge penalties to try (>= 0, same scale as the code: Σ residual² + λ‖w‖²).
            folds: number of folds (rows shuffled with ``seed``), or explicit validation-index arrays.
            seed: seed of the fold assignment.
            groups: one group id per row (the document it came from): the folds are then
                :func:`~adaptivek.stats.group_kfold`, so no document is split across folds (rows of one
                document look alike, and a row CV would score the probe on near-copies of its training
                rows). Explicit folds are checked against it.
            extend_grid: while CV picks the grid's largest (or smallest non-zero) λ, add λ one factor of
                10 beyond it, at most ``MAX_GRID_EXTENSIONS`` times (then warn). ``lambdas`` and
                ``cv_rmse`` hold the final grid, ``grid_extensions`` the count, ``lambda_at_edge``
                whether the chosen λ is still at the edge.
            standardize: z-score features with training-fold statistics (None: keep the probe's setting).
        Validation RMSE uses predictions clamped to each training fold's label range, as ``predict`` does.
        With a single λ the CV still runs (``cv_rmse`` is reported) but cannot change the choice.
        """
        if standardize is not None:
            self.standardize = bool(standardize)
        X, y = _check_xy(X, y)
        lam = _check_lambdas(lambdas).to(X.device)
        parts = _Parts(X, y[:, None], validation_folds(folds, len(y), seed, groups=groups), self.standardize)
        c = _choose(parts, lam, bool(extend_grid))
        full = parts.factors(frozenset())
        W, b = _weights(full, c.lambdas[c.best:c.best + 1])  # [d, 1, 1], [1, 1]
        self.lambda_ = float(c.lambdas[c.best])
        self.lambdas, self.cv_rmse, self.cv_rmse_folds = c.lambdas.cpu(), c.fold_rmse.mean(0).cpu(), c.fold_rmse.cpu()
        self.grid_extensions, self.lambda_at_edge = c.extensions, c.at_edge
        self.weight, self.bias = W[:, 0, 0].cpu(), b[0, 0].cpu()
        self.x_mean, self.x_scale = full.mean.cpu(), full.scale.cpu()
        self.y_min, self.y_max = float(y.min()), float(y.max())
        self.n_train = len(y)
        return self

    def predict(self, X: Any, *, clamp: bool = True) -> torch.Tensor:
        """Predicted complexity [...] for X [..., d], on X's device.

        float64 input gives float64; anything else is computed and returned in float32.
        Predictions are clamped to the training label range unless ``clamp=False``.
        """
        self._require_fitted()
        t = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
        if t.ndim == 0 or t.shape[-1] != self.d:
            raise ValueError(f"X must have shape [..., {self.d}] (the probe's feature size), got {tuple(t.shape)}")
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.detach().to(dtype)
        out = t @ self.weight.to(t.device, dtype) + self.bias.to(t.device, dtype)
        return out.clamp(self.y_min, self.y_max) if clamp else out

    def evaluate(self, X: Any, y: Any) -> dict[str, float]:
        """``rmse``, ``pearson``, ``spearman``, ``r2``, ``n`` of the (clamped) predictions on (X, y)."""
        y = real_tensor(y, "y").flatten()
        pred = self.predict(X)
        if len(pred) != len(y):
            raise ValueError(f"X and y have different lengths: {len(pred)} vs {len(y)}")
        finite_rows(y, "y", _NOT_FINITE)
        return regression_metrics(pred.double().cpu(), y.cpu())

    # -------------------------------------------------------------- serialisation
    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Everything needed to restore the probe, as tensors (to embed in another safetensors file)."""
        self._require_fitted()
        f64 = functools.partial(torch.tensor, dtype=torch.float64)
        t = {"weight": self.weight, "bias": self.bias.reshape(()), "x_mean": self.x_mean, "x_scale": self.x_scale,
             "y_range": f64([self.y_min, self.y_max]), "lambda_": f64(self.lambda_), "lambdas": self.lambdas,
             "cv_rmse": self.cv_rmse, "cv_rmse_folds": self.cv_rmse_folds,
             "standardize": torch.tensor(int(self.standardize), dtype=torch.int64),
             "n_train": torch.tensor(self.n_train, dtype=torch.int64),
             "grid_extensions": torch.tensor(self.grid_extensions, dtype=torch.int64),
             "format": torch.tensor(PROBE_FORMAT, dtype=torch.int64)}
        if self.lambda_at_edge is not None:
            t["lambda_at_edge"] = torch.tensor(int(self.lambda_at_edge), dtype=torch.int64)
        return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> RidgeProbe:
        """Inverse of :meth:`to_tensors` (keys under ``prefix``)."""
        need = ("weight", "bias", "x_mean", "x_scale", "y_range", "lambda_", "lambdas", "cv_rmse",
                "cv_rmse_folds", "standardize", "n_train", "format")
        missing = [k for k in need if f"{prefix}{k}" not in tensors]
        if missing:
            raise KeyError(f"not a saved RidgeProbe: keys {[prefix + k for k in missing]} are missing")
        t = {k: tensors[f"{prefix}{k}"] for k in need}
        if int(t["format"]) != PROBE_FORMAT:
            raise ValueError(f"probe format {int(t['format'])} is not supported (this version reads {PROBE_FORMAT})")
        p = cls(standardize=bool(int(t["standardize"])))
        p.weight, p.bias = t["weight"].double(), t["bias"].double().reshape(())
        p.x_mean, p.x_scale = t["x_mean"].double(), t["x_scale"].double()
        p.y_min, p.y_max = (float(v) for v in t["y_range"])
        p.lambda_ = float(t["lambda_"])
        p.lambdas, p.cv_rmse, p.cv_rmse_folds = t["lambdas"], t["cv_rmse"], t["cv_rmse_folds"]
        p.n_train = int(t["n_train"])
        # optional: files written before grid extension was added lack them
        p.grid_extensions = int(tensors.get(f"{prefix}grid_extensions", torch.tensor(0)))
        edge = tensors.get(f"{prefix}lambda_at_edge")
        p.lambda_at_edge = None if edge is None else bool(int(edge))
        return p

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/probe.safetensors`` and then ``path/probe.json`` (a readable summary), atomically."""
        path = Path(path)
        save_tensors(path / "probe.safetensors", self.to_tensors())
        write_json(path / "probe.json", {
            "class": "RidgeProbe", "format": PROBE_FORMAT, "d": self.d, "lambda_": self.lambda_,
            "lambdas": self.lambdas.tolist(), "cv_rmse": self.cv_rmse.tolist(), "standardize": self.standardize,
            "y_min": self.y_min, "y_max": self.y_max, "n_train": self.n_train, "bias": float(self.bias),
            "grid_extensions": self.grid_extensions, "lambda_at_edge": self.lambda_at_edge,
            "objective": "sum (y - Xw - b)^2 + lambda * ||w||^2, intercept unpenalised"})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RidgeProbe:
        """Read a probe written by :meth:`save` (a directory, or its ``probe.safetensors`` file)."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.name == "probe.safetensors":
            path = path.parent
        data, meta = path / "probe.safetensors", path / "probe.json"
        if not (data.is_file() and meta.is_file()):
            raise FileNotFoundError(f"no saved probe in {path}: expected probe.safetensors and probe.json "
                                    f"(written by RidgeProbe.save)")
        info = json.loads(meta.read_text())
        if info.get("class") != "RidgeProbe":
            raise ValueError(f"{meta} describes a {info.get('class')!r}, not a RidgeProbe")
        return cls.from_tensors(load_file(str(data)))


def fit_many(X: Any, Y: Any, *, lambdas: Sequence[float] = LAMBDAS, folds: int | Sequence = 5, seed: int = 0,
             groups: Any = None, standardize: bool = False) -> list[RidgeProbe]:
    """One :class:`RidgeProbe` per column of ``Y`` [n, m] (e.g. permuted labels), each exactly as
    ``RidgeProbe.fit(X, Y[:, j], groups=groups)`` would fit it, but sharing one decomposition per fold."""
    Y = real_tensor(Y, "Y")
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D [n_samples, n_targets], got shape {tuple(Y.shape)}")
    X, _ = _check_xy(X, Y[:, 0])
    Y = Y.to(X.device)
    for j in range(1, Y.shape[1]):
        _check_xy(X[:1].expand(len(Y), -1), Y[:, j])  # finite, non-constant (X already checked)
    lam = _check_lambdas(lambdas).to(X.device)
    parts = _Parts(X, Y, validation_folds(folds, len(Y), seed, groups=groups), standardize)
    fold_rmse = parts.rmse(lam)  # [F, L, m]
    mean_rmse = fold_rmse.mean(0)  # [L, m]
    best = mean_rmse.argmin(0)  # [m]
    full = parts.factors(frozenset())
    W, b = _weights(full, lam)  # [d, L, m], [L, m]
    mean, scale = full.mean, full.scale
    cols = torch.arange(Y.shape[1], device=X.device)
    W, b = W[:, best, cols].cpu(), b[best, cols].cpu()  # [d, m], [m]
    probes = []
    for j in range(Y.shape[1]):
        p = RidgeProbe(standardize=standardize)
        p.lambda_, p.lambdas = float(lam[best[j]]), lam.cpu()
        p.cv_rmse, p.cv_rmse_folds = mean_rmse[:, j].cpu(), fold_rmse[:, :, j].cpu()
        p.weight, p.bias = W[:, j].clone(), b[j].clone()
        p.x_mean, p.x_scale = mean.cpu(), scale.cpu()
        p.y_min, p.y_max = float(Y[:, j].min()), float(Y[:, j].max())
        p.n_train = len(Y)
        p.lambda_at_edge = bool(len(_beyond_edge(lam, int(best[j]))))
        probes.append(p)
    return probes


def out_of_fold_predict(X: Any, y: Any, *, groups: Any, folds: int | Sequence = 5,
                        lambdas: Sequence[float] = LAMBDAS, seed: int = 0, extend_grid: bool = True,
                        standardize: bool = False, unlabelled: Literal["error", "predict"] = "error") -> torch.Tensor:
    """Out-of-fold ridge predictions [n]: row i is predicted by a probe that never saw its fold.

    What AdaptiveK's training k should come from: in-sample predictions are closer to the labels than
    anything the probe will produce on new data, so an SAE trained on them learns a k that is too
    label-aligned. Folds are :func:`~adaptivek.stats.group_kfold` over ``groups`` (one document id per
    row; ``None`` treats rows as independent), or explicit validation sets that partition the rows.

    λ is chosen inside each training part (a nested CV whose inner folds are the other outer folds,
    grid extended as in :meth:`RidgeProbe.fit`), never once on all rows: a λ picked with row i's label
    would let that label reach row i's prediction; here it cannot (a test changes one label and checks).
    The cost stays one pass over the rows for large inputs: every part is decomposed from per-fold sums.
    Predictions are clamped to each training part's label range; float64 X gives float64, else float32.

    ``unlabelled="predict"``: rows whose label is NaN (e.g. tokens before the first scored prefix) are
    never fitted, but are predicted by the probe of their own fold, so every row of an SAE's training set
    gets an out-of-fold k. The default refuses NaN labels.
    """
    dtype = torch.float64 if getattr(X, "dtype", None) in (torch.float64, np.float64) else torch.float32
    one_of(unlabelled, "unlabelled", ("error", "predict"))
    val_all = None
    if unlabelled == "predict":
        y_all = real_tensor(y, "y").flatten()
        labelled = ~torch.isnan(y_all)
        if int(labelled.sum()) < 2:
            raise ValueError(f"only {int(labelled.sum())} of {len(y_all)} rows have a label; the probe needs at least 2")
        X_all = X.detach() if isinstance(X, torch.Tensor) and X.is_floating_point() else real_tensor(X, "X")
        if X_all.ndim != 2 or len(X_all) != len(y_all):
            raise ValueError(f"X must be [n, d] with one row per label ({len(y_all)}), got {tuple(X_all.shape)}")
        finite_rows(X_all, "X", _NOT_FINITE)
        val_all = validation_folds(folds, len(y_all), seed, groups=groups)
        lab_idx = labelled.nonzero().flatten()
        new_index = torch.full((len(y_all),), -1, dtype=torch.long)
        new_index[lab_idx] = torch.arange(len(lab_idx))
        folds = [new_index[v][labelled[v]] for v in val_all]  # each fold's labelled rows, renumbered
        if any(len(f) == 0 for f in folds):
            raise ValueError("a fold has no labelled row; use fewer folds or label more rows")
        X, y, groups = X_all[lab_idx], y_all[lab_idx], None
    X, y = _check_xy(X, y)
    lam = _check_lambdas(lambdas).to(X.device)
    val_sets = validation_folds(folds, len(y), seed, groups=groups)
    if len(val_sets) < 3:
        raise ValueError(f"out_of_fold_predict needs folds >= 3 (the λ of each part is chosen by CV over "
                         f"the other folds), got {len(val_sets)}")
    counts = torch.bincount(torch.cat(val_sets), minlength=len(y))
    if not bool((counts == 1).all()):
        raise ValueError(f"the folds must partition the rows (each row in exactly one fold): "
                         f"{int((counts == 0).sum())} rows in none, {int((counts > 1).sum())} in several")
    parts = _Parts(X, y[:, None], val_sets, standardize, gram_first=True)  # F(F+1)/2 parts from one pass
    pred = torch.empty(len(y) if val_all is None else len(X_all), dtype=torch.float64, device=X.device)
    for f, val in enumerate(parts.val_sets):
        c = _choose(parts, lam, bool(extend_grid), outer=frozenset({f}))
        fac = parts.factors(frozenset({f}))
        W, b = _weights(fac, c.lambdas[c.best:c.best + 1])
        if val_all is None:
            pred[val] = parts.predict(val, W, b, fac)[:, 0, 0]
        else:  # every row of the fold, labelled or not
            for rows, x in _rows64(X_all, val_all[f]):
                pred[rows] = _predict_rows(x.to(X.device), W, b, fac)[:, 0, 0]
    return pred.to(dtype)


# ----------------------------------------------------------------------------- complexity -> k
def complexity_to_k(c: Any, *, k_min: int = 20, k_max: int = 320, steepness: float = 6.0,
                    c_min: float = 0.0, c_max: float = 10.0) -> torch.Tensor:
    """The paper's map from complexity to a per-sample k (Eq. 7; reference ``map_complexity_to_k``).

    ``k = round(k_min + sigmoid(s · ((c - c_min)/(c_max - c_min) - 0.5)) · (k_max - k_min))``,
    clamped to [k_min, k_max], as an int64 tensor shaped like ``c`` (on ``c``'s device). Rounding
    is half-to-even like ``torch.round`` in the reference code.

    What it really does: the sigmoid only reaches σ(±3) = 0.047 … 0.953 on [c_min, c_max], so with
    the defaults c = 0, 5, 10 give k = 34, 170, 306: the reachable range is [34, 306], not
    [20, 320], and the midpoint is 170. The paper's ``base_k = 80`` plays no part (in the reference
    code it is only the fallback k when no complexity is given).
    """
    k_min, k_max = integer(k_min, "k_min"), integer(k_max, "k_max")
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1 (a sample needs at least one active latent), got {k_min}")
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) > k_max ({k_max}); swap them or raise k_max")
    if not (math.isfinite(c_min) and math.isfinite(c_max)) or c_max <= c_min:
        raise ValueError(f"c_max must be finite and > c_min, got c_min={c_min}, c_max={c_max}")
    if not (math.isfinite(steepness) and steepness > 0):
        raise ValueError(f"steepness must be finite and > 0, got {steepness}")
    t = c.detach() if isinstance(c, torch.Tensor) else torch.as_tensor(np.asarray(c, dtype=np.float64))
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"c must hold real numbers, got dtype {t.dtype}")
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    t = t.to(dtype)
    finite_rows(t.reshape(-1), "c", "a missing complexity has no k (drop it or predict it first)")
    z = steepness * ((t - c_min) / (c_max - c_min) - 0.5)
    k = k_min + torch.sigmoid(z) * (k_max - k_min)
    return k.round().clamp(k_min, k_max).to(torch.int64)
