"""Optimisers for SAE training: the reference's Adam and sparsify's sign-SGD with a schedule-free average.

``TrainConfig.optimizer`` picks one:

* ``"adam"``: Adam (default betas) at ``lr`` (1e-3, the reference code's), linear warm-up, constant, linear
  decay to 0 from ``decay_start``; decoder rows renormalised after every step.
* ``"signum"``: EleutherAI sparsify's default recipe. Each step moves every weight by ``lr · sign(gradient)``
  (steepest descent in the L∞ norm, https://arxiv.org/abs/1802.04434) at a constant learning rate
  ``5e-3 / sqrt(d_sae / 2**14)``, and a schedule-free wrapper (Defazio et al. 2024,
  https://arxiv.org/abs/2405.15682, the ``schedulefree`` package) evaluates gradients at an interpolation of
  the iterate and its running average, and hands back the *average* when training ends. No decay schedule
  is needed, so the number of steps need not be known in advance. The decoder is normalised once, before
  training, as in sparsify: renormalising it after every step would move the averaged weights off the
  wrapper's bookkeeping. The gradient component parallel to each decoder row is still removed.

The wrapper keeps two copies of the weights: during training the SAE's parameters hold the point where
gradients are taken (``y``), :func:`to_eval` turns them into the average (``x``). Checkpoints store ``y``
and the wrapper's state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

ADAM_LR = 1e-3
"""Adam's learning rate when ``TrainConfig.lr`` is None (the reference code's)."""


def signum_lr(d_sae: int) -> float:
    """sparsify's default sign-SGD learning rate for ``d_sae`` latents: ``5e-3 / sqrt(d_sae / 2**14)``."""
    return 5e-3 / math.sqrt(d_sae / 2**14)


def default_lr(optimizer: str, d_sae: int) -> float:
    """The learning rate used when ``TrainConfig.lr`` is None."""
    return ADAM_LR if optimizer == "adam" else signum_lr(d_sae)


class SignSGD(torch.optim.Optimizer):
    """``p ← p − lr · sign(∂L/∂p)``: every weight moves by exactly ``lr`` (or not at all, at a zero gradient)."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"SignSGD needs a finite lr > 0, got {lr!r}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SignSGD.step takes no closure")
        for group in self.param_groups:
            grads = [p.grad.sign() for p in group["params"] if p.grad is not None]
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_(params, grads, alpha=-group["lr"])


def make_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with default betas; the fused single-pass kernel where the device and dtype support it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> Any:
    """The optimiser ``name`` ("adam" or "signum") over ``params`` at ``lr``, ready for training steps."""
    if name == "adam":
        return make_adam(params, lr)
    if name != "signum":
        raise ValueError(f"optimizer must be 'adam' or 'signum', got {name!r}")
    from schedulefree import ScheduleFreeWrapperReference  # the other wrapper needs contiguous weights

    opt = ScheduleFreeWrapperReference(SignSGD(params, lr=lr), momentum=0.95)  # sparsify's settings
    opt.train()
    return opt


def is_schedule_free(opt: Any) -> bool:
    """True for an optimiser whose parameters hold the gradient point, not the weights to keep."""
    return hasattr(opt, "train_mode") and hasattr(opt, "base")


def resumed(opt: Any) -> None:
    """After loading a checkpoint: its parameters already hold the gradient point (``y``)."""
    if is_schedule_free(opt):
        opt.train_mode = True


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


__all__ = ["averaged", "SignSGD", "make_optimizer", "make_adam", "signum_lr", "default_lr", "is_schedule_free", "to_eval",
           "ADAM_LR"]
