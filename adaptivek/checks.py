"""Input checks shared by the library: each raises one clear error that names the input and the fix.

Every public function validates what it is given before any work starts. The helpers here keep the
messages consistent (the name of the argument, what was received, what to do) and keep the checks out
of the functions' own logic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def positive_int(value: Any, name: str, *, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` if it is an int >= 1 (bools refused); ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def non_negative_int(value: Any, name: str, *, allow_none: bool = False) -> Any:
    """``value`` if it is an int >= 0 (bools refused); ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int{' or None' if allow_none else ''}, got {value!r}")
    return value


def int_at_least(value: Any, name: str, low: int = 1, *, why: str = "") -> int:
    """``value`` if it is an int >= ``low`` (bools refused); ``why`` says what the bound is for."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}" + (f" ({why})" if why else "") + f", got {value!r}")
    return value


def integer(value: Any, name: str, *, why: str = "") -> int:
    """``int(value)`` if it is a Python or NumPy integer (bools refused), else a TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int" + (f" ({why})" if why else "") + f", got {value!r}")
    return int(value)


def finite_number(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number in the given range (bools refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def one_of(value: Any, name: str, options: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def matrix(X: Any, name: str, *, d: int | None = None, min_rows: int = 1) -> Tensor:
    """``X`` if it is a 2-D torch tensor ``[n, d]`` with at least ``min_rows`` rows."""
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n, d], got {type(X).__name__}")
    if X.ndim != 2 or (d is not None and X.shape[1] != d):
        want = f"[n, {d}]" if d is not None else "[n, d]"
        hint = "; flatten leading dims with x.reshape(-1, d)" if X.ndim > 2 else ""
        raise ValueError(f"{name} must have shape {want}, got {tuple(X.shape)}{hint}")
    if len(X) < min_rows:
        raise ValueError(f"{name} has {len(X)} rows; need at least {min_rows}")
    return X


def finite_rows(X: Tensor, name: str, fix: str = "drop those rows first") -> Tensor:
    """``X`` if every element is finite; else a ValueError counting the bad rows and naming the first."""
    if X.is_floating_point() and X.numel() and bool(torch.isfinite(X.sum())):
        return X  # a NaN or inf anywhere makes the sum NaN or inf (one fast reduction, no [n, d] mask); a
        # finite X whose sum overflows takes the exact path below
    bad = ~torch.isfinite(X)
    if bad.any():
        rows = (bad.reshape(-1) if bad.ndim <= 1 else bad.flatten(1).any(1)).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); {fix}")
    return X


def real_tensor(a: Any, name: str) -> Tensor:
    """Any array-like of real numbers as a float64 tensor (detached; moved off MPS, which has no float64)."""
    if isinstance(a, Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor or array of numbers, got {type(a).__name__}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def text_list(texts: Any, *, allow_bytes: bool = False) -> list:
    """``texts`` as a list of str (and bytes, when ``allow_bytes``); a single string is refused."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, got a single string; wrap it in a list: [text]")
    try:
        texts = list(texts)
    except TypeError as e:
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}") from e
    for i, t in enumerate(texts):
        if not (isinstance(t, str) or (allow_bytes and isinstance(t, bytes))):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str; convert or drop it")
    return texts


def same_length(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Refuse two row-paired inputs of different lengths."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} entries but {name_b} has {len(b)}; they must be paired row by row")


__all__ = ["positive_int", "non_negative_int", "int_at_least", "integer", "finite_number", "one_of", "matrix",
           "finite_rows", "real_tensor", "text_list", "same_length"]
