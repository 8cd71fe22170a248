"""Sparse autoencoders: TopK and AdaptiveK (per-sample k from a complexity probe), one implementation.

Both classes share :class:`SparseAutoencoder` (SAEBench/SAELens tensor layout):

* encoder ``f = ReLU((x - b_dec) @ W_enc + b_enc)`` followed by a per-row top-k: row ``i`` keeps its
  ``k_i`` largest positive pre-activations. ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``.
* decoder ``x_hat = f @ W_dec + b_dec`` with unit-norm rows of ``W_dec [d_sae, d_in]``.
* ``TopKSAE`` uses one ``k`` for every row; ``AdaptiveKSAE`` computes
  ``k_i = complexity_to_k(probe.predict(x_i))`` (the paper's sigmoid map, Eq. 7) from a
  :class:`~adaptivek.probe.RidgeProbe` it owns and saves with its weights.

Variable k without a Python loop over rows: ``topk`` at the largest k, then the rank mask
``arange(k_max) < k[:, None]`` (the reference code runs one ``torch.topk`` per row). Because ``topk``
costs about linearly in k on CPU, rows are there first sorted by k into 8 equal groups, each topk'd at
its own largest k (a loop over 8 groups; :func:`_encode_topk`, :data:`TOPK_BUCKETS`). Row ``i`` then has exactly ``k_i`` nonzeros
whenever it has at least ``k_i`` positive pre-activations.

Training exploits sparsity where the maths allows it (like EleutherAI/sparsify's fused encoder, but
for the whole model): :class:`_SparseSAE` is one autograd function whose forward holds the step's only
dense ``B x d_in x d_sae`` matmul and decodes with ``embedding_bag`` over the kept ``(index, value)``
pairs; its backward touches only the kept entries (the decoder-side gradient of each value is a dot
product, ``dW_dec`` and ``dW_enc`` are ``embedding_bag``s over batch rows grouped by latent with one
shared sort, bias gradients are scatter-adds). AuxK uses the dense sub-matrix of the dead latents'
columns. No ``[B, d_sae]`` gradient is ever materialised. ``benchmarks/sae.py`` measures the step in
units of one dense matmul; ``tests/test_sae.py`` checks every gradient against plain autograd.

Layout note: ``W_enc`` is created as ``W_dec.T.clone()`` and so stored column-major (its
``[d_in, d_sae]`` view has strides ``(1, d_in)``), which is the layout its sparse gradient comes in.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import save_tensors, write_json

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- outputs
class ForwardOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns (scalars are 0-d tensors that carry gradients)."""

    x_hat: Tensor  # [B, d_in] reconstruction
    top_acts: Tensor  # [B, k_max] kept activations, descending; 0 at ranks >= k_i and where ReLU is 0
    top_indices: Tensor  # [B, k_max] latent of each entry of top_acts (meaningless where the value is 0)
    k: Tensor  # [B] int64: the k requested for each row
    fvu: Tensor  # () fraction of variance unexplained: sum||x - x_hat||² / sum||x - mean(x)||²
    mse: Tensor  # () mean squared error per element (the reference code's reconstruction loss)
    l1: Tensor  # () mean_b ||f_b||_1 / mean_b ||x_b||_2 (the reference code's sparsity term)
    auxk_loss: Tensor  # () AuxK loss of the dead latents, normalised by the residual variance (0 if none)
    d_sae: int  # dictionary size (to densify the codes)

    @property
    def codes(self) -> Tensor:
        """Dense codes [B, d_sae] (built on access: training never needs them)."""
        codes = self.top_acts.new_zeros(self.top_acts.shape[0], self.d_sae)
        return codes.scatter_add(1, self.top_indices, self.top_acts)  # add: padding entries (value 0) may repeat

    @property
    def l0(self) -> Tensor:
        """Number of active latents per row [B]."""
        return (self.top_acts > 0).sum(1)


