"""Training the SAE family: the paper's three phases for AdaptiveK, resumable, with a history table.

``train_sae(sae, X, y, cfg)`` trains any registered SAE in place and returns ``(sae, history)``: each step
calls ``sae(x, k, dead_mask=..., k_aux=...)`` and minimises ``sae.loss(out, cfg)``, the variant's objective.

* **TopK**: Adam, linear warm-up, constant, linear decay to 0 from ``decay_start``, gradient
  clipping, decoder rows renormalised after every step, AuxK on dead latents.
* **AdaptiveK** (reference ``DynamicTopKTrainer``):
  1. *Probe*: closed-form ridge with λ chosen by 5-fold CV (:meth:`RidgeProbe.fit`) on ``(X, y)``.
  2. *SAE, probe frozen*: steps ``[0, phase_ratio·T)``; k of each row from the probe's prediction.
  3. *Joint fine-tuning*: the last ``(1 - phase_ratio)·T`` steps; the probe (w, b) is trained too, with
     ``loss = L_SAE + γ (L_probe + δ (‖w - w0‖ + |b - b0|))`` where ``L_probe = MSE(clamp(Xw + b), y) +
     (λ/2)‖w‖²``, (w0, b0) the phase-1 probe and δ adapted every step (×0.8 when the probe loss fell more
     than 5 % over the last 3 steps, else ×1.2, kept in [0.01, 0.5]).

``L_SAE = MSE(x_hat, x) + l1_weight · mean‖f‖₁ / mean‖x‖₂ + auxk_alpha · AuxK`` (per-element MSE as
in the reference code; the default ``sae.loss``). The history has one row per logged step; ``step`` counts completed
updates and the phase-1 row has step 0.

Where this differs from the reference code (``hiyukie/adaptiveK``) and why is listed once, in
``adaptivek.paper.DEVIATIONS`` (rendered in chapter 6); ``docs/reference-code.md`` describes that code.
A per-row ``k`` (``train_sae(..., k=...)``) trains with a fixed allocation (TopK: the k of each row;
AdaptiveK: in phase 2 instead of the probe's, phase 3 still uses the live probe), e.g. the ablations'.

**Checkpoints** (``checkpoint_dir``) know their run: the fingerprint stored in ``checkpoint.pt`` holds the
TrainConfig, the SAE's config, a hash of its initial weights and :func:`content_hash` of X, y (AdaptiveK)
and the per-row k. Only an exact match is used (an interrupted run resumes bit-identically; a finished one
is returned untrained, with a :class:`TrainingWarning`); anything else, or a file that cannot be read, is a
ValueError naming the file and what differs. **Mistakes that would train silently** are refused or warned
about: non-finite settings (at construction), AdaptiveK labels outside ``[c_min, c_max]``, a loss that stops
being finite (FloatingPointError naming the step), and schedules where training, AuxK or phase 3 hardly run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pandas as pd
import torch

from .checks import finite_rows
from .io import atomic_path
from .optim import (
    SIGNUM_LR,
    SPARSIFY_SIGNUM_LR,
    averaged,
    default_lr,
    make_adam,
    make_optimizer,
    resumed,
    to_eval,
)
from .sae import AdaptiveKSAE, SparseAutoencoder


class TrainingWarning(UserWarning):
    """A run that trains, but not as probably intended (too few steps, AuxK or phase 3 idle, labels off scale,
    a finished checkpoint returned); the message says what to change. Silence with ``warnings.filterwarnings``."""


CHECKPOINT_VERSION = 4
"""Format of ``checkpoint.pt``; 3: the fingerprint covers the initial weights and the data's contents; 4: and
sign-SGD's ``signum_base_lr`` and ``average_power`` (a version-3 file names neither, so it is refused by version)."""


