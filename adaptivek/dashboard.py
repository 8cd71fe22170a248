"""Feature dashboards: one static HTML card per latent of any SAE of the family, offline.

A card shows a latent's top-activating token contexts (the active token outlined, every token shaded by
that latent's activation), the histogram of its nonzero activations, its firing frequency, the direct
logit effect of its decoder direction (``W_dec[i] @ W_Uᵀ``: the tokens it promotes and suppresses) and,
where the SAE chooses k per row (AdaptiveK; BatchTopK with its threshold), the k of every shown token
and the latent's mean k where it fires.

The maintained renderers (``sae-vis``, ``sae-dashboard``) require TransformerLens' ``HookedTransformer``
(and ``sae-dashboard`` SAELens' SAE class), and load d3/plotly from a CDN; ours is plain HTML with inline
styles and an inline SVG histogram (no JavaScript, no network), so a page works in the built book and
as a single file.

Pipeline: :func:`latent_stats` (one chunked encoding pass over ``X``; latents chosen by
:func:`choose_latents` unless given), :func:`logit_effects`, :func:`render_dashboard`; or all at once
with :func:`dashboard`, whose :class:`Dashboard` displays in Jupyter and ``.save(path)`` writes one file.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .checks import int_at_least, matrix, one_of, same_length
from .io import atomic_path

RULES = ("quantiles", "most_frequent")


# ------------------------------------------------------------------------------------ choosing latents
def choose_latents(freq: Any, n: int = 8, rule: str = "quantiles") -> Tensor:
    """``n`` latents chosen by a fixed rule from their firing frequencies ``freq [d_sae]`` (never by hand).

    ``"quantiles"``: sort the live latents (``freq > 0``) by frequency (ties by index) and take those at
    ``n`` evenly spaced ranks from the rarest to the most frequent (``round(linspace(0, n_live - 1, n))``),
    so the cards span the frequency distribution. ``"most_frequent"``: the ``n`` most frequent live
    latents. Deterministic; every live latent when fewer than ``n`` are live. Returns int64 ``[<= n]``.
    """
    one_of(rule, "rule", RULES)
    int_at_least(n, "n", why="latents to show")
    freq = torch.as_tensor(freq).double()
    if freq.ndim != 1:
        raise ValueError(f"freq must be a 1-D tensor [d_sae] of firing frequencies, got shape {tuple(freq.shape)}")
    live = (freq > 0).nonzero().flatten()
    if len(live) == 0:
        raise ValueError(f"no live latent: none of the {len(freq)} latents fires on these rows; check that X is "
                         "scaled as the SAE was trained (SAEData.scaled) and that the SAE is trained")
    order = live[torch.argsort(freq[live], stable=True)]  # rarest first; equal frequencies by index
    if len(order) <= n:
        return order
    if rule == "most_frequent":
        return order[-n:].flip(0)
    return order[torch.linspace(0, len(order) - 1, n, dtype=torch.float64).round().long()]


def _latent_ids(latents: Any, d_sae: int) -> Tensor:
    """``latents`` as a non-empty 1-D int64 tensor of distinct indices in ``[0, d_sae)``."""
    t = torch.as_tensor(latents)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or len(t) == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"latents must be a non-empty list of integer latent indices, got {latents!r}")
    bad = t[(t < 0) | (t >= d_sae)]
    if len(bad):
        raise ValueError(f"latents {bad[:5].tolist()} are out of range: this SAE has d_sae={d_sae} latents "
                         f"(indices 0..{d_sae - 1})")
    if len(torch.unique(t)) != len(t):
        raise ValueError(f"latents repeat an index ({t.tolist()}); give each latent once")
    return t.long()


# ------------------------------------------------------------------------------------ statistics
@dataclass
class LatentStats:
    """What the cards show, for the chosen latents over the rows of ``X`` (all on the CPU)."""

    latents: Tensor
    """[n] int64 the latents, in card order."""
    acts: Tensor
    """[N, n] float32 each latent's activation on every row (0 where it is not active)."""
    top_rows: Tensor
    """[n, n_top] int64 rows of the largest activations, descending; -1 where a latent fires on fewer rows."""
    top_values: Tensor
    """[n, n_top] float32 those activations; NaN where ``top_rows`` is -1."""
    counts: Tensor
    """[n] int64 rows on which each latent fires."""
    freq_all: Tensor
    """[d_sae] float64 firing frequency (fraction of rows) of every latent: what :func:`choose_latents` reads."""
    hist_counts: Tensor
    """[n, n_bins] int64 histogram of each latent's nonzero activations (sums to ``counts``)."""
    hist_edges: Tensor
    """[n, n_bins + 1] float32 bin edges, from 0 to the latent's largest activation."""
    k: Tensor
    """[N] int64 the k of each row: ``SparseCode.k`` (what AdaptiveK assigned), or L0 for an ``encode``-only SAE."""
    mean_k: Tensor
    """[n] float64 mean k of the rows where each latent fires (NaN where it never fires)."""
    rule: str | None = None
    """How the latents were chosen (a :data:`RULES` name), or None when they were given."""

    @property
    def freq(self) -> Tensor:
        """[n] float64 firing frequency of each chosen latent."""
        return self.freq_all[self.latents]

    @property
    def n_rows(self) -> int:
        return len(self.acts)

    @property
    def k_varies(self) -> bool:
        """Whether rows get different k (AdaptiveK, thresholded BatchTopK): then the cards show k."""
        return bool(len(self.k)) and bool((self.k != self.k[0]).any())


