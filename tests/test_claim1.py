"""Claim 1's tests (adaptivek.claim1) on tiny synthetic data whose answer is known by construction."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from adaptivek import claim1
from adaptivek.claim1 import (
    PAIR_CHANCE,
    chunk_texts,
    claim1_verdicts,
    incremental_r2,
    leave_one_source_out,
    level_ordering,
    order_sensitivity,
    residualize,
    rubric_features,
    shuffle_words,
    source_transfer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "The committee postponed its decision. However, the members agreed that further analysis was required."


def _sources_data(n_docs=36, per_doc=3, seed=0):
    """Rows of three sources with a source offset in y; ``signal`` carries y's within-source part."""
    g = torch.Generator().manual_seed(seed)
    n = n_docs * per_doc
    docs = np.array([f"d{i // per_doc}" for i in range(n)], dtype=object)
    src = np.array([f"s{(i // per_doc) % 3}" for i in range(n)], dtype=object)
    within = torch.randn(n, generator=g, dtype=torch.float64)
    offset = torch.tensor([3.0 * int(s[1]) for s in src], dtype=torch.float64)
    y = offset + within
    noise = torch.randn(n, 4, generator=g, dtype=torch.float64)
    signal = torch.cat([within[:, None] + 0.1 * noise[:, :1], noise[:, 1:]], 1)  # knows the within part only
    onehot = torch.nn.functional.one_hot(torch.tensor([int(s[1]) for s in src])).double()
    source_only = torch.cat([onehot, noise], 1)  # knows the source only
    return y, src, docs, signal, source_only


# ----------------------------------------------------------------------------- features and texts
@pytest.mark.slow  # loads the word-frequency tables (seconds)
def test_rubric_features_are_the_rubrics_raw_features():
    from adaptivek.complexity import FEATURES, features

    F = rubric_features([TEXT, TEXT.upper()])  # an all-capital text has undefined word rates
    names = [f for fs in FEATURES.values() for f in fs]
    assert F.shape == (2, len(names)) and torch.isfinite(F).all()
    raw = features([TEXT])
    assert torch.allclose(F[0], torch.tensor(raw[names].to_numpy()[0]))


def test_shuffle_words_keeps_the_bag_and_is_seeded():
    a, b = shuffle_words([TEXT, "one"], seed=1), shuffle_words([TEXT, "one"], seed=1)
    assert a == b and a[1] == "one"
    assert Counter(a[0].split()) == Counter(TEXT.split()) and a[0] != TEXT
    assert shuffle_words([TEXT], seed=2) != a[:1]


@pytest.mark.slow  # loads the embedded tokenizer
def test_chunk_texts_cover_the_text_in_windows_that_fit(smol_tokenizer):
    text = " ".join([TEXT] * 12)
    ch = chunk_texts(smol_tokenizer, [text, "Short text."], max_length=32)
    assert ch.text_index.tolist().count(1) == 1 and ch.read[1] == "Short text."
    n0 = int((ch.text_index == 0).sum())
    assert n0 >= 3 and ch.read[0] == text
    assert all(len(smol_tokenizer(c)["input_ids"]) <= 32 for c in ch.texts)
    capped = chunk_texts(smol_tokenizer, [text], max_length=32, max_chunks=2)
    assert capped.texts == ch.texts[:2] and text.startswith(capped.read[0]) and len(capped.read[0]) < len(text)


# ----------------------------------------------------------------------------- sources
def test_leave_one_source_out_needs_within_source_signal():
    y, src, docs, signal, source_only = _sources_data()
    good = leave_one_source_out(signal, y, src, docs, min_n=10, n_boot=50)
    assert list(good.index) == ["s0", "s1", "s2"] and (good["pearson_lo"] > 0.5).all()
    assert (good["n"] + good["n_train"] == len(y)).all()
    bad = leave_one_source_out(source_only, y, src, docs, min_n=10, n_boot=50)
    assert (bad["pearson"].abs() < good["pearson"]).all()


def test_source_transfer_separates_within_source_from_which_source():
    y, src, docs, signal, source_only = _sources_data()
    test = torch.arange(len(y))[torch.tensor([int(d[1:]) % 4 == 0 for d in docs])]
    train = torch.arange(len(y))[torch.tensor([int(d[1:]) % 4 != 0 for d in docs])]
    summary, loso = source_transfer({"signal": signal, "source only": source_only}, y, src, docs, train, test,
                                    min_n=5, n_boot=50)
    assert summary.loc["signal", "within_lo"] > 0.5
    assert summary.loc["source only", "within"] < summary.loc["signal", "within_lo"]
    assert summary.loc["source only", "pooled_lo"] > 0.5  # the offsets alone give a pooled correlation
    assert set(loso.index.get_level_values("model")) == {"signal", "source only"}


