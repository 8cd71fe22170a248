"""RubricScorer's mechanics (range, weights, bad input, determinism, calibration, and monotonic on pairs built
from the rubric's definition), and the validation helpers that report (never assert) agreement with labels."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from adaptivek.complexity import CALIBRATION_PATH, COLUMNS, DIMENSIONS, RubricScorer
from adaptivek.corpus import load_corpus
from adaptivek.stats import auroc, ordered_share, spearman
from adaptivek.validation import (
    READABILITY_INDICES,
    cached_llm_labels,
    group_spearman_ci,
    level_agreement,
    llm_agreement,
    readability_scores,
)

SIMPLE = "The cat sat on the mat. It was a sunny day. The dog ran to the cat. They played in the sun."
HARD = ("Notwithstanding the heterogeneity of epistemological frameworks, the constitutive indeterminacy of "
        "quantum-mechanical observables, as formalised by non-commuting self-adjoint operators on a Hilbert "
        "space, necessitates a reconceptualisation of measurement whereby the ontological status of "
        "eigenvalues remains contingent upon the experimental arrangement.")


@pytest.fixture(scope="module")
def scorer() -> RubricScorer:
    return RubricScorer()


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return load_corpus("embedded", n=400, seed=3)["text"]


def test_range_columns_and_weights(scorer, sample):
    df = scorer.score(sample)
    assert list(df.columns) == COLUMNS and len(df) == len(sample)
    assert df.notna().all(axis=None)
    assert ((df >= 0) & (df <= 10)).all(axis=None)
    assert df["complexity"].to_numpy() == pytest.approx(sum(df[d] * w for d, w in DIMENSIONS.items()).to_numpy())
    assert sum(DIMENSIONS.values()) == pytest.approx(1.0)
    assert df["complexity"].std() > 0.8  # the scores spread, they are not all ~5
    s = scorer.score([SIMPLE, HARD])["complexity"]
    assert s[0] < 3.5 < 6.5 < s[1]


def test_deterministic_and_batch_independent(scorer, sample):
    a = scorer.score(sample[:50])
    b = scorer.score(sample[:50])
    pd.testing.assert_frame_equal(a, b)
    alone = scorer.score([sample[7]])
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), a.iloc[[7]].reset_index(drop=True))


def test_empty_and_whitespace_are_nan_with_warning(scorer):
    with pytest.warns(UserWarning, match="2 empty or whitespace-only"):
        df = scorer.score([SIMPLE, "", " \n\t ", HARD])
    assert df.iloc[[1, 2]].isna().all(axis=None)
    assert df.iloc[[0, 3]].notna().all(axis=None)
    with pytest.warns(UserWarning, match="no words"):
        assert scorer.score(["12 34 !!! 56"]).isna().all(axis=None)
    assert scorer.score([]).columns.tolist() == COLUMNS


def test_non_english_and_binary_do_not_crash(scorer):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    texts = ["Der schnelle braune Fuchs springt über den faulen Hund, während es regnet.",
             "敏捷的棕色狐狸跳过了懒狗。这是一个测试。", "Быстрая коричневая лиса прыгает через ленивую собаку.",
             junk.decode("latin-1"), "\x00\x01\x02 word \x7f\ufffd", "a" * 5000, "ÅÄÖ " * 50]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = scorer.score(texts)
        by_bytes = scorer.score([junk, b"plain text as bytes"])
    assert len(df) == len(texts)
    assert ((df.dropna() >= 0) & (df.dropna() <= 10)).all(axis=None)
    assert df.iloc[[0, 1, 2, 4, 6]].notna().all(axis=None)
    assert by_bytes["complexity"].notna().all()


@pytest.mark.parametrize("texts, match", [(SIMPLE, "single string"), ([SIMPLE, 3], r"texts\[1\] is a int")],
                         ids=["single_string", "not_a_str"])
def test_bad_texts_are_refused(scorer, texts, match):
    with pytest.raises(TypeError, match=match):
        scorer.score(texts)


def test_calibration_fit_and_errors(tmp_path, sample):
    path = tmp_path / "cal.json"
    cal = RubricScorer.fit_calibration(sample, path, source="test")
    assert json.loads(path.read_text()) == cal
    df = RubricScorer(path).score(sample)
    assert abs(df["complexity"].median() - 5) < 1  # centred on the data it was fitted on
    packaged = json.loads(CALIBRATION_PATH.read_text())
    assert packaged["source"].startswith("embedded corpus") and packaged["n_texts"] > 20_000


@pytest.mark.parametrize("case, exc, match", [
    ("too_few_texts", ValueError, "at least 100"),
    ("wrong_version", ValueError, "version"),
    ("missing_file", FileNotFoundError, "python -m adaptivek.complexity"),
])
def test_calibration_errors(tmp_path, sample, case, exc, match):
    with pytest.raises(exc, match=match):
        if case == "too_few_texts":
            RubricScorer.fit_calibration(sample[:20], None)
        elif case == "wrong_version":
            RubricScorer({**json.loads(CALIBRATION_PATH.read_text()), "version": -1})
        else:
            RubricScorer(tmp_path / "missing.json")


def test_metrics():
    assert float(spearman([1, 2, 3, 4], [10, 20, 30, 45], nan_policy="omit")) == pytest.approx(1.0)
    assert float(spearman([1, 2, 3, 4], [4, 3, 2, 1], nan_policy="omit")) == pytest.approx(-1.0)
    assert float(spearman([1, 2, 3, 4, 5], [4, 3, float("nan"), 2, 1], nan_policy="omit")) == pytest.approx(-1.0)
    assert auroc([0.1, 0.2, float("nan"), 0.8, 0.9], [0, 0, 1, 1, 1]) == 1.0  # NaN scores dropped
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert ordered_share([1, 2, 3, 3, 2, 1], [0, 1, 2, 0, 1, 2], ["a", "a", "a", "b", "b", "b"]) == 0.5


# ------------------------------------------------------------------ mechanics: pairs built from the definition
# Each pair changes one thing the rubric's definition (adaptivek.complexity's table) counts, so the
# expectation follows from the definition: no threshold, no data set watched.
MERGED = ("The farmer walked to the field. He looked at the sky. The clouds were dark. He went back to the house.",
          "The farmer walked to the field; he looked at the sky; the clouds were dark; he went back to the house.")
PAIRS = {  # name: (plainer, harder, dimensions that must score higher)
    # same words, fewer sentences: every syntactic rate is per sentence, and ';' counts as punctuation
    "longer_sentences": (*MERGED, ["syntactic"]),
    # same count of words, each swapped for a rarer, longer one (checked below): rare, syllables, chars rise
    "rarer_words": ("The big dog ate the food and then went to sleep near the old door.",
                    "The colossal mastiff devoured the provender and then went to slumber near the decrepit portal.",
                    ["lexical"]),
    # "and" -> "because": one more subordinator (syntactic) and causal connective (logical) per sentence
    "subordination": ("The farmer stayed at home, and the rain fell on the fields all day.",
                      "The farmer stayed at home, because the rain fell on the fields all day.",
                      ["syntactic", "logical"]),
    # words replaced by numbers: numeric detail per word (domain)
    "numbers": ("The town has many people and a lot of old houses near the river.",
                "The town has 12,500 people and 3,400 old houses near the river.", ["domain"]),
    # common nouns replaced by names: capitalised words inside sentences (contextual)
    "names": ("Yesterday the man met the woman in the town near the river.",
              "Yesterday Johnson met Kowalski in Paris near the Seine.", ["contextual"]),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_harder_member_of_a_constructed_pair_scores_higher(scorer, name):
    plain, hard, dims = PAIRS[name]
    df = scorer.score([plain, hard])
    for d in dims:
        assert df.loc[1, d] > df.loc[0, d], (name, d, df[d].tolist())


def test_rarer_words_pair_is_built_as_the_definition_needs():
    """The rarer-words pair swaps words one for one, each for a rarer (Zipf) word of at least as many letters."""
    from adaptivek.complexity import _frequencies

    plain, hard, _ = PAIRS["rarer_words"]
    freq = _frequencies()
    swapped = [(a, b) for a, b in zip(plain.rstrip(".").split(), hard.rstrip(".").split(), strict=True) if a != b]
    assert swapped and all(freq.get(b.lower(), 0) < freq[a.lower()] and len(b) >= len(a) for a, b in swapped)


def test_rates_do_not_depend_on_length(scorer):
    """A text and the same text twice have the same per-word and per-sentence rates: every dimension but
    lexical (whose segment type-token ratio sees the repeated words) scores the same."""
    text = MERGED[0] + " The rain fell on the fields, which were far from the town."
    df = scorer.score([text, f"{text} {text}"])
    for d in ["syntactic", "conceptual", "domain", "logical", "contextual"]:
        assert df.loc[0, d] == pytest.approx(df.loc[1, d], abs=1e-9), d


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", "12 34 56"], ids=["empty", "spaces", "newline_tab",
                                                                              "punctuation", "digits"])
def test_no_words_is_nan_never_zero(scorer, text):
    with pytest.warns(UserWarning, match="NaN"):
        df = scorer.score([SIMPLE, text])
    assert df.iloc[1].isna().all() and df.iloc[0].notna().all()


# ------------------------------------------------------------------------------ validation helpers
def test_readability_scores_are_oriented_harder_is_higher():
    import textstat

    df = readability_scores([SIMPLE, HARD])
    assert list(df.columns) == list(READABILITY_INDICES)
    assert df["Flesch reading ease (negated)"][0] == pytest.approx(-textstat.flesch_reading_ease(SIMPLE))
    # HARD has longer sentences, longer words and more polysyllables: every index rises in them by its formula
    assert (df.iloc[1] > df.iloc[0]).all(), df


def test_readability_scores_nan_for_texts_without_words():
    with pytest.warns(UserWarning, match="2 texts have no words"):
        df = readability_scores([SIMPLE, "", "!!! 42"])
    assert df.iloc[1:].isna().all(axis=None) and df.iloc[0].notna().all()


def test_level_agreement_on_known_orderings():
    rng = np.random.default_rng(0)
    level = np.tile([0, 1, 2], 30)
    groups = np.repeat(np.arange(30), 3)
    noise = rng.normal(size=90)
    scores = pd.DataFrame({"level": level + 0.0, "reversed": -level + 0.0, "noise": noise,
                           "with_nan": np.where(np.arange(90) == 4, np.nan, level + 0.0)})
    t = level_agreement(scores, level, groups, n_boot=200)
    assert t.loc["level", ["spearman", "spearman_lo", "spearman_hi", "ordered_share"]].tolist() == pytest.approx([1] * 4)
    assert t.loc["reversed", "spearman"] == pytest.approx(-1) and t.loc["reversed", "ordered_share"] == 0
    assert t.loc["noise", "spearman_lo"] < t.loc["noise", "spearman"] < t.loc["noise", "spearman_hi"]
    assert t.loc["noise", "ordered_share"] == pytest.approx(ordered_share(noise, level, groups))
    assert t.loc["with_nan", "n_texts"] == 89 and t.loc["with_nan", "n_groups"] == 29  # group 1 lost a level
    assert t["n_groups"].tolist()[:3] == [30, 30, 30]


def test_group_spearman_ci_is_the_group_bootstrap():
    """The batched path for equal-sized groups gives exactly group_bootstrap_ci's interval; unequal sizes fall back."""
    from adaptivek.stats import group_bootstrap_ci

    rng = np.random.default_rng(2)
    a = rng.normal(size=120)
    b = a + rng.normal(size=120)
    groups = rng.permutation(np.repeat(np.arange(40), 3))
    for g in (groups, np.r_[groups[:-1], 99]):  # 40 groups of 3; then one group of 2 and one of 1
        loop = group_bootstrap_ci(lambda x, y: spearman(x, y), a, b, groups=g, n_boot=300, seed=5)
        assert tuple(group_spearman_ci(a, b, g, n_boot=300, seed=5)) == pytest.approx(tuple(loop))


