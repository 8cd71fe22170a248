"""Feature dashboards (adaptivek.dashboard): statistics, latent choice, logit effect, HTML, errors."""

from __future__ import annotations

import re

import pytest
import torch

from adaptivek.dashboard import (
    choose_latents,
    dashboard,
    latent_stats,
    logit_effects,
    render_dashboard,
    token_strings,
    unembedding,
    write_dashboard,
)
from adaptivek.probe import RidgeProbe
from adaptivek.sae import AdaptiveKSAE, BatchTopKSAE, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEXTS, LEN, D_IN, D_SAE = 5, 12, 16, 32
PLANTED, DEAD = 7, 8  # a latent that fires only where dimension 0 is set; one that never fires
PLANT_ROWS, PLANT_VALUES = [5, 17, 30, 44], [3.0, 9.0, 6.0, 12.0]


def _rows():
    """Five texts of twelve tokens: text and position of each row, and distinct token strings."""
    text_index = torch.arange(N_TEXTS).repeat_interleave(LEN)
    position = torch.arange(LEN).repeat(N_TEXTS)
    strs = [[f"t{t}p{p}" for p in range(LEN)] for t in range(N_TEXTS)]
    return text_index, position, strs


def _planted_sae(cls=TopKSAE, **kw):
    """An SAE whose latent PLANTED reads only dimension 0 (weight 1) and whose latent DEAD never fires."""
    sae = cls(D_IN, D_SAE, **kw, seed=0) if cls is AdaptiveKSAE else cls(D_IN, D_SAE, 4, seed=0)
    with torch.no_grad():
        sae.W_enc.mul_(0.1)
        sae.W_enc[0] = 0.0
        sae.W_enc[:, PLANTED] = 0.0
        sae.W_enc[0, PLANTED] = 1.0
        sae.b_enc[DEAD] = -100.0
    return sae.eval()


def _X(seed=0):
    """Random rows with dimension 0 zero except at PLANT_ROWS, where it holds PLANT_VALUES."""
    X = torch.randn(N_TEXTS * LEN, D_IN, generator=torch.Generator().manual_seed(seed))
    X[:, 0] = 0.0
    X[PLANT_ROWS, 0] = torch.tensor(PLANT_VALUES)
    return X


def _adaptive(X):
    y = 5 + 3 * X[:, 1]  # a label the probe can read, so k varies across rows
    probe = RidgeProbe.fit(X, y, folds=3)
    return _planted_sae(AdaptiveKSAE, probe=probe, k_min=2, k_max=12)


# ----------------------------------------------------------------------------------- statistics
def test_planted_latent_top_contexts_are_its_rows():
    sae, X = _planted_sae(), _X()
    st = latent_stats(sae, X, [PLANTED, 3], n_top=6, batch_size=7)  # chunks of 7: row offsets matter
    order = sorted(range(4), key=lambda i: -PLANT_VALUES[i])
    assert st.top_rows[0, :4].tolist() == [PLANT_ROWS[i] for i in order]
    assert torch.allclose(st.top_values[0, :4], torch.tensor([PLANT_VALUES[i] for i in order]))
    assert st.top_rows[0, 4:].tolist() == [-1, -1] and st.top_values[0, 4:].isnan().all()
    assert int(st.counts[0]) == 4


@pytest.mark.parametrize("batch_size", [7, 4096])
def test_stats_match_dense_codes(batch_size):
    sae, X = _planted_sae(), _X(1)
    latents = [PLANTED, 0, 5, 31]
    st = latent_stats(sae, X, latents, batch_size=batch_size, n_bins=5)
    dense = sae.encode(X).detach()  # [N, d_sae]
    assert torch.allclose(st.acts, dense[:, latents])
    assert torch.equal(st.counts, (dense[:, latents] > 0).sum(0))
    assert torch.allclose(st.freq_all, (dense > 0).double().mean(0))
    assert torch.equal(st.hist_counts.sum(1), st.counts)  # every firing lands in one bin
    assert st.rule is None and not st.k_varies


def test_histogram_bins_hold_their_values():
    sae, X = _planted_sae(), _X()
    st = latent_stats(sae, X, [PLANTED], n_bins=4)  # values 3, 6, 9, 12 over [0, 12]: bins of width 3
    assert torch.allclose(st.hist_edges[0], torch.tensor([0.0, 3.0, 6.0, 9.0, 12.0]))
    assert st.hist_counts[0].tolist() == [0, 1, 1, 2]  # 3 -> [3, 6); 6 -> [6, 9); 9 and 12 -> the last bin


def test_adaptivek_k_is_the_saes_and_shown():
    X = _X()
    sae = _adaptive(X)
    k = sae.encode_sparse(X).k
    assert len(torch.unique(k)) > 1
    text_index, position, strs = _rows()
    dash = dashboard(sae, X, text_index, position, strs, latents=[PLANTED, 2], before=3, after=2)
    st = dash.stats
    assert st.k_varies and torch.equal(st.k, k)
    for j in range(2):
        fires = st.acts[:, j] > 0
        assert torch.isclose(st.mean_k[j], k[fires].double().mean())
    shown = re.findall(r"data-row='(\d+)' data-k='(\d+)'", dash.html)
    assert shown and all(int(kk) == int(k[int(r)]) for r, kk in shown)