@dataclass
class TrainConfig:
    """Training settings; defaults are the reference code's values (``demo_config.py``) unless noted."""

    steps: int | None = None
    """Number of optimiser steps T. None: ``len(X) * epochs // batch_size`` (the reference's rule)."""
    epochs: float = 15.0
    """Passes over X when ``steps`` is None (reference: 15 epochs of 250k contexts = 1,831 steps)."""
    batch_size: int = 2048
    """Vectors per step (reference 2048)."""
    optimizer: Literal["adam", "signum"] = "adam"
    """How the SAE's weights move (:mod:`adaptivek.optim`). "adam": the reference's Adam with warm-up and
    linear decay. "signum": EleutherAI sparsify's sign-SGD with a schedule-free average (constant rate, no
    warm-up, decay or clipping; decoder rows renormalised at the gradient point before every step, as sparsify's
    trainer does), with our rate and average weighting (:attr:`signum_base_lr`, :attr:`average_power`).
    ``benchmarks/train_vs_peers.py`` measures both against sparsify and SAELens on the same tokens."""
    lr: float | None = None
    """Learning rate of the SAE. None: the optimiser's default, Adam 1e-3 (reference, default betas) or
    sign-SGD ``signum_base_lr / sqrt(d_sae / 2**14)`` (sparsify's scaling rule)."""
    signum_base_lr: float = SIGNUM_LR
    """Sign-SGD's default rate at 2**14 latents (used when ``lr`` is None). 3.35e-3, chosen on validation
    documents (:data:`adaptivek.optim.SIGNUM_LR`); sparsify's is 5e-3."""
    average_power: float = 2.0
    """Sign-SGD: the schedule-free average weights step t's iterate by ``t**average_power`` (the
    ``schedulefree`` package's ``r``). 0 is sparsify's plain average; 2 lets the poor first iterates of a short
    run fade (chosen with :attr:`signum_base_lr`). Adam ignores it."""
    enc_init_scale: float | None = None
    """Factor on the encoder's initial weights at the start of a fresh run. None: the optimiser's recipe, 1 for
    Adam (``W_enc = W_decᵀ``, the reference's) and ``1/√3`` for sign-SGD (sparsify's ``nn.Linear`` init: encoder
    rows of norm about 1/√3 against unit decoder rows). A sign step moves every weight by ``lr`` whatever its
    size, so with sign-SGD the weights' scale sets the effective step and belongs to the recipe with ``lr``."""
    warmup_steps: int = 15
    """Linear warm-up steps (reference 15 for AdaptiveK)."""
    decay_start: float = 0.8
    """Fraction of T after which the learning rate decays linearly to 0 (reference 0.8; the paper says 0.7)."""
    grad_clip: float = 1.0
    """Max global gradient norm, applied to the SAE and the probe separately (reference 1.0; ``math.inf``: none).
    With ``optimizer="signum"`` the SAE's gradients are not clipped (a sign ignores their scale)."""
    l1_weight: float = 0.005
    """Weight of ``mean‖f‖₁ / mean‖x‖₂`` (reference 0.005, used for AdaptiveK; the usual TopK recipe uses 0).
    Applied to both classes so that a comparison changes only how k is chosen."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (reference 1/32)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per row; None: ``d_in // 2`` (reference)."""
    dead_after_vectors: int = 10_000
    """A latent is dead when it has not fired in this many training vectors (reference 10,000)."""
    init_b_dec: Literal["geometric_median", "mean", "none"] = "geometric_median"
    """How ``b_dec`` is set from the first batch (reference: geometric median)."""
    seed: int = 0
    """Seed of the batch order (the SAE's own init is seeded by its constructor)."""
    phase_ratio: float = 0.9
    """AdaptiveK: phase 3 (joint fine-tuning) runs for steps ``>= int(phase_ratio * T)`` (reference 0.9)."""
    probe_weight: float = 0.9
    """AdaptiveK: γ, weight of the probe terms in phase 3 (reference 0.9)."""
    probe_lr: float = 1e-3
    """AdaptiveK: Adam learning rate of the probe in phase 3 (reference 1e-3)."""
    probe_l2: bool = True
    """AdaptiveK: add the reference's ``(λ/2)‖w‖²`` (λ from phase 1's CV) to the phase-3 probe loss."""
    deviation_weight: float = 0.2
    """AdaptiveK: initial δ, weight of ``‖w - w0‖ + |b - b0|`` (reference 0.2)."""
    deviation_bounds: tuple[float, float] = (0.01, 0.5)
    """AdaptiveK: δ is kept in this range (reference [0.01, 0.5])."""
    deviation_threshold: float = 0.05
    """AdaptiveK: δ ×0.8 if the probe loss fell by more than this fraction over 3 steps, else ×1.2."""
    fit_probe: bool | None = None
    """AdaptiveK phase 1: fit the probe on (X, y). None: only if the SAE's probe is missing or unfitted."""
    probe_lambdas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    """AdaptiveK phase 1: ridge penalties tried by cross-validation (reference grid)."""
    probe_folds: int = 5
    """AdaptiveK phase 1: cross-validation folds (reference 5)."""
    unlabelled: Literal["error", "reconstruct_only"] = "error"
    """AdaptiveK: what a NaN label means. "error" refuses it (a failed label). "reconstruct_only": the row
    trains the SAE but never the probe (phase 1 fits the labelled rows, phase 3's probe loss averages
    over the labelled rows of each batch); for token-level data where the tokens before the first scored
    prefix have no complexity label. Pass their k with ``train_sae(..., k=...)`` or let the probe set it."""
    k_gradient: Literal["none", "straight_through"] = "none"
    """AdaptiveK phase 3: "none" is faithful (rounded k, no gradient from the SAE loss to the probe);
    "straight_through" is an extension that lets the SAE loss train the probe (module docstring)."""
    k_temperature: float = 1.0
    """Width, in ranks, of the sigmoid whose gradient the straight-through rank mask uses."""
    autocast: Literal["bfloat16"] | None = None
    """Train under ``torch.autocast`` with this dtype (the reference trains Gemma-2-2B's SAE under bf16
    autocast). Only the encoder's dense matmul then runs in bf16; top-k, the sparse decode, the losses and
    every gradient stay in float32 (``adaptivek.fused._addmm``). None: full precision."""
    log_every: int = 1
    """Write a history row every this many steps (and at phase changes and the last step)."""
    checkpoint_every: int = 100
    """With ``checkpoint_dir``: save a resumable checkpoint every this many steps (and at the end)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the checkpoint (not used by training)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(name, f"must be a number, not a {type(v).__name__}")
            return v

        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise bad("steps", "must be a positive int or None (then epochs decides)")
        for name in ("batch_size", "log_every", "checkpoint_every", "dead_after_vectors", "probe_folds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive int")
        for name in ("warmup_steps", "seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise bad(name, "must be an int")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        for name in ("epochs", "probe_lr", "k_temperature", "signum_base_lr") + (("lr",) if self.lr is not None else ()) + (
                ("enc_init_scale",) if self.enc_init_scale is not None else ()):
            if not (math.isfinite(number(name)) and getattr(self, name) > 0):
                raise bad(name, "must be a finite number > 0 (inf or NaN would train to NaN weights)")
        if not number("grad_clip") > 0:
            raise bad("grad_clip", "must be > 0 (math.inf: no clipping)")
        for name in ("l1_weight", "auxk_alpha", "probe_weight", "deviation_weight", "deviation_threshold",
                     "average_power"):
            if not (math.isfinite(number(name)) and getattr(self, name) >= 0):
                raise bad(name, "must be a finite number >= 0")
        if not 0 < number("decay_start") <= 1:
            raise bad("decay_start", "must be in (0, 1] (1 = no decay)")
        if not 0 < number("phase_ratio") <= 1:
            raise bad("phase_ratio", "must be in (0, 1] (1 = no phase 3)")
        self._check_choices()

    def _check_choices(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        lo, hi = self.deviation_bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise bad("deviation_bounds", "must be finite (low, high) with 0 <= low <= high")
        if not self.probe_lambdas or not all(math.isfinite(v) and v > 0 for v in self.probe_lambdas):
            raise bad("probe_lambdas", "must be finite ridge penalties > 0 (at least one)")
        if self.k_gradient not in ("none", "straight_through"):
            raise bad("k_gradient", "must be 'none' (faithful) or 'straight_through'")
        if self.init_b_dec not in ("geometric_median", "mean", "none"):
            raise bad("init_b_dec", "must be 'geometric_median', 'mean' or 'none'")
        if self.unlabelled not in ("error", "reconstruct_only"):
            raise bad("unlabelled", "must be 'error' (NaN labels refused) or 'reconstruct_only'")
        if self.optimizer not in ("adam", "signum"):
            raise bad("optimizer", "must be 'adam' (the reference's) or 'signum' (sparsify's sign-SGD)")
        if self.autocast not in (None, "bfloat16"):
            raise bad("autocast", "must be None (full precision) or 'bfloat16'")
        if self.k_aux is not None and (isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int)
                                       or self.k_aux < 0):
            raise bad("k_aux", "must be a non-negative int or None (d_in // 2)")

    @classmethod
    def sparsify_recipe(cls, **overrides: Any) -> TrainConfig:
        """EleutherAI sparsify's default recipe in our trainer: sign-SGD with a plain schedule-free average at
        sparsify's rate (and its encoder scale), no L1 term, no AuxK, ``b_dec`` from the first batch's mean. Any
        field can be overridden. ``benchmarks/train_vs_peers.py`` measures it against sparsify itself on the
        same tokens: the same algorithm, so the two differ only by float rounding."""
        return cls(**({"optimizer": "signum", "l1_weight": 0.0, "auxk_alpha": 0.0, "init_b_dec": "mean",
                       "signum_base_lr": SPARSIFY_SIGNUM_LR, "average_power": 0.0} | overrides))

    def encoder_scale(self) -> float:
        """The factor on the encoder's initial weights (:attr:`enc_init_scale`, or the optimiser's)."""
        if self.enc_init_scale is not None:
            return float(self.enc_init_scale)
        return 1.0 if self.optimizer == "adam" else 1 / math.sqrt(3)

    def sae_lr(self, d_sae: int) -> float:
        """The SAE's learning rate: ``lr``, or the optimiser's default for ``d_sae`` latents."""
        return self.lr if self.lr is not None else default_lr(self.optimizer, d_sae, self.signum_base_lr)

    def total_steps(self, n: int) -> int:
        """T for a training set of ``n`` vectors."""
        return self.steps if self.steps is not None else max(1, int(n * self.epochs) // self.batch_size)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Learning-rate multiplier of 0-based step ``step``: linear warm-up, constant, linear decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    start = int(decay_start * total)
    if decay_start < 1 and step >= start:
        return (total - step) / max(1, total - start)
    return 1.0


class _Batches:
    """Row indices of step s: the s-th slice of a stream of seeded per-epoch permutations of n rows."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed, self._perms = n, batch_size, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        start, parts, need = step * self.bs, [], self.bs
        while need:
            epoch, off = divmod(start, self.n)
            take = min(need, self.n - off)
            parts.append(self._perm(epoch)[off:off + take])
            start, need = start + take, need - take
        return torch.cat(parts)


