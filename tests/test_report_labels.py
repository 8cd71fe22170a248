"""Chapter 2's computed sentences and tables (adaptivek.report_labels): each follows the numbers it is given."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from adaptivek import report_labels as rl


@pytest.fixture
def table() -> pd.DataFrame:
    """A level_agreement-shaped table."""
    return pd.DataFrame({
        "spearman": [0.51, 0.62, 0.02, -0.30], "spearman_lo": [0.47, 0.58, -0.02, -0.40],
        "spearman_hi": [0.55, 0.66, 0.06, -0.20], "ordered_share": [0.98, 0.99, 0.30, 0.01],
        "ordered_lo": [0.96, 0.97, 0.10, 0.0], "ordered_hi": [1.0, 1.0, 0.35, 0.03],
        "n_texts": [567] * 4, "n_groups": [189] * 4}, index=["rubric", "syntactic", "contextual", "odd"])


def test_agreement_table_formats_intervals(table):
    t = rl.agreement_table(table)
    assert t.loc["rubric", "Spearman with level [95% CI]"] == "0.51 [0.47, 0.55]"
    assert t.loc["rubric", "articles in order, % [95% CI]"] == "98 [96, 100]"
    assert list(t.index) == list(table.index) and t["articles"].tolist() == [189] * 4
    assert rl.share_ci(table.loc["rubric"]) == "98% [96, 100]"


def test_rank_sentence(table):
    assert rl.rank_sentence(table, "rubric") == "2nd of 4 scores; the highest is syntactic (0.62)"
    assert rl.rank_sentence(table, "syntactic") == "first of 4 scores"
    assert rl.rank_sentence(table, "odd", what="indices").startswith("4th of 4 indices")
    with pytest.raises(KeyError, match="'nope' is not a row"):
        rl.rank_sentence(table, "nope")


@pytest.mark.parametrize("n, word", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"),
                                     (13, "13th"), (21, "21st"), (22, "22nd")])
def test_ordinal(n, word):
    assert rl._ordinal(n) == word


def test_ordered_sentence_against_chance(table):
    assert rl.ordered_sentence(table.loc["rubric"]) == ("98% of the 189 articles [96, 100]; chance is 17%, so above "
                                                         "chance")
    assert rl.ordered_sentence(table.loc["contextual"]).endswith("not distinguishable from chance")
    assert rl.ordered_sentence(table.loc["odd"]).endswith("below chance")


def test_auroc_sentence():
    s = rl.auroc_sentence(0.964, 0.953, 0.974, positive="learned", negative="fiction")
    assert s == ("AUROC 0.964 [0.953, 0.974]: a random learned context scores above a random fiction context in "
                 "96% of pairs (chance: 50%)")
    assert "not defined" in rl.auroc_sentence(math.nan, math.nan, math.nan, positive="a", negative="b")


def test_sides_sentence(table):
    sides = rl.interval_sides(table, ["rubric", "syntactic", "contextual", "odd"])
    assert sides == {"above": ["syntactic", "rubric"], "below": ["odd"], "includes_zero": ["contextual"]}
    assert rl.sides_sentence(table, ["syntactic", "contextual"]) == ("interval above 0: syntactic (0.62); interval "
                                                                     "includes 0: contextual (0.02)")


def test_extremes_sentence_and_errors():
    m = pd.Series({"a": 3.0, "b": 1.0, "c": 7.0, "d": 5.0, "e": np.nan})
    assert rl.extremes_sentence(m) == "lowest medians: b (1.00), a (3.00); highest: c (7.00), d (5.00)"
    with pytest.raises(ValueError, match="at least 4 groups"):
        rl.extremes_sentence(m.head(3))


def test_correlation_range_ignores_the_diagonal():
    corr = pd.DataFrame([[1.0, 0.2, -0.1], [0.2, 1.0, 0.6], [-0.1, 0.6, 1.0]])
    assert rl.correlation_range(corr) == (-0.1, 0.6)
    with pytest.raises(ValueError, match="square correlation matrix"):
        rl.correlation_range(pd.DataFrame([[1.0, 0.2]]))


def test_llm_agreement_sentence_says_plainly_when_there_are_no_labels():
    none = rl.llm_agreement_sentence({}, cache="art/llm_cache")
    assert none.startswith("no LLM labels of these contexts exist in art/llm_cache") and "not measured" in none
    cols = ["lexical", "syntactic", "conceptual", "domain", "logical", "contextual", "complexity"]
    t = pd.DataFrame({"spearman": [0.5, 0.6, 0.4, 0.3, 0.2, 0.1, 0.55], "lo": 0.0, "hi": 0.9, "n": 100}, index=cols)
    s = rl.llm_agreement_sentence({"gpt": t, "empty": t.assign(n=0)}, cache="c")
    assert s == ("gpt on 100 contexts: weighted complexity Spearman 0.55 [0.00, 0.90], the six dimensions from "
                 "0.10 (contextual) to 0.60 (syntactic)")