def _sae_device(sae: Any) -> torch.device:
    p = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _d_sae(sae: Any) -> int:
    W = getattr(sae, "W_dec", None)
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise TypeError(f"sae must have a decoder W_dec [d_sae, d_in] (a TopKSAE, AdaptiveKSAE, BatchTopKSAE or "
                        f"alike), got {type(sae).__name__}")
    return W.shape[0]


def _chunk_entries(sae: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Active entries of one chunk as ``(row [m], latent [m], value [m], k [B])``, on the CPU."""
    if hasattr(sae, "encode_sparse"):
        code = sae.encode_sparse(x)
        mask = code.mask  # [B, k_max]
        row = torch.arange(len(x), device=mask.device)[:, None].expand_as(mask)[mask]
        return row.cpu(), code.top_indices[mask].cpu(), code.top_acts[mask].float().cpu(), code.k.cpu()
    codes = sae.encode(x)  # [B, d_sae] dense
    row, latent = (codes > 0).nonzero(as_tuple=True)
    return row.cpu(), latent.cpu(), codes[row, latent].float().cpu(), (codes > 0).sum(1).cpu()


@torch.no_grad()
def _encode_all(sae: Any, X: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over ``X`` in chunks: every active entry ``(row, latent, value)`` (int32/int32/float32, about
    12 bytes per row and active latent) and each row's k. The SAE runs in eval mode (restored after)."""
    device, was_training = _sae_device(sae), getattr(sae, "training", False)
    if was_training:
        sae.eval()
    try:
        parts = []
        for start in range(0, len(X), batch_size):
            row, latent, value, k = _chunk_entries(sae, X[start:start + batch_size].to(device))
            parts.append(((row + start).int(), latent.int(), value, k.long()))
    finally:
        if was_training:
            sae.train()
    rows, latents, values, ks = (torch.cat(p) for p in zip(*parts, strict=True))
    return rows, latents, values, ks


def _histograms(acts: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Counts ``[n, n_bins]`` of each column's nonzero values in bins from 0 to its max, and the edges."""
    top = acts.max(0).values.clamp_min(torch.finfo(torch.float32).tiny)  # [n]
    r, c = acts.nonzero(as_tuple=True)
    b = (acts[r, c] / top[c] * n_bins).long().clamp(0, n_bins - 1)  # bin of each nonzero value
    counts = torch.bincount(c * n_bins + b, minlength=acts.shape[1] * n_bins).view(acts.shape[1], n_bins)
    edges = torch.linspace(0, 1, n_bins + 1)[None, :] * top[:, None]  # [n, n_bins + 1]
    return counts, edges


def latent_stats(sae: Any, X: Tensor, latents: Any = None, *, n_latents: int = 8, rule: str = "quantiles",
                 n_top: int = 8, n_bins: int = 24, batch_size: int = 4096) -> LatentStats:
    """Everything the cards show, from one chunked encoding pass over ``X [N, d_in]`` (scaled as the SAE was
    trained). ``latents``: the latents to show, or None to choose ``n_latents`` by ``rule``
    (:func:`choose_latents` on the frequencies over ``X``). Top contexts come from ``torch.topk`` over the
    ``[N, n]`` activation matrix of the chosen latents."""
    d_sae = _d_sae(sae)
    matrix(X, "X", d=sae.W_dec.shape[1])
    for v, name in ((n_top, "n_top"), (n_bins, "n_bins"), (batch_size, "batch_size"), (n_latents, "n_latents")):
        int_at_least(v, name)
    one_of(rule, "rule", RULES)
    chosen = None if latents is None else _latent_ids(latents, d_sae)
    rows, lat, val, k = _encode_all(sae, X, batch_size)
    freq_all = torch.bincount(lat.long(), minlength=d_sae).double() / len(X)
    if chosen is None:
        chosen = choose_latents(freq_all, n_latents, rule)
    elif not (freq_all[chosen] > 0).any():
        raise ValueError(f"none of the latents {chosen.tolist()} fires on these {len(X)} rows; choose live ones "
                         "(choose_latents(stats.freq_all)) or check that X is scaled as the SAE was trained")
    col = torch.full((d_sae,), -1, dtype=torch.long)
    col[chosen] = torch.arange(len(chosen))
    keep = col[lat.long()] >= 0  # entries of the chosen latents
    acts = torch.zeros(len(X), len(chosen))  # [N, n]
    acts[rows[keep].long(), col[lat[keep].long()]] = val[keep]
    return _finish(acts, chosen, freq_all, k, n_top, n_bins, None if latents is not None else rule)


def _finish(acts: Tensor, latents: Tensor, freq_all: Tensor, k: Tensor, n_top: int, n_bins: int,
            rule: str | None) -> LatentStats:
    """Top rows, histograms and mean k from the activation matrix ``acts [N, n]``."""
    values, top_rows = acts.topk(min(n_top, len(acts)), dim=0)  # [n_top, n] descending
    values, top_rows = values.T.contiguous(), top_rows.T.contiguous()  # [n, n_top]
    missing = values <= 0
    values, top_rows = values.masked_fill(missing, float("nan")), top_rows.masked_fill(missing, -1)
    fires = acts > 0  # [N, n]
    counts = fires.sum(0)
    mean_k = (fires.double().T @ k.double()) / counts.double()  # NaN where it never fires
    hist_counts, hist_edges = _histograms(acts, n_bins)
    return LatentStats(latents, acts, top_rows, values, counts, freq_all, hist_counts, hist_edges, k, mean_k, rule)


# ------------------------------------------------------------------------------------ logit effect
class LogitEffects(NamedTuple):
    """Direct logit effect ``W_dec[latent] @ W_Uᵀ`` of each latent: the most promoted and suppressed tokens."""

    promoted_ids: Tensor  # [n, m] int64 token ids, largest effect first
    promoted: Tensor  # [n, m] float32 their effects
    suppressed_ids: Tensor  # [n, m] int64, most negative first
    suppressed: Tensor  # [n, m] float32


def logit_effects(sae: Any, latents: Any, W_U: Tensor, *, n: int = 8) -> LogitEffects:
    """The ``n`` tokens each latent's decoder direction raises and lowers most through the unembedding
    ``W_U [vocab, d_in]`` (:func:`unembedding`): its direct effect, ignoring the blocks after the SAE's layer."""
    d_sae, d_in = _d_sae(sae), sae.W_dec.shape[1]
    ids = _latent_ids(latents, d_sae)
    int_at_least(n, "n", why="tokens per side")
    if not isinstance(W_U, Tensor) or W_U.ndim != 2 or W_U.shape[1] != d_in:
        shape = tuple(W_U.shape) if isinstance(W_U, Tensor) else type(W_U).__name__
        hint = " (it looks transposed: pass W_U.T)" if isinstance(W_U, Tensor) and W_U.ndim == 2 and \
            W_U.shape[0] == d_in else ""
        raise ValueError(f"W_U must be the unembedding matrix [vocab, d_in={d_in}] of the SAE's model "
                         f"(unembedding(lm)), got {shape}{hint}")
    effect = sae.W_dec.detach()[ids].float().cpu() @ W_U.detach().float().cpu().T  # [n, vocab]
    m = min(n, effect.shape[1])
    up, down = effect.topk(m, dim=1), effect.topk(m, dim=1, largest=False)
    return LogitEffects(up.indices, up.values, down.indices, down.values)


def unembedding(lm: Any, *, fold_norm: bool = True) -> Tensor:
    """``W_U [vocab, d_model]`` of a model loaded with :func:`~adaptivek.load_model` (its output embedding),
    float32 on the CPU. ``fold_norm``: multiply in the final norm's scale (``1 + w`` for Gemma), as
    TransformerLens' folded ``W_U`` does, so a direction's logit effect is what the norm lets through."""
    hf = getattr(lm, "_module", lm)
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is None or not isinstance(getattr(out, "weight", None), Tensor):
        raise TypeError(f"{type(hf).__name__} has no output embedding (get_output_embeddings()); pass W_U yourself")
    W = out.weight.detach().float().cpu()
    if not fold_norm:
        return W
    base = getattr(hf, "base_model", hf)
    norm = next((getattr(base, a) for a in ("norm", "final_layer_norm", "ln_f", "final_norm") if hasattr(base, a)),
                None)
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.shape != (W.shape[1],):
        raise ValueError(f"cannot find the final norm's scale of {type(hf).__name__}; call unembedding(lm, "
                         "fold_norm=False) for the raw output embedding")
    scale = w.detach().float().cpu() + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
    return W * scale[None, :]


# ------------------------------------------------------------------------------------ token strings
class TokenStrings(Mapping):
    """Text id -> the text's token strings, tokenised as :func:`~adaptivek.extract` does (same truncation),
    each token decoded alone; decoded on first access (a dashboard reads a few dozen texts)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> None:
        from .checks import text_list

        self.tokenizer, self.texts, self.max_length = tokenizer, text_list(texts), int_at_least(max_length, "max_length")
        self._cache: dict[int, list[str]] = {}

    def __getitem__(self, i: int) -> list[str]:
        if i not in self._cache:
            if not isinstance(i, int) or not 0 <= i < len(self.texts):
                raise KeyError(i)
            ids = self.tokenizer(self.texts[i], truncation=True, max_length=self.max_length)["input_ids"]
            self._cache[i] = self.tokenizer.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)
        return self._cache[i]

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self):
        return iter(range(len(self.texts)))


def token_strings(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenStrings:
    """The token strings of ``texts`` as the activations saw them (:class:`TokenStrings`)."""
    return TokenStrings(tokenizer, texts, max_length)


# ------------------------------------------------------------------------------------ rendering
_CARD = ("border:1px solid #ccc;border-radius:6px;padding:10px 12px;margin:12px 0;font-family:system-ui,sans-serif;"
         "font-size:13px;background:#fff;color:#222")
_TOK = "white-space:pre;font-family:ui-monospace,monospace;font-size:12px;padding:1px 0;border-radius:2px"
_ROW = "padding:2px 0;border-top:1px solid #eee;line-height:1.9"
_MUTED = "color:#888"


def _visible(s: str) -> str:
    """A token string made visible and HTML-safe: newlines ↵, tabs ⇥, all-space tokens ·, empty ∅."""
    if s == "":
        return "∅"
    s = s.replace("\r", "⏎").replace("\n", "↵").replace("\t", "⇥")
    if s.strip(" ") == "":
        s = s.replace(" ", "·")
    return html.escape(s, quote=True)


def _index_rows(text_index: Tensor, position: Tensor, span: int) -> tuple[Tensor, Tensor, int]:
    """Sorted keys ``text * M + position`` of the rows, their order, and ``M`` (room for ``span`` beyond)."""
    M = int(position.max()) + span + 2
    keys = text_index * M + position  # [N]
    order = torch.argsort(keys)
    skeys = keys[order]
    if len(skeys) > 1 and (skeys[1:] == skeys[:-1]).any():
        dup = order[1:][skeys[1:] == skeys[:-1]][0]
        raise ValueError(f"(text_index, position) pairs repeat (first at row {int(dup)}): each row must be a distinct "
                         "token of a text, as in a TokenSet")
    return skeys, order, M


def _window_rows(index: tuple[Tensor, Tensor, int], text: Tensor, pos: Tensor, before: int, after: int
                 ) -> tuple[Tensor, Tensor]:
    """Rows of X at positions ``pos - before .. pos + after`` of each context's text (-1: not in X), and those
    positions. ``text``, ``pos`` [m] -> both [m, before + 1 + after]."""
    skeys, order, M = index
    q = pos[:, None] + torch.arange(-before, after + 1)[None, :]  # [m, W]
    want = text[:, None] * M + q
    j = torch.searchsorted(skeys, want).clamp(max=len(skeys) - 1)
    hit = (skeys[j] == want) & (q >= 0)
    return torch.where(hit, order[j], torch.full_like(j, -1)), q


def _token_str(tokenizer: Any, i: int) -> str:
    if tokenizer is None:
        return f"#{i}"
    return tokenizer.batch_decode([[i]], clean_up_tokenization_spaces=False)[0]


def _logit_html(effects: LogitEffects | None, j: int, tokenizer: Any) -> str:
    """Two small tables: tokens promoted and suppressed by card ``j``'s latent."""
    if effects is None:
        return ""
    cols = []
    for name, ids, vals, color in (("promoted", effects.promoted_ids, effects.promoted, "#1a7f37"),
                                   ("suppressed", effects.suppressed_ids, effects.suppressed, "#b42318")):
        items = "".join(f"<tr><td><span style='{_TOK};background:#f3f3f3'>{_visible(_token_str(tokenizer, t))}"
                        f"</span></td><td style='text-align:right;color:{color}'>{v:+.3f}</td></tr>"
                        for t, v in zip(ids[j].tolist(), vals[j].tolist(), strict=True))
        cols.append(f"<table style='border-collapse:collapse;margin-right:18px'><tr><th colspan=2 "
                    f"style='text-align:left;{_MUTED};font-weight:normal'>logit effect: {name}</th></tr>{items}</table>")
    return f"<div style='display:flex;align-items:flex-start'>{''.join(cols)}</div>"


def _histogram_svg(counts: Tensor, edges: Tensor, width: int = 260, height: int = 90) -> str:
    """Inline SVG bar chart of one latent's nonzero activations (a tooltip per bar)."""
    n, top = len(counts), max(int(counts.max()), 1)
    bw, ph = width / n, height - 28  # bars between y = 12 (count label) and height - 16 (axis)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{12 + ph - ph * c / top:.1f}' width='{max(bw - 1, 1):.1f}' height='{ph * c / top:.1f}' "
        f"fill='#e8862a'><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}</title></rect>"
        for i, c in enumerate(counts.tolist()))
    axis = (f"<text x='0' y='{height - 3}' font-size='10' fill='#666'>0</text><text x='{width}' y='{height - 3}' "
            f"font-size='10' fill='#666' text-anchor='end'>{float(edges[-1]):.3g}</text><text x='2' y='10' "
            f"font-size='10' fill='#666'>tallest bar: {top} tokens</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='activation histogram'>{bars}{axis}</svg>")


def _context_html(strs: Sequence[str], q: list[int], rows: list[int], acts: Tensor, k: Tensor | None,
                  vmax: float, active: int) -> str:
    """One context: each token shaded by the latent's activation (``acts [N]``), the active one outlined."""
    spans = []
    for pos, r in zip(q, rows, strict=True):
        if not 0 <= pos < len(strs):
            continue
        tok = _visible(strs[pos])
        if r < 0:
            spans.append(f"<span style='{_TOK};{_MUTED}' title='position {pos}: not among the encoded rows "
                         f"(excluded)'>{tok}</span>")
            continue
        a = float(acts[r])
        tip = f"position {pos}: activation {a:.3g}" + (f", k {int(k[r])}" if k is not None else "")
        shade = f"background:rgba(232,134,42,{0.85 * min(a / vmax, 1.0):.3f});" if a > 0 else ""
        ring = "outline:2px solid #1f4e9e;font-weight:600;" if r == active else ""
        spans.append(f"<span style='{_TOK};{shade}{ring}' title='{tip}' data-row='{r}'"
                     + (f" data-k='{int(k[r])}'" if k is not None else "") + f">{tok}</span>")
    return "".join(spans)


def _token_strs_of(token_strs: Any, t: int, p: int) -> Sequence[str]:
    """Text ``t``'s token strings, checked to reach position ``p``."""
    try:
        strs = token_strs[t]
    except (KeyError, IndexError) as e:
        raise ValueError(f"token_strs has no entry for text {t}; it must map every text id of text_index to that "
                         "text's token strings (token_strings(tokenizer, texts, max_length))") from e
    if p >= len(strs):
        raise ValueError(f"text {t} has {len(strs)} token strings but a row sits at position {p}: the token strings "
                         "do not match the activations (another tokenizer or max_length?)")
    return strs


def _card_header(stats: LatentStats, j: int) -> str:
    """Latent index, firing frequency, largest activation and (where k varies) mean k."""
    c, f = int(stats.counts[j]), float(stats.freq[j])
    parts = [f"<b style='font-size:15px'>latent {int(stats.latents[j])}</b>",
             f"fires on {c:,} of {stats.n_rows:,} tokens ({100 * f:.3g}%)"]
    if c:
        parts.append(f"max activation {float(stats.top_values[j, 0]):.3g}")
    if stats.k_varies:
        parts.append(f"mean k where it fires {float(stats.mean_k[j]):.1f} (all rows {float(stats.k.double().mean()):.1f})")
    return " &nbsp;·&nbsp; ".join(parts)


def _card(stats: LatentStats, j: int, windows: dict, token_strs: Any, logits: LogitEffects | None,
          tokenizer: Any) -> str:
    """One latent's card: header, histogram and logit tables side by side, then its top contexts."""
    k = stats.k if stats.k_varies else None
    vmax = float(stats.top_values[j, 0]) if int(stats.counts[j]) else 1.0
    lines = []
    for rank, r in enumerate(stats.top_rows[j].tolist()):
        if r < 0:
            break
        rows, q, t, p = windows[(j, rank)]
        body = _context_html(_token_strs_of(token_strs, t, p), q, rows, stats.acts[:, j], k, vmax, r)
        meta = f"{float(stats.acts[r, j]):.3g}" + (f" · k {int(k[r])}" if k is not None else "")
        lines.append(f"<div style='{_ROW}'><span style='display:inline-block;min-width:92px;{_MUTED}' "
                     f"title='text {t}, position {p}'>{meta}</span>{body}</div>")
    if not lines:
        lines.append(f"<div style='{_ROW};{_MUTED}'>never fires on these rows</div>")
    hist = _histogram_svg(stats.hist_counts[j], stats.hist_edges[j]) if int(stats.counts[j]) else ""
    return (f"<div style='{_CARD}'><div>{_card_header(stats, j)}</div>"
            f"<div style='display:flex;gap:24px;align-items:flex-start;margin:8px 0'><div>{hist}</div>"
            f"{_logit_html(logits, j, tokenizer)}</div>"
            f"<div style='{_MUTED};font-size:11px'>top activations (activation{' · k' if k is not None else ''})"
            f"</div>{''.join(lines)}</div>")


def _index_tensor(v: Any, name: str, n: int) -> Tensor:
    t = torch.as_tensor(v)
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor [N], got dtype {t.dtype} and shape {tuple(t.shape)}")
    same_length(t, range(n), name, "X (the rows the stats were computed on)")
    if len(t) and int(t.min()) < 0:
        raise ValueError(f"{name} holds negative values ({int(t.min())}); it must hold text ids / positions >= 0")
    return t.long().cpu()


def render_dashboard(stats: LatentStats, text_index: Any, position: Any, token_strs: Any, *,
                     logits: LogitEffects | None = None, tokenizer: Any = None, before: int = 12, after: int = 4,
                     title: str | None = None) -> str:
    """HTML (a ``<div>`` fragment, inline styles) of one card per latent of ``stats``.

    ``text_index``, ``position`` [N]: each row's text and position (a TokenSet's); ``token_strs``: text id ->
    its token strings (:func:`token_strings`); a context shows ``before`` tokens before and ``after`` after
    its active token (tokens that are not rows of X, e.g. excluded ones, in grey). ``logits``: from
    :func:`logit_effects` (token names via ``tokenizer``; ids without one)."""
    text_index, position = (_index_tensor(v, n, stats.n_rows) for v, n in ((text_index, "text_index"),
                                                                            (position, "position")))
    for v, n in ((before, "before"), (after, "after")):
        int_at_least(v, n, 0)
    if logits is not None and len(logits.promoted) != len(stats.latents):
        raise ValueError(f"logits covers {len(logits.promoted)} latents but stats has {len(stats.latents)}; compute "
                         "both for the same latents")
    index = _index_rows(text_index, position, after)
    valid = stats.top_rows >= 0  # [n, n_top]
    top = stats.top_rows[valid]  # [m] flattened shown contexts
    rows, q = _window_rows(index, text_index[top], position[top], before, after)  # [m, W]
    windows = {(j, rank): (rows[i].tolist(), q[i].tolist(), int(text_index[top[i]]), int(position[top[i]]))
               for i, (j, rank) in enumerate(valid.nonzero().tolist())}  # nonzero is row-major, as top is
    head = f"<h3 style='font-family:system-ui,sans-serif'>{html.escape(title)}</h3>" if title else ""
    cards = "".join(_card(stats, j, windows, token_strs, logits, tokenizer) for j in range(len(stats.latents)))
    return f"<div class='adaptivek-dashboard'>{head}{cards}</div>"


def write_dashboard(path: str | Path, fragment: str, *, title: str = "SAE dashboard") -> Path:
    """Write ``fragment`` (:func:`render_dashboard`) as one self-contained HTML page, atomically."""
    if not isinstance(fragment, str):
        raise TypeError(f"fragment must be the HTML string of render_dashboard, got {type(fragment).__name__}")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"</head><body style='max-width:1100px;margin:20px auto;padding:0 12px'>\n{fragment}\n</body></html>\n")
    path = Path(path)
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


