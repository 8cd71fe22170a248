"""Evaluating sparse autoencoders: reconstruction metrics and downstream next-token loss.

``evaluate(sae, X)`` streams ``X`` in batches and returns one set of formulas for every SAE:

* ``mse``: mean squared error **per element**, ``Σ‖x - x̂‖² / (n · d)`` (the training loss's unit);
* ``fve``: fraction of variance explained over the whole set, ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` with the
  mean ``x̄`` of this evaluation set subtracted (SAELens before 6.45.1 got this wrong, and so did the
  reference code's per-context variant: its flaws 6-7 in ``docs/reference-code.md``). ``Σ‖x - x̄‖²``
  is accumulated with Chan et al.'s pairwise merge of per-batch means and sums of squares in float64,
  so a large common offset does not cancel catastrophically;
* ``cosine`` (mean over rows of cos(x, x̂)), ``l2_ratio`` (mean over rows of ‖x̂‖ / ‖x‖, SAEBench's);
* ``l0_mean``, ``l0_std`` and ``l0`` (every row's number of active latents), ``dead_frac`` (latents
  that never fired on this set), ``ever_fired_frac`` and ``n``.

An evaluation set of one vector has no variance, so FVE is undefined: ``evaluate`` raises instead of
returning NaN (the reference code's Gemma evaluation ran with batches of one and got NaN).

``downstream_loss(lm, sae, texts, layer)`` splices the reconstruction into the model with nnsight and
measures next-token cross-entropy. In ``token="last"`` mode the SAE replaces the residual stream after
block ``layer`` at each text's **second-to-last** real token ``t = n - 2`` and we score the prediction of
the **last** real token ``n - 1`` from position ``t``: the only position whose loss the splice can
change that still has a target inside the text. Three numbers, on the same texts and positions:
``ce_clean`` (no splice), ``ce_sae`` (``x`` replaced by ``x̂``) and ``ce_ablate`` (``x`` replaced by a
mean activation), and ``frac_recovered = (ce_ablate - ce_sae) / (ce_ablate - ce_clean)``.

Only position ``t`` is changed, and a causal model's earlier positions do not see it, so we run the
model once per batch on tokens ``0..t`` (clean loss, the activation at ``t`` and the key/value cache of
``0..t-1``) and then **one token per SAE** on top of that cache: comparing a dozen SAEs costs about one
forward pass instead of a dozen (``method="kv"``). ``method="full"`` re-runs the whole sequence for every
splice; both give the same numbers (tested), and ``"auto"`` uses the cache when the model's cache can be
rolled back exactly (not for sliding-window layers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from .checks import finite_number, finite_rows, int_at_least, matrix, non_negative_int, one_of, positive_int

if TYPE_CHECKING:
    import pandas as pd


class Encoder(Protocol):
    """What ``evaluate`` and ``downstream_loss`` need from an SAE: dense ``encode`` and ``decode``."""

    def encode(self, x: Tensor, k: Any = None) -> Tensor: ...  # [B, d_in] -> [B, d_sae]
    def decode(self, codes: Tensor) -> Tensor: ...  # [B, d_sae] -> [B, d_in]


# ----------------------------------------------------------------------------- helpers
def _param_device_dtype(sae: Any, x: Tensor) -> tuple[torch.device, torch.dtype]:
    p = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    return (p.device, p.dtype) if p is not None else (x.device, x.dtype)


def _check_k(k: Any, n: int) -> Tensor | int | None:
    if k is None or (isinstance(k, int) and not isinstance(k, bool)):
        return k
    if callable(k) and not isinstance(k, Tensor):
        return k
    if not isinstance(k, Tensor):
        k = torch.as_tensor(k)
    if k.ndim == 0:
        return int(k)
    if k.shape != (n,) or k.is_floating_point() or k.dtype == torch.bool:
        raise ValueError(f"k must be None, an int or an integer tensor [n={n}] (one k per row), got "
                         f"{k.dtype} {tuple(k.shape)}")
    return k


def reconstruct(sae: Encoder, x: Tensor, k: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """``(x_hat [B, d_in], codes [B, d_sae])`` of ``x`` on the SAE's device and dtype (no gradient)."""
    device, dtype = _param_device_dtype(sae, x)
    xb = x.to(device=device, dtype=dtype)
    with torch.no_grad():
        if k is None:
            codes = sae.encode(xb)
        else:
            codes = sae.encode(xb, k=k.to(device) if isinstance(k, Tensor) else k)
        return sae.decode(codes), codes


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(sae: Encoder, X: Tensor, *, batch_size: int = 4096, k: int | Tensor | None = None,
             per_row: bool = False) -> dict[str, Any]:
    """Reconstruction metrics of ``sae`` on ``X [n, d_in]``, streamed in batches (module docstring).

    Args:
        sae: anything with ``encode(x, k=None) -> codes [B, d_sae]`` and ``decode(codes) -> [B, d_in]``
            (``TopKSAE``, ``AdaptiveKSAE``, ...). Inputs are moved to its device and dtype.
        X: evaluation vectors, one per row (at least 2, not all equal: FVE needs variance).
        batch_size: rows per batch; the result does not depend on it.
        k: None (the SAE's own k), an int, an integer tensor [n] with each row's k, or a function of a
            batch [B, d_in] returning its k [B].
        per_row: also return ``row_sq_err`` (‖x - x̂‖² [n]), ``row_cosine`` [n] and ``row_l2_ratio`` [n]
            (float64 CPU tensors), which is what bootstrap CIs resample.

    Returns a dict: ``mse`` (per element), ``fve``, ``fvu``, ``cosine``, ``l2_ratio``, ``l0_mean``,
    ``l0_std``, ``l0`` (int64 tensor [n]), ``dead_frac`` (latents that never fire on X), ``ever_fired_frac``,
    ``firing_freq`` (float64 [d_sae]: the share of rows each latent fires on), ``n``, ``d_in``, ``d_sae``.
    """
    n, d = matrix(X, "X").shape
    if n < 2:
        raise ValueError(f"the evaluation set has {n} row(s): FVE = 1 - SSE / Σ‖x - mean(x)‖² is undefined "
                         f"without at least 2 vectors (the variance of one vector is 0/0); evaluate on more rows")
    positive_int(batch_size, "batch_size")
    finite_rows(X, "X", "drop them")
    k = _check_k(k, n)
    sse, m2, rows, fired = _stream(sae, X, k, batch_size)
    if not m2 > 0:
        raise ValueError("every row of X is the same vector: Σ‖x - mean(x)‖² = 0, so FVE is undefined")
    l0 = torch.cat(rows["l0"]).to(torch.int64)
    cos_all, ratio_all = torch.cat(rows["cosine"]), torch.cat(rows["l2_ratio"])
    fve = float(1 - sse / m2)
    out: dict[str, Any] = {
        "mse": float(sse / (n * d)), "fve": fve, "fvu": 1 - fve, "cosine": float(cos_all.mean()),
        "l2_ratio": float(ratio_all.mean()), "l0_mean": float(l0.double().mean()),
        "l0_std": float(l0.double().std()), "l0": l0, "dead_frac": float((fired == 0).double().mean()),
        "ever_fired_frac": float((fired > 0).double().mean()), "firing_freq": fired.double() / n, "n": n, "d_in": d,
        "d_sae": int(fired.numel())}
    if per_row:
        out |= {"row_sq_err": torch.cat(rows["sq_err"]), "row_cosine": cos_all, "row_l2_ratio": ratio_all}
    return out


