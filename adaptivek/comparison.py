"""AdaptiveK vs TopK on equal terms: one data set, one set of formulas, held-out evaluation, paired CIs.

``compare(X_train, y_train, X_test, y_test, out=...)`` trains every SAE with :func:`train_sae` and one
:class:`TrainConfig` (same dictionary size, steps, batch order and initial weights), evaluates all of
them with :func:`~adaptivek.evaluation.evaluate` on held-out vectors never used for training, and
writes one results JSON atomically. What it trains:

* **TopK sweep** over ``topk_ks``: the frontier of FVE / cosine / MSE / CE against mean L0.
* **AdaptiveK** for each ``(k_min, k_max)`` in ``k_ranges`` (the paper's three phases, probe fitted on
  the training labels): a point on the same axes, and its difference from the TopK frontier at the same
  mean L0. The frontier is interpolated linearly in ``log L0`` by default: the sweep is geometric in k,
  and interpolating a concave curve linearly in L0 would understate TopK between sweep points and so
  flatter AdaptiveK. ``interp="linear"`` interpolates in L0 itself.
* **BatchTopK** (:class:`BatchTopKSAE`) at AdaptiveK's mean k: it also adapts the number of active
  latents per input, but learns how from the data instead of from a complexity probe. Evaluated twice:
  with its learned threshold (``batchtopk_K``; its mean L0 on unseen data can drift from k) and with its
  training rule applied to the evaluation set as one batch (``batchtopk_K_batch``: mean L0 = k).
* **Ablations** at ``ablation_range`` (default the first range), as :class:`TableKSAE` (a TopK SAE
  whose per-row k is given): k from *shuffled* complexity predictions (the same k distribution with no
  signal) and k from *text length* (character count, rank-matched to the same k distribution). If
  AdaptiveK's gain comes from allocating k by complexity, it should beat both.
* **Per complexity bin** (quantile bins of the label, terciles by default): does AdaptiveK help complex
  contexts and cost simple ones? Per bin each SAE's FVE (bin mean subtracted), MSE, cosine and L0,
  and the difference from the TopK frontier both at the SAE's overall mean L0 (same budget) and at its
  mean L0 within the bin (is the allocation efficient?).
* **Downstream loss** (with ``lm``): next-token CE with each SAE spliced in on ``n_ce`` held-out texts
  (:func:`~adaptivek.evaluation.downstream_losses`), clean and mean-ablated baselines.

CIs are percentile bootstraps over evaluation rows with the **same resamples for every SAE** (paired),
computed without a Python loop over replicates: a replicate is a row-count vector ``w [n]``, so every
sum is a matrix product, including FVE's variance with the replicate's own mean,
``Σ w_i‖x_i - m_w‖² = Σ w_i‖x_i - m‖² - ‖Σ w_i (x_i - m)‖² / n``.

Activations are multiplied by ``scale = sqrt(d_in / mean‖x_train‖²)`` before training (mean squared
norm ``d_in`` on the training set, SAELens' convention), so MSE is in those units; FVE and cosine do not
depend on it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ._io import write_json
from .evaluation import downstream_losses, evaluate, frac_recovered
from .paper import K_RANGE_ABLATION
from .sae import AdaptiveKSAE, TopKSAE
from .training import TrainConfig, train_sae

RESULTS_FORMAT = 1

# metric -> is higher better?
HIGHER_BETTER = {"fve": True, "cosine": True, "mse": False, "ce": False, "frac_recovered": True}


# ----------------------------------------------------------------------------- extra SAE variants
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): keep the ``k · B`` largest activations of the whole batch.

    Training: row i keeps as many latents as it has among the batch's top ``k · B`` pre-activations
    (so k varies per row, averaging ``k``), and a global ``threshold`` tracks an exponential moving
    average (``threshold_beta``) of the smallest kept activation of each training batch. Inference
    (after :meth:`freeze`, which ``compare`` calls once training ends): a latent is active when its
    activation exceeds ``threshold``, independently of the rest of the batch, so the mean L0 is only
    approximately ``k``. Kept simple: the reference starts the average after 1,000 steps with β = 0.999;
    our short runs start it at step 1 with β = 0.99, and ``compare`` then recalibrates the threshold on
    the training vectors taken as one batch (``freeze(X)``), because a few hundred steps are too few
    for the average to forget the first steps.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_beta: float = 0.99, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        super().__init__(d_in, d_sae, k, seed=seed, dtype=dtype, device=device)
        if not 0 <= threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {threshold_beta}")
        self.threshold_beta = float(threshold_beta)
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=dtype, device=device))
        self.frozen = False
        self.threshold_ema = math.nan

    def freeze(self, X: Tensor | None = None, *, max_rows: int = 4096, seed: int = 0,
               chunk: int = 512) -> BatchTopKSAE:
        """Switch to inference: a latent is active when its activation exceeds ``threshold``.

        Without ``X`` the threshold is the training-time moving average. With ``X`` (training vectors) it
        is recalibrated so that BatchTopK's own rule holds on up to ``max_rows`` of them taken as one
        batch: the ``k · N``-th largest activation (``threshold_ema`` keeps the average). Short runs need
        this: the moving average still remembers the first steps' thresholds.
        """
        if not torch.isfinite(self.threshold):
            raise RuntimeError("this BatchTopKSAE has no threshold yet: train it (train_sae) before freezing")
        self.threshold_ema = float(self.threshold)
        if X is not None:
            g = torch.Generator().manual_seed(seed)
            rows = X[torch.randperm(len(X), generator=g)[:max_rows]]
            keep = self.k * len(rows)
            top = self.threshold.new_zeros(0)
            with torch.no_grad():
                for part in rows.split(chunk):  # running top-(k·N) over chunks: memory O(k·N + chunk·d_sae)
                    xb = part.to(self.W_enc.device, self.W_enc.dtype)
                    pre = torch.addmm(self.b_enc, xb - self.b_dec, self.W_enc).relu_().flatten()
                    top = torch.cat([top, pre]).topk(min(keep, len(top) + len(pre))).values
            self.threshold.fill_(float(top[-1]))
        self.frozen = True
        return self

    def batch_k(self, x: Tensor) -> Tensor:
        """BatchTopK's own rule on ``x`` taken as one batch: how many of the batch's top ``k · B``
        activations each row holds [B] (int64). Rows may get 0."""
        return self._batch_rule(x)[0]

    def _batch_rule(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            x = x.to(self.W_enc.device, self.W_enc.dtype)
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).relu_()  # [B, d_sae]
            vals, flat = pre.flatten().topk(min(self.k * len(x), pre.numel()))  # [k·B] kept values
            k = torch.bincount(torch.div(flat, self.d_sae, rounding_mode="floor"), minlength=len(x))  # [B]
        return k, vals

    def _default_k(self, x: Tensor) -> Tensor:
        training_step = torch.is_grad_enabled()  # train_sae's forward; evaluation runs under no_grad
        if self.frozen:
            with torch.no_grad():
                return (torch.addmm(self.b_enc, x - self.b_dec, self.W_enc) > self.threshold).sum(1)
        k, vals = self._batch_rule(x)
        if training_step and (vals > 0).any():  # a training step: update the moving-average threshold
            with torch.no_grad():
                low, t = vals[vals > 0].min(), self.threshold
                t.copy_(low if not torch.isfinite(t) else self.threshold_beta * t + (1 - self.threshold_beta) * low)
        return k

    def config(self) -> dict[str, Any]:
        return super().config() | {"threshold_beta": self.threshold_beta}


def _row_keys(x: Tensor) -> Tensor:
    """An exact int64 hash of each row's float32 bit pattern [B, d] -> [B] (integer sums: order-independent)."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)  # [B, d]
    g = torch.Generator().manual_seed(12345)
    coef = torch.randint(1, 2**62, (x.shape[1],), generator=g, dtype=torch.int64) | 1  # odd multipliers
    return (bits * coef.to(x.device)).sum(1)  # wraps modulo 2**64