@pytest.mark.parametrize("case, exc, match", [
    ("length", ValueError, "scores has 4 entries but the labels has 6"),
    ("not_numeric", TypeError, r"columns \['s'\] are not numeric"),
    ("no_columns", ValueError, "at least one score column"),
    ("one_group", ValueError, "at least 2 groups"),
    ("level_nan", ValueError, "level has 1 missing or infinite values"),
], ids=["length", "not_numeric", "no_columns", "one_group", "level_nan"])
def test_level_agreement_errors(case, exc, match):
    level, groups = [0, 1, 2, 0, 1, np.nan if case == "level_nan" else 2], [0, 0, 0, 1, 1, 1]
    scores = {"length": pd.DataFrame({"s": [1.0, 2, 3, 4]}), "not_numeric": pd.DataFrame({"s": list("abcdef")}),
              "no_columns": pd.DataFrame(index=range(6))}.get(case, pd.DataFrame({"s": [1.0, 2, 3, 4, 5, 6]}))
    with pytest.raises(exc, match=match):
        level_agreement(scores, level, [0] * 6 if case == "one_group" else groups, n_boot=10)


def _llm_cache(tmp_path, texts, scores, model="m1"):
    """Cache replies the way LLMScorer does after a successful request."""
    from adaptivek.llm_scorer import LLMScorer

    writer = LLMScorer("http://cache.invalid", model, cache_dir=tmp_path)
    for t, s in zip(texts, scores, strict=True):
        writer._store(t, s)
    return writer