def _stream(sae: Encoder, X: Tensor, k: Any, batch_size: int
            ) -> tuple[Tensor, Tensor, dict[str, list[Tensor]], Tensor]:
    """One pass over ``X`` in batches: ``(Σ‖x - x̂‖², Σ‖x - x̄‖², per-row parts, rows each latent fired on [d_sae])``.

    ``Σ‖x - x̄‖²`` merges per-batch means and sums of squares (Chan et al.) in float64, so a large common
    offset does not cancel; the per-row parts are lists of per-batch ``sq_err``, ``cosine``, ``l2_ratio``
    (float64) and ``l0`` tensors.
    """
    f64 = torch.float64
    sse, m2 = torch.zeros((), dtype=f64), torch.zeros((), dtype=f64)  # Σ‖x - x̂‖², running Σ‖x - mean‖²
    mean = torch.zeros(X.shape[1], dtype=f64)  # running mean of x
    seen, fired = 0, None
    rows: dict[str, list[Tensor]] = {"sq_err": [], "cosine": [], "l2_ratio": [], "l0": []}
    for start in range(0, len(X), batch_size):
        xb = X[start:start + batch_size]
        kb = k[start:start + batch_size] if isinstance(k, Tensor) else k(xb) if callable(k) else k
        x_hat, l0, fired_b = _pass(sae, xb, kb)
        x64, h64 = xb.to(device="cpu", dtype=f64), x_hat.detach().to(device="cpu", dtype=f64)
        err = (x64 - h64).pow(2).sum(1)  # [B]
        sse += err.sum()
        nb, mean_b = len(xb), x64.mean(0)  # merge (seen, mean, m2) with this batch's (nb, mean_b, m2_b)
        m2_b = (x64 - mean_b).pow(2).sum()
        delta = mean_b - mean
        m2 += m2_b + delta.pow(2).sum() * seen * nb / (seen + nb)
        mean += delta * nb / (seen + nb)
        seen += nb
        xn, hn = x64.norm(dim=1), h64.norm(dim=1)  # [B]
        rows["cosine"].append((x64 * h64).sum(1) / (xn * hn).clamp_min(1e-30))
        rows["l2_ratio"].append(hn / xn.clamp_min(1e-30))
        rows["sq_err"].append(err)
        rows["l0"].append(l0.cpu())
        fired = fired_b.cpu() if fired is None else fired + fired_b.cpu()  # [d_sae] int64
    return sse, m2, rows, fired