# ----------------------------------------------------------------------------- incremental validity
def test_incremental_r2_detects_what_extra_adds_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n = 120
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    y = a + b
    docs = [f"d{i // 2}" for i in range(n)]
    base = torch.cat([a[:, None], torch.randn(n, 2, generator=g, dtype=torch.float64)], 1)
    adds = incremental_r2(base, b[:, None], y, docs, n_boot=100)
    assert adds["delta_lo"] > 0.2 and adds["r2_full"] > adds["r2_base"]
    assert adds["pred_full"].shape == (n,) and adds["n_documents"] == n // 2
    noise = incremental_r2(base, torch.randn(n, 3, generator=g, dtype=torch.float64), y, docs, n_boot=100)
    assert noise["delta_lo"] <= 0


def test_stacking_recovers_an_exact_combination_out_of_fold():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    base = 0.5 * y + torch.randn(30, generator=g, dtype=torch.float64)
    folds = [torch.arange(i, 30, 3) for i in range(3)]
    assert torch.allclose(claim1._stack(base, y - base, y, folds), y)


# ----------------------------------------------------------------------------- word order
def test_order_sensitivity_measures_moves_pairwise():
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(40, generator=g, dtype=torch.float64)
    docs = [f"d{i // 4}" for i in range(40)]
    table = order_sensitivity((y0, y0 + 1.0), (y0, y0), (y0, y0 - 0.5), docs, n_boot=50)
    assert table.loc["probe: mean |move|", "estimate"] == pytest.approx(1.0)
    assert table.loc["probe minus baseline |move|", ["estimate", "lo", "hi"]].tolist() == pytest.approx([1.0] * 3)
    assert table.loc["label: mean |move|", "estimate"] == pytest.approx(0.5)
    assert table.loc["probe on shuffled texts (Pearson with original labels)", "estimate"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- OneStopEnglish as labels
def _levels(n_topics=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.arange(3, dtype=torch.float64).repeat(n_topics)  # [3 T]
    topics = [f"t{i // 3}" for i in range(3 * n_topics)]
    article = torch.randn(n_topics, generator=g, dtype=torch.float64).repeat_interleave(3)
    return levels, topics, article, g


def test_level_ordering_counts_pairs_within_articles():
    levels, topics, _, _ = _levels(5)
    up = level_ordering(levels, levels, topics, n_boot=50)
    assert (up["pairwise"], up["ordered"], up["n_topics"]) == (1.0, 1.0, 5)
    down = level_ordering(-levels, levels, topics, n_boot=50)
    assert (down["pairwise"], down["ordered"]) == (0.0, 0.0)


def test_residualize_removes_the_linear_part():
    b = torch.linspace(0, 1, 10, dtype=torch.float64)
    extra = torch.tensor([1.0, -1.0] * 5, dtype=torch.float64)
    r = residualize(2 * b + 1 + extra, b)
    assert float(torch.dot(r, b - b.mean()).abs()) < 1e-9 and float(r.abs().max()) > 0.5


def test_onestop_as_labels_residual_ordering():
    levels, topics, article, g = _levels()
    lexical = torch.stack([levels + 0.8 * torch.randn(len(levels), generator=g, dtype=torch.float64), article], 1)
    copy = lexical[:, :1] + 0.01 * torch.randn(len(levels), 1, generator=g, dtype=torch.float64)
    more = torch.cat([levels[:, None] + 0.1 * torch.randn(len(levels), 1, generator=g, dtype=torch.float64), article[:, None]], 1)
    adds = claim1.onestop_as_labels(more, lexical, levels, topics, n_boot=50)
    assert adds["residual_pairwise_lo"] > PAIR_CHANCE and adds["delta_lo"] > 0
    assert adds["spearman_hidden"] > adds["spearman_lexical"]
    same = claim1.onestop_as_labels(copy, lexical, levels, topics, n_boot=50)
    assert same["delta_lo"] <= 0.05 and same["residual_pairwise_lo"] < adds["residual_pairwise_lo"]


# ----------------------------------------------------------------------------- verdicts
def _evidence(**over):
    kw = dict(probe_pearson=0.8, null_pearson=np.linspace(-0.3, 0.3, 49),
              beyond_length={"dpearson": 0.1, "dpearson_lo": 0.05, "dpearson_hi": 0.15},
              incremental={"delta": 0.01, "delta_lo": -0.01, "delta_hi": 0.03, "r2_base": 0.8, "r2_full": 0.81})
    return {**kw, **over}


def test_verdicts_answer_each_question_from_its_number():
    v = claim1_verdicts(**_evidence())
    assert v["decodable"]["answer"] == "yes" and v["decodable"]["p"] == pytest.approx(1 / 50)
    assert v["beyond_length"]["answer"] == "yes" and v["beyond_lexical"]["answer"] == "no"
    assert {v[k]["answer"] for k in ("order_sensitive", "transfers", "human_beyond_lexical")} == {"not measured"}
    inside = claim1_verdicts(**_evidence(probe_pearson=0.25))  # inside the null band: not decodable, though > 0
    assert inside["decodable"]["answer"] == "no"
    order = pd.DataFrame({"estimate": [0.2, 0.5], "lo": [0.1, 0.3], "hi": [0.3, 0.7]},
                         index=["probe minus baseline |move|", "probe move vs label move (Pearson)"])
    h = {"residual_pairwise": 0.52, "residual_pairwise_lo": 0.45, "residual_pairwise_hi": 0.6, "residual_n_topics": 20}
    v2 = claim1_verdicts(**_evidence(word_order=order, human_labels=h,
                                     transfer={"spearman": 0.2, "spearman_lo": 0.1, "spearman_hi": 0.3}))
    assert (v2["order_sensitive"]["answer"], v2["transfers"]["answer"], v2["human_beyond_lexical"]["answer"]) == \
        ("yes", "yes", "no")
    wrong_way = order.assign(lo=[0.1, -0.35], estimate=[0.2, -0.05])  # moves more, but not as the label does
    assert claim1_verdicts(**_evidence(word_order=wrong_way))["order_sensitive"]["answer"] == "no"


# ----------------------------------------------------------------------------- bad inputs
_Y = torch.arange(6, dtype=torch.float64)
_BAD = {
    "loso one source": (lambda: leave_one_source_out(torch.ones(6, 2), _Y, ["a"] * 6, list("abcdef")), "2 sources"),
    "loso lengths": (lambda: leave_one_source_out(torch.ones(5, 2), _Y, ["a"] * 6, list("abcdef")),
                     "different lengths"),
    "incremental rows": (lambda: incremental_r2(torch.ones(5, 2), torch.ones(6, 2), _Y, list("abcdef")), "one row per"),
    "chunks max_chunks": (lambda: chunk_texts(None, ["a"], 8, 0), "max_chunks"),
    "levels out of range": (lambda: level_ordering(_Y, _Y, list("aabbcc")), "levels must be"),
    "residualize lengths": (lambda: residualize(_Y, _Y[:4]), "same length"),
    "rubric no words": (lambda: rubric_features(["...", TEXT]), "no words"),
    "order lengths": (lambda: order_sensitivity((_Y, _Y), (_Y, _Y), (_Y, _Y), list("abc")), "one entry per"),
}


@pytest.mark.parametrize("case", list(_BAD), ids=list(_BAD))
def test_bad_inputs_raise_clear_errors(case):
    fn, match = _BAD[case]
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.slow
def test_lexical_baseline_and_pooled_readout_on_a_tiny_model(tiny_neox):
    from adaptivek import extract
    from adaptivek.linear_encoding import mean_pool

    texts = [" ".join([TEXT] * 4), TEXT]
    lex = claim1.lexical_baseline(tiny_neox, texts, 32)
    assert lex.shape == (2, 64 + 6 + 29) and lex.dtype == torch.float64
    X, read = claim1.pooled_chunk_readout(tiny_neox, texts, 2, max_length=32, max_chunks=2)
    ch = chunk_texts(tiny_neox.tokenizer, texts, 32, 2)
    acts, idx = extract(tiny_neox, ch.texts, 2, token="all", max_length=32, progress=False)
    chunk_means = mean_pool(acts.double(), idx, len(ch.texts))
    assert read == ch.read and X.shape == (2, 64)
    assert torch.allclose(X[0], chunk_means[ch.text_index == 0].mean(0)) and not math.isnan(float(X.sum()))
