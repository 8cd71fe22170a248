"""Optimisers for SAE training: the reference's Adam and sparsify's sign-SGD with a schedule-free average.

``TrainConfig.optimizer`` picks one:

* ``"adam"``: Adam (default betas) at ``lr`` (1e-3, the reference code's), linear warm-up, constant, linear
  decay to 0 from ``decay_start``; decoder rows renormalised after every step.
* ``"signum"``: sign-SGD inside a schedule-free average, EleutherAI sparsify's default optimiser (its
  ``Trainer`` with ``optimizer="signum"``) with two settings of our own. Each step moves every weight by
  ``lr · sign(gradient)`` (steepest descent in the L∞ norm, https://arxiv.org/abs/1802.04434) at a constant
  rate, and a schedule-free average (Defazio et al. 2024, https://arxiv.org/abs/2405.15682, as in the
  ``schedulefree`` package's ``ScheduleFreeWrapper``, momentum 0.95) evaluates gradients at an interpolation
  of the iterate and its running average and hands back the *average* when training ends. No decay schedule
  is needed, so the number of steps need not be known in advance. As in sparsify, the decoder rows of the
  gradient point are renormalised before every step and the gradient component parallel to each decoder row
  is removed. sparsify's rate is ``5e-3 / sqrt(d_sae / 2**14)`` and its average weights every step alike;
  ours is ``3.35e-3 / sqrt(d_sae / 2**14)`` (:data:`SIGNUM_LR`) and weights step t by ``t²`` (the package's
  ``r = 2``, ``TrainConfig.average_power``), so that the poor first iterates of a short run fade from the
  average. Both were chosen on validation documents (``benchmarks/train_vs_peers.py`` says how);
  ``TrainConfig.sparsify_recipe()`` restores sparsify's.

:class:`ScheduleFreeSignSGD` is that wrapper and sign-SGD in one optimiser, written with ``torch._foreach``
ops: one step is four elementwise passes over the weights, about what Adam's fused step costs
(``schedulefree.ScheduleFreeWrapperReference`` makes seven and keeps ``x``, ``y`` and ``z``). Like ``ScheduleFreeWrapper`` it stores only
the base sequence ``z``: during training the SAE's parameters hold the gradient point ``y`` and the average is
``x = (y - (1 - β) z) / β``. :func:`to_eval` puts ``x`` into the parameters and :func:`averaged` does so for
a block, in one pass: ``x`` is computed into a spare buffer and the parameters point at it, and afterwards
they point back at ``y``'s untouched storage, so that looking at the average never changes the run.
Checkpoints store ``y`` and ``z``, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

ADAM_LR = 1e-3
"""Adam's learning rate when ``TrainConfig.lr`` is None (the reference code's)."""

SIGNUM_MOMENTUM = 0.95
"""β of the schedule-free average, sparsify's setting (``ScheduleFreeWrapper(..., momentum=0.95)``)."""


SIGNUM_LR = 3.35e-3
"""Our sign-SGD rate at 2**14 latents (``TrainConfig.signum_base_lr``), 0.67 x sparsify's. With
``average_power`` 2 it gave the best validation FVE (mean of 79 and 198 steps, d_sae 4,608, batch 4,096, seed 0)
of the 14 settings tried: rates 0.5-1.25 x sparsify's at powers 1 and 2, a few at powers 0, 0.5 and 3
(``benchmarks/train_vs_peers.py --validation``, whose docstring lists them), with sparsify's loss plus AuxK."""

SPARSIFY_SIGNUM_LR = 5e-3
"""sparsify's sign-SGD rate at 2**14 latents (its ``Trainer``'s default)."""


def signum_lr(d_sae: int, base: float = SIGNUM_LR) -> float:
    """The sign-SGD learning rate for ``d_sae`` latents, sparsify's scaling rule: ``base / sqrt(d_sae / 2**14)``."""
    return base / math.sqrt(d_sae / 2**14)


def default_lr(optimizer: str, d_sae: int, signum_base: float = SIGNUM_LR) -> float:
    """The learning rate used when ``TrainConfig.lr`` is None."""
    return ADAM_LR if optimizer == "adam" else signum_lr(d_sae, signum_base)


def _check_lr(name: str, lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name} needs a finite lr > 0, got {lr!r}")