def _pass(sae: Encoder, x: Tensor, k: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_hat [B, d_in], l0 [B], fired [d_sae])`` of one batch. An SAE of the family goes through its sparse
    code: the decode sums each row's active rows of ``W_dec`` instead of multiplying a dense ``[B, d_sae]``
    code (``d_sae / k`` times less work), and the firing counts come from the active indices."""
    if not (hasattr(sae, "encode_sparse") and hasattr(sae, "decode_sparse")):
        x_hat, codes = reconstruct(sae, x, k)
        active = codes != 0  # [B, d_sae]
        return x_hat, active.sum(1), active.sum(0)
    device, dtype = _param_device_dtype(sae, x)
    xb = x.to(device=device, dtype=dtype)
    code = sae.encode_sparse(xb) if k is None else sae.encode_sparse(xb, k=k.to(device) if isinstance(k, Tensor) else k)
    fired = torch.bincount(code.top_indices[code.mask], minlength=sae.d_sae)  # [d_sae] rows each latent fired on
    return sae.decode_sparse(code), code.mask.sum(1), fired


# ----------------------------------------------------------------------------- downstream loss
def _tokenize(tok: Any, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` [N, T]: column -1 is every row's last real token."""
    from .activations import _check_texts

    texts = _check_texts(texts)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (one token to splice, one to predict), got {max_length!r}")
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt", padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    short = mask.sum(1) < 2
    if short.any():
        i = int(short.nonzero()[0])
        raise ValueError(f"{int(short.sum())} text(s) have fewer than 2 tokens (first: texts[{i}] = {texts[i]!r}); "
                         f"the next-token loss needs a token to splice at and a token to predict: drop them")
    return ids, mask


def _block_out(envoy: Any) -> Any:
    """The residual-stream tensor of a block's output inside a trace (GPT-2-style blocks return tuples)."""
    out = envoy.output
    return out[0] if isinstance(out, tuple) else out


def _trace(lm: Any, layer: int, ids: Tensor, mask: Tensor, pos: Tensor, *, splice: Tensor | None = None,
           read: bool = False, cache: Any = None) -> tuple[Tensor, Tensor | None]:
    """One nnsight trace: logits at the last column [B, vocab], optionally reading / overwriting the
    block output at the last column (``read``: returns it, ``splice [B, d]``: writes it)."""
    from .models import blocks

    kw: dict[str, Any] = {"use_cache": cache is not None}
    if cache is not None:
        kw[_cache_kwarg(lm)] = cache
    x = None
    with torch.inference_mode(), lm.trace(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          logits_to_keep=1, **kw):
        h = _block_out(blocks(lm)[layer])  # [B, T, d]
        if read:
            x = h[:, -1].save()
        if splice is not None:
            h[:, -1] = splice
        logits = lm.output.logits[:, -1].save()  # [B, vocab]
    return logits.float(), (x.float() if x is not None else None)


def _cache_kwarg(lm: Any) -> str:
    """transformers >= 5.2x names the cache argument ``cache``; earlier versions ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm._module.forward).parameters else "past_key_values"


def _can_roll_back(cache: Any) -> bool:
    return bool(getattr(cache, "is_croppable", False)) and hasattr(cache, "crop")


@torch.no_grad()
def downstream_losses(lm: Any, saes: Mapping[str, Encoder], texts: Sequence[str], layer: int, *,
                      max_length: int = 128, batch_size: int = 32, token: Literal["last"] = "last",
                      scale: float = 1.0, k: Mapping[str, Tensor | int | None] | None = None,
                      mean: Tensor | None = None, method: Literal["auto", "kv", "full"] = "auto",
                      progress: bool = False) -> dict[str, Any]:
    """Next-token loss with several SAEs spliced in turn, sharing the clean and mean-ablated passes.

    Args:
        lm: a model from :func:`adaptivek.load_model` / ``wrap_model``.
        saes: name -> SAE (``encode``/``decode``); each sees ``x * scale`` and its ``x̂ / scale`` is spliced.
        texts: contexts of at least 2 tokens (after truncation to ``max_length``).
        layer: the block whose output the SAEs reconstruct.
        token: "last" (the only mode): splice at the second-to-last real token, score the last one.
        scale: the factor the SAEs' training activations were multiplied by (1.0: none).
        k: optional name -> per-text k passed to that SAE's ``encode``: an int, a tensor [len(texts)], or a
            function of the batch's scaled activations [B, d] returning [B] (e.g. BatchTopK's batch rule).
        mean: the activation [d_model] (model units) that the mean-ablated baseline splices in. None: the
            mean over these texts at the splice position (one extra early-stopped pass).
        method: "kv" (one cached token per SAE), "full" (whole sequence per SAE) or "auto".

    Returns ``{"ce_clean", "ce_ablate", "n", "rows_clean" [n], "rows_ablate" [n], "saes": {name: {"ce_sae",
    "frac_recovered", "delta_ce", "l0_mean", "rows" [n], "l0" [n]}}}``; losses in nats, float64 CPU rows.
    """
    from tqdm.auto import tqdm

    layer = _check_downstream(lm, saes, layer, token, batch_size, scale, method)
    ids_all, mask_all = _tokenize(lm.tokenizer, texts, max_length)
    n = len(ids_all)
    ks = _check_ks(k, saes, n)
    if mean is None:
        mean = _splice_mean(lm, layer, ids_all, mask_all, batch_size)
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    parts: list[dict[str, tuple[Tensor, Tensor | None]]] = []
    order = torch.argsort(mask_all.sum(1), descending=True, stable=True)  # similar lengths share a batch
    for start in tqdm(range(0, n, batch_size), desc="downstream loss", disable=not progress, unit="batch"):
        sl = order[start:start + batch_size]
        step, x, ce_clean = _prefix_pass(lm, layer, ids_all[sl], mask_all[sl], method)
        ce_ablate = _spliced_ce(lm, layer, step, mean.to(x.dtype).expand_as(x))
        parts.append({"clean": (ce_clean, None), "ablate": (ce_ablate, None)}
                     | _sae_losses(lm, layer, step, x, saes, ks, sl, scale))
    return _collect_losses(parts, order, list(saes))


def _check_downstream(lm: Any, saes: Any, layer: Any, token: str, batch_size: Any, scale: Any, method: str) -> int:
    """Validate :func:`downstream_losses`' settings; returns the checked layer index."""
    from .activations import _check_layers

    if token != "last":
        raise ValueError(f"token must be 'last' (splice at the second-to-last real token and score the last); "
                         f"got {token!r}")
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("saes must be a non-empty mapping name -> SAE")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int (the block the SAEs were trained on), got {layer!r}")
    positive_int(batch_size, "batch_size")
    finite_number(scale, "scale", low=0, low_open=True)
    one_of(method, "method", ("auto", "kv", "full"))
    return _check_layers(lm, layer)[0]


