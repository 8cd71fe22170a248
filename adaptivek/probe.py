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
intercept is not penalised: X and y are centred, solved, and ``b = ȳ - x̄ᵀw``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import finite_rows, integer, real_tensor
from .io import save_tensors, write_json
from .stats import regression_metrics, validation_folds

LAMBDAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the paper's grid
PROBE_FORMAT = 1
_SVD_MAX_ELEMENTS = 2**25  # above this many entries in X (268 MB in float64) use the Gram route
_NOT_FINITE = ("a failed label or a broken activation cannot be probed: drop those rows "
               "(e.g. keep = torch.isfinite(y)) before fitting")


# ----------------------------------------------------------------------------- input checks
def _check_xy(X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired features X [n, d] and labels y [n] (or [n, 1]) as float64: finite, n >= 2, y not constant."""
    X = real_tensor(X, "X")
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
    e, V = torch.linalg.eigh(Xc.T @ Xc)  # very tall: Gram [d, d], O(d²) memory
    return V, e.clamp_min(0), V.T @ (Xc.T @ Yc)


def _ridge_weights(V: torch.Tensor, e: torch.Tensor, B: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ridge weights for every λ and target at once: [d, L, m]. λ = 0 gives the minimum-norm fit."""
    tol = e.max().clamp_min(1e-300) * max(V.shape) * torch.finfo(e.dtype).eps
    denom = e[:, None] + lam[None, :]  # [r, L]
    keep = (e[:, None] > tol) | (lam[None, :] > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, denom, 1.0), 0.0)  # [r, L]
    coef = inv[:, :, None] * B[:, None, :]  # [r, L, m]
    return (V @ coef.reshape(len(e), -1)).reshape(V.shape[0], len(lam), B.shape[1])  # one matmul


def _fit_all(X: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor, standardize: bool):
    """Fit every λ on X [n, d] and targets Y [n, m]: weights [d, L, m] in raw units, biases [L, m], stats."""
    mean, scale = _standardizer(X, standardize)
    y_mean = Y.mean(0)  # [m]
    W = _ridge_weights(*_spectral((X - mean) / scale, Y - y_mean), lam) / scale[:, None, None]  # raw units
    return W, y_mean - (mean @ W.reshape(W.shape[0], -1)).reshape(W.shape[1:]), mean, scale


def _cv_rmse(X: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor, val_sets: list[torch.Tensor],
             standardize: bool) -> torch.Tensor:
    """Validation RMSE [F, L, m] of every fold, λ and target column, predictions clamped to each
    training fold's label range (as ``predict`` clamps to the training range)."""
    per_fold = []
    for val in val_sets:
        val = val.to(X.device)
        train_mask = torch.ones(len(Y), dtype=torch.bool, device=X.device)
        train_mask[val] = False
        Yt = Y[train_mask]  # [n_t, m]
        W, b, _, _ = _fit_all(X[train_mask], Yt, lam, standardize)  # [d, L, m], [L, m]
        pred = (X[val] @ W.reshape(W.shape[0], -1)).reshape(len(val), *b.shape) + b  # [n_val, L, m]
        pred = pred.clamp(Yt.min(0).values, Yt.max(0).values)
        per_fold.append(((pred - Y[val][:, None, :]) ** 2).mean(0).sqrt())  # [L, m]
    return torch.stack(per_fold)


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
    and ``bias``, so ``predict`` is always one affine map: nothing to re-apply by hand).
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
            seed: int = 0, standardize: bool | None = None) -> RidgeProbe:
        """Choose λ by k-fold CV (lowest mean validation RMSE), then refit on all of (X, y).

        Args:
            X: [n, d] features (tensor on any device, or array); y: [n] labels. Solved in float64.
            lambdas: the ridge penalties to try (>= 0, same scale as the code: Σ residual² + λ‖w‖²).
            folds: number of folds (rows shuffled with ``seed``), or explicit validation-index arrays.
            seed: seed of the fold assignment.
            standardize: z-score features with training-fold statistics (None: keep the probe's setting).
        Validation RMSE uses predictions clamped to each training fold's label range, as ``predict`` does.
        With a single λ the CV still runs (``cv_rmse`` is reported) but cannot change the choice.
        """
        if standardize is not None:
            self.standardize = bool(standardize)
        X, y = _check_xy(X, y)
        lam = _check_lambdas(lambdas).to(X.device)
        val_sets = validation_folds(folds, len(y), seed)
        fold_rmse = _cv_rmse(X, y[:, None], lam, val_sets, self.standardize)[..., 0]  # [F, L]
        mean_rmse = fold_rmse.mean(0)
        best = int(torch.argmin(mean_rmse))  # first of equals: the grid order breaks ties
        W, b, mean, scale = _fit_all(X, y[:, None], lam[best:best + 1], self.standardize)
        self.lambda_ = float(lam[best])
        self.lambdas, self.cv_rmse, self.cv_rmse_folds = lam.cpu(), mean_rmse.cpu(), fold_rmse.cpu()
        self.weight, self.bias = W[:, 0, 0].cpu(), b[0, 0].cpu()
        self.x_mean, self.x_scale = mean.cpu(), scale.cpu()
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
             "format": torch.tensor(PROBE_FORMAT, dtype=torch.int64)}
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
        return p

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/probe.safetensors`` and then ``path/probe.json`` (a readable summary), atomically."""
        path = Path(path)
        save_tensors(path / "probe.safetensors", self.to_tensors())
        write_json(path / "probe.json", {
            "class": "RidgeProbe", "format": PROBE_FORMAT, "d": self.d, "lambda_": self.lambda_,
            "lambdas": self.lambdas.tolist(), "cv_rmse": self.cv_rmse.tolist(), "standardize": self.standardize,
            "y_min": self.y_min, "y_max": self.y_max, "n_train": self.n_train, "bias": float(self.bias),
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
             standardize: bool = False) -> list[RidgeProbe]:
    """One :class:`RidgeProbe` per column of ``Y`` [n, m] (e.g. permuted labels), each exactly as
    ``RidgeProbe.fit(X, Y[:, j])`` would fit it, but sharing one decomposition per fold."""
    Y = real_tensor(Y, "Y")
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D [n_samples, n_targets], got shape {tuple(Y.shape)}")
    X, _ = _check_xy(X, Y[:, 0])
    Y = Y.to(X.device)
    for j in range(1, Y.shape[1]):
        _check_xy(X[:1].expand(len(Y), -1), Y[:, j])  # finite, non-constant (X already checked)
    lam = _check_lambdas(lambdas).to(X.device)
    fold_rmse = _cv_rmse(X, Y, lam, validation_folds(folds, len(Y), seed), standardize)  # [F, L, m]
    mean_rmse = fold_rmse.mean(0)  # [L, m]
    best = mean_rmse.argmin(0)  # [m]
    W, b, mean, scale = _fit_all(X, Y, lam, standardize)  # [d, L, m], [L, m]
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
        probes.append(p)
    return probes


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