def _check_data(sae: SparseAutoencoder, X: Any, y: Any, k: Any, cfg: TrainConfig
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor [n, d_in], got {type(X).__name__}")
    if X.ndim != 2 or X.shape[1] != sae.d_in:
        raise ValueError(f"X must have shape [n, d_in={sae.d_in}], got {tuple(X.shape)}")
    if len(X) == 0:
        raise ValueError("X is empty; need at least one training vector")
    finite_rows(X, "X", "drop them (and their labels) before training")
    if k is not None:
        k = torch.as_tensor(k)
        if k.shape != (len(X),) or k.is_floating_point() or k.dtype == torch.bool:
            raise ValueError(f"k must be an integer tensor [n={len(X)}] (one k per row of X), got {k.dtype} "
                             f"{tuple(k.shape)}")
        if int(k.min()) < 1 or int(k.max()) > sae.d_sae:
            raise ValueError(f"k must lie in [1, d_sae={sae.d_sae}], got values in [{int(k.min())}, {int(k.max())}]")
        k = k.to(torch.int64)
    if y is None:
        if isinstance(sae, AdaptiveKSAE):
            raise ValueError("training an AdaptiveKSAE needs the complexity labels y (one per row of X): "
                             "phases 1 and 3 fit the probe to them")
        return X, None, k
    y = torch.as_tensor(y).detach().flatten().to(torch.float32)
    if len(y) != len(X):
        raise ValueError(f"labels have the wrong length: y has {len(y)} entries but X has {len(X)} rows; "
                         f"they must be paired row by row")
    labelled = ~torch.isnan(y)
    if cfg.unlabelled == "error" or not isinstance(sae, AdaptiveKSAE):
        finite_rows(y, "y", "a failed label has no complexity: drop those rows from X and y (or, for rows "
                    "that should train the SAE but not the probe, TrainConfig(unlabelled='reconstruct_only'))")
    else:
        finite_rows(y[labelled], "y", "only NaN may mark an unlabelled row")
        if int(labelled.sum()) < 2:
            raise ValueError(f"only {int(labelled.sum())} of {len(y)} rows have a label; AdaptiveK's probe needs "
                             "at least 2 labelled rows")
    if isinstance(sae, AdaptiveKSAE):
        _check_scale(sae, y[labelled])
    return X, y, k


OUTSIDE_SCALE_LIMIT = 0.05
"""Largest share of AdaptiveK labels outside [c_min, c_max] that only warns; more is an error."""


def _check_scale(sae: AdaptiveKSAE, y: torch.Tensor) -> None:
    """Refuse labels on another scale than the SAE's complexity map (their k would pin at k_min or k_max).

    More than :data:`OUTSIDE_SCALE_LIMIT` of the labels outside ``[c_min, c_max]`` is an error (e.g. 0-100
    labels on the 0-10 scale: AdaptiveK would silently become TopK at k_max); fewer is a warning. Labels
    that span at most a tenth of the scale (e.g. 0-1 labels) warn too: k then hardly varies.
    """
    lo, hi, ymin, ymax = sae.c_min, sae.c_max, float(y.min()), float(y.max())
    outside = int(((y < lo) | (y > hi)).sum())
    scale = (f"the complexity scale [c_min={lo:g}, c_max={hi:g}] of this AdaptiveKSAE (labels span "
             f"[{ymin:g}, {ymax:g}])")
    fix = (f"rescale y to [{lo:g}, {hi:g}] (e.g. y / 10 for a 0-100 scale) or build the SAE with c_min / c_max "
           f"set to the labels' scale")
    if outside > OUTSIDE_SCALE_LIMIT * len(y):
        raise ValueError(f"{outside} of {len(y)} labels lie outside {scale}: their k would all be pinned at "
                         f"k_min={sae.k_min} or k_max={sae.k_max}, a TopK in disguise; {fix}")
    if outside:
        warnings.warn(f"{outside} of {len(y)} labels lie outside {scale}; their k is pinned near k_min or k_max. "
                      f"If the labels are on another scale, {fix}", TrainingWarning, stacklevel=4)
    elif 0 < ymax - ymin <= 0.1 * (hi - lo):
        k = sae.k_from_complexity(torch.tensor([ymin, ymax]))
        warnings.warn(f"the labels cover at most a tenth of {scale}, so k only spans [{int(k[0])}, {int(k[1])}] of "
                      f"[{sae.k_min}, {sae.k_max}]; if the labels are on another scale (e.g. 0-1), {fix}",
                      TrainingWarning, stacklevel=4)


class ProbeTerms(NamedTuple):
    """Phase 3's probe terms of one batch (0-d tensors, with gradients to the probe)."""

    pred: torch.Tensor  # [B] clamped predictions
    mse: torch.Tensor  # () mean squared error against the labels
    loss: torch.Tensor  # () mse + (λ/2)‖w‖² (the reference's probe loss)
    deviation: torch.Tensor  # () ‖w - w0‖ + |b - b0|
    n_labelled: int  # rows of the batch with a label (the MSE's rows; 0: the MSE term is 0 and logged as NaN)


@dataclass
class JointProbe:
    """Phase 3's trainable probe: (w, b) from the phase-1 fit (w0, b0), its Adam, and the deviation weight δ.

    ``loss = L_SAE + γ (L_probe + δ (‖w - w0‖ + |b - b0|))`` with ``L_probe = MSE(clamp(Xw + b), y) +
    (λ/2)‖w‖²``; δ adapts every step (:meth:`update_delta`).
    """

    w: torch.Tensor  # [d] trainable
    b: torch.Tensor  # () trainable
    w0: torch.Tensor  # [d] the phase-1 fit, for the deviation penalty
    b0: torch.Tensor  # ()
    opt: torch.optim.Optimizer
    delta: float
    losses: list[float] = field(default_factory=list)  # the last three probe losses

    @classmethod
    def start(cls, w0: torch.Tensor, b0: torch.Tensor, cfg: TrainConfig) -> JointProbe:
        """Trainable copies of (w0, b0), a fresh Adam and δ = ``cfg.deviation_weight``."""
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        return cls(w, b, w0, b0, make_adam([w, b], cfg.probe_lr), cfg.deviation_weight)

    @classmethod
    def of(cls, sae: AdaptiveKSAE, cfg: TrainConfig) -> JointProbe:
        """Unfreeze the SAE's probe: float copies on the SAE's device."""
        probe = sae.probe
        return cls.start(probe.weight.to(sae.device, sae.dtype), probe.bias.to(sae.device, sae.dtype).reshape(()), cfg)

    @classmethod
    def from_state(cls, state: dict[str, Any], cfg: TrainConfig) -> JointProbe:
        """Rebuild from :meth:`state_dict` (a checkpoint's)."""
        w, b = (state[k].detach().clone().requires_grad_(True) for k in ("w", "b"))
        jp = cls(w, b, state["w0"], state["b0"], make_adam([w, b], cfg.probe_lr), state["delta"], list(state["losses"]))
        jp.opt.load_state_dict(state["opt_state"])
        return jp

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "b": self.b, "w0": self.w0, "b0": self.b0, "delta": self.delta,
                "losses": self.losses, "opt_state": self.opt.state_dict()}

    def loss(self, xb: torch.Tensor, yb: torch.Tensor, probe: Any, cfg: TrainConfig) -> ProbeTerms:
        """The probe terms on a batch ``xb [B, d]`` with labels ``yb [B]``."""
        pred = (xb @ self.w + self.b).clamp(probe.y_min, probe.y_max)  # [B]
        labelled = ~torch.isnan(yb)  # unlabelled rows (TrainConfig.unlabelled) add nothing to the MSE
        n = labelled.sum()
        mse = torch.where(labelled, pred - yb, 0.0).pow(2).sum() / n.clamp(min=1)
        loss = mse + (0.5 * probe.lambda_ * self.w.pow(2).sum() if cfg.probe_l2 else 0.0)
        return ProbeTerms(pred, mse, loss, (self.w - self.w0).norm() + (self.b - self.b0).abs(), int(n))

    def step(self, probe_loss: float, lr: float, cfg: TrainConfig) -> None:
        """Clip, one Adam step at ``lr``, then adapt δ (the gradients come from the joint backward)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_([self.w, self.b], cfg.grad_clip)
        self.opt.step()
        self.update_delta(probe_loss, cfg)

    def update_delta(self, probe_loss: float, cfg: TrainConfig) -> None:
        """The reference's adaptive δ: relax it (×0.8) while the probe loss falls by more than
        ``deviation_threshold`` over 3 steps, else tighten it (×1.2), within ``deviation_bounds``."""
        self.losses = (self.losses + [probe_loss])[-3:]
        if len(self.losses) == 3 and self.losses[0] > 0:
            lo, hi = cfg.deviation_bounds
            fell = (self.losses[0] - self.losses[-1]) / self.losses[0]
            self.delta = max(lo, self.delta * 0.8) if fell > cfg.deviation_threshold else min(hi, self.delta * 1.2)

    def write_back(self, sae: AdaptiveKSAE) -> None:
        """Copy (w, b) into ``sae.probe`` (float64, CPU, as RidgeProbe stores them)."""
        sae.probe.weight = self.w.detach().cpu().double().clone()
        sae.probe.bias = self.b.detach().cpu().double().clone().reshape(())


@dataclass
class _Run:
    """The mutable state of one training run (what a checkpoint holds)."""

    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # [d_sae] training vectors since each latent last fired
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0  # first step still to run
    joint: JointProbe | None = None  # phase 3 only

    def snapshot(self, sae: SparseAutoencoder, fingerprint: dict[str, Any], step: int) -> dict[str, Any]:
        if self.joint is not None:
            self.joint.write_back(sae)
        return {"fingerprint": fingerprint, "step": step, "history": self.history, "sae": sae.state_dict(),
                "extra": sae._extra_tensors(), "opt": self.opt.state_dict(), "since_fired": self.since_fired,
                "joint": self.joint.state_dict() if self.joint is not None else None}


_CHECKPOINT_KEYS = ("fingerprint", "step", "history", "sae", "extra", "opt", "since_fired", "joint")
_FIX = "delete it (training then starts afresh) or pass another checkpoint_dir"


def _load_checkpoint(ckpt: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain data only), or a ValueError naming the file."""
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as e:  # truncated, overwritten or not a torch file: torch raises many kinds
        raise ValueError(f"{ckpt} is not a readable training checkpoint ({_why(e)}); {_FIX}") from e
    if not (isinstance(state, dict) and set(_CHECKPOINT_KEYS) <= set(state)
            and isinstance(state["fingerprint"], dict)):
        raise ValueError(f"{ckpt} is not a checkpoint written by train_sae (entries missing); {_FIX}")
    return state