def _check_ks(k: Mapping[str, Any] | None, saes: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Each SAE's checked per-text k (None: its own), refusing names that are not SAEs."""
    unknown = set(k or {}) - set(saes)
    ks = {name: _check_k((k or {}).get(name), n) for name in saes}
    if unknown:
        raise ValueError(f"k names SAEs that are not in saes: {sorted(unknown)}")
    return ks


def _prefix_pass(lm: Any, layer: int, ids: Tensor, mask: Tensor, method: str
                 ) -> tuple[tuple[Tensor, Tensor, Tensor, Any, Tensor], Tensor, Tensor]:
    """Run one batch's tokens ``0..t`` (t the second-to-last real token) once.

    Returns ``(step, x, ce_clean)``: ``step = (ids, mask, pos, cache, target)`` is what each splice runs
    (one token on the key/value cache of ``0..t-1``, or the whole prefix when the cache cannot be rolled
    back), ``x [B, d]`` the block output at ``t`` and ``ce_clean [B]`` the unspliced loss.
    """
    from .models import model_device

    keep = mask.any(0).nonzero()[0, 0]  # drop columns that are padding in every row (left padding)
    device = model_device(lm)
    ids, mask = ids[:, keep:].to(device), mask[:, keep:].to(device)
    target = ids[:, -1]  # [B] the last real token
    p_ids, p_mask = ids[:, :-1], mask[:, :-1]  # tokens 0..t
    p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
    cache = None
    if method != "full":
        from transformers import DynamicCache

        cache = DynamicCache(config=lm._module.config)
    logits, x = _trace(lm, layer, p_ids, p_mask, p_pos, read=True, cache=cache)
    if cache is not None and not _can_roll_back(cache):
        if method == "kv":
            raise ValueError("this model's cache cannot be rolled back (sliding-window layers?); use method='full'")
        cache = None
    if cache is not None:
        cache.crop(-1)  # forget position t: every splice re-runs it on top of positions 0..t-1
        step = (p_ids[:, -1:], p_mask, p_pos[:, -1:], cache, target)
    else:
        step = (p_ids, p_mask, p_pos, None, target)
    ce_clean = torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu()
    return step, x, ce_clean


def _sae_losses(lm: Any, layer: int, step: tuple, x: Tensor, saes: Mapping[str, Encoder], ks: dict[str, Any],
                sl: Tensor, scale: float) -> dict[str, tuple[Tensor, Tensor]]:
    """Per SAE: ``(ce [B], l0 [B])`` with its reconstruction of ``x [B, d]`` spliced in (rows ``sl``)."""
    x_cpu, out = x.cpu(), {}
    for name, sae in saes.items():
        kn = ks[name]
        kb = kn[sl] if isinstance(kn, Tensor) else kn(x_cpu * scale) if callable(kn) else kn
        x_hat, codes = reconstruct(sae, x_cpu * scale, kb)
        out[name] = (_spliced_ce(lm, layer, step, x_hat.float() / scale), (codes != 0).sum(1).cpu())
    return out


def _collect_losses(parts: list[dict[str, tuple[Tensor, Tensor | None]]], order: Tensor, names: list[str]
                    ) -> dict[str, Any]:
    """Concatenate the batches' losses back into text order and summarise them (downstream_losses' return)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    cat = {name: torch.cat([p[name][0] for p in parts])[inverse] for name in parts[0]}
    l0 = {name: torch.cat([p[name][1] for p in parts])[inverse].to(torch.int64) for name in names}
    clean, ablate = float(cat["clean"].mean()), float(cat["ablate"].mean())
    result: dict[str, Any] = {"ce_clean": clean, "ce_ablate": ablate, "n": len(order), "rows_clean": cat["clean"],
                              "rows_ablate": cat["ablate"], "saes": {}}
    for name in names:
        ce = float(cat[name].mean())
        result["saes"][name] = {"ce_sae": ce, "delta_ce": ce - clean, "frac_recovered": frac_recovered(clean, ce, ablate),
                                "l0_mean": float(l0[name].double().mean()), "rows": cat[name], "l0": l0[name]}
    return result


def _spliced_ce(lm: Any, layer: int, step: tuple[Tensor, Tensor, Tensor, Any, Tensor], vec: Tensor) -> Tensor:
    """Per-row CE [B] of the step's target with ``vec [B, d]`` written at the last column; rolls the cache back."""
    ids, mask, pos, cache, target = step
    logits, _ = _trace(lm, layer, ids, mask, pos, splice=vec.to(ids.device), cache=cache)
    if cache is not None:
        cache.crop(-1)
    return torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu()


def frac_recovered(ce_clean: float, ce_sae: float, ce_ablate: float) -> float:
    """``(ce_ablate - ce_sae) / (ce_ablate - ce_clean)``: 1 = the splice costs nothing, 0 = as bad as the mean."""
    gap = ce_ablate - ce_clean
    return (ce_ablate - ce_sae) / gap if gap != 0 else math.nan


def _splice_mean(lm: Any, layer: int, ids_all: Tensor, mask_all: Tensor, batch_size: int) -> Tensor:
    """Mean block-``layer`` output at every text's second-to-last real token (early-stopped passes)."""
    from .activations import _trace_batch
    from .models import blocks, model_device

    device, parts = model_device(lm), []
    for start in range(0, len(ids_all), batch_size):
        ids, mask = ids_all[start:start + batch_size, :-1].to(device), mask_all[start:start + batch_size, :-1].to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = _trace_batch(lm, blocks(lm), [layer], layer, ids, mask, pos, False)[layer]  # [B, T, d]
        parts.append(out[:, -1].double().sum(0).cpu())
    return (torch.stack(parts).sum(0) / len(ids_all)).float()


def downstream_loss(lm: Any, sae: Encoder, texts: Sequence[str], layer: int, *, max_length: int = 128,
                    batch_size: int = 32, token: Literal["last"] = "last", scale: float = 1.0,
                    k: Tensor | int | None = None, mean: Tensor | None = None,
                    method: Literal["auto", "kv", "full"] = "auto", progress: bool = False) -> dict[str, Any]:
    """Next-token cross-entropy with ``sae``'s reconstruction spliced in (see the module docstring).

    Returns ``ce_clean``, ``ce_sae``, ``ce_ablate`` (nats, mean over texts), ``frac_recovered``,
    ``delta_ce`` (``ce_sae - ce_clean``), ``l0_mean`` (at the spliced positions), ``n``, and per-text
    float64 tensors ``rows_clean``, ``rows_sae``, ``rows_ablate``. Arguments as :func:`downstream_losses`.
    """
    res = downstream_losses(lm, {"sae": sae}, texts, layer, max_length=max_length, batch_size=batch_size,
                            token=token, scale=scale, k=None if k is None else {"sae": k}, mean=mean,
                            method=method, progress=progress)
    s = res.pop("saes")["sae"]
    return res | {"ce_sae": s["ce_sae"], "delta_ce": s["delta_ce"], "frac_recovered": s["frac_recovered"],
                  "l0_mean": s["l0_mean"], "rows_sae": s["rows"], "l0": s["l0"]}


# ----------------------------------------------------------------------------- every-position splice
def _check_splice(lm: Any, saes: Any, layer: Any, scale: Any, mean: Any, max_norm: Any, drop_first: Any,
                  batch_size: Any, k: Any) -> tuple[int, Tensor, dict[str, Any]]:
    """Validate :func:`splice_metrics`' settings; returns the layer, the mean [d_model] and each SAE's k."""
    from .activations import _check_layers
    from .models import d_model

    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("saes must be a non-empty mapping name -> SAE")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int (the block the SAEs were trained on), got {layer!r}")
    layer = _check_layers(lm, layer)[0]
    finite_number(scale, "scale (SAEs see x * scale)", low=0, low_open=True)
    if max_norm is not None:
        finite_number(max_norm, "max_norm (model units, e.g. SAEData.selection.threshold; None: no norm rule)",
                      low=0, low_open=True)
    non_negative_int(drop_first, "drop_first")
    positive_int(batch_size, "batch_size")
    if not isinstance(mean, Tensor) or mean.numel() != d_model(lm) or not torch.isfinite(mean).all():
        raise ValueError(f"mean must be a finite tensor [d_model={d_model(lm)}] in model units (the mean of the "
                         f"training tokens' activations, before scaling), got {mean!r:.80}")
    unknown = set(k or {}) - set(saes)
    if unknown:
        raise ValueError(f"k names SAEs that are not in saes: {sorted(unknown)}")
    ks = {name: (k or {}).get(name) for name in saes}
    for name, kn in ks.items():
        if not (kn is None or callable(kn) or (isinstance(kn, int) and not isinstance(kn, bool) and kn >= 1)):
            raise TypeError(f"k[{name!r}] must be None (the SAE's own k), an int >= 1 or a function of the scaled "
                            f"activations [n, d] returning [n] (a per-token k is unknown before tokenising), "
                            f"got {kn!r:.60}")
    return layer, mean.detach().float().flatten(), ks


def _logits_trace(lm: Any, layer: int, ids: Tensor, mask: Tensor, pos: Tensor, *, read: bool = False,
                  at: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One clean nnsight trace: logits [B, T, vocab] (with ``at [B, T]`` bool: only there, [m, vocab]), and
    with ``read`` the block output [B, T, d] (spliced passes start from it: :func:`_spliced_logits`)."""
    from .models import blocks

    h_saved = None
    with torch.inference_mode(), _head_at(lm, at), lm.trace(input_ids=ids, attention_mask=mask, position_ids=pos):
        if read:
            h_saved = _block_out(blocks(lm)[layer]).save()  # [B, T, d]
        logits = lm.output.logits.save()  # [B, T, vocab] or [m, vocab]
    return logits, h_saved


@contextmanager
def _head_at(lm: Any, at: Tensor | None) -> Iterator[None]:
    """While open, the output embedding computes logits only at ``at [B, T]`` (bool), returning [m, vocab]:
    a scored token costs the unembedding, a padding, first or last position does not. Anything the model
    applies after it (Gemma-2's logit soft-capping) is elementwise, so it works on [m, vocab] alike."""
    from .models import _hf

    if at is None:
        yield
        return
    head = _hf(lm).get_output_embeddings()
    kept, inner = head.__dict__.get("forward"), head.forward

    def forward(x: Tensor) -> Tensor:
        return inner(x[at] if x.dim() == 3 else x)

    head.forward = forward
    try:
        yield
    finally:
        if kept is None:
            del head.forward
        else:
            head.forward = kept


def _batch_positions(lm: Any, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A batch on the model's device without all-padding columns: ``(ids, mask, position ids)`` [B, T]."""
    from .models import model_device

    first = mask.any(0).nonzero()[0, 0]  # left padding: drop columns that are padding in every row
    device = model_device(lm)
    ids, mask = ids[:, first:].to(device), mask[:, first:].to(device)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


class _CleanDist:
    """The clean next-token distribution at the scored positions, kept once per batch for every SAE's CE
    and KL: ``lse`` [m] (log-normaliser), ``p`` [m, vocab] (probabilities), ``logits`` [m, vocab] (float32)."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits.float()
        self.lse = torch.logsumexp(self.logits, dim=-1)  # [m]
        self.p = torch.exp(self.logits - self.lse[:, None])  # [m, vocab]
        self.mass = self.p.sum(-1)  # [m], 1 up to rounding

    def nll(self, target: Tensor) -> Tensor:
        return _nll_from_logits(self.logits, self.lse, target)

    def kl_to(self, logits: Tensor) -> Tensor:
        """KL(clean || spliced) [m] = Σ p (z₀ - z) + (lse - lse₀) Σ p: exactly 0 where the logits agree,
        and no large terms cancel (``logits`` [m, vocab] float32 is overwritten)."""
        with torch.inference_mode():
            lse = torch.logsumexp(logits, dim=-1)
            diff = torch.sub(self.logits, logits, out=logits)  # z₀ - z, in place
            return (torch.linalg.vecdot(self.p, diff).double() + (lse - self.lse).double() * self.mass.double()).cpu()


def _nll_from_logits(logits: Tensor, lse: Tensor, target: Tensor) -> Tensor:
    """Per-token cross-entropy [m] (float64 CPU): ``lse - z[target]``."""
    return (lse - logits.gather(1, target[:, None]).squeeze(1)).double().cpu()


def _splice_batch(lm: Any, layer: int, ids: Tensor, mask: Tensor, text: Tensor, saes: Mapping[str, Encoder],
                  ks: dict[str, Any], scale: float, mean: Tensor, max_norm: float | None, drop_first: int
                  ) -> dict[str, Tensor]:
    """One batch of :func:`splice_metrics`: the shared clean pass, the two ablations, one pass per SAE.

    Returns per-token tensors (scored positions, row-major): ``text``, ``position``, ``clean``, ``zero``,
    ``mean``, ``saes: {name: {"ce", "kl", "l0"}}``, and ``counts`` (0-d tensors) of the batch."""
    ids, mask, pos = _batch_positions(lm, ids, mask)
    real = mask.bool()
    has_next = real.clone()  # positions with a next token: every pass computes logits there only
    has_next[:, :-1] &= real[:, 1:]
    has_next[:, -1] = False
    logits, h = _logits_trace(lm, layer, ids, mask, pos, read=True, at=has_next)  # [m_next, vocab], [B, T, d]
    norm_ok = torch.ones_like(real) if max_norm is None else h.float().norm(dim=-1) <= max_norm  # [B, T]
    spliced = real & (pos >= drop_first) & norm_ok  # positions the SAEs reconstruct
    score = spliced & has_next  # scored: spliced, with a next token to predict
    keep = score[has_next]  # [m_next] -> the scored rows of every pass's logits
    scored_rows = (lambda z: z) if bool(keep.all()) else (lambda z: z[keep])  # no [m, vocab] copy when all are scored
    target = ids[:, 1:][score[:, :-1]]  # [m] the next token of each scored position
    clean = _CleanDist(scored_rows(logits))
    del logits
    out: dict[str, Any] = {
        "text": text[:, None].expand_as(score.cpu())[score.cpu()], "position": pos[score].cpu(),
        "clean": clean.nll(target), "saes": {},
        "counts": {"tokens": real.sum(), "excluded_first_positions": (real & (pos < drop_first)).sum(),
                   "excluded_extreme_norm": (real & (pos >= drop_first) & ~norm_ok).sum(), "spliced": spliced.sum()}}
    x = h[spliced].float()  # [n_spliced, d] model units
    for name, vec in (("zero", torch.zeros_like(x)), ("mean", mean.to(x.device).expand_as(x))):
        z = scored_rows(_spliced_logits(lm, layer, (ids, mask, pos), h, spliced, vec, has_next))
        out[name] = _nll_from_logits(z, torch.logsumexp(z, dim=-1), target)
    for name, sae in saes.items():
        x_hat, l0 = _reconstruct_rows(sae, x, ks[name], scale)
        z = scored_rows(_spliced_logits(lm, layer, (ids, mask, pos), h, spliced, x_hat, has_next))
        l0_full = torch.zeros(score.shape, dtype=torch.int64)
        l0_full[spliced.cpu()] = l0
        ce = _nll_from_logits(z, torch.logsumexp(z, dim=-1), target)
        out["saes"][name] = {"ce": ce, "kl": clean.kl_to(z), "l0": l0_full[score.cpu()]}
    return out


def _spliced_logits(lm: Any, layer: int, batch: tuple[Tensor, Tensor, Tensor], h: Tensor, where: Tensor,
                    values: Tensor, at: Tensor) -> Tensor:
    """Logits [m, vocab] (float32) at ``at [B, T]`` with ``values`` written into the clean block output
    ``h [B, T, d]`` at ``where``: only the blocks after ``layer`` run (:func:`_start_after`), and the
    unembedding only at ``at`` (:func:`_head_at`)."""
    from .models import _hf

    ids, mask, pos = batch
    h = h.clone()
    h[where] = values.to(h.dtype)
    with torch.inference_mode(), _start_after(lm, layer, h), _head_at(lm, at):
        return _hf(lm)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()


@contextmanager
def _start_after(lm: Any, layer: int, h: Tensor) -> Iterator[None]:
    """While open, a forward pass skips blocks ``0..layer``: each passes its input on and block ``layer``
    returns ``h [B, T, d]``, so a splice at ``layer`` costs only the blocks after it (the earlier blocks'
    output is the clean pass's, which does not depend on the splice). Exactly the full spliced pass
    (tested); the blocks' own ``forward`` (nnsight's wrapper included) is restored on exit."""
    from .models import module_blocks

    mods = list(module_blocks(lm)[: layer + 1])
    kept = [m.__dict__.get("forward") for m in mods]

    def passthrough(i: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return h if i == layer else (args[0] if args else kwargs["hidden_states"])
        return forward

    try:
        for i, m in enumerate(mods):
            m.forward = passthrough(i)
        yield
    finally:
        for m, f in zip(mods, kept, strict=True):
            if f is None:
                del m.forward
            else:
                m.forward = f


def _reconstruct_rows(sae: Encoder, x: Tensor, k: Any, scale: float, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """``(x̂ [n, d] in model units, l0 [n])``: the SAE sees ``x · scale``, its reconstruction is divided back."""
    hats, l0s = [], []
    for xb in (x * scale).split(chunk):
        kb = k(xb.cpu()) if callable(k) else k
        x_hat, codes = reconstruct(sae, xb, kb)
        hats.append(x_hat.float().to(x.device) / scale)
        l0s.append((codes != 0).sum(1).cpu())
    if not hats:
        return x.clone(), torch.zeros(0, dtype=torch.int64)
    return torch.cat(hats), torch.cat(l0s)


@torch.no_grad()
def splice_metrics(lm: Any, saes: Mapping[str, Encoder], texts: Sequence[str], layer: int, *, scale: float,
                   mean: Tensor, max_norm: float | None, drop_first: int = 1, max_length: int = 128,
                   batch_size: int = 4, k: Mapping[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """SAEBench's core downstream metrics at every position: each SAE's reconstruction spliced at all kept
    positions of the texts in ONE forward pass per SAE per batch, the clean pass shared by all SAEs.

    Positions the SAEs never trained on stay clean and are not scored: position < ``drop_first`` (0: the
    attention sink) and block outputs with norm > ``max_norm`` (model units: ``SAEData.selection.threshold``
    of the same :class:`~adaptivek.tokens.ExclusionRule`; None: no norm rule). A scored position is a spliced
    one with a next token: its next-token cross-entropy clean, spliced, zero-ablated (the block output set to 0
    at every spliced position) and mean-ablated (set to ``mean [d_model]``, the training tokens' mean in model
    units), and the KL(clean || spliced) of its next-token distribution.

    ``scale``: the SAEs see ``x · scale`` (SAEData.scale) and their ``x̂ / scale`` is spliced. ``k``: optional
    name -> int or function of the scaled activations [n, d] returning [n] (None: the SAE's own k; AdaptiveK's
    probe per token). Returns ``n_tokens`` (scored), ``n_texts``, ``counts``, per-token ``text_index``,
    ``position``, ``rows_clean``, ``rows_zero_ablate``, ``rows_mean_ablate`` (nats, float64, sorted by text then
    position), their means ``ce_clean``, ``ce_zero_ablate``, ``ce_mean_ablate``, and ``saes: {name: {"ce_sae",
    "delta_ce", "frac_recovered_zero", "frac_recovered_mean", "kl", "l0_mean", "rows", "rows_kl", "l0"}}``.
    Recovered: ``(CE_ablate - CE_sae) / (CE_ablate - CE_clean)`` over all scored tokens. ``counts``: tokens,
    excluded_first_positions, excluded_extreme_norm, spliced, scored, texts_scored. Memory: a few
    ``batch_size x max_length x vocab`` float32 tensors (lower ``batch_size`` for a large vocabulary).
    """
    from tqdm.auto import tqdm

    layer, mean, ks = _check_splice(lm, saes, layer, scale, mean, max_norm, drop_first, batch_size, k)
    ids_all, mask_all = _tokenize(lm.tokenizer, texts, max_length)
    order = torch.argsort(mask_all.sum(1), descending=True, stable=True)  # similar lengths share a batch
    parts = [_splice_batch(lm, layer, ids_all[sl], mask_all[sl], sl, saes, ks, float(scale), mean, max_norm,
                           drop_first)
             for sl in tqdm(order.split(batch_size), desc="splice", disable=not progress, unit="batch")]
    return _collect_splice(parts, list(saes), len(ids_all))


def _collect_splice(parts: list[dict[str, Tensor]], names: list[str], n_texts: int) -> dict[str, Any]:
    """Concatenate the batches' per-token results, sort them by (text, position) and summarise them."""
    flat = [{key: p[key] for key in ("text", "position", "clean", "zero", "mean")}
            | {(name, key): v for name, s in p["saes"].items() for key, v in s.items()} for p in parts]
    cat = {key: torch.cat([p[key] for p in flat]) for key in flat[0]}
    if len(cat["clean"]) == 0:
        raise ValueError("no position was scored: every kept position is excluded (drop_first, max_norm) or is "
                         "its text's last token; use longer texts or check max_norm's units (model units)")
    order = torch.argsort(cat["text"] * (int(cat["position"].max()) + 1) + cat["position"])
    rows = {key: v[order] for key, v in cat.items()}
    counts = {key: int(sum(p["counts"][key] for p in parts)) for key in parts[0]["counts"]}
    counts |= {"scored": len(order), "texts_scored": len(torch.unique(rows["text"]))}
    clean, zero, mean = (float(rows[key].mean()) for key in ("clean", "zero", "mean"))
    result: dict[str, Any] = {
        "n_tokens": len(order), "n_texts": n_texts, "counts": counts, "text_index": rows["text"],
        "position": rows["position"], "rows_clean": rows["clean"], "rows_zero_ablate": rows["zero"],
        "rows_mean_ablate": rows["mean"], "ce_clean": clean, "ce_zero_ablate": zero, "ce_mean_ablate": mean,
        "saes": {}}
    for name in names:
        ce_rows, kl_rows, l0 = rows[name, "ce"], rows[name, "kl"], rows[name, "l0"]
        ce = float(ce_rows.mean())
        result["saes"][name] = {
            "ce_sae": ce, "delta_ce": ce - clean, "frac_recovered_zero": frac_recovered(clean, ce, zero),
            "frac_recovered_mean": frac_recovered(clean, ce, mean), "kl": float(kl_rows.mean()),
            "l0_mean": float(l0.double().mean()), "rows": ce_rows, "rows_kl": kl_rows, "l0": l0}
    return result


def splice_intervals(result: Mapping[str, Any], documents: Sequence[Any], *, reference: str | None = None,
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, min_documents: int = 20
                     ) -> pd.DataFrame:
    """Cluster-bootstrap intervals over documents for :func:`splice_metrics`' aggregates.

    ``documents``: one source-document id per text given to :func:`splice_metrics` (tokens of one document
    are resampled together). Metrics per SAE: ``frac_recovered_zero``, ``frac_recovered_mean``, ``kl``,
    ``delta_ce``; with ``reference`` (an SAE name) also each SAE's difference to it on the same draws
    (``versus`` column). Fewer than ``min_documents`` documents with scored tokens is an error: a cluster
    bootstrap over a handful of documents gives intervals that cannot be trusted.
    """
    import pandas as pd

    from .stats import bootstrap_counts, group_codes, percentile_summary

    docs = np.asarray(documents, dtype=object)
    if docs.ndim != 1 or len(docs) != result["n_texts"]:
        raise ValueError(f"documents must hold one id per text given to splice_metrics ({result['n_texts']}), got "
                         f"shape {docs.shape}")
    names = list(result["saes"])
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the SAEs {names}")
    int_at_least(min_documents, "min_documents", 2)
    g = group_codes(docs[result["text_index"].numpy()], "documents")
    if len(g.ids) < min_documents:
        raise ValueError(f"the scored tokens come from {len(g.ids)} document(s); a cluster bootstrap over documents "
                         f"needs at least {min_documents}: splice more held-out texts from more documents")
    cols = [torch.ones_like(result["rows_clean"]), result["rows_clean"], result["rows_zero_ablate"],
            result["rows_mean_ablate"]]
    cols += [t for s in result["saes"].values() for t in (s["rows"], s["rows_kl"])]
    per_group = torch.zeros(len(g.ids), len(cols), dtype=torch.float64).index_add_(
        0, g.codes, torch.stack(cols, 1).double())  # [G, 4 + 2 · n_saes]
    sums = torch.cat([per_group.sum(0, keepdim=True), bootstrap_counts(len(g.ids), n_boot, seed) @ per_group])
    stats = {name: _splice_stats(sums, 4 + 2 * i) for i, name in enumerate(names)}  # each [1 + B]
    rows = [{"sae": name, "metric": metric, "versus": ref, **percentile_summary(v[:1], v[1:], alpha)}
            for name in names for metric, own in stats[name].items()
            for ref, v in [(None, own)] + ([(reference, own - stats[reference][metric])]
                                           if reference not in (None, name) else [])]
    return pd.DataFrame(rows).assign(n_documents=len(g.ids), n_tokens=result["n_tokens"])


def _splice_stats(sums: Tensor, col: int) -> dict[str, Tensor]:
    """One SAE's aggregates from summed columns ``[R, c]`` (count, clean, zero, mean, then each SAE's CE and KL)."""
    n, clean, zero, mean, sae, kl = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3], sums[:, col], sums[:, col + 1]
    return {"frac_recovered_zero": (zero - sae) / (zero - clean), "frac_recovered_mean": (mean - sae) / (mean - clean),
            "kl": kl / n, "delta_ce": (sae - clean) / n}


__all__ = ["evaluate", "downstream_loss", "downstream_losses", "frac_recovered", "reconstruct", "splice_metrics",
           "splice_intervals"]