# ----------------------------------------------------------------------------- the fused training path
class _SparseSAE(torch.autograd.Function):
    """Encoder, top-k, decoder and AuxK decoder in one function with a sparse backward.

    Forward: ``pre = (x - b_dec) W_enc + b_enc`` (the one dense ``B x d_in x d_sae`` matmul), ``topk``,
    ReLU and rank mask on the selected values, ``x_hat = Σ_kept a·W_dec[j] + b_dec`` as an
    ``embedding_bag``. Backward: the gradient of each kept value is a dot product
    ``g_x_hat[b] · W_dec[j]``; ``dW_dec = Aᵀ g_x_hat`` and ``dW_enc = xcᵀ G`` (A, G sparse) share one sort
    of the kept entries by latent and are ``embedding_bag``s over batch rows; bias gradients are
    scatter-adds. AuxK works on the dense sub-matrix of the n dead latents' columns (its decode and
    gradients are four ``B x d_in x n`` matmuls: cheap while few latents are dead, and never worse than
    the sparse route by much, since k_aux = d_in/2 entries per row is more than most k).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: Tensor,
                k_max: int, dead_idx: Tensor | None, k_aux: int, matmul_dtype: torch.dtype | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # only the encoder matmul uses matmul_dtype
            return _SparseSAE._forward(ctx, x, W_enc, b_enc, b_dec, W_dec, k, k_max, dead_idx, k_aux, matmul_dtype)

    @staticmethod
    def _forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: Tensor,
                 k_max: int, dead_idx: Tensor | None, k_aux: int, matmul_dtype: torch.dtype | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        xc = x - b_dec  # [B, d_in]
        pre, acts, idx, inv = _encode_topk(xc, W_enc, b_enc, k, k_max, matmul_dtype=matmul_dtype)
        keep = (torch.arange(k_max, device=x.device) < k[:, None]) & (acts > 0)  # [B, k_max]
        lat, row, val, counts = _entries(acts, idx, keep)  # [nnz] each, counts [B]
        offsets = counts.cumsum(0) - counts
        x_hat = F.embedding_bag(lat, W_dec, offsets, mode="sum", per_sample_weights=val) + b_dec  # [B, d_in]
        if dead_idx is not None and dead_idx.numel() > 0 and k_aux > 0:
            pre_dead = pre.index_select(1, dead_idx)  # [B, n_dead]
            pre_dead = pre_dead if inv is None else pre_dead[inv]  # back to the batch's row order
            aux, pos = pre_dead.topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
            A = torch.zeros_like(pre_dead).scatter_(1, pos, aux.relu_())  # [B, n_dead] top-k_aux, ReLU'd
            aux_hat = A @ W_dec.index_select(0, dead_idx)  # [B, d_in]
        else:
            dead_idx, A, aux_hat = lat[:0], x.new_zeros(len(x), 0), torch.zeros_like(x)
        del pre
        ctx.save_for_backward(xc, W_enc, W_dec, keep, lat, row, val, offsets, dead_idx, A)
        ctx.mark_non_differentiable(idx, keep)
        return acts * keep, idx, keep, x_hat, aux_hat

    @staticmethod
    def backward(ctx: Any, g_top: Tensor, _gi: Any, _gk: Any, g_xhat: Tensor, g_aux: Tensor):  # type: ignore[override]
        xc, W_enc, W_dec, keep, lat, row, val, offsets, dead_idx, A = ctx.saved_tensors
        need_x, need_we, need_be, need_bd, need_wd = ctx.needs_input_grad[:5]
        d_sae, aux = W_enc.shape[1], A.shape[1] > 0
        # dL/d(value) of every kept entry: direct (L1 term) + through the decoder
        g_val = g_top[keep] + _gather_dot(g_xhat, W_dec, lat, offsets, row)  # [nnz]
        g_b_enc = torch.zeros(d_sae, dtype=xc.dtype, device=xc.device).index_add_(0, lat, g_val)  # [d_sae]
        if aux:
            gA = (g_aux @ W_dec.index_select(0, dead_idx).T).mul_(A > 0)  # [B, n_dead] dL/dpre of AuxK entries
            g_b_enc.index_add_(0, dead_idx, gA.sum(0))
        g_x = g_We = g_Wd = None
        if need_we or need_wd:  # one sort of the kept entries by latent serves both weight gradients
            order = torch.sort(lat.int() if d_sae < 2**31 else lat, stable=True).indices
            counts = torch.bincount(lat, minlength=d_sae)
            by_lat = counts.cumsum(0) - counts  # [d_sae] start of each latent's group
            row_sorted = row[order]
            if need_wd:  # dW_dec[j] = Σ_b a[b, j] g_xhat[b]
                g_Wd = F.embedding_bag(row_sorted, g_xhat, by_lat, mode="sum", per_sample_weights=val[order])
                if aux:
                    g_Wd.index_add_(0, dead_idx, A.T @ g_aux)
            if need_we:  # dW_encᵀ[j] = Σ_b g_pre[b, j] xc[b], built as [d_sae, d_in]
                g_We = F.embedding_bag(row_sorted, xc, by_lat, mode="sum", per_sample_weights=g_val[order])
                if aux:
                    g_We.index_add_(0, dead_idx, gA.T @ xc)
                g_We = g_We.T
        if need_x:
            g_x = F.embedding_bag(lat, W_enc.T.contiguous(), offsets, mode="sum", per_sample_weights=g_val)
            if aux:
                g_x += gA @ W_enc.index_select(1, dead_idx).T
        g_b_dec = None
        if need_bd:
            g_b_dec = g_xhat.sum(0) - (W_enc @ g_b_enc if g_x is None else g_x.sum(0))
        return g_x, g_We, g_b_enc if need_be else None, g_b_dec, g_Wd, None, None, None, None, None


TOPK_BUCKETS: dict[str, int] = {"cpu": 8}
"""Row groups for variable-k top-k per device type (default 1). On CPU ``topk`` costs about linearly in k,
so 8 groups cut it to about mean(k)/max(k) (measured: ``benchmarks/sae.py``); on GPUs ``topk`` is a
radix select whose cost hardly depends on k, so one call at the largest k is kept there (not measured)."""


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """torch.autocast's dtype where it is on for ``device_type``, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _addmm(b: Tensor, x: Tensor, W: Tensor, matmul_dtype: torch.dtype | None = None) -> Tensor:
    """``b + x @ W`` in ``x``'s dtype, the product computed in ``matmul_dtype``.

    ``matmul_dtype`` defaults to torch.autocast's dtype when autocast is on for ``x``'s device. Only this,
    the encoder's one dense ``B x d_in x d_sae`` matmul, runs in low precision under autocast: it is where
    bf16 saves time, while top-k, the sparse decode and every gradient stay in ``x``'s dtype.
    """
    dev = x.device.type
    matmul_dtype = matmul_dtype or _autocast_dtype(dev)
    with torch.autocast(dev, enabled=False):
        if matmul_dtype is None or matmul_dtype == x.dtype:
            return torch.addmm(b, x, W)
        return torch.addmm(b.to(matmul_dtype), x.to(matmul_dtype), W.to(matmul_dtype)).to(x.dtype)


