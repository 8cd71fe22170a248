"""Checks of complexity scores against labels no part of the scorer saw.

* OneStopEnglish (Vajjala & Lučić 2018): the same 189 news articles rewritten by teachers at three
  levels. We report the Spearman correlation of score with level and the share of articles whose
  three versions are scored strictly elementary < intermediate < advanced (chance: 1/6).
* Brown corpus genres: AUROC of learned + government (1) against fiction genres (0).
* State of the Union: Spearman correlation of score with year (prose has grown simpler; expect < 0).

Any object with ``.score(texts) -> DataFrame`` (with a ``complexity`` column) can be validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

BROWN_HARD = ("learned", "government")
BROWN_EASY = ("adventure", "romance", "mystery", "fiction", "science_fiction")


class Scorer(Protocol):
    def score(self, texts: Sequence[str]) -> pd.DataFrame: ...


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (average ranks for ties), NaN pairs dropped."""
    d = pd.DataFrame({"x": np.asarray(x, dtype=float), "y": np.asarray(y, dtype=float)}).dropna()
    if len(d) < 3:
        return float("nan")
    return float(np.corrcoef(d["x"].rank(), d["y"].rank())[0, 1])


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U; ties count 1/2)."""
    d = pd.DataFrame({"s": np.asarray(scores, dtype=float), "y": np.asarray(labels, dtype=bool)}).dropna()
    n1 = int(d["y"].sum())
    n0 = len(d) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = d["s"].rank().to_numpy()
    return float((r[d["y"].to_numpy()].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ordered_share(scores: Any, level: Any, topic: Any) -> float:
    """Share of topics whose versions' scores strictly increase with level (topics with all levels)."""
    d = pd.DataFrame({"s": np.asarray(scores, dtype=float), "level": level, "topic": topic})
    wide = d.pivot_table(index="topic", columns="level", values="s", aggfunc="mean").dropna()
    if wide.empty:
        return float("nan")
    return float((wide.diff(axis=1).iloc[:, 1:] > 0).all(axis=1).mean())


def validate_onestop(scorer: Scorer, path: str | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """OneStopEnglish: Spearman of score with level and the share of correctly ordered topics."""
    from .corpus import load_onestopenglish

    df = load_onestopenglish(path).to_pandas()
    df = pd.concat([df, scorer.score(df["text"].tolist()).set_index(df.index)], axis=1)
    res = {"spearman_level": spearman(df["complexity"], df["level"]),
           "ordered_share": ordered_share(df["complexity"], df["level"], df["topic"]),
           "n_texts": len(df), "n_topics": int(df["topic"].nunique())}
    return res, df


def validate_brown(scorer: Scorer, *, n: int | None = None, seed: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    """Brown: AUROC of learned + government against adventure/romance/mystery/fiction/sci-fi."""
    from .corpus import load_corpus

    df = load_corpus("embedded", sources=["brown"], seed=seed).to_pandas()
    df = df[df["genre"].isin(BROWN_HARD + BROWN_EASY)]
    df = (df.head(n) if n else df).reset_index(drop=True)
    df = pd.concat([df, scorer.score(df["text"].tolist())], axis=1)
    res = {"auroc": auroc(df["complexity"], df["genre"].isin(BROWN_HARD)), "n_texts": len(df)}
    return res, df


def validate_sotu(scorer: Scorer, *, n: int | None = None, seed: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    """State of the Union: Spearman of score with year."""
    from .corpus import load_corpus

    df = load_corpus("embedded", sources=["sotu"], n=n, seed=seed).to_pandas()
    df = pd.concat([df, scorer.score(df["text"].tolist())], axis=1)
    return {"spearman_year": spearman(df["complexity"], df["year"]), "n_texts": len(df)}, df
