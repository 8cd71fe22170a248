"""Checks of complexity scores against labels no part of the scorer saw.

* OneStopEnglish (Vajjala & Lučić 2018): the same 189 news articles rewritten by teachers at three
  levels. We report the Spearman correlation of score with level and the share of articles whose
  three versions are scored strictly elementary < intermediate < advanced (chance: 1/6).
* Brown corpus genres: AUROC of learned + government (1) against fiction genres (0).
* State of the Union: Spearman correlation of score with year (prose has grown simpler; expect < 0).

Any object with ``.score(texts) -> DataFrame`` (with a ``complexity`` column) can be validated.
The statistics (``spearman`` with ``nan_policy="omit"``, ``auroc``, ``ordered_share``) live in
:mod:`adaptivek.stats`; a text the scorer failed on (NaN) is left out of each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pandas as pd

from .stats import auroc, ordered_share, spearman

BROWN_HARD = ("learned", "government")
BROWN_EASY = ("adventure", "romance", "mystery", "fiction", "science_fiction")


class Scorer(Protocol):
    def score(self, texts: Sequence[str]) -> pd.DataFrame: ...


def validate_onestop(scorer: Scorer, path: str | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """OneStopEnglish: Spearman of score with level and the share of correctly ordered topics."""
    from .corpus import load_onestopenglish

    df = load_onestopenglish(path).to_pandas()
    df = pd.concat([df, scorer.score(df["text"].tolist()).set_index(df.index)], axis=1)
    res = {"spearman_level": float(spearman(df["complexity"], df["level"], nan_policy="omit")),
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
    return {"spearman_year": float(spearman(df["complexity"], df["year"], nan_policy="omit")), "n_texts": len(df)}, df