def _why(e: Exception) -> str:
    """One line about an exception: its type and the first line that says something (torch's are long)."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


_DATA_PARTS = {"X": "the contents of X", "y": "the labels y", "k": "the per-row k"}
_SAE_PARTS = {"architecture": "the SAE's architecture", "sae": "the SAE's config",
              "init": "the SAE's initial weights (built with another seed, or seed=None)"}


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, in words (empty: the same run)."""
    if saved.get("version") != now["version"]:
        return [f"its format (version {saved.get('version')!r}; this adaptivek writes {now['version']})"]
    cfg, data = saved.get("cfg") or {}, saved.get("data") or {}
    out = [f"TrainConfig.{name} ({cfg.get(name)!r} there, {v!r} now)" for name, v in now["cfg"].items()
           if cfg.get(name) != v]
    out += [words for key, words in _SAE_PARTS.items() if saved.get(key) != now[key]]
    if data.get("n") != now["data"]["n"]:  # then the contents differ too
        return out + [f"the number of training vectors ({data.get('n')} there, {now['data']['n']} now)"]
    return out + [words for key, words in _DATA_PARTS.items() if data.get(key) != now["data"][key]]


def _resume(run: _Run, sae: SparseAutoencoder, ckpt: Path, fingerprint: dict[str, Any], cfg: TrainConfig) -> None:
    """Load an earlier call's checkpoint into ``run`` and ``sae``, refusing one of another run or data."""
    state = _load_checkpoint(ckpt, sae.device)
    diff = _differences(state["fingerprint"], fingerprint)
    if diff:
        raise ValueError(f"{ckpt} was written by another run: it differs in {'; '.join(diff)}. Using it would "
                         f"continue or return that run's training; {_FIX}")
    try:
        run.start, run.history = int(state["step"]), list(state["history"])
        sae._load_extra(state["extra"])
        sae.load_state_dict(state["sae"])
        run.opt.load_state_dict(state["opt"])
        resumed(run.opt)
        run.since_fired.copy_(state["since_fired"])
        run.joint = JointProbe.from_state(state["joint"], cfg) if state["joint"] is not None else None
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{ckpt} matches this run but its contents are damaged ({_why(e)}); {_FIX}") from e