@dataclass
class Dashboard:
    """A rendered dashboard: shows itself in Jupyter (and the built book); ``save(path)`` writes one file."""

    stats: LatentStats
    logits: LogitEffects | None
    html: str
    title: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:  # the plain-text output beside the HTML: short, not the page
        return f"Dashboard({self.title!r}, latents={self.stats.latents.tolist()}, rows={self.stats.n_rows})"

    def save(self, path: str | Path) -> Path:
        """Write the dashboard as one self-contained HTML page (atomically)."""
        return write_dashboard(path, self.html, title=self.title)


def dashboard(sae: Any, X: Tensor, text_index: Any, position: Any, token_strs: Any, *, W_U: Tensor | None = None,
              tokenizer: Any = None, latents: Any = None, n_latents: int = 8, rule: str = "quantiles",
              n_top: int = 8, before: int = 12, after: int = 4, n_logits: int = 8, n_bins: int = 24,
              batch_size: int = 4096, title: str | None = None) -> Dashboard:
    """Cards for ``latents`` (None: ``n_latents`` chosen by ``rule``, :func:`choose_latents`) of ``sae`` over the
    rows ``X [N, d_in]`` (scaled as the SAE was trained) with their ``text_index`` and ``position`` [N] and the
    texts' ``token_strs``; the logit effect when ``W_U [vocab, d_in]`` (:func:`unembedding`) is given."""
    matrix(X, "X")
    for v, name in ((text_index, "text_index"), (position, "position")):
        _index_tensor(v, name, len(X))  # checked before the encoding pass
    _index_rows(torch.as_tensor(text_index).long(), torch.as_tensor(position).long(), after)  # distinct pairs
    stats = latent_stats(sae, X, latents, n_latents=n_latents, rule=rule, n_top=n_top, n_bins=n_bins,
                         batch_size=batch_size)
    logits = None if W_U is None else logit_effects(sae, stats.latents, W_U, n=n_logits)
    title = title or f"{type(sae).__name__}: {len(stats.latents)} latents over {len(X):,} tokens" + (
        f" (chosen by firing-frequency {stats.rule})" if stats.rule else "")
    fragment = render_dashboard(stats, text_index, position, token_strs, logits=logits, tokenizer=tokenizer,
                                before=before, after=after, title=title)
    return Dashboard(stats, logits, fragment, title)


__all__ = ["RULES", "choose_latents", "LatentStats", "latent_stats", "LogitEffects", "logit_effects", "unembedding",
           "TokenStrings", "token_strings", "render_dashboard", "write_dashboard", "Dashboard", "dashboard"]