class TableKSAE(TopKSAE):
    """A TopK SAE whose k per row is looked up in a table of training rows (ablations).

    ``train_sae`` only passes the batch's vectors, so rows are recognised by an exact hash of their bits
    (:func:`_row_keys`); a vector not in the table raises. Give ``k`` explicitly for other vectors
    (``evaluate(sae, X, k=...)``).
    """

    def __init__(self, d_in: int, d_sae: int, X: Tensor, k_rows: Tensor, *, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        k_rows = torch.as_tensor(k_rows).to(torch.int64).flatten()
        if len(k_rows) != len(X):
            raise ValueError(f"k_rows has {len(k_rows)} entries for {len(X)} rows of X")
        super().__init__(d_in, d_sae, int(k_rows.max()), seed=seed, dtype=dtype, device=device)
        if int(k_rows.min()) < 1:
            raise ValueError(f"every k must be >= 1, got min {int(k_rows.min())}")
        keys = torch.cat([_row_keys(part.to(dtype)) for part in X.split(8192)])  # chunks: bounded int64 copies
        order = torch.argsort(keys, stable=True)
        self._keys, self._k = keys[order], k_rows[order]

    def _default_k(self, x: Tensor) -> Tensor:
        keys = _row_keys(x).to(self._keys.device)
        pos = torch.searchsorted(self._keys, keys).clamp(max=len(self._keys) - 1)
        found = self._keys[pos] == keys
        if not found.all():
            raise ValueError(f"{int((~found).sum())} of {len(x)} rows are not in this TableKSAE's k table; it "
                             f"knows only its training rows: pass k explicitly (e.g. evaluate(sae, X, k=...))")
        return self._k[pos].to(x.device)


# ----------------------------------------------------------------------------- bootstrap machinery
def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> Tensor:
    """Row counts of ``n_boot`` bootstrap resamples of ``n`` rows: float64 [n_boot, n], each row sums to n."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


def _recon_stats(W: Tensor, rows: dict[str, Tensor], Xc: Tensor) -> dict[str, Tensor]:
    """fve, mse, cosine, l2_ratio, l0 for each weighting in ``W [R, n]`` (R replicates, or 1 row of ones)."""
    n, d = Xc.shape
    sst = W @ Xc.pow(2).sum(1) - (W @ Xc).pow(2).sum(1) / W.sum(1)  # [R] Σ w‖x - m_w‖²
    sse = W @ rows["sq_err"]
    tot = W.sum(1)
    return {"fve": 1 - sse / sst, "mse": sse / (tot * d), "cosine": W @ rows["cosine"] / tot,
            "l2_ratio": W @ rows["l2_ratio"] / tot, "l0": W @ rows["l0"] / tot}


def _ce_stats(W: Tensor, rows: dict[str, Tensor], clean: Tensor, ablate: Tensor) -> dict[str, Tensor]:
    tot = W.sum(1)
    ce, c, a = W @ rows["ce"] / tot, W @ clean / tot, W @ ablate / tot
    return {"ce": ce, "frac_recovered": (a - ce) / (a - c), "l0": W @ rows["l0"] / tot}


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


def _summary(est: Tensor, boot: Tensor, alpha: float = 0.05) -> dict[str, float]:
    """Full-sample estimate and percentile CI of a statistic ([1] and [R] tensors; NaN replicates dropped)."""
    b = boot[torch.isfinite(boot)]
    lo, hi = (torch.quantile(b, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=b.dtype)).tolist()
              if b.numel() and torch.isfinite(est[0]) else (math.nan, math.nan))
    return {"estimate": float(est[0]), "lo": lo, "hi": hi}


def _vs_frontier(stats: dict[str, dict[str, Tensor]], topk: list[str], name: str, metric: str, log: bool,
                 l0_key: str = "l0") -> dict[str, float]:
    """``name``'s metric minus the TopK frontier's at ``name``'s mean L0, per replicate (index 0 = full data)."""
    xp = torch.stack([stats[t][l0_key] for t in topk], 1)  # [R, m]
    fp = torch.stack([stats[t][metric] for t in topk], 1)
    order = xp[:1].argsort(1).expand_as(xp)  # sort the sweep by its full-data L0
    xp, fp = xp.gather(1, order), fp.gather(1, order)
    front = interpolate(stats[name][l0_key], xp, fp, log=log)
    diff = stats[name][metric] - front
    out = _summary(diff[:1], diff[1:])
    out["frontier"] = float(front[0])
    out["value"] = float(stats[name][metric][0])
    out["l0"] = float(stats[name][l0_key][0])
    return out


# ----------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """What :func:`compare` returns: the JSON ``results``, the trained ``saes`` and per-row test metrics."""

    results: dict[str, Any]
    saes: dict[str, Any]
    rows: pd.DataFrame  # one row per (sae, test row): sq_err, cosine, l2_ratio, l0, k, complexity, bin
    scale: float
    path: Path


def _check_xy(X: Tensor, y: Any, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(X, Tensor) or X.ndim != 2:
        raise ValueError(f"X_{name} must be a 2-D tensor [n, d_in], got {type(X).__name__} "
                         f"{tuple(getattr(X, 'shape', ()))}")
    y = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten()
    if len(y) != len(X):
        raise ValueError(f"y_{name} has {len(y)} labels for {len(X)} rows of X_{name}; pair them row by row")
    bad = ~torch.isfinite(y)
    if bad.any():
        raise ValueError(f"y_{name} has {int(bad.sum())} NaN/inf labels (first row {int(bad.nonzero()[0])}): a "
                         f"failed label has no complexity; drop those rows before comparing")
    if not torch.isfinite(X).all():
        raise ValueError(f"X_{name} contains NaN or inf; drop those rows before comparing")
    return X.float(), y


def rank_match(values: Tensor, target: Tensor) -> Tensor:
    """``target``'s values reassigned so that their order follows ``values`` (largest value, largest k)."""
    out = torch.empty_like(target)
    out[torch.argsort(torch.as_tensor(values), stable=True)] = torch.sort(target, stable=True).values
    return out


def compare(X_train: Tensor, y_train: Any, X_test: Tensor, y_test: Any, *, out: str | Path,
            texts_train: Sequence[str] | None = None, texts_test: Sequence[str] | None = None,
            d_sae: int = 16384, steps: int | None = None, batch_size: int | None = None,
            topk_ks: Sequence[int] = (20, 40, 80, 160, 320, 640),
            k_ranges: Sequence[tuple[int, int]] = ((20, 320), (20, 480), (20, 640)),
            batchtopk: Literal["all", "first", "none"] = "all", ablation_range: tuple[int, int] | None = None,
            train_cfg: TrainConfig | None = None, seed: int = 0, scale: float | Literal["auto"] = "auto",
            n_boot: int = 1000, n_bins: int = 3, interp: Literal["log", "linear"] = "log",
            lm: Any = None, layer: int | None = None, max_length: int = 128, n_ce: int = 200,
            ce_batch_size: int = 32, eval_batch_size: int = 4096, device: str | torch.device | None = None,
            progress: bool = False, log: Any = print) -> Comparison:
    """Train and compare TopK, AdaptiveK, BatchTopK and the ablations; write ``out`` (JSON) atomically.

    Args:
        X_train, y_train: training vectors [n, d_in] (last-token activations, model units) and their
            complexity labels; X_test, y_test: held-out vectors and labels, never used for training.
        out: path of the results JSON (written once, at the end; a failed run leaves no file).
        texts_train, texts_test: the texts behind the rows (the length ablation and the CE need them;
            without them those parts are skipped and say so in the JSON).
        d_sae, steps, batch_size: the dictionary size and training length shared by every SAE
            (``steps``/``batch_size`` override ``train_cfg``'s).
        topk_ks: the TopK sweep; k_ranges: AdaptiveK's ``(k_min, k_max)`` settings.
        batchtopk: train a BatchTopK at the mean training k of "all" AdaptiveK ranges, the "first", or "none".
        ablation_range: the k range of the shuffled / length ablations (default ``k_ranges[0]``).
        train_cfg: :class:`TrainConfig` shared by all SAEs (``seed`` sets its batch order too).
        seed: seed of SAE initialisation, batch order, shuffles and bootstrap resamples.
        scale: activation scale factor, or "auto" (``sqrt(d_in / mean‖x_train‖²)``, as chapter 4).
        n_boot, n_bins, interp: bootstrap replicates, complexity bins (quantiles of y_test), frontier
            interpolation in "log" L0 or "linear" L0.
        lm, layer, max_length, n_ce, ce_batch_size: with ``lm``, next-token CE on the first ``n_ce`` test
            texts with each SAE spliced in at block ``layer`` (texts truncated to ``max_length`` tokens).
        device: where the SAEs train ("cpu" default).
        log: a print-like function for progress lines (None: silent).
    """
    t_start = time.perf_counter()
    say = log or (lambda *_: None)
    X_train, y_train = _check_xy(X_train, y_train, "train")
    X_test, y_test = _check_xy(X_test, y_test, "test")
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"X_train has d={X_train.shape[1]} but X_test has d={X_test.shape[1]}")
    if len(X_test) < 2:
        raise ValueError("X_test needs at least 2 rows (FVE is undefined on one vector)")
    topk_ks = sorted({int(k) for k in topk_ks})
    if len(topk_ks) < 2:
        raise ValueError(f"topk_ks needs at least 2 values to draw a frontier, got {topk_ks}")
    k_ranges = [(int(a), int(b)) for a, b in k_ranges]
    if not k_ranges:
        raise ValueError("k_ranges is empty; give at least one (k_min, k_max)")
    for a, b in k_ranges:
        if not 1 <= a <= b <= d_sae:
            raise ValueError(f"k range ({a}, {b}) must satisfy 1 <= k_min <= k_max <= d_sae={d_sae}")
    if max(topk_ks) > d_sae:
        raise ValueError(f"TopK k={max(topk_ks)} exceeds d_sae={d_sae}")
    ablation_range = tuple(ablation_range) if ablation_range is not None else k_ranges[0]
    if ablation_range not in k_ranges:
        raise ValueError(f"ablation_range {ablation_range} must be one of k_ranges {k_ranges}")
    for nm, texts, X in (("train", texts_train, X_train), ("test", texts_test, X_test)):
        if texts is not None and len(texts) != len(X):
            raise ValueError(f"texts_{nm} has {len(texts)} texts for {len(X)} rows of X_{nm}")
    if lm is not None and (layer is None or texts_test is None):
        raise ValueError("the downstream loss needs lm, layer and texts_test together")
    if batchtopk not in ("all", "first", "none"):
        raise ValueError(f"batchtopk must be 'all', 'first' or 'none', got {batchtopk!r}")
    if interp not in ("log", "linear"):
        raise ValueError(f"interp must be 'log' or 'linear', got {interp!r}")

    d_in = X_train.shape[1]
    if scale == "auto":
        scale = float((d_in / X_train.double().pow(2).sum(1).mean()).sqrt())
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be 'auto' or a finite number > 0, got {scale!r}")
    scale = float(scale)
    Xtr, Xte = X_train * scale, X_test * scale
    cfg = train_cfg or TrainConfig()
    cfg = replace(cfg, seed=seed, **({"steps": steps} if steps is not None else {}),
                  **({"batch_size": batch_size} if batch_size is not None else {}))
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(seed)

    saes: dict[str, Any] = {}
    meta: dict[str, dict[str, Any]] = {}
    eval_k: dict[str, Tensor | None] = {}  # per-row k for evaluate (None: the SAE's own)
    ce_k: dict[str, Any] = {}  # per-text k (or a function of the batch) for the downstream loss

    def train(name: str, sae: Any, y: Tensor | None, **info: Any) -> None:
        t0 = time.perf_counter()
        sae, hist = train_sae(sae.to(device), Xtr, y, cfg, progress=progress)
        saes[name] = sae
        last = hist.iloc[-1]
        meta[name] = info | {"train_seconds": time.perf_counter() - t0, "train_fve_last_batch": float(last["fve"]),
                             "train_l0_last_batch": float(last["l0"])}
        say(f"  trained {name:<24s} in {meta[name]['train_seconds']:5.1f} s  (last-batch FVE {last['fve']:.3f}, "
            f"L0 {last['l0']:.1f})")

    # 1. TopK sweep
    topk_names = [f"topk_{k}" for k in topk_ks]
    for k, name in zip(topk_ks, topk_names, strict=True):
        train(name, TopKSAE(d_in, d_sae, k, seed=seed), None, kind="topk", k=k)
        eval_k[name] = None

    # 2. AdaptiveK: one probe fit (phase 1) shared as a starting point; each SAE trains its own copy
    from .probe import RidgeProbe

    probe = RidgeProbe.fit(Xtr, y_train, lambdas=cfg.probe_lambdas, folds=cfg.probe_folds, seed=seed)
    probe_info = {"lambda": probe.lambda_, "train": probe.evaluate(Xtr, y_train), "test": probe.evaluate(Xte, y_test)}
    pred_train = probe.predict(Xtr).float()
    ada_names = []
    for lo, hi in k_ranges:
        name = f"adaptivek_{lo}_{hi}"
        sae = AdaptiveKSAE(d_in, d_sae, copy.deepcopy(probe), k_min=lo, k_max=hi, seed=seed)
        k_tr = sae.k_from_complexity(pred_train)
        train(name, sae, y_train, kind="adaptivek", k_range=[lo, hi], k_train_mean=float(k_tr.float().mean()))
        k_te = saes[name].k_from_complexity(saes[name].probe.predict(Xte).float())
        meta[name] |= {"k_test_mean": float(k_te.float().mean()), "k_test_min": int(k_te.min()),
                       "k_test_max": int(k_te.max()), "probe_test_after_training": saes[name].probe.evaluate(Xte, y_test)}
        eval_k[name] = None
        ada_names.append(name)

    # 3. BatchTopK at AdaptiveK's mean training k, evaluated with its threshold and with its batch rule
    btk_names = []
    for ada in ada_names[: {"all": len(ada_names), "first": 1, "none": 0}[batchtopk]]:
        k = max(1, round(meta[ada]["k_train_mean"]))
        name = f"batchtopk_{k}"
        if name in saes:
            continue
        train(name, BatchTopKSAE(d_in, d_sae, k, seed=seed), None, kind="batchtopk", k=k, matched_to=ada,
              inference="threshold")
        sae = saes[name].freeze(Xtr, seed=seed)
        meta[name] |= {"threshold": float(sae.threshold), "threshold_ema": sae.threshold_ema}
        eval_k[name] = None
        # the training rule applied to the held-out set as one batch (per CE batch for the downstream loss):
        # exactly k latents per row on average, whatever the threshold does on unseen data
        saes[f"{name}_batch"] = sae
        meta[f"{name}_batch"] = meta[name] | {"inference": "batch rule"}
        eval_k[f"{name}_batch"] = sae.batch_k(Xte).clamp(min=1)
        ce_k[f"{name}_batch"] = lambda x, sae=sae: sae.batch_k(x).clamp(min=1)
        btk_names += [name, f"{name}_batch"]

    # 4. ablations: the same k distribution as AdaptiveK at ablation_range, without the complexity signal
    ada = f"adaptivek_{ablation_range[0]}_{ablation_range[1]}"
    k_tr = saes[ada].k_from_complexity(pred_train)  # the k the SAE trained with (phase-1 probe)
    k_te = saes[ada].k_from_complexity(saes[ada].probe.predict(Xte).float())
    abl_names, skipped = [], {}
    perm_tr, perm_te = torch.randperm(len(k_tr), generator=g), torch.randperm(len(k_te), generator=g)
    ablations: dict[str, tuple[Tensor, Tensor, str]] = {
        "shuffled_k": (k_tr[perm_tr], k_te[perm_te], "AdaptiveK's k, randomly permuted across rows")}
    if texts_train is not None and texts_test is not None:
        len_tr = torch.tensor([len(t) for t in texts_train], dtype=torch.float64)
        len_te = torch.tensor([len(t) for t in texts_test], dtype=torch.float64)
        ablations["length_k"] = (rank_match(len_tr, k_tr), rank_match(len_te, k_te),
                                 "AdaptiveK's k values reassigned by text length in characters (longest, largest)")
    else:
        skipped["length_k"] = "no texts given"
    for name, (ktr, kte, what) in ablations.items():
        train(name, TableKSAE(d_in, d_sae, Xtr, ktr, seed=seed), None, kind="ablation", what=what, of=ada)
        eval_k[name] = kte
        abl_names.append(name)

    # 5. held-out evaluation, per row
    say("evaluating on held-out vectors")
    ev: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        ev[name] = evaluate(sae, Xte, batch_size=eval_batch_size, k=eval_k[name], per_row=True)
    rows = {name: {"sq_err": e["row_sq_err"], "cosine": e["row_cosine"], "l2_ratio": e["row_l2_ratio"],
                   "l0": e["l0"].double()} for name, e in ev.items()}
    Xc = Xte.double() - Xte.double().mean(0)
    W = torch.cat([torch.ones(1, len(Xte), dtype=torch.float64), bootstrap_counts(len(Xte), n_boot, seed)])
    stats = {name: _recon_stats(W, r, Xc) for name, r in rows.items()}
    log_interp = interp == "log"
    points = ada_names + btk_names + abl_names
    recon_metrics = ["fve", "cosine", "mse"]
    vs_topk = {p: {m: _vs_frontier(stats, topk_names, p, m, log_interp) for m in recon_metrics} for p in points}
    # AdaptiveK minus each ablation, paired (same rows, same k distribution): isolates the complexity signal
    paired = {a: {m: _summary((stats[ada][m] - stats[a][m])[:1], (stats[ada][m] - stats[a][m])[1:])
                  for m in recon_metrics + ["l0"]} for a in abl_names}

    # 6. per complexity bin
    edges = torch.quantile(y_test, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)).tolist()
    bin_of = torch.bucketize(y_test, torch.tensor(edges[1:-1], dtype=torch.float64), right=True)  # [n]
    by_bin = []
    for b in range(n_bins):
        sel = bin_of == b
        if int(sel.sum()) < 2:
            by_bin.append({"bin": b, "n": int(sel.sum()), "skipped": "fewer than 2 rows"})
            continue
        Wb, Xb = W[:, sel], Xte.double()[sel]
        sb = {name: _recon_stats(Wb, {k: v[sel] for k, v in r.items()}, Xb - Xb.mean(0)) for name, r in rows.items()}
        entry: dict[str, Any] = {"bin": b, "n": int(sel.sum()), "label_range": [edges[b], edges[b + 1]],
                                 "label_mean": float(y_test[sel].mean()),
                                 "saes": {name: {m: float(s[m][0]) for m in ("fve", "mse", "cosine", "l0")}
                                          for name, s in sb.items()}, "vs_topk_same_budget": {}, "vs_topk_bin_l0": {}}
        for p in points:
            glob = {t: sb[t] | {"l0_global": stats[t]["l0"]} for t in topk_names}
            glob[p] = sb[p] | {"l0_global": stats[p]["l0"]}
            entry["vs_topk_same_budget"][p] = {m: _vs_frontier(glob, topk_names, p, m, log_interp, "l0_global")
                                               for m in ("mse", "cosine")}
            entry["vs_topk_bin_l0"][p] = {m: _vs_frontier(sb, topk_names, p, m, log_interp)
                                          for m in ("fve", "mse", "cosine")}
        by_bin.append(entry)

    # 7. downstream loss on held-out texts
    ce_block: dict[str, Any] = {"skipped": "no language model given"}
    if lm is not None:
        n_ce_used = min(n_ce, len(texts_test))
        ce_texts = list(texts_test[:n_ce_used])
        say(f"downstream loss on {n_ce_used} held-out texts ({len(saes)} SAEs)")
        t0 = time.perf_counter()
        ce = downstream_losses(lm, saes, ce_texts, layer, max_length=max_length, batch_size=ce_batch_size,
                               scale=scale, k={nm: kk[:n_ce_used] for nm, kk in eval_k.items() if kk is not None} | ce_k,
                               mean=X_train.mean(0), progress=progress)
        ce_rows = {name: {"ce": s["rows"], "l0": s["l0"].double()} for name, s in ce["saes"].items()}
        Wc = torch.cat([torch.ones(1, n_ce_used, dtype=torch.float64), bootstrap_counts(n_ce_used, n_boot, seed + 1)])
        cstats = {name: _ce_stats(Wc, r, ce["rows_clean"], ce["rows_ablate"]) for name, r in ce_rows.items()}
        for p in points:
            vs_topk[p] |= {m: _vs_frontier(cstats, topk_names, p, m, log_interp) for m in ("ce", "frac_recovered")}
        for a in abl_names:
            paired[a] |= {m: _summary((cstats[ada][m] - cstats[a][m])[:1], (cstats[ada][m] - cstats[a][m])[1:])
                          for m in ("ce", "frac_recovered")}
        y_ce, bins_ce = y_test[:n_ce_used], bin_of[:n_ce_used]
        ce_block = {"n": n_ce_used, "ce_clean": ce["ce_clean"], "ce_ablate": ce["ce_ablate"],
                    "seconds": time.perf_counter() - t0, "mean_ablation": "mean training activation (model units)",
                    "position": "splice at the second-to-last real token, score the last real token",
                    "by_bin": [{"bin": b, "n": int((bins_ce == b).sum()),
                                "ce_clean": float(ce["rows_clean"][bins_ce == b].mean()),
                                "saes": {nm: float(r["ce"][bins_ce == b].mean()) for nm, r in ce_rows.items()}}
                               for b in range(n_bins) if int((bins_ce == b).sum()) > 0],
                    "label_mean": float(y_ce.mean())}
        for name, s in ce["saes"].items():
            meta[name]["ce"] = {"ce_sae": s["ce_sae"], "delta_ce": s["delta_ce"], "frac_recovered": s["frac_recovered"],
                                "l0_mean": s["l0_mean"],
                                "ci": {m: _summary(cstats[name][m][:1], cstats[name][m][1:]) for m in ("ce", "frac_recovered")}}

    # 8. assemble, write atomically
    sae_block = {}
    for name in saes:
        e = ev[name]
        sae_block[name] = meta[name] | {
            "metrics": {m: e[m] for m in ("mse", "fve", "cosine", "l2_ratio", "l0_mean", "l0_std", "dead_frac",
                                          "ever_fired_frac", "n")},
            "ci": {m: _summary(stats[name][m][:1], stats[name][m][1:]) for m in ("fve", "cosine", "mse", "l0")},
            "l0_quantiles": torch.quantile(e["l0"].double(), torch.tensor([0, .1, .5, .9, 1], dtype=torch.float64)).tolist()}
    frontier = {}
    for m in recon_metrics + (["ce", "frac_recovered"] if lm is not None else []):
        if m in recon_metrics:
            l0s, vals = [ev[t]["l0_mean"] for t in topk_names], [ev[t][m] for t in topk_names]
        else:
            key = "ce_sae" if m == "ce" else m
            l0s, vals = [meta[t]["ce"]["l0_mean"] for t in topk_names], [meta[t]["ce"][key] for t in topk_names]
        frontier[m] = {"names": topk_names, "l0": l0s, "value": vals,
                       "pareto": pareto_mask(l0s, vals, HIGHER_BETTER[m]), "higher_better": HIGHER_BETTER[m]}
    results = {
        "format": RESULTS_FORMAT,
        "config": {"d_in": d_in, "d_sae": d_sae, "topk_ks": topk_ks, "k_ranges": [list(r) for r in k_ranges],
                   "ablation_range": list(ablation_range), "seed": seed, "scale": scale, "n_train": len(Xtr),
                   "n_test": len(Xte), "n_boot": n_boot, "n_bins": n_bins, "interp": interp, "layer": layer,
                   "max_length": max_length, "train": asdict(cfg), "device": str(device)},
        "probe": probe_info, "saes": sae_block, "frontier": frontier, "vs_topk": vs_topk,
        "ablations": {"adaptivek": ada, "minus": paired},
        "by_complexity": {"edges": edges, "bins": by_bin}, "downstream": ce_block, "skipped": skipped,
        "paper_k_range_ablation": K_RANGE_ABLATION,
        "higher_better": HIGHER_BETTER, "seconds": time.perf_counter() - t_start,
    }
    out = Path(out)
    write_json(out, results)
    say(f"wrote {out} ({results['seconds']:.0f} s)")
    per_row = pd.concat([pd.DataFrame({"sae": name, "row": np.arange(len(Xte)),
                                       **{m: r[m].numpy() for m in ("sq_err", "cosine", "l2_ratio", "l0")},
                                       "complexity": y_test.numpy(), "bin": bin_of.numpy()})
                         for name, r in rows.items()], ignore_index=True)
    return Comparison(results=results, saes=saes, rows=per_row, scale=scale, path=out)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON written by :func:`compare`."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no comparison results at {path}; run adaptivek.compare(..., out={str(path)!r})")
    res = json.loads(path.read_text())
    if res.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} has results format {res.get('format')!r}; this adaptivek reads {RESULTS_FORMAT}")
    return res


__all__ = ["compare", "Comparison", "BatchTopKSAE", "TableKSAE", "load_results", "interpolate", "pareto_mask",
           "bootstrap_counts", "rank_match", "frac_recovered"]
