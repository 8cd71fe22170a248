"""The sparse kernels behind the SAE family: bucketed variable-k top-k and the fused training step.

Everything here is a speed-up of :func:`adaptivek.sae.variable_topk` (top-k at the largest k, ReLU, then
the rank mask ``arange(k_max) < k[:, None]``) and of plain autograd through it; ``tests/test_sae.py``
checks both against that reference, and ``benchmarks/sae.py`` measures them. Sparsify keeps its fused
encoder beside its sparse coder in the same way.

* :func:`_encode_topk`: on CPU ``topk`` costs about linearly in k, so rows are sorted by k into
  :data:`TOPK_BUCKETS` equal groups, each topk'd at its own largest k (a loop over a few groups, never over
  rows). Row ``i`` then has exactly ``k_i`` nonzeros whenever it has ``k_i`` positive pre-activations.
* :class:`_SparseSAE`: one autograd function for the whole training forward (encoder, top-k, decoder,
  AuxK decoder) whose backward touches only the kept entries. Its forward holds the step's only dense
  ``B x d_in x d_sae`` matmul and decodes with ``embedding_bag``; in the backward the decoder-side
  gradient of each kept value is a dot product, ``dW_dec`` and ``dW_enc`` are ``embedding_bag``s over
  batch rows grouped by latent with one shared sort, bias gradients are scatter-adds, and AuxK uses the
  dense sub-matrix of the dead latents' columns. No ``[B, d_sae]`` gradient is ever materialised.

:func:`geometric_median` (vectorised Weiszfeld) initialises ``b_dec`` as the reference code does.

Layout note: ``W_enc`` is created as ``W_dec.T.clone()`` and so stored column-major (its ``[d_in, d_sae]``
view has strides ``(1, d_in)``), which is the layout its sparse gradient comes in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

TOPK_BUCKETS: dict[str, int] = {"cpu": 8}
"""Row groups for variable-k top-k per device type (default 1). On CPU ``topk`` costs about linearly in k,
so 8 groups cut it to about mean(k)/max(k) (measured: ``benchmarks/sae.py``); on GPUs ``topk`` is a
radix select whose cost hardly depends on k, so one call at the largest k is kept there (not measured)."""


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """torch.autocast's dtype where it is on for ``device_type``, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _addmm(b: Tensor, x: Tensor, W: Tensor, matmul_dtype: torch.dtype | None = None) -> Tensor:
    """``b + x @ W`` in ``x``'s dtype, the product computed in ``matmul_dtype``: the encoder's matmul.

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


def _keep_mask(acts: Tensor, k: Tensor) -> Tensor:
    """[B, k_max] bool: rank below the row's k (``acts`` descending) and a positive activation."""
    return (torch.arange(acts.shape[1], device=acts.device) < k[:, None]) & (acts > 0)