def test_topk_cards_show_no_k():
    text_index, position, strs = _rows()
    dash = dashboard(_planted_sae(), _X(), text_index, position, strs, latents=[PLANTED])
    assert "data-row=" in dash.html and "data-k=" not in dash.html and "mean k" not in dash.html


def test_batchtopk_in_training_mode_is_left_as_it_was():
    sae = BatchTopKSAE(D_IN, D_SAE, 4, seed=0).train()
    st = latent_stats(sae, _X(), [0, 1, 2])
    assert sae.training and sae.threshold.isnan()  # encoded in eval mode: no threshold learned, mode restored
    assert int(st.k.sum()) == 4 * len(st.k)  # the batch rule: k * B latents in each chunk


class _DenseOnly:
    """An SAE that offers only ``encode`` (dense codes) and ``W_dec``."""

    def __init__(self, sae):
        self.sae, self.W_dec = sae, sae.W_dec

    def encode(self, x):
        return self.sae.encode(x)


def test_encode_only_sae_gives_the_same_stats():
    sae, X = _planted_sae(), _X(2)
    a, b = latent_stats(sae, X, [PLANTED, 4, 9]), latent_stats(_DenseOnly(sae), X, [PLANTED, 4, 9])
    assert torch.allclose(a.acts, b.acts) and torch.equal(a.top_rows, b.top_rows)
    assert torch.equal(b.k, (sae.encode(X) > 0).sum(1))  # k of an encode-only SAE: its L0


# ----------------------------------------------------------------------------------- choosing latents
@pytest.mark.parametrize("rule,n,want", [("quantiles", 3, [2, 4, 1]), ("most_frequent", 2, [1, 6]),
                                         ("quantiles", 9, [2, 5, 4, 6, 1]), ("quantiles", 1, [2])])
def test_choose_latents_rule(rule, n, want):
    freq = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.3, 0.2, 0.4])  # live by frequency: 2, 5, 4, 6, 1
    assert choose_latents(freq, n, rule).tolist() == want


def test_choose_latents_ties_by_index_and_stats_use_it():
    assert choose_latents(torch.tensor([0.2, 0.2, 0.0, 0.2]), 2).tolist() == [0, 3]
    sae, X = _planted_sae(), _X()
    st = latent_stats(sae, X, n_latents=4)
    assert st.rule == "quantiles" and torch.equal(st.latents, choose_latents(st.freq_all, 4))
    assert DEAD not in st.latents.tolist()


# ----------------------------------------------------------------------------------- logit effect
def test_logit_effect_order_is_the_argsort():
    sae = _planted_sae()
    W_U = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(3))
    latents = [PLANTED, 1, 30]
    eff = logit_effects(sae, latents, W_U, n=5)
    full = sae.W_dec.detach()[latents] @ W_U.T  # [3, 50]
    assert torch.equal(eff.promoted_ids, torch.argsort(full, dim=1, descending=True)[:, :5])
    assert torch.equal(eff.suppressed_ids, torch.argsort(full, dim=1)[:, :5])
    assert torch.allclose(eff.promoted, full.gather(1, eff.promoted_ids))


# ----------------------------------------------------------------------------------- HTML
def _context_line(html, row):
    """The context line whose active (outlined) token is ``row``."""
    active = re.compile(rf"outline:2px solid #1f4e9e;font-weight:600;' title='[^']*' data-row='{row}'")
    return next(line for line in html.split("<div style='padding:2px 0") if active.search(line))


def test_context_window_and_excluded_tokens():
    text_index, position, strs = _rows()
    keep = torch.ones(len(text_index), dtype=torch.bool)
    keep[16] = False  # text 1, position 4: an excluded token beside the planted one (text 1, position 5)
    X = _X()[keep]
    dash = dashboard(_planted_sae(), X, text_index[keep], position[keep], strs, latents=[PLANTED], before=3, after=2)
    line = _context_line(dash.html, 16)  # row 17 of the full set is row 16 of the subset
    toks = re.findall(r">(t\dp\d+)</span>", line)
    assert toks == [f"t1p{p}" for p in range(2, 8)]
    assert re.search(r"not among the encoded rows \(excluded\)'>t1p4<", line)


