"""Presentation of claim 1's tests (:mod:`adaptivek.claim1`): verdict sentences, tables, the run file.

Chapter 3 computes the verdicts and writes them to ``linear_encoding/claim1.json``; chapter 6 reads that
file back (:func:`load_claim1`) and shows the same sentences, so both chapters say what the run measured.
Nothing here measures anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .io import nan_for_null
from .report import fmt_ci

CLAIM1_FILE = "linear_encoding/claim1.json"  # under a run's artifacts folder
QUESTIONS = {  # verdict key -> the question it answers
    "decodable": "Linearly decodable, against the shuffled-label null?",
    "beyond_length": "Beyond text length?",
    "beyond_lexical": "Beyond the lexical baseline (bag of input embeddings, length, the rubric's own features)?",
    "order_sensitive": "Does its reading follow word order the way the label does, beyond the word statistics?",
    "transfers": "Transfers to human reading levels (OneStopEnglish)?",
    "human_beyond_lexical": "Orders human reading levels within an article beyond the lexical baseline?",
}


def _ci(v: dict[str, Any], signed: bool = False, digits: int = 2) -> str:
    return fmt_ci(v["value"], v["lo"], v["hi"], signed=signed, digits=digits)


def _evidence(key: str, v: dict[str, Any]) -> str:
    """The number behind one verdict, in words."""
    if key == "decodable":
        return (f"held-out Pearson {v['value']:.2f} against the shuffled-label null's 95 % band "
                f"[{v['null_lo']:.2f}, {v['null_hi']:.2f}] (p = {v['p']:.3f} over {v['n_perm']} permutations)")
    if key == "beyond_length":
        return f"probe minus length-control Pearson {_ci(v, signed=True)} (paired bootstrap)"
    if key == "beyond_lexical":
        return (f"ΔR² {_ci(v, signed=True, digits=3)} (cross-fitted R² {v['r2_base']:.2f} lexical, {v['r2_full']:.2f} "
                f"lexical + hidden; interval over documents)")
    if key == "order_sensitive":
        tracks = ("" if "tracks" not in v else f"; the probe's move correlates with the label's own move at "
                  f"{fmt_ci(v['tracks'], v['tracks_lo'], v['tracks_hi'])}")
        return (f"under word shuffling the probe's prediction moves {_ci(v, signed=True)} more (mean |move|) than "
                f"the lexical baseline's (interval over documents){tracks}")
    if key == "transfers":
        return f"the rubric-trained probe's Spearman with reading level {_ci(v)}"
    return (f"the hidden readout with its linear fit on the lexical readout removed orders a share {_ci(v)} of "
            f"within-article level pairs (chance {v['chance']:.1f}, {v['n_topics']} articles)")


def _ordered(verdicts: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The verdicts in :data:`QUESTIONS` order (a JSON round trip sorts keys), refusing unknown keys."""
    unknown = sorted(set(verdicts) - set(QUESTIONS))
    if unknown:
        raise KeyError(f"unknown claim-1 verdict {unknown[0]!r}; expected one of {sorted(QUESTIONS)}")
    return [(k, verdicts[k]) for k in QUESTIONS if k in verdicts]


def verdict_sentences(verdicts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{key: "Question? yes: the number."}`` for each verdict of :func:`adaptivek.claim1.claim1_verdicts`."""
    out = {}
    for key, v in _ordered(verdicts):
        body = "not measured in this run" if v["answer"] == "not measured" else f"{v['answer']}: {_evidence(key, v)}"
        out[key] = f"{QUESTIONS[key]} {body}."
    return out


def verdict_table(verdicts: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per question: ``answer`` and ``evidence`` (the number in words)."""
    rows = {QUESTIONS[k]: {"answer": v["answer"], "evidence": "" if v["answer"] == "not measured" else
                           _evidence(k, v)} for k, v in _ordered(verdicts)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "claim 1"
    return table


def claim1_summary(verdicts: dict[str, dict[str, Any]]) -> str:
    """``"3 of 6 tests say yes (…); no: …; not measured: …"``: the verdicts in one sentence."""
    by = {a: [k.replace("_", " ") for k, v in _ordered(verdicts) if v["answer"] == a]
          for a in ("yes", "no", "not measured")}
    n = len(by["yes"]) + len(by["no"])
    parts = [f"{len(by['yes'])} of {n} measured tests say yes" + (f" ({', '.join(by['yes'])})" if by["yes"] else "")]
    parts += [f"{a}: {', '.join(ks)}" for a, ks in by.items() if a != "yes" and ks]
    return "; ".join(parts)


def source_table(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`adaptivek.claim1.source_transfer`'s summary as text: pooled, within-source and leave-one-source-out."""
    out = {}
    for model, r in summary.iterrows():
        out[model] = {"pooled Pearson": fmt_ci(r["pooled"], r["pooled_lo"], r["pooled_hi"]),
                      "source means removed": fmt_ci(r["within"], r["within_lo"], r["within_hi"]),
                      "leave one source out: mean (min)": f"{r['loso_mean']:.2f} ({r['loso_min']:.2f})"}
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index.name = "model"
    return table


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (index levels as columns, NaN as None)."""
    flat = df.reset_index()
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in flat.to_dict(orient="records")]


def claim1_record(verdicts: dict, sources: pd.DataFrame, loso: pd.DataFrame, incremental: dict[str, Any],
                  word_order: pd.DataFrame | None, human_labels: dict[str, Any] | None) -> dict[str, Any]:
    """What chapter 3 writes to :data:`CLAIM1_FILE` (JSON-ready: no tensors, NaN as None)."""
    scalars = {k: v for k, v in incremental.items() if not k.startswith("pred_")}
    return {"verdicts": verdicts, "sources": _records(sources), "loso": _records(loso), "incremental": scalars,
            "word_order": None if word_order is None else _records(word_order), "human_labels": human_labels}


def load_claim1(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's claim-1 record (:func:`claim1_record`), or None when its chapter 3 has not written one."""
    path = Path(run_dir) / CLAIM1_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    missing = [k for k in ("verdicts", "sources") if k not in record]
    if missing:
        raise ValueError(f"{path} is not a claim-1 record: keys {missing} are missing; rerun chapter 3")
    record["verdicts"] = nan_for_null(record["verdicts"])  # write_json stored NaN as null
    return record


def sources_from_record(record: dict[str, Any]) -> pd.DataFrame:
    """The summary table of a loaded record, as :func:`source_table` shows it."""
    df = pd.DataFrame(record["sources"]).set_index("model").astype(float)
    return source_table(df)