def _encode_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: Tensor, buckets: int | None = None,
                 matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Pre-activations and each row's top-k_i: ``(pre, acts [B, k_max], idx [B, k_max], keep, inv)``.

    ``xc = x - b_dec``. ``acts`` are ReLU'd and descending but not masked; ``keep`` is the mask (columns
    ``>= k_i`` hold further values or zero padding). Rows are sorted by k and cut into ``buckets`` groups,
    each topk'd at its own largest k. ``pre``'s rows are then in that sorted order and ``pre[inv]`` is in
    the batch's order (``inv`` is None when no sort happened). Differentiable by plain autograd. An empty
    batch gives empty codes ``[0, 0]``.
    """
    B = len(xc)
    if B == 0:  # an empty batch: its [0, d_sae] pre-activations and [0, 0] codes
        pre = _addmm(b_enc, xc, W_enc, matmul_dtype)
        return pre, pre.new_zeros(0, 0), k.new_zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool, device=xc.device), None
    k_max = int(k.max())
    buckets = TOPK_BUCKETS.get(xc.device.type, 1) if buckets is None else buckets
    if buckets < 2 or B < 2 * buckets or int(k.min()) == k_max:
        pre = _addmm(b_enc, xc, W_enc, matmul_dtype)  # [B, d_sae]; ReLU after the top-k: same codes, one pass less
        acts, idx = pre.topk(k_max, dim=1, sorted=True)  # [B, k_max]
        acts = acts.relu_()  # topk saves only its indices for backward: in-place is safe
        return pre, acts, idx, _keep_mask(acts, k), None
    order = torch.argsort(k, stable=True)
    pre = _addmm(b_enc, xc[order], W_enc, matmul_dtype)  # [B, d_sae], rows by increasing k
    acts = pre.new_zeros(B, k_max)
    idx = torch.zeros(B, k_max, dtype=torch.int64, device=xc.device)
    ends = torch.tensor([len(r) for r in torch.arange(B).tensor_split(buckets)]).cumsum(0).tolist()
    for start, end, kk in zip([0] + ends[:-1], ends, k[order][torch.tensor(ends) - 1].tolist(), strict=True):
        acts[start:end, :kk], idx[start:end, :kk] = pre[start:end].topk(kk, dim=1, sorted=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(B, device=order.device)
    acts = acts[inv].relu_()  # a fresh tensor: in-place is safe under autograd too
    return pre, acts, idx[inv], _keep_mask(acts, k), inv


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


def fused_forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: Tensor,
                  dead_idx: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(top_acts, top_indices, keep, x_hat, aux_hat)`` of one training batch through :class:`_SparseSAE`.

    ``top_acts [B, k_max]`` are masked by ``keep``; ``aux_hat`` is AuxK's reconstruction from the ``k_aux``
    largest activations among the latents ``dead_idx`` (zeros without them). Under torch.autocast only the
    encoder matmul runs in autocast's dtype.
    """
    return _SparseSAE.apply(x, W_enc, b_enc, b_dec, W_dec, k, dead_idx, k_aux, _autocast_dtype(x.device.type))


class _SparseSAE(torch.autograd.Function):
    """Encoder, top-k, decoder and AuxK decoder in one function with a sparse backward (module docstring).

    AuxK works on the dense sub-matrix of the n dead latents' columns (its decode and gradients are four
    ``B x d_in x n`` matmuls: cheap while few latents are dead, and never worse than the sparse route by
    much, since k_aux = d_in/2 entries per row is more than most k).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: Tensor,
                dead_idx: Tensor | None, k_aux: int, matmul_dtype: torch.dtype | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # only the encoder matmul uses matmul_dtype
            return _SparseSAE._forward(ctx, x, W_enc, b_enc, b_dec, W_dec, k, dead_idx, k_aux, matmul_dtype)

    @staticmethod
    def _forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: Tensor,
                 dead_idx: Tensor | None, k_aux: int, matmul_dtype: torch.dtype | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        xc = x - b_dec  # [B, d_in]
        pre, acts, idx, keep, inv = _encode_topk(xc, W_enc, b_enc, k, matmul_dtype=matmul_dtype)
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
            dead_idx32 = dead_idx.int()  # row index_add_ on CPU: int64 indices take a path ~1000x slower (same sums)
            order = torch.sort(lat.int() if d_sae < 2**31 else lat, stable=True).indices
            counts = torch.bincount(lat, minlength=d_sae)
            by_lat = counts.cumsum(0) - counts  # [d_sae] start of each latent's group
            row_sorted = row[order]
            if need_wd:  # dW_dec[j] = Σ_b a[b, j] g_xhat[b]
                g_Wd = F.embedding_bag(row_sorted, g_xhat, by_lat, mode="sum", per_sample_weights=val[order])
                if aux:
                    g_Wd.index_add_(0, dead_idx32, A.T @ g_aux)
            if need_we:  # dW_encᵀ[j] = Σ_b g_pre[b, j] xc[b], built as [d_sae, d_in]
                g_We = F.embedding_bag(row_sorted, xc, by_lat, mode="sum", per_sample_weights=g_val[order])
                if aux:
                    g_We.index_add_(0, dead_idx32, gA.T @ xc)
                g_We = g_We.T
        if need_x:
            g_x = F.embedding_bag(lat, W_enc.T.contiguous(), offsets, mode="sum", per_sample_weights=g_val)
            if aux:
                g_x += gA @ W_enc.index_select(1, dead_idx).T
        g_b_dec = None
        if need_bd:
            g_b_dec = g_xhat.sum(0) - (W_enc @ g_b_enc if g_x is None else g_x.sum(0))
        return g_x, g_We, g_b_enc if need_be else None, g_b_dec, g_Wd, None, None, None, None
