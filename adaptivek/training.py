"""Training TopK and AdaptiveK SAEs: the paper's three phases, resumable, with a history table.

``train_sae(sae, X, y, cfg)`` trains in place and returns ``(sae, history)``.

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
in the reference code). The history has one row per logged step; ``step`` counts completed
updates and the phase-1 row has step 0.

Deviations from the reference code (``hiyukie/adaptiveK``, ``dynamic_topk.py``; see
``reference/paper.md`` §5), all deliberate:

* **No gradient from the SAE to the probe, reproduced** (``k_gradient="none"``, the default): k is
  rounded, so in the reference "joint" phase the probe is trained only by its own MSE, L2 and
  deviation terms. ``k_gradient="straight_through"`` is an extension: the hard rank mask gets the
  backward of a sigmoid in ``rank - k`` and k the backward of the unrounded sigmoid map, so the
  reconstruction loss reaches (w, b). Expect it to push k up (more latents always reconstruct
  better); only the probe loss, the deviation penalty and the L1 term hold it back.
* **Probe fit on everything it is given.** The reference fits phase 1 on a random 80 % split (the
  other 20 % is never used); we fit on all of ``(X, y)`` (hold data out yourself if you want a test
  set). The probe (helper ``RidgeProbe``) clamps to the training label range, the reference to [0, 10].
* **Step numbering.** The reference spends its step 0 on logging phase 1 only (T - 1 SAE updates); here
  phase 1 runs before the loop and all T steps update the SAE. Warm-up is ``(s + 1) / warmup_steps``
  (the reference's ``s / warmup_steps`` makes the first update a no-op).
* **Probe learning rate** follows the reference's *effective* schedule: its probe scheduler only steps
  during phase 3, so the probe warms up over ``warmup_steps`` from the start of phase 3 and never decays.
* **Dead latents for AuxK** are those not fired in ``dead_after_vectors`` training vectors *before* the
  current batch (the reference updates the counter with the batch first). Dead ⇒ AuxK selects among
  them on the post-ReLU pre-activations, as the reference does.
* **Batches** are drawn from a seeded per-epoch permutation (the reference streams in file order), so a
  resumed run sees exactly the batches of an uninterrupted one.
* **Speed, not maths**: one encoder matmul per step (the reference computes it twice), a loop-free
  variable-k top-k, sparse decode and a sparse encoder backward.
* **Reproduced, but worth knowing**: the phase-3 probe loss adds ``(λ/2)‖w‖²`` to a *mean* squared
  error while phase 1 chose λ for a *summed* one, so relative to phase 1 the penalty is about n/2 times
  stronger; it dominates the probe loss and pulls w towards 0, held back by the deviation penalty
  (``probe_l2=False`` drops it).
* The reference's silently ignored CLI flags (``--probe_weight 0.05``) play no part: the defaults here
  are the values the reference actually ran with (γ = 0.9, L1 0.005, lr 1e-3, phase_ratio 0.9).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from ._io import atomic_path
from .sae import AdaptiveKSAE, SparseAutoencoder

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Training settings; defaults are the reference code's values (``demo_config.py``) unless noted."""

    steps: int | None = None
    """Number of optimiser steps T. None: ``len(X) * epochs // batch_size`` (the reference's rule)."""
    epochs: float = 15.0
    """Passes over X when ``steps`` is None (reference: 15 epochs of 250k contexts = 1,831 steps)."""
    batch_size: int = 2048
    """Vectors per step (reference 2048)."""
    lr: float = 1e-3
    """Adam learning rate of the SAE (reference 1e-3, default betas)."""
    warmup_steps: int = 15
    """Linear warm-up steps (reference 15 for AdaptiveK)."""
    decay_start: float = 0.8
    """Fraction of T after which the learning rate decays linearly to 0 (reference 0.8; the paper says 0.7)."""
    grad_clip: float = 1.0
    """Max global gradient norm, applied to the SAE and the probe separately (reference 1.0)."""
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
    k_gradient: Literal["none", "straight_through"] = "none"
    """AdaptiveK phase 3: "none" is faithful (rounded k, no gradient from the SAE loss to the probe);
    "straight_through" is an extension that lets the SAE loss train the probe (module docstring)."""
    k_temperature: float = 1.0
    """Width, in ranks, of the sigmoid whose gradient the straight-through rank mask uses."""
    autocast: Literal["bfloat16"] | None = None
    """Train under ``torch.autocast`` with this dtype (the reference trains Gemma-2-2B's SAE under bf16
    autocast). Only the encoder's dense matmul then runs in bf16; top-k, the sparse decode, the losses and
    every gradient stay in float32 (``sae._addmm``). None: full precision."""
    log_every: int = 1
    """Write a history row every this many steps (and at phase changes and the last step)."""
    checkpoint_every: int = 100
    """With ``checkpoint_dir``: save a resumable checkpoint every this many steps (and at the end)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the checkpoint (not used by training)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise bad("steps", "must be a positive int or None (then epochs decides)")
        if not self.epochs > 0:
            raise bad("epochs", "must be > 0")
        for name in ("batch_size", "log_every", "checkpoint_every", "dead_after_vectors", "probe_folds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive int")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        for name in ("lr", "probe_lr", "grad_clip", "k_temperature"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        for name in ("l1_weight", "auxk_alpha", "probe_weight", "deviation_weight", "deviation_threshold"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if not 0 < self.decay_start <= 1:
            raise bad("decay_start", "must be in (0, 1] (1 = no decay)")
        if not 0 < self.phase_ratio <= 1:
            raise bad("phase_ratio", "must be in (0, 1] (1 = no phase 3)")
        lo, hi = self.deviation_bounds
        if not 0 <= lo <= hi:
            raise bad("deviation_bounds", "must be (low, high) with 0 <= low <= high")
        if self.k_gradient not in ("none", "straight_through"):
            raise bad("k_gradient", "must be 'none' (faithful) or 'straight_through'")
        if self.init_b_dec not in ("geometric_median", "mean", "none"):
            raise bad("init_b_dec", "must be 'geometric_median', 'mean' or 'none'")
        if self.autocast not in (None, "bfloat16"):
            raise bad("autocast", "must be None (full precision) or 'bfloat16'")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux < 0):
            raise bad("k_aux", "must be a non-negative int or None (d_in // 2)")

    def total_steps(self, n: int) -> int:
        """T for a training set of ``n`` vectors."""
        return self.steps if self.steps is not None else max(1, int(n * self.epochs) // self.batch_size)


def make_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with default betas; the fused single-pass kernel where the device and dtype support it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


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


def _check_data(sae: SparseAutoencoder, X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor [n, d_in], got {type(X).__name__}")
    if X.ndim != 2 or X.shape[1] != sae.d_in:
        raise ValueError(f"X must have shape [n, d_in={sae.d_in}], got {tuple(X.shape)}")
    if len(X) == 0:
        raise ValueError("X is empty; need at least one training vector")
    bad = ~torch.isfinite(X).all(1)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(f"X contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); drop "
                         f"them (and their labels) before training")
    if y is None:
        if isinstance(sae, AdaptiveKSAE):
            raise ValueError("training an AdaptiveKSAE needs the complexity labels y (one per row of X): "
                             "phases 1 and 3 fit the probe to them")
        return X, None
    y = torch.as_tensor(y).detach().flatten().to(torch.float32)
    if len(y) != len(X):
        raise ValueError(f"labels have the wrong length: y has {len(y)} entries but X has {len(X)} rows; "
                         f"they must be paired row by row")
    bad = ~torch.isfinite(y)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(f"y contains NaN or inf at {len(rows)} row(s) (first: {rows[:5].tolist()}): a failed "
                         f"label has no complexity; drop those rows from X and y")
    return X, y


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def train_sae(sae: SparseAutoencoder, X: torch.Tensor, y: Any = None, cfg: TrainConfig | None = None, *,
              progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
              callback: Callable[[int, dict[str, Any]], None] | None = None
              ) -> tuple[SparseAutoencoder, pd.DataFrame]:
    """Train ``sae`` in place on ``X [n, d_in]`` and return ``(sae, history)``.

    Args:
        sae: a :class:`TopKSAE` or :class:`AdaptiveKSAE`; trained on its own device (X may stay on CPU).
        X: training vectors, one per row.
        y: complexity labels [n] (AdaptiveK: required; TopK: ignored).
        cfg: :class:`TrainConfig`.
        progress: show a tqdm bar with loss / FVE / L0 / dead fraction.
        checkpoint_dir: write ``checkpoint.pt`` there every ``cfg.checkpoint_every`` steps and at the end;
            if one exists from an earlier, interrupted call with the same config and data size, training
            resumes from it and the result equals that of an uninterrupted run.
        callback: called as ``callback(step, row)`` after every logged step (``row`` the history row).
    """
    cfg = TrainConfig() if cfg is None else cfg
    X, y = _check_data(sae, X, y)
    adaptive = isinstance(sae, AdaptiveKSAE)
    device = sae.W_enc.device
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg.autocast or "bfloat16"),
                              enabled=cfg.autocast is not None)  # reusable: a plain context manager
    n, T = len(X), cfg.total_steps(len(X))
    p3 = int(cfg.phase_ratio * T) if adaptive and cfg.phase_ratio < 1 else T  # first phase-3 step
    batches = _Batches(n, cfg.batch_size, cfg.seed)
    opt = make_adam(list(sae.parameters()), cfg.lr)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    history: list[dict[str, Any]] = []
    probe_state: dict[str, Any] = {}  # phase 3: w, b (trainable), w0, b0, its optimiser, δ and loss history
    start = 0

    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    fingerprint = {"cfg": asdict(cfg), "class": type(sae).__name__, "sae": sae.config() | {"has_probe": None},
                   "n": n, "version": CHECKPOINT_VERSION}
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt} was written by a run with a different config, model or data size; "
                             f"delete it or use another checkpoint_dir")
        start, history = state["step"], state["history"]
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired.copy_(state["since_fired"])
        if adaptive:
            from .probe import RidgeProbe

            sae.probe = RidgeProbe.from_tensors(state["probe"])
            if state["probe_state"]:
                probe_state = _start_phase3(sae, cfg, device, state["probe_state"])
    elif adaptive:
        fit = cfg.fit_probe if cfg.fit_probe is not None else not sae.has_probe
        if fit:
            from .probe import RidgeProbe

            sae.probe = RidgeProbe.fit(X, y, lambdas=cfg.probe_lambdas, folds=cfg.probe_folds, seed=cfg.seed)
        elif not sae.has_probe:
            raise ValueError("fit_probe=False but the AdaptiveKSAE has no fitted probe; pass one or allow phase 1")
        pred = sae.probe.predict(X).float()
        history.append({"step": 0, "phase": 1, "probe_loss": float(((pred - y) ** 2).mean()),
                        "probe_rmse": float(((pred - y) ** 2).mean().sqrt()),
                        "probe_cv_rmse": float(sae.probe.cv_rmse.min()) if sae.probe.cv_rmse is not None else None,
                        "probe_lambda": sae.probe.lambda_, "k_mean": float(sae.k_from_complexity(pred).float().mean()),
                        "lr": 0.0})

    def snapshot(step: int) -> dict[str, Any]:
        if adaptive and probe_state:
            _write_back(sae, probe_state)
        return {"fingerprint": fingerprint, "step": step, "history": history, "sae": sae.state_dict(),
                "opt": opt.state_dict(), "since_fired": since_fired,
                "probe": sae.probe.to_tensors() if adaptive else None,
                "probe_state": {k: v for k, v in probe_state.items() if k != "opt"}
                | ({"opt_state": probe_state["opt"].state_dict()} if probe_state else {})}

    from tqdm.auto import tqdm

    bar = tqdm(total=T, initial=start, disable=not progress, desc=type(sae).__name__, leave=False)
    t0 = time.perf_counter()
    k_aux = cfg.k_aux if cfg.k_aux is not None else sae.d_in // 2
    for s in range(start, T):
        idx = batches(s)
        xb = X[idx].to(device=device, dtype=sae.W_enc.dtype, non_blocking=True)
        if s == 0:
            sae.init_b_dec(xb, cfg.init_b_dec)
        phase = 3 if s >= p3 else 2
        lr_f = lr_factor(s, T, cfg.warmup_steps, cfg.decay_start)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_f
        dead = since_fired >= cfg.dead_after_vectors
        row: dict[str, Any] = {"step": s + 1, "phase": phase}

        if phase == 3:
            if not probe_state:
                probe_state = _start_phase3(sae, cfg, device)
            ps = probe_state
            yb = y[idx].to(device)
            w, b = ps["w"], ps["b"]
            pred = (xb @ w + b).clamp(sae.probe.y_min, sae.probe.y_max)  # [B]
            probe_mse = (pred - yb).pow(2).mean()
            probe_loss = probe_mse + (0.5 * sae.probe.lambda_ * w.pow(2).sum() if cfg.probe_l2 else 0.0)
            deviation = (w - ps["w0"]).norm() + (b - ps["b0"]).abs()
            k = sae.k_from_complexity(pred.detach()).to(device)
            k_soft = sae.soft_k(pred) if cfg.k_gradient == "straight_through" else None
            with autocast:
                out = sae(xb, k, dead_mask=dead, k_aux=k_aux, k_soft=k_soft, k_temperature=cfg.k_temperature)
        else:
            with autocast:
                out = sae(xb, dead_mask=dead, k_aux=k_aux)
        sae_loss = out.mse + cfg.l1_weight * out.l1 + cfg.auxk_alpha * out.auxk_loss
        loss = sae_loss
        if phase == 3:
            loss = sae_loss + cfg.probe_weight * (probe_loss + ps["delta"] * deviation)
            ps["opt"].zero_grad(set_to_none=True)
            for group in ps["opt"].param_groups:
                group["lr"] = cfg.probe_lr * lr_factor(s - p3, T - p3, cfg.warmup_steps, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        if phase == 3:
            torch.nn.utils.clip_grad_norm_([w, b], cfg.grad_clip)
            ps["opt"].step()
            _update_delta(ps, probe_loss.item(), cfg)

        with torch.no_grad():  # dead-latent bookkeeping on the latents that really fired
            fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
            fired[out.top_indices[out.top_acts > 0]] = True
            since_fired += len(xb)
            since_fired[fired] = 0

        last = s == T - 1
        if (s + 1) % cfg.log_every == 0 or last or s == start or s == p3:
            l0 = out.l0.float()
            row |= {"loss": loss.item(), "mse": out.mse.item(), "fve": 1 - out.fvu.item(), "l1": out.l1.item(),
                    "auxk_loss": out.auxk_loss.item(), "l0": float(l0.mean()), "l0_std": float(l0.std()),
                    "k_mean": float(out.k.float().mean()), "k_min": int(out.k.min()), "k_max": int(out.k.max()),
                    "dead_frac": float(dead.float().mean()), "grad_norm": float(grad_norm),
                    "lr": cfg.lr * lr_f, "time_s": time.perf_counter() - t0}
            if phase == 3:
                row |= {"probe_loss": probe_loss.item(), "probe_rmse": probe_mse.sqrt().item(),
                        "deviation": deviation.item(), "deviation_weight": ps["delta"],
                        "probe_lr": ps["opt"].param_groups[0]["lr"]}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}", fve=f"{row['fve']:.3f}", l0=f"{row['l0']:.0f}",
                            dead=f"{row['dead_frac']:.2f}", refresh=False)
            if callback is not None:
                callback(s + 1, row)
        bar.update(1)
        if ckpt is not None and ((s + 1) % cfg.checkpoint_every == 0 or last):
            _save_checkpoint(ckpt, snapshot(s + 1))
    bar.close()
    if adaptive and probe_state:
        _write_back(sae, probe_state)
    return sae, pd.DataFrame(history)


def _start_phase3(sae: AdaptiveKSAE, cfg: TrainConfig, device: torch.device,
                  saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unfreeze the probe: trainable float copies (w, b) of the phase-1 fit, (w0, b0) kept for the penalty.

    ``saved``: the phase-3 state of a checkpoint to resume from.
    """
    if saved is not None:
        w, b = (saved[k].detach().clone().requires_grad_(True) for k in ("w", "b"))
        ps = {"w": w, "b": b, "w0": saved["w0"], "b0": saved["b0"], "opt": make_adam([w, b], cfg.probe_lr),
              "delta": saved["delta"], "losses": list(saved["losses"])}
        ps["opt"].load_state_dict(saved["opt_state"])
        return ps
    dtype = sae.W_enc.dtype
    w0 = sae.probe.weight.to(device, dtype)
    b0 = sae.probe.bias.to(device, dtype).reshape(())
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    return {"w": w, "b": b, "w0": w0, "b0": b0, "opt": make_adam([w, b], cfg.probe_lr),
            "delta": cfg.deviation_weight, "losses": []}


def _update_delta(ps: dict[str, Any], probe_loss: float, cfg: TrainConfig) -> None:
    """The reference's adaptive deviation weight: relax it while the probe loss is still falling fast."""
    ps["losses"] = (ps["losses"] + [probe_loss])[-3:]
    if len(ps["losses"]) == 3 and ps["losses"][0] > 0:
        lo, hi = cfg.deviation_bounds
        fell = (ps["losses"][0] - ps["losses"][-1]) / ps["losses"][0]
        ps["delta"] = max(lo, ps["delta"] * 0.8) if fell > cfg.deviation_threshold else min(hi, ps["delta"] * 1.2)


def _write_back(sae: AdaptiveKSAE, ps: dict[str, Any]) -> None:
    """Copy the phase-3 probe (w, b) into ``sae.probe`` (float64, CPU, as RidgeProbe stores them)."""
    sae.probe.weight = ps["w"].detach().cpu().double().clone()
    sae.probe.bias = ps["b"].detach().cpu().double().clone().reshape(())


__all__ = ["TrainConfig", "train_sae", "lr_factor", "make_adam"]