def test_tokens_are_escaped_and_whitespace_visible(tmp_path):
    text_index, position, strs = _rows()
    strs[1][3:8] = ["<script>alert(1)</script>", " & ", "\"q'", "\n", "  "]  # around the planted token (1, 5)
    dash = dashboard(_planted_sae(), _X(), text_index, position, strs, latents=[PLANTED], before=3, after=2,
                     title="<b>x</b> & y")
    h = dash.html
    assert "<script" not in h and "&lt;script&gt;alert(1)&lt;/script&gt;" in h
    assert "&quot;q&#x27;" in h and " &amp; " in h and ">↵<" in h and ">··<" in h
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in h
    path = dash.save(tmp_path / "d.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and h in page and "<svg" in page
    assert "src=" not in page and "<link" not in page  # self-contained: nothing to fetch
    assert dash._repr_html_() == h and not list(tmp_path.glob(".*partial*"))


# ----------------------------------------------------------------------------------- errors
def _call(case):
    sae, X = _planted_sae(), _X()
    ti, pos, strs = _rows()
    kw = dict(latents=[PLANTED])
    if case == "latent-out-of-range":
        kw["latents"] = [D_SAE]
    elif case == "latent-negative":
        kw["latents"] = [-1]
    elif case == "latent-repeated":
        kw["latents"] = [1, 1]
    elif case == "latent-float":
        kw["latents"] = [1.5]
    elif case == "no-live-latent-asked":
        kw["latents"] = [DEAD]
    elif case == "X-width":
        X = X[:, :5]
    elif case == "text-index-length":
        ti = ti[:-1]
    elif case == "position-length":
        pos = pos[1:]
    elif case == "text-index-float":
        ti = ti.float()
    elif case == "pairs-repeat":
        pos = torch.zeros_like(pos)
    elif case == "W_U-width":
        kw["W_U"] = torch.randn(50, D_IN + 1)
    elif case == "W_U-transposed":
        kw["W_U"] = torch.randn(D_IN, 50)
    elif case == "token-strs-short":
        strs = [s[:4] for s in strs]
    elif case == "token-strs-missing":
        strs = {0: strs[0]}
    elif case == "rule":
        kw = dict(rule="random")
    elif case == "n-top":
        kw["n_top"] = 0
    elif case == "not-an-sae":
        sae = torch.nn.Linear(3, 3)
    return dashboard(sae, X, ti, pos, strs, **kw)


ERRORS = {
    "latent-out-of-range": (ValueError, "out of range: this SAE has d_sae=32"),
    "latent-negative": (ValueError, "out of range"),
    "latent-repeated": (ValueError, "repeat an index"),
    "latent-float": (ValueError, "integer latent indices"),
    "no-live-latent-asked": (ValueError, "none of the latents"),
    "X-width": (ValueError, "X must have shape"),
    "text-index-length": (ValueError, "text_index has 59 entries"),
    "position-length": (ValueError, "position has 59 entries"),
    "text-index-float": (ValueError, "text_index must be a 1-D integer tensor"),
    "pairs-repeat": (ValueError, "pairs repeat"),
    "W_U-width": (ValueError, r"W_U must be the unembedding matrix \[vocab, d_in=16\]"),
    "W_U-transposed": (ValueError, "transposed"),
    "token-strs-short": (ValueError, "do not match the activations"),
    "token-strs-missing": (ValueError, "no entry for text"),
    "rule": (ValueError, "rule must be one of"),
    "n-top": (ValueError, "n_top must be an int >= 1"),
    "not-an-sae": (TypeError, "must have a decoder W_dec"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input(case):
    err, msg = ERRORS[case]
    with pytest.raises(err, match=msg):
        _call(case)


@pytest.mark.parametrize("case,call,msg", [
    ("no-live-latent", lambda: choose_latents(torch.zeros(5)), "no live latent"),
    ("freq-2d", lambda: choose_latents(torch.ones(2, 2)), "1-D tensor"),
    ("write-not-html", lambda: write_dashboard("x.html", None), "HTML string"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_bad_input_helpers(case, call, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        call()


def test_render_refuses_logits_of_other_latents():
    sae, X = _planted_sae(), _X()
    ti, pos, strs = _rows()
    st = latent_stats(sae, X, [PLANTED, 1])
    eff = logit_effects(sae, [PLANTED], torch.randn(20, D_IN))
    with pytest.raises(ValueError, match="logits covers 1 latents but stats has 2"):
        render_dashboard(st, ti, pos, strs, logits=eff)


# ----------------------------------------------------------------------------------- embedded model
@pytest.mark.slow
def test_embedded_model_tokens_align_with_extract(embedded_lm):
    from adaptivek.activations import extract

    lm = embedded_lm
    texts = ["The cat sat on the mat.\nIt purred <loudly> & slept.", "Tokens: \"quotes\", 'ticks' and\ttabs."]
    acts, ti = extract(lm, texts, 3, token="all", max_length=16, progress=False)
    ts = token_strings(lm.tokenizer, texts, 16)
    assert [len(ts[i]) for i in range(2)] == torch.bincount(ti).tolist()  # one string per activation row
    W_U, raw = unembedding(lm), unembedding(lm, fold_norm=False)
    assert W_U.shape[1] == acts.shape[1] and W_U.shape[0] >= len(lm.tokenizer)
    assert torch.allclose(W_U, raw * lm._module.model.norm.weight.float())  # SmolLM2's final RMSNorm folded in
    X = acts / acts.norm(dim=1, keepdim=True).median()
    sae = TopKSAE(acts.shape[1], 64, 4, seed=0).eval()
    from adaptivek.tokens import token_positions

    dash = dashboard(sae, X, ti, token_positions(ti), ts, W_U=W_U, tokenizer=lm.tokenizer, n_latents=3, n_logits=3)
    assert len(dash.stats.latents) == 3 and dash.html.count("logit effect: promoted") == 3