def _encode_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: Tensor, k_max: int, buckets: int | None = None,
                 matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pre-activations and each row's top-k_i: ``(pre, acts [B, k_max], idx [B, k_max], inv)``.

    ``acts`` are ReLU'd and descending; columns ``>= k_i`` are to be masked (they hold further values or
    zero padding). The cost of ``topk`` grows with k, so rows are sorted by k and cut into ``buckets``
    groups of equal size, each topk'd at its own largest k (a loop over a few groups, not over rows):
    about mean(k) instead of max(k). Then ``pre``'s rows are in that sorted order and ``pre[inv]`` is in
    the batch's order (``inv`` is None when all rows share one k).
    """
    B = len(xc)
    buckets = TOPK_BUCKETS.get(xc.device.type, 1) if buckets is None else buckets
    if buckets < 2 or B < 2 * buckets or int(k.min()) == k_max:
        pre = _addmm(b_enc, xc, W_enc, matmul_dtype)  # [B, d_sae]; ReLU after the top-k: same codes, one pass less
        acts, idx = pre.topk(k_max, dim=1, sorted=True)  # [B, k_max]
        return pre, acts.relu_(), idx, None
    order = torch.argsort(k, stable=True)
    pre = _addmm(b_enc, xc[order], W_enc, matmul_dtype)  # [B, d_sae], rows by increasing k
    acts = pre.new_zeros(B, k_max)
    idx = torch.zeros(B, k_max, dtype=torch.int64, device=xc.device)
    ends = [len(r) for r in torch.arange(B).tensor_split(buckets)]
    ends = torch.tensor(ends).cumsum(0).tolist()
    for start, end, kk in zip([0] + ends[:-1], ends, k[order][torch.tensor(ends) - 1].tolist(), strict=True):
        acts[start:end, :kk], idx[start:end, :kk] = pre[start:end].topk(kk, dim=1, sorted=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(B, device=order.device)
    return pre, acts[inv].relu_(), idx[inv], inv


def _entries(acts: Tensor, idx: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row-major list of the kept entries of [B, k]: latent, batch row, value [nnz], and counts per row [B]."""
    sel = keep.flatten().nonzero().squeeze(1)  # [nnz] positions in the flattened [B, k]
    return idx.flatten()[sel], sel // keep.shape[1], acts.flatten()[sel], keep.sum(1)


