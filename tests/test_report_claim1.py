"""Claim 1's presentation (adaptivek.report_claim1): sentences follow the verdicts, the run file round-trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from adaptivek import report_claim1 as rc
from adaptivek.claim1 import claim1_verdicts
from adaptivek.io import write_json


def _verdicts(delta_lo=-0.01):
    return claim1_verdicts(probe_pearson=0.8, null_pearson=np.linspace(-0.3, 0.3, 49),
                           beyond_length={"dpearson": 0.1, "dpearson_lo": 0.05, "dpearson_hi": 0.15},
                           incremental={"delta": 0.01, "delta_lo": delta_lo, "delta_hi": 0.03, "r2_base": 0.8,
                                        "r2_full": 0.81})


def test_sentences_state_each_answer_with_its_number():
    s = rc.verdict_sentences(_verdicts())
    assert s["decodable"].startswith(rc.QUESTIONS["decodable"] + " yes: held-out Pearson 0.80")
    assert " no: ΔR² +0.010 [-0.010, +0.030]" in s["beyond_lexical"]
    assert s["transfers"].endswith("not measured in this run.")
    assert " yes: " in rc.verdict_sentences(_verdicts(delta_lo=0.005))["beyond_lexical"]


def test_word_order_sentence_says_whether_the_move_tracks_the_label():
    order = pd.DataFrame({"estimate": [0.2, 0.4], "lo": [0.1, 0.2], "hi": [0.3, 0.6]},
                         index=["probe minus baseline |move|", "probe move vs label move (Pearson)"])
    v = claim1_verdicts(probe_pearson=0.8, null_pearson=np.zeros(9), word_order=order,
                        beyond_length={"dpearson": 0.1, "dpearson_lo": 0.05, "dpearson_hi": 0.15},
                        incremental={"delta": 0.01, "delta_lo": -0.01, "delta_hi": 0.03, "r2_base": 0.8, "r2_full": 0.81})
    s = rc.verdict_sentences(v)["order_sensitive"]
    assert " yes: " in s and "moves +0.20 [+0.10, +0.30] more" in s and "label's own move at 0.40 [0.20, 0.60]" in s


def test_summary_and_table_count_the_answers():
    v = _verdicts()
    assert rc.claim1_summary(v) == ("2 of 3 measured tests say yes (decodable, beyond length); no: beyond lexical; "
                                    "not measured: order sensitive, transfers, human beyond lexical")
    t = rc.verdict_table(v)
    assert list(t["answer"]) == ["yes", "yes", "no", "not measured", "not measured", "not measured"]


def test_unknown_verdict_key_is_refused():
    with pytest.raises(KeyError, match="unknown claim-1 verdict"):
        rc.verdict_sentences({"nonsense": {"answer": "yes"}})


def test_record_round_trips_through_the_run_file(tmp_path):
    summary = pd.DataFrame({"pooled": [0.8], "pooled_lo": [0.7], "pooled_hi": [0.9], "within": [0.6],
                            "within_lo": [0.5], "within_hi": [0.7], "loso_mean": [math.nan], "loso_min": [math.nan]},
                           index=pd.Index(["ridge probe"], name="model"))
    loso = pd.DataFrame({"pearson": [0.5]}, index=pd.MultiIndex.from_tuples([("ridge probe", "wiki")],
                                                                            names=["model", "held-out source"]))
    v = _verdicts()
    write_json(tmp_path / rc.CLAIM1_FILE, rc.claim1_record(v, summary, loso, {"delta": 0.01, "pred_base": [1.0]},
                                                          None, None))
    back = rc.load_claim1(tmp_path)
    assert list(rc.verdict_sentences(back["verdicts"]).items()) == list(rc.verdict_sentences(v).items())  # in order
    assert rc.claim1_summary(back["verdicts"]) == rc.claim1_summary(v)
    assert "pred_base" not in back["incremental"] and back["loso"][0]["held-out source"] == "wiki"
    table = rc.sources_from_record(back)
    assert table.loc["ridge probe", "pooled Pearson"] == "0.80 [0.70, 0.90]"
    assert table.loc["ridge probe", "leave one source out: mean (min)"] == "nan (nan)"
    assert rc.load_claim1(tmp_path / "missing") is None


def test_a_file_without_verdicts_is_refused(tmp_path):
    write_json(tmp_path / rc.CLAIM1_FILE, {"sources": []})
    with pytest.raises(ValueError, match="not a claim-1 record"):
        rc.load_claim1(tmp_path)