def _phase1(sae: AdaptiveKSAE, X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
    """AdaptiveK phase 1: fit the probe (unless it is fitted and ``fit_probe`` is not True); its history row."""
    from .probe import RidgeProbe

    lab = ~torch.isnan(y)  # the probe fits and is scored on labelled rows only (TrainConfig.unlabelled)
    X, y = (X, y) if bool(lab.all()) else (X[lab], y[lab])
    if cfg.fit_probe if cfg.fit_probe is not None else not sae.has_probe:
        sae.probe = RidgeProbe.fit(X, y, lambdas=cfg.probe_lambdas, folds=cfg.probe_folds, seed=cfg.seed)
    elif not sae.has_probe:
        raise ValueError("fit_probe=False but the AdaptiveKSAE has no fitted probe; pass one or allow phase 1")
    pred = sae.probe.predict(X).float()
    return {"step": 0, "phase": 1, "probe_loss": float(((pred - y) ** 2).mean()),
            "probe_rmse": float(((pred - y) ** 2).mean().sqrt()), "n_labelled": int(lab.sum()),
            "probe_cv_rmse": float(sae.probe.cv_rmse.min()) if sae.probe.cv_rmse is not None else None,
            "probe_lambda": sae.probe.lambda_, "k_mean": float(sae.k_from_complexity(pred).float().mean()),
            "lr": 0.0}


def content_hash(t: torch.Tensor | None) -> str | None:
    """sha256 (32 hex digits) of a tensor's dtype, shape and every byte; None for None.

    Read in blocks of about 64 MiB of rows (a GPU tensor goes to the host one block at a time). Any
    changed value, reordered row, other dtype or shape changes it; it reads every byte at about
    1.5 GB/s (150k x 576 float32, 330 MiB: about 0.2 s), and ``train_sae`` computes it only for a checkpoint.
    """
    if t is None:
        return None
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.reshape(len(t), -1) if t.ndim else t.reshape(1, 1)  # [n, everything else]
    rows = max(1, (64 << 20) // max(1, flat.shape[1] * flat.element_size()))
    for block in flat.split(rows):
        h.update(block.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def _fingerprint(sae: SparseAutoencoder, cfg: TrainConfig, X: torch.Tensor, y: torch.Tensor | None,
                 k: torch.Tensor | None) -> dict[str, Any]:
    """What a checkpoint must match to be used: format, TrainConfig, SAE config and initial weights, data."""
    state = {name: t for name, t in sorted((sae.state_dict() | sae._extra_tensors()).items())}
    init = hashlib.sha256("".join(f"{name}={content_hash(t)};" for name, t in state.items()).encode())
    return {"version": CHECKPOINT_VERSION, "cfg": json.loads(json.dumps(asdict(cfg), default=repr)),
            "architecture": sae.cfg.architecture, "sae": asdict(sae.cfg), "init": init.hexdigest()[:32],
            "data": {"n": len(X), "X": content_hash(X), "y": content_hash(y), "k": content_hash(k)}}


def _start(sae: SparseAutoencoder, X: torch.Tensor, y: torch.Tensor | None, cfg: TrainConfig,
           ckpt: Path | None, fingerprint: dict[str, Any] | None) -> _Run:
    """A fresh run (after AdaptiveK's phase 1) or the resumed one of ``ckpt``."""
    opt = make_optimizer(cfg.optimizer, list(sae.parameters()), cfg.sae_lr(sae.d_sae), average_power=cfg.average_power)
    run = _Run(opt, torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device))
    if ckpt is not None and fingerprint is not None and ckpt.is_file():
        _resume(run, sae, ckpt, fingerprint, cfg)
    elif isinstance(sae, AdaptiveKSAE):
        run.history.append(_phase1(sae, X, y, cfg))
    return run


MIN_STEPS = 50
"""Fewer steps than this from the epochs rule (``steps=None``) is warned about (:class:`TrainingWarning`)."""


def _warn_schedule(cfg: TrainConfig, n: int, T: int, p3: int | None) -> None:
    """Warn about a schedule that trains, but hardly as meant: too few steps, no AuxK, a stunted phase 2 or 3.

    ``p3``: AdaptiveK's first phase-3 step (None: no phase 3). Each warning states the numbers and the fix.
    """
    seen, bs, warm = T * cfg.batch_size, cfg.batch_size, cfg.warmup_steps
    found = []
    if cfg.steps is None and T < MIN_STEPS:
        found.append(f"training makes only {T} step(s): {n} vectors x {cfg.epochs:g} epochs / batch_size {bs}; "
                     f"pass steps= (the reference makes 1,831), more epochs= or a smaller batch_size=")
    if cfg.auxk_alpha > 0 and (T - 1) * bs < cfg.dead_after_vectors:
        found.append(f"AuxK never runs: a latent counts as dead after dead_after_vectors={cfg.dead_after_vectors} "
                     f"vectors without firing, but training sees {seen}; lower dead_after_vectors= (e.g. "
                     f"{max(bs, seen // 4)}) or train longer (steps=, epochs=)")
    if p3 is not None and p3 == 0:
        found.append(f"phase 2 (the SAE with the probe frozen) never runs: phase 3 starts at int(phase_ratio x T) "
                     f"= int({cfg.phase_ratio:g} x {T}) = 0; train longer (steps=, epochs=)")
    elif p3 is not None and T - p3 < warm:
        found.append(f"phase 3 runs {T - p3} step(s), fewer than its warmup_steps={warm}, so the probe never "
                     f"reaches probe_lr; train longer (phase 3 is the last {1 - cfg.phase_ratio:.0%} of steps=) or "
                     f"lower warmup_steps=")
    for msg in found:
        warnings.warn(msg, TrainingWarning, stacklevel=3)


def _diverged(s: int, what: str, sae: SparseAutoencoder, xb: torch.Tensor, cfg: TrainConfig) -> FloatingPointError:
    """The error that stops a run whose loss or weights stopped being finite, with the likely causes."""
    finite = all(bool(torch.isfinite(p).all()) for p in sae.parameters())
    return FloatingPointError(
        f"training diverged at step {s + 1}: {what}. Likely causes: a learning rate too high (lr={cfg.sae_lr(sae.d_sae):g}, "
        f"probe_lr={cfg.probe_lr:g}; try 10x lower) or extreme values in X (largest |x| in this batch: "
        f"{float(xb.abs().max()):.3g}; rescale X). The SAE's weights are "
        f"{'still finite' if finite else 'no longer finite'}; the last checkpoint, if any, predates this step")


def _set_lr(opt: Any, cfg: TrainConfig, base_lr: float, s: int, T: int) -> float:
    """Step ``s``'s learning rate, set in ``opt``: Adam's schedule, or sign-SGD's constant rate."""
    lr = base_lr * (lr_factor(s, T, cfg.warmup_steps, cfg.decay_start) if cfg.optimizer == "adam" else 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _prepare(sae: SparseAutoencoder, xb: torch.Tensor, cfg: TrainConfig, s: int) -> None:
    """Before step ``s``: ``b_dec`` from the first batch and the encoder at the recipe's scale
    (:meth:`TrainConfig.encoder_scale`); unit decoder rows before step 0 (Adam renormalises after every step)
    or before every step (sign-SGD: at each gradient point, as sparsify's trainer does)."""
    if s == 0:
        sae.init_b_dec(xb, cfg.init_b_dec)
        if cfg.encoder_scale() != 1.0:
            with torch.no_grad():
                sae.W_enc.mul_(cfg.encoder_scale())
    if s == 0 or cfg.optimizer == "signum":
        sae.set_decoder_norm_to_unit_norm()


def _clip(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.Tensor:
    """The SAE's gradient norm (logged); Adam's gradients are clipped to ``grad_clip``, sign-SGD's are left as
    they are (a positive rescaling cannot change a sign, so clipping would only cost a pass, as in sparsify)."""
    if cfg.optimizer == "adam":
        return torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in sae.parameters() if p.grad is not None])


def _step(sae: SparseAutoencoder, run: _Run, xb: torch.Tensor, yb: torch.Tensor | None, kb: torch.Tensor | None,
          dead: torch.Tensor, cfg: TrainConfig, probe_lr: float | None, autocast: Any, s: int
          ) -> tuple[Any, torch.Tensor, Any, Any]:
    """Step ``s``: ``(out, loss, grad_norm, probe_terms)`` (probe terms in phase 3, else None); a non-finite
    loss stops the run (:func:`_diverged`)."""
    terms, extra = None, {}
    if run.joint is not None:  # phase 3: k from the live probe, which trains with the SAE
        terms = run.joint.loss(xb, yb, sae.probe, cfg)
        kb = sae.k_from_complexity(terms.pred.detach()).to(xb.device)
        k_soft = sae.soft_k(terms.pred) if cfg.k_gradient == "straight_through" else None
        extra = {"k_soft": k_soft, "k_temperature": cfg.k_temperature}
    k_aux = cfg.k_aux if cfg.k_aux is not None else sae.d_in // 2
    with autocast:
        out = sae(xb, kb, dead_mask=dead, k_aux=k_aux, **extra)
    loss = sae.loss(out, cfg)
    if terms is not None:
        loss = loss + cfg.probe_weight * (terms.loss + run.joint.delta * terms.deviation)
        run.joint.opt.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss)):  # stop before the update: the weights stay those that gave this loss
        raise _diverged(s, f"the loss is {loss.item()}", sae, xb, cfg)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    grad_norm = _clip(sae, cfg)
    run.opt.step()
    if cfg.optimizer == "adam":  # sign-SGD renormalises the gradient point before the step instead (train_sae)
        sae.set_decoder_norm_to_unit_norm()
    if terms is not None:
        run.joint.step(terms.loss.item(), float(probe_lr), cfg)
    with torch.no_grad():  # dead-latent bookkeeping on the latents that really fired
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=run.since_fired.device)
        fired[out.top_indices[out.top_acts > 0]] = True
        run.since_fired += len(xb)
        run.since_fired[fired] = 0
    return out, loss, grad_norm, terms