def test_cached_llm_labels_reads_what_the_scorer_cached(tmp_path):
    texts = [SIMPLE, HARD, "never scored"]
    replies = [dict.fromkeys(DIMENSIONS, 2.0), dict.fromkeys(DIMENSIONS, 8.0)]
    writer = _llm_cache(tmp_path, texts[:2], replies)
    assert writer._cached(texts[0]) == replies[0]  # the scorer itself would read these back
    got = cached_llm_labels(texts, tmp_path)
    assert list(got) == ["m1"] and list(got["m1"].columns) == COLUMNS
    assert got["m1"]["complexity"].tolist()[:2] == pytest.approx([2.0, 8.0]) and np.isnan(got["m1"].loc[2, "lexical"])
    assert cached_llm_labels(texts, tmp_path / "absent") == {}


def test_cached_llm_labels_counts_broken_files(tmp_path):
    _llm_cache(tmp_path, [SIMPLE], [dict.fromkeys(DIMENSIONS, 3.0)])
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="1 files in the LLM cache .* count as missing"):
        got = cached_llm_labels([SIMPLE], tmp_path)
    assert got["m1"]["complexity"][0] == pytest.approx(3.0)


def test_llm_agreement_per_dimension():
    rng = np.random.default_rng(1)
    rubric = pd.DataFrame(rng.uniform(0, 10, (40, len(COLUMNS))), columns=COLUMNS)
    llm = rubric ** 2 / 10  # a monotone transform: ranks agree exactly
    llm["logical"] = 10 - rubric["logical"]  # reversed
    llm.loc[3, "domain"] = np.nan  # a failed LLM label
    t = llm_agreement(rubric, llm, n_boot=200)
    assert list(t.index) == COLUMNS and list(t.columns) == ["spearman", "lo", "hi", "n"]
    assert t.loc["lexical", ["spearman", "lo", "hi"]].tolist() == pytest.approx([1, 1, 1])
    assert t.loc["logical", "spearman"] == pytest.approx(-1)
    assert t.loc["domain", "n"] == 39 and t.loc["lexical", "n"] == 40
    grouped = llm_agreement(rubric, llm, groups=np.repeat(np.arange(10), 4), n_boot=200)
    assert grouped.loc["lexical", "spearman"] == pytest.approx(1)
    few = llm_agreement(rubric.head(2), llm.head(2), n_boot=10)
    assert few["spearman"].isna().all() and (few["n"] == 2).all()


@pytest.mark.parametrize("case, match", [("missing_column", r"llm scores lack columns \['logical'\]"),
                                         ("length", "rubric has 5 entries but llm has 4"),
                                         ("groups_length", "groups has 3 entries but rubric has 5")],
                         ids=["missing_column", "length", "groups_length"])
def test_llm_agreement_errors(case, match):
    rubric = pd.DataFrame(np.ones((5, len(COLUMNS))), columns=COLUMNS)
    llm = {"missing_column": rubric.drop(columns="logical"), "length": rubric.head(4)}.get(case, rubric)
    with pytest.raises(ValueError, match=match):
        llm_agreement(rubric, llm, groups=[0, 1, 2] if case == "groups_length" else None, n_boot=10)
