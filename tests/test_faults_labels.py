"""Failed labels stay NaN from the label file to chapters 3-5 (issue 15, classes 4 and 6).

The authors' label file stored every failed annotation as 0.0; a row without text cannot be a label.
Chapter 2 keeps a context it failed to label as NaN, and ``contexts_and_labels`` carries it as NaN
(naming that cause) instead of calling the files mismatched.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptivek import report
from adaptivek.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[1]
SCORES = {"lexical_complexity": {"score": 3.0}, "final_weighted_score": 4.5}  # a real rating's details
TIMEOUT = {"error": "Request timeout", "final_weighted_score": 0.0}  # the reference code's failure record


def _load(path: Path) -> tuple[dict, list[str]]:
    """``{text: complexity or None}`` of a loaded file, and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_corpus(path).to_pandas()
    got = {t: (None if c is None or math.isnan(c) else c) for t, c in zip(df["text"], df["complexity"], strict=True)}
    return got, [str(w.message) for w in caught]


# (file name, columns, expected {text: label}, expected warning) -- the second row is the fault each time
LABEL_CASES = {
    "details_error_struct": ("context_complexity_250k.parquet",
                             {"complexity_score": [4.5, 0.0], "complexity_details": [SCORES, TIMEOUT]},
                             {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "details_error_json": ("context_complexity_250k.parquet",
                           {"complexity_score": [4.5, 0.0],
                            "complexity_details": [json.dumps(SCORES), json.dumps(TIMEOUT)]},
                           {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "details_error_python_repr": ("context_complexity_250k.csv",
                                  {"complexity_score": [4.5, 0.0], "complexity_details": [repr(SCORES), repr(TIMEOUT)]},
                                  {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "details_null_and_zero": ("context_complexity_250k.parquet",
                              {"complexity_score": [4.5, 0.0], "complexity_details": [json.dumps(SCORES), None]},
                              {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "details_unreadable_and_zero": ("context_complexity_250k.parquet",
                                    {"complexity_score": [4.5, 0.0],
                                     "complexity_details": [json.dumps(SCORES), "{not json"]},
                                    {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "no_details_and_zero": ("context_complexity_250k.parquet", {"complexity_score": [4.5, 0.0]},
                            {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "error_with_nonzero_score": ("context_complexity_250k.parquet",
                                 {"complexity_score": [4.5, 6.0],
                                  "complexity_details": [json.dumps(SCORES), json.dumps({"error": "bad JSON"})]},
                                 {"t0": 4.5, "t1": None}, "1 rows were failed annotations"),
    "score_not_a_number": ("context_complexity_250k.csv", {"complexity_score": ["4.5", "n/a"]},
                           {"t0": 4.5, "t1": None}, "1 rows have a complexity_score that is not a finite number"),
    "text_null": ("context_complexity_250k.parquet", {"text": ["t0", None], "complexity_score": [4.5, 0.0]},
                  {"t0": 4.5}, "dropped 1 of 2 rows with no text in column 'text'"),
    "text_blank": ("context_complexity_250k.parquet", {"text": ["t0", "  \n"], "complexity_score": [4.5, 3.0]},
                   {"t0": 4.5}, "dropped 1 of 2 rows with no text in column 'text'"),
    "context_column_null": ("context_complexity_250k.parquet", {"context": ["t0", None], "complexity_score": [4.5, 2.0]},
                            {"t0": 4.5}, "dropped 1 of 2 rows with no text in column 'context'"),
    "csv_empty_text_cell": ("context_complexity_250k.csv", {"text": ["t0", None], "complexity_score": [4.5, 2.0]},
                            {"t0": 4.5}, "dropped 1 of 2 rows with no text"),
}


@pytest.mark.parametrize("name, columns, expected, warning", list(LABEL_CASES.values()), ids=list(LABEL_CASES))
def test_failed_annotations_are_nan_and_textless_rows_dropped(tmp_path, name, columns, expected, warning):
    df = pd.DataFrame(columns if "context" in columns else {"text": ["t0", "t1"], **columns})
    path = tmp_path / name
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path)
    got, warned = _load(path)
    assert got == expected
    assert any(warning in w for w in warned), warned


@pytest.mark.parametrize("details", [json.dumps({"final_weighted_score": 0.0}), {"x": {"score": 0}, "error": None}],
                         ids=["json_final_score", "struct_dimension_score"])
def test_a_zero_that_the_rater_gave_is_kept(tmp_path, details):
    path = tmp_path / "context_complexity_250k.parquet"
    pd.DataFrame({"text": ["t0", "t1"], "complexity_score": [4.5, 0.0],
                  "complexity_details": [details, details]}).to_parquet(path)
    got, warned = _load(path)
    assert got == {"t0": 4.5, "t1": 0.0} and not any("failed" in w for w in warned), warned


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"], ids=["csv", "jsonl", "parquet"])
def test_a_corpus_file_drops_and_counts_rows_without_text(tmp_path, suffix):
    df = pd.DataFrame({"text": ["first text", None, "third text", "   "], "year": [1, 2, 3, 4]})
    path = tmp_path / f"corpus{suffix}"
    {".csv": lambda: df.to_csv(path, index=False), ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    with pytest.warns(UserWarning, match=r"corpus.*: dropped 2 of 4 rows with no text in column 'text' \(rows \[1, 3\]"):
        ds = load_corpus(path)
    assert sorted(ds["text"]) == ["first text", "third text"]
    assert sorted(ds["year"]) == [1, 3]  # each text keeps its own row's metadata


# ------------------------------------------------------------------------------------------- chapter 2 -> 3
TEXTS = ["first context", "second context", "third context"]
DIMS = ["lexical", "syntactic", "conceptual", "domain", "logical", "contextual"]


def _chapter2_writes_labels(artifacts: Path, complexity: list[float]) -> pd.DataFrame:
    """Run chapter 2's own label-writing cell (from the notebook) on ``TEXTS`` labelled ``complexity``."""
    from adaptivek.io import atomic_path

    nb = json.loads((ROOT / "book" / "02_complexity.ipynb").read_text())
    cell = next("".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and "labels.parquet" in "".join(c["source"])
                and "to_parquet" in "".join(c["source"]))
    labels = pd.DataFrame({"text": TEXTS, "source": "s", "genre": None, "book": None,
                           "year": pd.array([None] * 3, dtype="Int64"),
                           **{d: complexity for d in DIMS}, "complexity": complexity})
    exec(cell, {"labels": labels, "artifacts": artifacts, "dims": DIMS, "atomic_path": atomic_path,  # noqa: S102
                "glue": lambda *a, **k: None})
    return pd.read_parquet(artifacts / "labels.parquet")


def test_chapter2_keeps_a_failed_label_and_chapter3_gets_it_as_nan(tmp_path, capsys):
    pd.DataFrame({"text": TEXTS}).to_parquet(tmp_path / "texts.parquet")
    written = _chapter2_writes_labels(tmp_path, [3.0, np.nan, 4.0])
    assert written["text"].tolist() == TEXTS and written["complexity"].isna().tolist() == [False, True, False]
    assert "1 of 3 contexts failed to label" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"1 of the 3 contexts failed to label in chapter 2 and carry NaN"):
        texts, y, source = report.contexts_and_labels(tmp_path, None)
    assert texts == TEXTS and "labels.parquet" in source
    assert y[0] == 3.0 and math.isnan(y[1]) and y[2] == 4.0


@pytest.mark.parametrize("labels, match", [
    ({"text": TEXTS[::-1], "complexity": [4.0, np.nan, 3.0]}, r"1 of the 3 contexts failed to label in chapter 2"),
    ({"text": [TEXTS[0], TEXTS[2]], "complexity": [3.0, 4.0]},
     r"1 of the 3 contexts failed to label.*1 of them have no row: an older chapter 2 dropped"),
], ids=["nan_row", "row_dropped_by_an_older_chapter2"])
def test_unlabelled_contexts_are_carried_as_nan_naming_the_cause(tmp_path, labels, match):
    pd.DataFrame({"text": TEXTS}).to_parquet(tmp_path / "texts.parquet")
    pd.DataFrame(labels).to_parquet(tmp_path / "labels.parquet")
    with pytest.warns(UserWarning, match=match) as caught:
        _, y, _ = report.contexts_and_labels(tmp_path, None)
    assert not any("different runs" in str(w.message) for w in caught)
    assert y[0] == 3.0 and math.isnan(y[1]) and y[2] == 4.0


@pytest.mark.parametrize("labels", [
    {"text": [TEXTS[0], "a text chapter 1 never had"], "complexity": [3.0, 4.0]},
    {"text": [*TEXTS, "one more"], "complexity": [3.0, 1.0, 4.0, 5.0]},
], ids=["other_texts", "extra_text"])
def test_labels_of_other_texts_are_refused_as_another_run(tmp_path, labels):
    pd.DataFrame({"text": TEXTS}).to_parquet(tmp_path / "texts.parquet")
    pd.DataFrame(labels).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match=r"labels 1 texts that are not among the 3 contexts.*different runs"):
        report.contexts_and_labels(tmp_path, None)
