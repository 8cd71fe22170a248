"""Token-level data: positions, the exclusion rule, per-token prefix labels, token sets and splits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from adaptivek import (
    ExclusionRule,
    TokenSet,
    extract,
    last_token_rows,
    prefix_cut_points,
    prefix_labels,
    rows_of_texts,
    select_tokens,
    token_positions,
    truncate_to_tokens,
)

TEXTS = [  # one truncated at 40 tokens, one shorter than 16 tokens, two in between
    "Sparse autoencoders decompose the residual stream of a language model into many features, each of which "
    "should fire on a small and interpretable set of inputs, and the number of active features may depend on "
    "how complex the context is.",
    "Short one, too short.",
    "The capital of France is Paris, a city on the Seine with about two million people.",
    "A much longer sentence, with several clauses, that keeps going so that the batch needs padding.",
]
MAX_LENGTH, FIRST, EVERY = 40, 16, 8


class CharLength:
    """A fake scorer: the complexity of a prefix is its length in characters (so it grows with the prefix)."""

    def __init__(self, nan_at: int | None = None):
        self.nan_at, self.seen = nan_at, []

    def score(self, texts):
        self.seen.extend(texts)
        return pd.DataFrame({"complexity": [math.nan if len(t) == self.nan_at else float(len(t)) for t in texts]})


# ----------------------------------------------------------------------------------- positions, rows
def test_positions_rows_and_last_tokens_on_a_hand_made_index():
    ti = torch.tensor([0, 0, 0, 1, 3, 3, 7, 7, 7, 7])
    assert token_positions(ti).tolist() == [0, 1, 2, 0, 0, 1, 0, 1, 2, 3]
    assert last_token_rows(ti).tolist() == [2, 3, 5, 9]
    assert rows_of_texts(ti, [7, 0]).tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert rows_of_texts(ti, np.array([2])).tolist() == []  # a text without rows contributes none
    assert token_positions(torch.empty(0, dtype=torch.long)).tolist() == []


@pytest.mark.parametrize("text_index, match", [
    (torch.tensor([0, 0, 1, 0]), "not grouped by text"),
    (torch.tensor([0.0, 1.0]), "1-D integer"),
    (torch.tensor([[0, 1]]), "1-D integer"),
], ids=["text-reappears", "float", "2-d"])
def test_positions_refuse_a_bad_text_index(text_index, match):
    with pytest.raises(ValueError, match=match):
        token_positions(text_index)


def test_rows_of_texts_refuses_float_ids():
    with pytest.raises(ValueError, match="integer text ids"):
        rows_of_texts(torch.tensor([0, 1]), [0.5])


def test_cut_points_on_hand_made_lengths():
    cuts = prefix_cut_points(torch.tensor([10, 16, 17, 24, 40]), 16, 8)
    assert list(zip(cuts.text.tolist(), cuts.cut.tolist(), strict=True)) == [
        (1, 16), (2, 16), (2, 17), (3, 16), (3, 24), (4, 16), (4, 24), (4, 32), (4, 40)]
    no_end = prefix_cut_points(torch.tensor([10, 17]), 16, 8, include_end=False)
    assert no_end.text.tolist() == [1] and no_end.cut.tolist() == [16]


@pytest.mark.parametrize("kw, match", [
    ({"first": 0}, "first must be an int >= 1"),
    ({"every": 0}, "every must be an int >= 1"),
    ({"n_tokens_per_text": torch.tensor([1.5])}, "non-negative ints"),
    ({"n_tokens_per_text": torch.tensor([-1])}, "non-negative ints"),
], ids=["first-0", "every-0", "float-lengths", "negative-length"])
def test_cut_points_refuse_bad_input(kw, match):
    args = {"n_tokens_per_text": torch.tensor([20]), "first": 16, "every": 8} | kw
    with pytest.raises(ValueError, match=match):
        prefix_cut_points(**args)


# ------------------------------------------------------------------------------------------ exclusion
def _planted(d=8, n_texts=5, length=20, seed=0):
    """Rows with known norms: ~1 everywhere, 100 at position 0, one 50x token and one 5x token."""
    g = torch.Generator().manual_seed(seed)
    ti = torch.arange(n_texts).repeat_interleave(length)
    pos = torch.arange(length).repeat(n_texts)
    norms = 1 + 0.1 * torch.rand(len(ti), generator=g)
    norms[pos == 0] = 100.0
    late_median = float(np.median(norms[pos > 0].numpy()))  # 95 tokens: an odd count, one median
    big, mid = 2 * length + 5, 3 * length + 7  # text 2 position 5, text 3 position 7
    norms[big], norms[mid] = 50 * late_median, 5 * late_median
    direction = torch.nn.functional.normalize(torch.randn(len(ti), d, generator=g), dim=1)
    return direction * norms[:, None], ti, pos, big, mid


def test_exclusion_rule_on_constructed_norms():
    acts, ti, pos, big, mid = _planted()
    sel = select_tokens(acts, ti, ExclusionRule())
    assert sel.counts == {"total": 100, "first_positions": 5, "extreme_norm": 1, "kept": 94}
    assert not sel.keep[pos == 0].any() and not sel.keep[big] and sel.keep[mid]
    expected_median = float(np.median(acts.norm(dim=1)[pos > 0].numpy()))
    assert sel.median_norm == pytest.approx(expected_median, rel=1e-6)
    assert sel.threshold == pytest.approx(10 * expected_median, rel=1e-6)
    assert int(sel.keep.sum()) == sel.counts["kept"]


def test_exclusion_rule_variants_count_what_they_drop():
    acts, ti, pos, big, mid = _planted()
    two = select_tokens(acts, ti, ExclusionRule(drop_first=2))
    assert two.counts["first_positions"] == 10 and not two.keep[pos < 2].any()
    off = select_tokens(acts, ti, ExclusionRule(max_norm_ratio=None))
    assert off.counts == {"total": 100, "first_positions": 5, "extreme_norm": 0, "kept": 95} and off.threshold is None
    tight = select_tokens(acts, ti, ExclusionRule(max_norm_ratio=4.0))
    assert not tight.keep[mid] and tight.counts["extreme_norm"] == 2
    none = select_tokens(acts, ti, ExclusionRule(drop_first=0, max_norm_ratio=None))
    assert none.keep.all()


def test_exclusion_of_float16_activations_matches_float32():
    acts, ti, *_ = _planted()
    half = select_tokens(acts.half(), ti)
    assert torch.equal(half.keep, select_tokens(acts, ti).keep)


def _with(acts, row, value):
    acts = acts.clone()
    acts[row, 0] = value
    return acts


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN or inf in 1 token row"),
    ("inf", "NaN or inf in 1 token row"),
    ("all-first", "no token left"),
    ("length-mismatch", "paired row by row"),
    ("1-d", r"shape \[n, d\]"),
], ids=lambda c: c if isinstance(c, str) and " " not in c else None)
def test_select_tokens_refuses(case, match):
    acts, ti, *_ = _planted()
    args = {"nan": (_with(acts, 7, math.nan), ti), "inf": (_with(acts, 7, math.inf), ti),
            "all-first": (acts[:4], torch.arange(4)), "length-mismatch": (acts, ti[:-1]),
            "1-d": (acts[:, 0], ti)}[case]
    with pytest.raises(ValueError, match=match):
        select_tokens(*args)


@pytest.mark.parametrize("kw", [{"drop_first": -1}, {"drop_first": 1.0}, {"max_norm_ratio": 1.0},
                                {"max_norm_ratio": 0.5}, {"max_norm_ratio": math.inf}, {"max_norm_ratio": math.nan},
                                {"max_norm_ratio": True}],
                         ids=["negative-drop", "float-drop", "ratio-1", "ratio-half", "ratio-inf", "ratio-nan",
                              "ratio-bool"])
def test_exclusion_rule_refuses_bad_fields(kw):
    with pytest.raises(ValueError, match="drop_first|max_norm_ratio"):
        ExclusionRule(**kw)


# ------------------------------------------------------------------------------------- prefix labels
@pytest.fixture(scope="module")
def aligned(embedded_lm):
    acts, ti = extract(embedded_lm, TEXTS, 3, token="all", max_length=MAX_LENGTH, progress=False)
    scorer = CharLength()
    labels = prefix_labels(embedded_lm.tokenizer, TEXTS, MAX_LENGTH, scorer, first=FIRST, every=EVERY)
    return acts, ti, labels, scorer


def test_prefix_labels_align_with_extract_rows(aligned):
    acts, ti, labels, _ = aligned
    assert torch.equal(labels.text_index, ti) and len(labels.label) == len(acts)
    assert torch.equal(labels.position, token_positions(ti))
    lengths = torch.bincount(ti).tolist()
    assert lengths[0] == MAX_LENGTH and lengths[1] < FIRST < lengths[2]  # the cases the texts are chosen for


def test_prefix_labels_follow_the_prefix_each_token_has_read(aligned, embedded_lm):
    _, ti, labels, _ = aligned
    tok = embedded_lm.tokenizer
    for t, text in enumerate(TEXTS):  # a reference written with loops and the tokenizer's decode
        ids = tok([text], truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
        cuts = [c for c in range(FIRST, len(ids) + 1, EVERY)] + ([len(ids)] if len(ids) >= FIRST else [])
        got = labels.label[ti == t]
        for p in range(len(ids)):
            read = [c for c in cuts if c <= p + 1]
            if not read:
                assert math.isnan(got[p]), (t, p)
                continue
            prefix = tok.decode(ids[:max(read)], clean_up_tokenization_spaces=False)
            assert text.startswith(prefix) and got[p] == len(prefix), (t, p)
        diffs = got[~got.isnan()].diff()
        assert (diffs >= 0).all()  # non-decreasing within a text
        changed = (diffs != 0).nonzero().flatten() + FIRST  # positions where the label changes
        assert all(int(p) + 1 in cuts for p in changed)  # only at cut points


def test_prefix_labels_count_short_texts_and_unlabelled_tokens(aligned):
    _, ti, labels, scorer = aligned
    lengths = torch.bincount(ti)
    long = lengths >= FIRST
    assert labels.counts["texts"] == 4 and labels.counts["texts_short"] == 1
    assert labels.counts["tokens_in_short_texts"] == int(lengths[~long].sum())
    assert labels.counts["tokens_before_first"] == int(long.sum()) * (FIRST - 1)
    assert labels.counts["tokens_labelled"] == int((lengths[long] - FIRST + 1).sum())
    assert labels.counts["tokens_labelled"] + labels.counts["tokens_before_first"] + \
        labels.counts["tokens_in_short_texts"] == len(ti)
    assert labels.counts["prefixes"] == len(labels.prefixes) == len(scorer.seen)
    assert list(labels.prefixes.columns) == ["text", "cut", "prefix", "complexity"]


def test_an_unscored_prefix_gives_nan_labels_never_zero(embedded_lm):
    first = prefix_labels(embedded_lm.tokenizer, TEXTS, MAX_LENGTH, CharLength(), first=FIRST, every=EVERY)
    n_chars = int(first.prefixes["complexity"].iloc[1])  # the second prefix of the first text (cut 24)
    labels = prefix_labels(embedded_lm.tokenizer, TEXTS, MAX_LENGTH, CharLength(nan_at=n_chars), first=FIRST,
                           every=EVERY)
    assert labels.counts["prefixes_unscored"] == 1 and labels.counts["tokens_unscored"] == EVERY
    assert labels.label.isnan().sum() == first.label.isnan().sum() + EVERY and not (labels.label == 0).any()


def test_last_token_label_is_the_rubric_score_of_what_the_model_read(embedded_lm):
    from adaptivek import RubricScorer

    texts = [TEXTS[0], TEXTS[2], TEXTS[3]]  # each at least FIRST tokens
    labels = prefix_labels(embedded_lm.tokenizer, texts, MAX_LENGTH, first=FIRST, every=EVERY)
    last = labels.label[last_token_rows(labels.text_index)]
    whole = RubricScorer().score(truncate_to_tokens(embedded_lm.tokenizer, texts, MAX_LENGTH))["complexity"]
    assert torch.allclose(last.double(), torch.tensor(whole.to_numpy()), atol=1e-5)
    ok = labels.label[~labels.label.isnan()]
    assert ((ok >= 0) & (ok <= 10)).all()


class NotFast:
    is_fast = False


@pytest.mark.parametrize("case, match", [
    ("none-reaches-first", "no text reaches first=16"),
    ("no-score-method", "must have a .score"),
    ("wrong-rows", "one row per text"),
    ("slow-tokenizer", "not a fast tokenizer"),
    ("empty-text", "empty or whitespace"),
    ("bad-max-length", "max_length must be an int >= 1"),
], ids=lambda c: c if isinstance(c, str) and " " not in c else None)
def test_prefix_labels_refuse(case, match, smol_tokenizer):
    class WrongRows:
        def score(self, texts):
            return pd.DataFrame({"complexity": [1.0]})

    kw = {"tokenizer": smol_tokenizer, "texts": TEXTS, "max_length": MAX_LENGTH, "scorer": CharLength()}
    kw |= {"none-reaches-first": {"texts": [TEXTS[1]]}, "no-score-method": {"scorer": object()},
           "wrong-rows": {"scorer": WrongRows()}, "slow-tokenizer": {"tokenizer": NotFast()},
           "empty-text": {"texts": ["fine", " "]}, "bad-max-length": {"max_length": 0}}[case]
    with pytest.raises((ValueError, TypeError), match=match):
        prefix_labels(**kw)


# ------------------------------------------------------------------------------------------- token set
def test_last_token_rows_equal_extract_last(embedded_lm):
    acts, ti = extract(embedded_lm, TEXTS, 3, token="all", max_length=MAX_LENGTH, progress=False)
    last = extract(embedded_lm, TEXTS, 3, token="last", max_length=MAX_LENGTH, progress=False)
    rows = last_token_rows(ti)
    assert torch.equal(ti[rows], torch.arange(len(TEXTS)))
    assert torch.allclose(acts[rows], last, atol=1e-4, rtol=1e-4)


def _rows(n_texts, length, d=8):
    """Random activations for ``n_texts`` texts of ``length`` tokens each, as extract(token="all") lays them out."""
    return torch.randn(n_texts * length, d), torch.arange(n_texts).repeat_interleave(length)


def _token_set():
    acts, ti = _rows(6, 4)
    return TokenSet.from_extract(acts, ti, ["a", "a", "b", "c", "c", "d"], label=torch.arange(len(ti)).float())


def test_token_set_selects_and_splits_texts_to_rows():
    ts = _token_set()
    assert ts.position.tolist()[:5] == [0, 1, 2, 3, 0] and ts.document[4] == "a" and ts.document[8] == "b"
    late = ts.select(ts.position >= 1)
    assert len(late) == 18 and (late.position >= 1).all() and torch.equal(late.label, ts.label[ts.position >= 1])
    train, test = late.split([0, 1, 3, 4], [2, 5])
    assert len(train) == 12 and len(test) == 6
    assert set(train.document) == {"a", "c"} and set(test.document) == {"b", "d"}
    assert torch.equal(test.acts, ts.acts[rows_of_texts(ts.text_index, [2, 5])][[1, 2, 3, 5, 6, 7]])


@pytest.mark.parametrize("sets, match", [
    (([0, 2], [2, 3]), "share 1 text"),
    (([0, 2], [1, 3]), "share 1 source document"),
], ids=["shared-text", "shared-document"])
def test_token_set_split_refuses_leaks(sets, match):
    with pytest.raises(ValueError, match=match):
        _token_set().split(*sets)


def test_token_set_split_allows_a_measured_leak():
    a, b = _token_set().split([0, 2], [1, 3], allow_shared_documents=True)
    assert set(a.document) & set(b.document) == {"a"}


@pytest.mark.parametrize("case, match", [
    ("documents-too-few", "one id per text"),
    ("label-length", "one entry per row"),
    ("mask-shape", "row mask must have shape"),
    ("document-missing", "missing id"),
], ids=lambda c: c if isinstance(c, str) and " " not in c else None)
def test_token_set_refuses_bad_input(case, match):
    acts, ti = _rows(3, 4)
    with pytest.raises(ValueError, match=match):
        if case == "documents-too-few":
            TokenSet.from_extract(acts, ti, ["a", "b"])
        elif case == "document-missing":
            TokenSet.from_extract(acts, ti, ["a", None, "c"])
        elif case == "label-length":
            TokenSet.from_extract(acts, ti, ["a", "b", "c"], label=torch.zeros(3))
        else:
            TokenSet.from_extract(acts, ti, ["a", "b", "c"]).select(torch.ones(3, dtype=torch.bool))
