"""Chapter 2's presentation of its label checks: tables and sentences computed from the measured numbers.

Every sentence that states a result is built here from the numbers a chapter measured (never typed in
the chapter), so that the prose follows the run: a rank, an interval and which side of a reference it
lies on. Nothing here measures anything; :mod:`adaptivek.validation` does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .report import fmt_ci


def agreement_table(table: pd.DataFrame, *, digits: int = 2) -> pd.DataFrame:
    """:func:`adaptivek.validation.level_agreement`'s table for display: Spearman and the ordered share
    (as %) each with its interval, and the counts, one row per score in the table's order."""
    return pd.DataFrame({
        "Spearman with level [95% CI]": [fmt_ci(r["spearman"], r["spearman_lo"], r["spearman_hi"], digits=digits)
                                         for _, r in table.iterrows()],
        "articles in order, % [95% CI]": [share_ci(r, percent=False) for _, r in table.iterrows()],
        "texts": table["n_texts"].astype(int), "articles": table["n_groups"].astype(int),
    }, index=table.index)


def share_ci(row: pd.Series, *, percent: bool = True) -> str:
    """The ordered share of a :func:`~adaptivek.validation.level_agreement` row with its interval, in percent:
    ``"98% [96, 100]"`` (``percent=False``: ``"98 [96, 100]"``, for a column already headed "%")."""
    text = fmt_ci(100 * row["ordered_share"], 100 * row["ordered_lo"], 100 * row["ordered_hi"], digits=0)
    return text.replace(" [", "% [", 1) if percent else text


def rank_sentence(table: pd.DataFrame, name: str, metric: str = "spearman", *, what: str = "scores") -> str:
    """Where ``name`` ranks among the rows of ``table`` by ``metric`` (highest first), and the best row, e.g.
    ``"5th of 8 scores; the highest is ARI (0.58)"``; ``"first of 8 scores"`` when it is the best."""
    if name not in table.index:
        raise KeyError(f"{name!r} is not a row of the table; rows are {list(table.index)}")
    values = table[metric].dropna().sort_values(ascending=False)
    if name not in values.index:
        return f"not ranked ({metric} is NaN)"
    rank, best = list(values.index).index(name) + 1, values.index[0]
    if rank == 1:
        return f"first of {len(values)} {what}"
    return f"{_ordinal(rank)} of {len(values)} {what}; the highest is {best} ({values.iloc[0]:.2f})"


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ordered_sentence(row: pd.Series, *, chance: float = 1 / 6) -> str:
    """An ordered share with its interval against chance, e.g. ``"98% of the 189 articles [96, 100]; chance
    is 17%, so well above it"``, from a :func:`~adaptivek.validation.level_agreement` row."""
    lo, hi = 100 * row["ordered_lo"], 100 * row["ordered_hi"]
    where = ("above chance" if lo > 100 * chance else "below chance" if hi < 100 * chance
             else "not distinguishable from chance")
    return (f"{100 * row['ordered_share']:.0f}% of the {int(row['n_groups'])} articles [{lo:.0f}, {hi:.0f}]; "
            f"chance is {100 * chance:.0f}%, so {where}")


def auroc_sentence(estimate: float, lo: float, hi: float, *, positive: str, negative: str) -> str:
    """What an AUROC says, in numbers: ``"AUROC 0.97 [0.95, 0.98]: a random learned context scores above a
    random fiction context in 97% of pairs (chance: 50%)"``."""
    if math.isnan(estimate):
        return "AUROC not defined (one of the two groups is empty)"
    return (f"AUROC {fmt_ci(estimate, lo, hi, digits=3)}: a random {positive} context scores above a random "
            f"{negative} context in {100 * estimate:.0f}% of pairs (chance: 50%)")