def _gather_dot(g: Tensor, W: Tensor, lat: Tensor, offsets: Tensor, row: Tensor) -> Tensor:
    """``(g[row] * W[lat]).sum(1)`` [nnz] without materialising the gathered rows."""
    if lat.numel() == 0:
        return g.new_zeros(0)
    try:  # the kernel behind embedding_bag's per_sample_weights gradient
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W, lat, offsets, row, 0, -1)
    except (AttributeError, RuntimeError):  # pragma: no cover - chunked fallback
        return torch.cat([(g[r] * W[j]).sum(1) for r, j in zip(row.split(2**16), lat.split(2**16), strict=True)])


def _bag(idx: Tensor, keep: Tensor, weight: Tensor, values: Tensor) -> Tensor:
    """``sum_j values[b, j] * weight[idx[b, j]]`` over the kept entries of each row: [B, k] -> [B, d]."""
    counts = keep.sum(1)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(idx[keep], weight, offsets, mode="sum", per_sample_weights=values[keep])


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Geometric median of the rows of ``points`` [n, d] -> [d] (Weiszfeld's algorithm, vectorised)."""
    guess = points.mean(0)
    for _ in range(max_iter):
        w = 1 / (points - guess).norm(dim=1).clamp_min(1e-12)  # [n]
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - guess).norm() < tol * (1 + guess.norm()):
            return new
        guess = new
    return guess