def _row(s: int, phase: int, out: Any, loss: torch.Tensor, dead: torch.Tensor, grad_norm: Any, lr: float,
         t0: float, terms: ProbeTerms | None, joint: JointProbe | None) -> dict[str, Any]:
    """The history row of step ``s`` (0-based; the row's ``step`` counts completed updates)."""
    l0 = out.l0.float()
    row = {"step": s + 1, "phase": phase, "loss": loss.item(), "mse": out.mse.item(), "fve": 1 - out.fvu.item(),
           "l1": out.l1.item(), "auxk_loss": out.auxk_loss.item(), "l0": float(l0.mean()),
           "l0_std": float(l0.std()), "k_mean": float(out.k.float().mean()), "k_min": int(out.k.min()),
           "k_max": int(out.k.max()), "dead_frac": float(dead.float().mean()), "grad_norm": float(grad_norm),
           "lr": lr, "time_s": time.perf_counter() - t0}
    if terms is not None and joint is not None:
        row |= {"probe_loss": terms.loss.item(),
                "probe_rmse": terms.mse.sqrt().item() if terms.n_labelled else math.nan,
                "deviation": terms.deviation.item(), "deviation_weight": joint.delta,
                "probe_lr": joint.opt.param_groups[0]["lr"]}
    return row