def interval_sides(table: pd.DataFrame, rows: list[str], metric: str = "spearman") -> dict[str, list[str]]:
    """The ``rows`` whose ``metric`` interval lies above 0, below 0, or includes 0 (keys ``above``,
    ``below``, ``includes_zero``), each list ordered by the estimate, highest first."""
    t = table.loc[rows].sort_values(metric, ascending=False)
    lo, hi = t[f"{metric}_lo"], t[f"{metric}_hi"]
    return {"above": list(t.index[lo > 0]), "below": list(t.index[hi < 0]),
            "includes_zero": list(t.index[(lo <= 0) & (hi >= 0)])}


def sides_sentence(table: pd.DataFrame, rows: list[str], metric: str = "spearman") -> str:
    """:func:`interval_sides` as a sentence with each row's estimate, e.g. ``"interval above 0: syntactic
    (0.62), lexical (0.45); interval includes 0: contextual (0.02)"``; empty groups are left out."""
    sides = interval_sides(table, rows, metric)
    words = {"above": "interval above 0", "below": "interval below 0", "includes_zero": "interval includes 0"}
    parts = [f"{words[k]}: " + ", ".join(f"{r} ({table.loc[r, metric]:.2f})" for r in names)
             for k, names in sides.items() if names]
    return "; ".join(parts)


def extremes_sentence(medians: pd.Series, n: int = 2) -> str:
    """The ``n`` lowest and highest groups of a Series of medians, e.g. ``"lowest medians: gutenberg:
    children (2.1), brown: romance (2.9); highest: wiki: all (7.0), brown: learned (6.8)"``."""
    m = medians.dropna().sort_values()
    if len(m) < 2 * n:
        raise ValueError(f"need at least {2 * n} groups to name the {n} lowest and highest, got {len(m)}")
    low = ", ".join(f"{k} ({v:.2f})" for k, v in m.head(n).items())
    high = ", ".join(f"{k} ({v:.2f})" for k, v in m.tail(n)[::-1].items())
    return f"lowest medians: {low}; highest: {high}"


def correlation_range(corr: pd.DataFrame) -> tuple[float, float]:
    """The smallest and largest off-diagonal entries of a square correlation matrix (NaN ignored)."""
    values = corr.to_numpy(dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] < 2:
        raise ValueError(f"need a square correlation matrix of at least 2 x 2, got shape {values.shape}")
    off = values[~np.eye(len(values), dtype=bool)]  # [n * (n - 1)]
    return float(np.nanmin(off)), float(np.nanmax(off))


def llm_agreement_sentence(tables: dict[str, pd.DataFrame], *, cache: Any) -> str:
    """What chapter 2 can say about rubric-vs-LLM agreement: per model with labels, the texts both scored and
    the Spearman of the weighted complexity with its interval, plus the range over the six dimensions; or,
    plainly, that no LLM labels exist in ``cache`` (the folder searched)."""
    usable = {m: t for m, t in tables.items() if t.loc["complexity", "n"] >= 3}
    if not usable:
        return (f"no LLM labels of these contexts exist in {cache}, so rubric-versus-LLM agreement is not "
                "measured in this run; run the chapter with "
                "label_source='llm:<model>@<base_url>' to measure it")
    parts = []
    for model, t in usable.items():
        dims = t.drop(index="complexity")["spearman"]
        parts.append(f"{model} on {int(t.loc['complexity', 'n'])} contexts: weighted complexity Spearman "
                     f"{fmt_ci(t.loc['complexity', 'spearman'], t.loc['complexity', 'lo'], t.loc['complexity', 'hi'])}"
                     f", the six dimensions from {dims.min():.2f} ({dims.idxmin()}) to {dims.max():.2f} "
                     f"({dims.idxmax()})")
    return "; ".join(parts)


__all__ = ["agreement_table", "share_ci", "rank_sentence", "ordered_sentence", "auroc_sentence", "interval_sides",
           "sides_sentence", "extremes_sentence", "correlation_range", "llm_agreement_sentence"]