# ----------------------------------------------------------------------------- checks
def _check_k_int(k: Any, name: str, d_sae: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1 (every row needs at least one active latent), got {k}")
    if k > d_sae:
        raise ValueError(f"{name} ({k}) > d_sae ({d_sae}): a row cannot keep more latents than the dictionary "
                         f"has; lower {name} or enlarge the dictionary")
    return k


# ----------------------------------------------------------------------------- the shared model
class SparseAutoencoder(nn.Module):
    """Shared implementation of :class:`TopKSAE` and :class:`AdaptiveKSAE` (not used directly)."""

    k_max: int
    _registry: dict[str, type[SparseAutoencoder]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:  # load_sae finds every subclass by its name
        super().__init_subclass__(**kw)
        SparseAutoencoder._registry[cls.__name__] = cls

    def __init__(self, d_in: int, d_sae: int, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.d_in, self.d_sae = d_in, d_sae
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))  # [d_sae, d_in], unit rows
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())  # [d_in, d_sae] = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    # -------------------------------------------------------------- per-class hooks
    def _default_k(self, x: Tensor) -> Tensor:  # [B] int64
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as written to ``cfg.json``."""
        return {"d_in": self.d_in, "d_sae": self.d_sae}

    # -------------------------------------------------------------- checks
    def _check_x(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, {self.d_in}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape [batch, d_in={self.d_in}], got {tuple(x.shape)}"
                             + ("; flatten leading dims with x.reshape(-1, d_in)" if x.ndim > 2 else ""))
        bad = ~torch.isfinite(x).all(1)
        if bad.any():
            rows = bad.nonzero().flatten()
            raise ValueError(f"x contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                             f"drop those rows before encoding")
        return x.to(self.W_enc.dtype)

    def _resolve_k(self, x: Tensor, k: int | Tensor | None) -> Tensor:
        """Per-row k as an int64 tensor [B] on x's device."""
        if k is None:
            k = self._default_k(x)
        elif isinstance(k, Tensor):
            if k.ndim == 0:
                k = k.expand(len(x))
            if k.shape != (len(x),) or k.is_floating_point() or k.dtype == torch.bool or k.is_complex():
                raise ValueError(f"k must be an int or an integer tensor of shape [batch={len(x)}], got "
                                 f"{k.dtype} {tuple(k.shape)}")
            lo, hi = int(k.min()), int(k.max())
            if lo < 1 or hi > self.d_sae:
                raise ValueError(f"k must lie in [1, d_sae={self.d_sae}], got values in [{lo}, {hi}]")
        else:
            k = torch.full((len(x),), _check_k_int(k, "k", self.d_sae))
        return k.to(device=x.device, dtype=torch.int64)

    def _dead_idx(self, dead_mask: Tensor | None, device: torch.device) -> Tensor | None:
        if dead_mask is None:
            return None
        if dead_mask.shape != (self.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor [d_sae={self.d_sae}], got "
                             f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
        return dead_mask.to(device).nonzero().flatten()

    # -------------------------------------------------------------- encode / decode
    def select(self, x: Tensor, k: int | Tensor | None = None, *, dead_mask: Tensor | None = None,
               k_aux: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Sparse encoding: ``(top_acts, top_indices, keep, k, aux_acts, aux_indices)``.

        ``top_acts [B, k_max]`` are the post-ReLU activations at the ``k_max`` largest pre-activations in
        descending order, *not yet masked*; ``keep [B, k_max]`` marks ranks ``< k_i`` with a positive
        value. With ``dead_mask [d_sae]`` the ``k_aux`` (default ``d_in // 2``) largest activations among
        the dead latents come back too (AuxK). Differentiable through plain autograd (a dense backward):
        ``forward`` uses the fused sparse path instead, except for the straight-through extension.
        """
        return self._select(self._check_x(x), k, dead_mask, k_aux)

    def _select(self, x: Tensor, k: int | Tensor | None, dead_mask: Tensor | None, k_aux: int | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        k = self._resolve_k(x, k)
        k_max, dead_idx = int(k.max()), self._dead_idx(dead_mask, x.device)
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        pre = _addmm(self.b_enc, x - self.b_dec, self.W_enc)  # [B, d_sae] (encoder matmul as under autocast)
        acts, idx = pre.topk(k_max, dim=1, sorted=True)  # [B, k_max]: plain autograd (dense backward)
        acts = acts.relu()
        keep = (torch.arange(k_max, device=x.device) < k[:, None]) & (acts > 0)  # [B, k_max]
        if dead_idx is not None and dead_idx.numel() > 0 and k_aux > 0:
            aux, pos = pre.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
            aux, aux_idx = aux.relu(), dead_idx[pos]  # [B, k_aux] activations, latent indices
        else:
            aux, aux_idx = acts.new_zeros(len(x), 0), idx.new_zeros(len(x), 0)
        return acts, idx, keep, k, aux, aux_idx

    def encode(self, x: Tensor, k: int | Tensor | None = None) -> Tensor:
        """Dense codes [B, d_sae]: row i keeps its k_i largest positive pre-activations.

        ``k``: None (the model's own: fixed for TopK, from the probe for AdaptiveK), an int, or an
        integer tensor [B].
        """
        if torch.is_grad_enabled() and self.W_enc.requires_grad:  # differentiable path
            acts, idx, keep, *_ = self.select(x, k)
            return acts.new_zeros(len(acts), self.d_sae).scatter(1, idx, acts * keep)
        x = self._check_x(x)
        k = self._resolve_k(x, k)
        k_max = int(k.max())
        _, acts, idx, _ = _encode_topk(x - self.b_dec, self.W_enc, self.b_enc, k, k_max)
        keep = (torch.arange(k_max, device=x.device) < k[:, None]) & (acts > 0)  # [B, k_max]
        return acts.new_zeros(len(acts), self.d_sae).scatter_add_(1, idx, acts * keep)  # padding may repeat

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [B, d_in] from dense codes [B, d_sae]."""
        if codes.ndim != 2 or codes.shape[1] != self.d_sae:
            raise ValueError(f"codes must have shape [batch, d_sae={self.d_sae}], got {tuple(codes.shape)}")
        return codes @ self.W_dec + self.b_dec

    def decode_sparse(self, top_acts: Tensor, top_indices: Tensor, keep: Tensor | None = None) -> Tensor:
        """Reconstruction [B, d_in] from ``(top_acts, top_indices)`` [B, k] via ``embedding_bag``.

        With ``keep [B, k]`` only the kept entries are summed (rows may differ in length); without it
        every entry is (zeros included, which still pass gradients to their values).
        """
        if top_acts.shape != top_indices.shape or top_acts.ndim != 2:
            raise ValueError(f"top_acts and top_indices must both be [B, k], got {tuple(top_acts.shape)} and "
                             f"{tuple(top_indices.shape)}")
        if keep is None:
            out = F.embedding_bag(top_indices, self.W_dec, mode="sum", per_sample_weights=top_acts)
        else:
            out = _bag(top_indices, keep, self.W_dec, top_acts)
        return out + self.b_dec

    def forward(self, x: Tensor, k: int | Tensor | None = None, *, dead_mask: Tensor | None = None,
                k_aux: int | None = None, k_soft: Tensor | None = None, k_temperature: float = 1.0
                ) -> ForwardOutput:
        """Encode, decode and the training losses (see :class:`ForwardOutput`).

        Args:
            x: [B, d_in] inputs.
            k: per-row k (None: the model's own).
            dead_mask: [d_sae] bool, latents counted as dead; enables the AuxK loss.
            k_aux: number of dead latents used by AuxK (default ``d_in // 2``).
            k_soft: [B] float k that carries a gradient (extension, off by default): the rank mask gets a
                straight-through estimator whose backward is that of ``sigmoid((k_soft - rank - 0.5) / T)``
                (T = ``k_temperature``) while the forward stays the hard mask.
        """
        x = self._check_x(x)
        if k_soft is None:  # the fast path: one fused function with a sparse backward
            k = self._resolve_k(x, k)
            dead_idx = self._dead_idx(dead_mask, x.device)
            k_aux = self.d_in // 2 if k_aux is None else k_aux
            top, idx, keep, x_hat, aux_hat = _SparseSAE.apply(x, self.W_enc, self.b_enc, self.b_dec, self.W_dec, k,
                                                              int(k.max()), dead_idx, k_aux,
                                                              _autocast_dtype(x.device.type))
            has_aux = dead_idx is not None and dead_idx.numel() > 0 and k_aux > 0
        else:
            acts, idx, keep, k, aux, aux_idx = self._select(x, k, dead_mask, k_aux)
            ranks = torch.arange(acts.shape[1], device=x.device, dtype=acts.dtype)
            soft = torch.sigmoid((k_soft.to(acts.dtype)[:, None] - ranks - 0.5) / k_temperature)  # [B, k_max]
            top = acts * (keep + soft - soft.detach())  # value: acts * keep; gradient reaches k_soft
            x_hat = self.decode_sparse(top, idx)  # every rank, so dropped ranks get a gradient too
            has_aux = aux.shape[1] > 0
            if has_aux:
                aux_hat = F.embedding_bag(aux_idx, self.W_dec, mode="sum", per_sample_weights=aux)  # [B, d_in]
        err = (x - x_hat).pow(2)  # [B, d_in]
        fvu = err.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        l1 = top.sum(1).mean() / x.norm(dim=1).mean().clamp_min(torch.finfo(x.dtype).tiny)
        auxk = x.new_zeros(())
        if has_aux:
            e = (x - x_hat).detach()  # residual the dead latents should explain
            auxk = ((aux_hat - e).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()).nan_to_num(0.0)
        return ForwardOutput(x_hat, top, idx, k, fvu, err.mean(), l1, auxk, self.d_sae)

    # -------------------------------------------------------------- decoder constraint, init
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit norm (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each decoder row (before each step)."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad  # [d_sae, d_in]
        dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1)  # [d_sae] row-wise g·W, without a temporary
        g.addcmul_(W, (dots / W.norm(dim=1).square().clamp_min(1e-12))[:, None], value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from a batch [B, d_in]: its geometric median (reference), mean, or leave it."""
        x = self._check_x(x)
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif method == "mean":
            self.b_dec.copy_(x.mean(0))
        elif method != "none":
            raise ValueError(f"method must be 'geometric_median', 'mean' or 'none', got {method!r}")

    # -------------------------------------------------------------- save / load
    def _extra_tensors(self) -> dict[str, Tensor]:
        return {}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/sae.safetensors`` and then ``path/cfg.json`` (atomically); returns ``path``."""
        path = Path(path)
        tensors = {k: v.detach() for k, v in self.state_dict().items()} | self._extra_tensors()
        save_tensors(path / "sae.safetensors", tensors)
        write_json(path / "cfg.json", {"format_version": FORMAT_VERSION, "class": type(self).__name__,
                                       "dtype": str(self.W_enc.dtype).removeprefix("torch."), **self.config()})
        return path

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


class TopKSAE(SparseAutoencoder):
    """TopK SAE: every row keeps its ``k`` largest positive pre-activations."""

    def __init__(self, d_in: int, d_sae: int, k: int, *, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, device=device)
        self.k = self.k_max = _check_k_int(k, "k", d_sae)

    def _default_k(self, x: Tensor) -> Tensor:
        return torch.full((len(x),), self.k, device=x.device, dtype=torch.int64)

    def config(self) -> dict[str, Any]:
        return super().config() | {"k": self.k}

    def export_saelens(self, path: str | os.PathLike, *, model_name: str | None = None,
                       hook_name: str | None = None) -> Path:
        """Write the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``, architecture "topk")."""
        path = Path(path)
        save_tensors(path / "sae_weights.safetensors", {k: v.detach() for k, v in self.state_dict().items()})
        write_json(path / "cfg.json", {
            "architecture": "topk", "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
            "metadata": {"model_name": model_name, "hook_name": hook_name, "exported_by": "adaptivek"}})
        return path


class AdaptiveKSAE(SparseAutoencoder):
    """AdaptiveK SAE: row i keeps ``k_i = complexity_to_k(probe.predict(x_i))`` latents.

    ``probe`` is a fitted :class:`~adaptivek.probe.RidgeProbe` on the same features (or None / an
    unfitted probe, which ``train_sae`` fits in phase 1). The map is the paper's
    ``k = round(k_min + sigmoid(steepness * ((c - c_min)/(c_max - c_min) - 0.5)) * (k_max - k_min))``;
    with the defaults it reaches k in [34, 306].
    """

    def __init__(self, d_in: int, d_sae: int, probe: Any = None, *, k_min: int = 20, k_max: int = 320,
                 steepness: float = 6.0, c_min: float = 0.0, c_max: float = 10.0, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, device=device)
        self.k_min = _check_k_int(k_min, "k_min", d_sae)
        self.k_max = _check_k_int(k_max, "k_max", d_sae)
        if k_min > k_max:
            raise ValueError(f"k_min ({k_min}) > k_max ({k_max}); swap them or raise k_max")
        if not (math.isfinite(steepness) and steepness > 0):
            raise ValueError(f"steepness must be finite and > 0, got {steepness}")
        if not (math.isfinite(c_min) and math.isfinite(c_max) and c_max > c_min):
            raise ValueError(f"need finite c_min < c_max, got c_min={c_min}, c_max={c_max}")
        self.steepness, self.c_min, self.c_max = float(steepness), float(c_min), float(c_max)
        self.probe = probe
        if probe is not None and getattr(probe, "is_fitted", False) and probe.d != d_in:
            raise ValueError(f"the probe reads {probe.d} features but the SAE has d_in={d_in}; fit the probe "
                             f"on the activations the SAE encodes")

    @property
    def has_probe(self) -> bool:
        return self.probe is not None and bool(getattr(self.probe, "is_fitted", True))

    def k_from_complexity(self, c: Tensor) -> Tensor:
        """The paper's map from (predicted) complexity [B] to k [B] int64."""
        from .probe import complexity_to_k

        return complexity_to_k(c, k_min=self.k_min, k_max=self.k_max, steepness=self.steepness,
                               c_min=self.c_min, c_max=self.c_max)

    def soft_k(self, c: Tensor) -> Tensor:
        """The same map without rounding, differentiable in ``c`` [B] -> float [B]."""
        z = self.steepness * ((c - self.c_min) / (self.c_max - self.c_min) - 0.5)
        return self.k_min + torch.sigmoid(z) * (self.k_max - self.k_min)

    def _default_k(self, x: Tensor) -> Tensor:
        if not self.has_probe:
            raise RuntimeError("this AdaptiveKSAE has no fitted probe, so it cannot choose k: train it with "
                               "train_sae(sae, X, y) (phase 1 fits the probe), pass a fitted RidgeProbe, or "
                               "give k explicitly")
        return self.k_from_complexity(self.probe.predict(x)).to(x.device)

    def config(self) -> dict[str, Any]:
        return super().config() | {"k_min": self.k_min, "k_max": self.k_max, "steepness": self.steepness,
                                   "c_min": self.c_min, "c_max": self.c_max, "has_probe": self.has_probe}

    def _extra_tensors(self) -> dict[str, Tensor]:
        return self.probe.to_tensors(prefix="probe.") if self.has_probe else {}

    def export_saelens(self, path: str | os.PathLike, **_: Any) -> Path:
        raise NotImplementedError("SAELens has no architecture with a per-input k; save an AdaptiveKSAE with "
                                  ".save(path) and load it with adaptivek.load_sae(path)")


def load_sae(path: str | os.PathLike, *, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Restore a :class:`TopKSAE` or :class:`AdaptiveKSAE` written by ``save(path)`` (probe included).

    Subclasses are found by the class name in ``cfg.json`` (their module must have been imported) and
    rebuilt from the ``cfg.json`` entries that are constructor arguments.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, data = path / "cfg.json", path / "sae.safetensors"
    if not (cfg_file.is_file() and data.is_file()):
        raise FileNotFoundError(f"no saved SAE in {path}: expected cfg.json and sae.safetensors (written by "
                                f"sae.save(path)); a SAELens export is read with sae_lens.SAE.load_from_disk")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {cfg.get('format_version')!r}; this adaptivek reads "
                         f"{FORMAT_VERSION}")
    cls = SparseAutoencoder._registry.get(cfg.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_file} describes a {cfg.get('class')!r}; known classes: "
                         f"{sorted(SparseAutoencoder._registry)} (import the module that defines it first)")
    tensors = load_file(str(data))
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params and k not in ("self", "probe", "dtype", "device", "seed")}
    if issubclass(cls, AdaptiveKSAE):
        from .probe import RidgeProbe

        has = any(k.startswith("probe.") for k in tensors)
        kwargs["probe"] = RidgeProbe.from_tensors(tensors, prefix="probe.") if has else None
    sae = cls(**kwargs, dtype=dtype)
    sae.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("probe.")})
    return sae.to(device) if device is not None else sae