def _save_checkpoint(run: _Run, sae: SparseAutoencoder, ckpt: Path, fingerprint: dict[str, Any], s: int,
                     xb: torch.Tensor, cfg: TrainConfig) -> None:
    """Write the state after step ``s`` atomically, unless the weights stopped being finite (then stop)."""
    if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
        raise _diverged(s, "the SAE's weights are no longer finite after the update", sae, xb, cfg)
    with atomic_path(ckpt, ".pt") as tmp:
        torch.save(run.snapshot(sae, fingerprint, s + 1), tmp)


def train_sae(sae: SparseAutoencoder, X: torch.Tensor, y: Any = None, cfg: TrainConfig | None = None, *,
              k: Any = None, progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
              callback: Callable[[int, dict[str, Any]], None] | None = None
              ) -> tuple[SparseAutoencoder, pd.DataFrame]:
    """Train ``sae`` in place on ``X [n, d_in]`` and return ``(sae, history)``, the SAE in eval mode.

    Args:
        sae: any registered SAE (TopK, AdaptiveK, BatchTopK, ...); trained on its own device (X may stay on CPU).
        X: training vectors, one per row.
        y: complexity labels [n] (AdaptiveK: required; others: ignored).
        cfg: :class:`TrainConfig`.
        k: optional per-row k, an integer tensor [n]: TopK keeps ``k[i]`` latents for row i; AdaptiveK uses it
            instead of the probe's k in phase 2 (phase 3 keeps the live probe's).
        progress: show a tqdm bar with loss / FVE / L0 / dead fraction.
        checkpoint_dir: write ``checkpoint.pt`` there every ``cfg.checkpoint_every`` steps and at the end.
            A checkpoint there is used only when its fingerprint matches this call exactly: the config,
            the SAE's config and initial weights, and the contents of X, y and k (:func:`content_hash`).
            Then an interrupted run resumes (the result equals an uninterrupted run's) and a finished one
            is returned without training, with a :class:`TrainingWarning` saying so. Any difference, or an
            unreadable file, is a ValueError naming the file and what differs.
        callback: called as ``callback(step, row)`` after every logged step (``row`` the history row).

    Raises FloatingPointError, naming the step and the likely causes, when the loss stops being finite.
    Warns (:class:`TrainingWarning`) when the schedule hardly trains as meant: under :data:`MIN_STEPS` steps
    from the epochs rule, AuxK never active, phase 2 empty or phase 3 shorter than its warm-up.
    """
    from tqdm.auto import tqdm

    cfg = TrainConfig() if cfg is None else cfg
    X, y, k = _check_data(sae, X, y, k, cfg)
    T = cfg.total_steps(len(X))
    adaptive = isinstance(sae, AdaptiveKSAE)
    p3 = int(cfg.phase_ratio * T) if adaptive and cfg.phase_ratio < 1 else T  # first phase-3 step
    _warn_schedule(cfg, len(X), T, p3 if p3 < T else None)
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    fingerprint = _fingerprint(sae, cfg, X, y if adaptive else None, k) if ckpt else None  # hashes the data
    run = _start(sae, X, y, cfg, ckpt, fingerprint)
    if run.start >= T:
        warnings.warn(f"{ckpt} holds this very run, finished ({T} steps; same config, initial weights and data): "
                      f"its model is returned without training; delete the file to train again",
                      TrainingWarning, stacklevel=2)
    batches = _Batches(len(X), cfg.batch_size, cfg.seed)
    autocast = torch.autocast(sae.device.type, dtype=getattr(torch, cfg.autocast or "bfloat16"),
                              enabled=cfg.autocast is not None)  # reusable: a plain context manager
    bar = tqdm(total=T, initial=run.start, disable=not progress, desc=type(sae).__name__, leave=False)
    t0, base_lr = time.perf_counter(), cfg.sae_lr(sae.d_sae)
    sae.train()
    try:
        for s in range(run.start, T):
            idx = batches(s)
            xb = X[idx].to(device=sae.device, dtype=sae.dtype, non_blocking=True)
            _prepare(sae, xb, cfg, s)
            lr = _set_lr(run.opt, cfg, base_lr, s, T)
            yb = probe_lr = None
            if s >= p3:  # phase 3: the probe trains too (warm-up from p3, no decay: the reference's schedule)
                run.joint = run.joint or JointProbe.of(sae, cfg)
                yb, probe_lr = y[idx].to(sae.device), cfg.probe_lr * lr_factor(s - p3, T - p3, cfg.warmup_steps, 1.0)
            dead = run.since_fired >= cfg.dead_after_vectors
            kb = k[idx].to(sae.device) if k is not None else None
            out, loss, grad_norm, terms = _step(sae, run, xb, yb, kb, dead, cfg, probe_lr, autocast, s)
            if (s + 1) % cfg.log_every == 0 or s == T - 1 or s == run.start or s == p3:
                row = _row(s, 3 if s >= p3 else 2, out, loss, dead, grad_norm, lr, t0, terms, run.joint)
                run.history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", fve=f"{row['fve']:.3f}", l0=f"{row['l0']:.0f}",
                                dead=f"{row['dead_frac']:.2f}", refresh=False)
                if callback is not None:
                    with averaged(run.opt):  # sign-SGD: the callback sees the averaged weights
                        callback(s + 1, row)
            bar.update(1)
            if ckpt is not None and ((s + 1) % cfg.checkpoint_every == 0 or s == T - 1):
                _save_checkpoint(run, sae, ckpt, fingerprint, s, xb, cfg)
    finally:
        bar.close()
        to_eval(run.opt)  # sign-SGD: the schedule-free average becomes the SAE's weights
        sae.eval()
    if run.joint is not None:
        run.joint.write_back(sae)
    return sae, pd.DataFrame(run.history)


__all__ = ["TrainConfig", "train_sae", "TrainingWarning", "JointProbe", "content_hash", "lr_factor", "make_adam",
           "MIN_STEPS", "OUTSIDE_SCALE_LIMIT"]