class SignSGD(torch.optim.Optimizer):
    """``p ← p − lr · sign(∂L/∂p)``: every weight moves by exactly ``lr`` (or not at all, at a zero gradient)."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        _check_lr("SignSGD", lr)
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SignSGD.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_(params, torch._foreach_sign([p.grad for p in params]), alpha=-group["lr"])


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Sign-SGD inside a schedule-free average: ``schedulefree.ScheduleFreeWrapper(SignSGD(params, lr),
    momentum, r=r)`` (``weight_lr_power`` 2), in four ``torch._foreach`` passes over the weights.

    With ``s = sign(∂L/∂y)`` and ``c = w_t / Σ w`` (``w_t = (t+1)^r lr_max²``: at a constant rate ``c = 1/(t+1)``
    for ``r = 0``, a plain average, and ``2/(t+2)`` for ``r = 1``, later iterates weighing more)
    the wrapper's update ``z ← z − lr·s``, ``x ← (1−c) x + c z``, ``y ← β x + (1−β) z`` is, with
    ``x = (y − (1−β) z)/β``: ``y ← lerp(y, z, c) − lr (1 − β (1−c)) s`` and then ``z ← z − lr·s``.
    The parameters hold ``y`` in train mode (:meth:`train`, the state after construction) and ``x`` in eval
    mode (:meth:`eval`); :meth:`step` needs train mode and turns each gradient into its sign, in place.
    """

    def __init__(self, params: Any, lr: float, momentum: float = SIGNUM_MOMENTUM, r: float = 0.0) -> None:
        _check_lr("ScheduleFreeSignSGD", lr)
        if not 0 < momentum < 1:
            raise ValueError(f"ScheduleFreeSignSGD needs 0 < momentum < 1, got {momentum!r}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r >= 0):
            raise ValueError(f"ScheduleFreeSignSGD needs a finite r >= 0 (the average's weight power), got {r!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "r": r, "k": 0, "weight_sum": 0.0, "lr_max": 0.0})
        self.train_mode = True
        self._y: dict[torch.Tensor, torch.Tensor] = {}  # eval mode: y's storage, which train() puts back
        self._spare: dict[torch.Tensor, torch.Tensor] = {}  # train mode: buffers for eval()'s x

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state saved before r existed: its average was a plain one
            group.setdefault("r", 0.0)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters ← the average ``x``, computed into a spare buffer; ``y``'s storage is kept for :meth:`train`
        (one pass over the weights, and switching back copies nothing)."""
        if self.train_mode:
            for group in self.param_groups:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        spare = self._spare.pop(p, None)
                        x = torch.lerp(p, self.state[p]["z"], 1 - 1 / group["momentum"],
                                       **({"out": spare} if spare is not None else {}))
                        self._y[p] = p.detach()  # the same storage: y stays exactly as it was
                        p.set_(x)
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters ← the gradient point ``y``: the one :meth:`eval` kept, else ``lerp(x, z, 1 − β)``."""
        if not self.train_mode:
            for group in self.param_groups:
                for p in group["params"]:
                    if "z" not in self.state[p]:
                        continue
                    y = self._y.pop(p, None)
                    if y is None:
                        p.lerp_(self.state[p]["z"], 1 - group["momentum"])
                    else:
                        self._spare[p] = p.detach()  # x's buffer, reused by the next eval()
                        p.set_(y)
        self._y.clear()
        self.train_mode = True

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD.step takes no closure")
        if not self.train_mode:
            raise RuntimeError("ScheduleFreeSignSGD.step needs train mode (the parameters at y): call .train() "
                               "after .eval()")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone(memory_format=torch.preserve_format)
            zs = [self.state[p]["z"] for p in params]
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = max(lr, group["lr_max"])
            weight = (group["k"] + 1) ** group["r"] * group["lr_max"] ** 2
            group["weight_sum"] += weight
            c = weight / group["weight_sum"]
            signs = [p.grad for p in params]
            torch._foreach_sign_(signs)  # in place: the gradients become their signs
            torch._foreach_lerp_(params, zs, c)
            torch._foreach_add_(params, signs, alpha=-lr * (1 - beta * (1 - c)))
            torch._foreach_add_(zs, signs, alpha=-lr)
            group["k"] += 1


def make_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with default betas; the fused single-pass kernel where the device and dtype support it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, *, average_power: float = 0.0) -> Any:
    """The optimiser ``name`` ("adam" or "signum") over ``params`` at ``lr``, ready for training steps;
    ``average_power``: sign-SGD's weighting of step t in its average, ``t**average_power``."""
    if name == "adam":
        return make_adam(params, lr)
    if name != "signum":
        raise ValueError(f"optimizer must be 'adam' or 'signum', got {name!r}")
    return ScheduleFreeSignSGD(params, lr=lr, r=average_power)


def is_schedule_free(opt: Any) -> bool:
    """True for an optimiser whose parameters hold the gradient point, not the weights to keep."""
    return isinstance(opt, ScheduleFreeSignSGD)


def resumed(opt: Any) -> None:
    """After loading a checkpoint: its parameters already hold the gradient point (``y``)."""
    if is_schedule_free(opt):
        opt.train_mode = True
        opt._y.clear()


def to_eval(opt: Any) -> None:
    """Put the weights to keep into the parameters: the schedule-free average; Adam's are already there."""
    if is_schedule_free(opt):
        opt.eval()


@contextmanager
def averaged(opt: Any) -> Iterator[None]:
    """Within the block the parameters hold the weights to keep (for a mid-training evaluation)."""
    if not (is_schedule_free(opt) and opt.train_mode):
        yield
        return
    opt.eval()
    try:
        yield
    finally:
        opt.train()


__all__ = ["averaged", "SignSGD", "ScheduleFreeSignSGD", "make_optimizer", "make_adam", "signum_lr", "default_lr",
           "is_schedule_free", "to_eval", "ADAM_LR", "SIGNUM_LR", "SPARSIFY_SIGNUM_LR", "SIGNUM_MOMENTUM"]
