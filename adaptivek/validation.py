"""Checks of complexity scores against labels no part of the scorer saw.

* OneStopEnglish (Vajjala & Lučić 2018): the same 189 news articles rewritten by teachers at three
  levels. We report the Spearman correlation of score with level and the share of articles whose
  three versions are scored strictly elementary < intermediate < advanced (chance: 1/6).
* Brown corpus genres: AUROC of learned + government (1) against fiction genres (0).
* State of the Union: Spearman correlation of score with year (prose has grown simpler; expect < 0).

Beside a scorer's own numbers, :func:`readability_scores` gives the classic textstat indices for scale and
:func:`level_agreement` reports each score's Spearman with level and its ordered share, both with intervals
from resampling whole articles. :func:`cached_llm_labels` reads the LLM labels an earlier run cached, and
:func:`llm_agreement` measures how far the rubric agrees with them (Spearman per dimension, with intervals).

Any object with ``.score(texts) -> DataFrame`` (with a ``complexity`` column) can be validated.
The statistics (``spearman`` with ``nan_policy="omit"``, ``auroc``, ``ordered_share``) live in
:mod:`adaptivek.stats`; a text the scorer failed on (NaN) is left out of each of them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from .checks import same_length, text_list
from .complexity import COLUMNS, DIMENSIONS
from .stats import (
    CI,
    _group_draws,
    _percentile_ci,
    auroc,
    bootstrap_ci,
    group_bootstrap_ci,
    group_codes,
    ordered_share,
    spearman,
)

BROWN_HARD = ("learned", "government")
BROWN_EASY = ("adventure", "romance", "mystery", "fiction", "science_fiction")
# display name -> (textstat 0.7.8 function, sign): the sign makes every index "higher = harder" by its
# definition (Flesch reading ease is high for easy text, so it is negated), never by looking at data
READABILITY_INDICES: dict[str, tuple[str, int]] = {
    "Flesch-Kincaid grade": ("flesch_kincaid_grade", 1),
    "Flesch reading ease (negated)": ("flesch_reading_ease", -1),
    "Gunning fog": ("gunning_fog", 1),
    "SMOG": ("smog_index", 1),
    "Coleman-Liau": ("coleman_liau_index", 1),
    "ARI": ("automated_readability_index", 1),
    "Dale-Chall": ("dale_chall_readability_score", 1),
}
_HAS_WORD = re.compile(r"[^\W\d_]")


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


def validate_brown(scorer: Scorer, *, n: int | None = None, seed: int = 0,
                   n_boot: int = 1000) -> tuple[dict[str, float], pd.DataFrame]:
    """Brown: AUROC of learned + government against adventure/romance/mystery/fiction/sci-fi, with a
    percentile interval (``auroc_lo``, ``auroc_hi``) from resampling whole Brown samples (``book``)."""
    from .corpus import load_corpus

    df = load_corpus("embedded", sources=["brown"], seed=seed).to_pandas()
    df = df[df["genre"].isin(BROWN_HARD + BROWN_EASY)]
    df = (df.head(n) if n else df).reset_index(drop=True)
    df = pd.concat([df, scorer.score(df["text"].tolist())], axis=1)
    hard = df["genre"].isin(BROWN_HARD).to_numpy()
    ci = group_bootstrap_ci(auroc, df["complexity"].to_numpy(dtype=float), hard, groups=df["book"].to_numpy(),
                            n_boot=n_boot, seed=seed)
    res = {"auroc": ci.estimate, "auroc_lo": ci.lo, "auroc_hi": ci.hi, "n_texts": len(df),
           "n_samples": int(df["book"].nunique())}
    return res, df


def validate_sotu(scorer: Scorer, *, n: int | None = None, seed: int = 0,
                  n_boot: int = 1000) -> tuple[dict[str, float], pd.DataFrame]:
    """State of the Union: Spearman of score with year, with a percentile interval (``spearman_year_lo``,
    ``spearman_year_hi``) from resampling whole addresses (``book``)."""
    from .corpus import load_corpus

    df = load_corpus("embedded", sources=["sotu"], n=n, seed=seed).to_pandas()
    df = pd.concat([df, scorer.score(df["text"].tolist())], axis=1)
    ci = group_bootstrap_ci(lambda a, b: spearman(a, b, nan_policy="omit"), df["complexity"].to_numpy(dtype=float),
                            df["year"].to_numpy(dtype=float), groups=df["book"].to_numpy(), n_boot=n_boot, seed=seed)
    return {"spearman_year": ci.estimate, "spearman_year_lo": ci.lo, "spearman_year_hi": ci.hi, "n_texts": len(df),
            "n_addresses": int(df["book"].nunique())}, df


# ------------------------------------------------------------------------------ readability indices
def readability_scores(texts: Sequence[str]) -> pd.DataFrame:
    """The textstat indices of :data:`READABILITY_INDICES` per text, each signed so that higher means harder.

    textstat returns 0.0 for a text without words (a real score, as far as a correlation can tell); such a
    text gets NaN here instead, with a warning that counts them.
    """
    import textstat

    texts = text_list(texts)
    has_words = np.array([bool(_HAS_WORD.search(t)) for t in texts], dtype=bool)
    if not has_words.all():
        warnings.warn(f"{int((~has_words).sum())} texts have no words (e.g. index {int(np.flatnonzero(~has_words)[0])})"
                      " and get NaN readability scores", stacklevel=2)
    out = {}
    for name, (fn, sign) in READABILITY_INDICES.items():
        score = getattr(textstat, fn)
        out[name] = np.array([sign * float(score(t)) if ok else np.nan for t, ok in zip(texts, has_words, strict=True)])
    return pd.DataFrame(out)


def ordered_groups(scores: Any, level: Any, groups: Any) -> pd.Series:
    """Per group with a score at every level present (NaN scores dropped): True when its scores rise strictly
    with level. Its mean is :func:`adaptivek.stats.ordered_share`; as a per-group series it can be resampled."""
    d = pd.DataFrame({"s": np.asarray(scores, dtype=float), "level": np.asarray(level), "group": np.asarray(groups)})
    wide = d.pivot_table(index="group", columns="level", values="s", aggfunc="mean").dropna()  # [groups, levels]
    return (wide.diff(axis=1).iloc[:, 1:] > 0).all(axis=1)


def _check_paired(scores: pd.DataFrame, n: int, what: str) -> None:
    """Refuse a score table that is empty, not numeric, or not one row per text."""
    if not isinstance(scores, pd.DataFrame) or scores.shape[1] == 0:
        raise ValueError(f"{what} must be a DataFrame with at least one score column, got {type(scores).__name__}")
    bad = [c for c in scores.columns if not pd.api.types.is_numeric_dtype(scores[c])]
    if bad:
        raise TypeError(f"{what} columns {bad} are not numeric; pass scores (floats, NaN for a failed text)")
    same_length(scores, range(n), what, "the labels")


def level_agreement(scores: pd.DataFrame, level: Any, groups: Any, *, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> pd.DataFrame:
    """For each score column: Spearman with ``level`` and the share of groups (articles) ordered strictly by
    level, each with a percentile interval from resampling whole groups (an article's versions share their
    topic, so rows are not independent). NaN scores are left out. One row per column, in the given order.
    """
    level, groups = np.asarray(level, dtype=float), np.asarray(groups)
    _check_paired(scores, len(level), "scores")
    same_length(groups, level, "groups", "level")
    if not np.isfinite(level).all():
        raise ValueError(f"level has {int((~np.isfinite(level)).sum())} missing or infinite values; every text needs "
                         "its level (drop the texts without one)")
    rows = {}
    for name in scores.columns:
        s = scores[name].to_numpy(dtype=float)
        ok = ~np.isnan(s)
        rho = group_spearman_ci(s[ok], level[ok], groups[ok], n_boot=n_boot, seed=seed, alpha=alpha)
        ordered = ordered_groups(s, level, groups).to_numpy(dtype=np.float64)  # [complete groups] 1.0 = in order
        share = (bootstrap_ci(lambda x: x.mean(-1), ordered, n_boot=n_boot, seed=seed, alpha=alpha)
                 if len(ordered) >= 2 else CI(float(ordered.mean()) if len(ordered) else np.nan, np.nan, np.nan))
        rows[name] = {"spearman": rho.estimate, "spearman_lo": rho.lo, "spearman_hi": rho.hi,
                      "ordered_share": share.estimate, "ordered_lo": share.lo, "ordered_hi": share.hi,
                      "n_texts": int(ok.sum()), "n_groups": len(ordered)}
    return pd.DataFrame.from_dict(rows, orient="index")


def group_spearman_ci(a: Any, b: Any, groups: Any, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> CI:
    """Spearman of ``a`` with ``b`` and its percentile interval from resampling whole groups: exactly
    :func:`adaptivek.stats.group_bootstrap_ci` (same draws, same interval), computed in one batched call
    when every group has the same number of rows (an article's three versions) instead of a loop."""
    import torch

    g = group_codes(groups)
    sizes = torch.bincount(g.codes)  # [G] rows per group
    if len(sizes) < 2 or not bool((sizes == sizes[0]).all()):
        return group_bootstrap_ci(lambda x, y: spearman(x, y), a, b, groups=g, n_boot=n_boot, seed=seed, alpha=alpha)
    ta, tb = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (a, b))
    same_length(ta, g.codes, "scores", "groups")
    g, draws = _group_draws(g, len(ta), n_boot, seed, alpha)  # [B, G]: the draws group_bootstrap_ci makes
    rows = torch.argsort(g.codes, stable=True).reshape(len(sizes), int(sizes[0]))  # [G, m] each group's rows
    idx = rows[draws].reshape(n_boot, -1)  # [B, G * m]: every row of every drawn group, as group_bootstrap_ci
    return _percentile_ci(float(spearman(ta, tb)), spearman(ta[idx], tb[idx]), alpha)


# ------------------------------------------------------------------------------------ LLM agreement
def cached_llm_labels(texts: Sequence[str], cache_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The LLM labels cached under ``cache_dir`` (an :class:`~adaptivek.llm_scorer.LLMScorer` cache) for
    ``texts``: per model, the six dimensions and ``complexity`` per text, NaN where that model has no valid
    cached reply for the current prompt version. ``{}`` when the folder is missing or holds no reply.

    Every reply is checked as the scorer checks it (six scores in [0, 10]); one that is unreadable or out
    of range counts as missing, and a warning counts them.
    """
    from .llm_scorer import PROMPT_VERSION, LLMScorer

    texts = text_list(texts)
    models, broken = _cached_models(Path(cache_dir), PROMPT_VERSION)
    if broken:
        warnings.warn(f"{broken} files in the LLM cache {cache_dir} are unreadable or not a reply of this "
                      "prompt version; they count as missing labels", stacklevel=2)
    out = {}
    for model in models:  # the cache key is (model, prompt version, text): looked up the scorer's own way
        reader = LLMScorer("http://cache.invalid", model, cache_dir=cache_dir)
        rows = [reader._cached(t) or {} for t in texts]  # noqa: SLF001 - read-only use of the scorer's cache
        df = pd.DataFrame(rows, columns=list(DIMENSIONS), dtype=float)
        df["complexity"] = sum(df[d] * w for d, w in DIMENSIONS.items())  # as LLMScorer.score computes it
        out[model] = df
    return out


def _cached_models(cache_dir: Path, prompt_version: str) -> tuple[list[str], int]:
    """Models with at least one cached reply of ``prompt_version`` under ``cache_dir``, and the count of
    files that are not such a reply (unreadable JSON, another prompt version, no model name)."""
    models, broken = set(), 0
    for path in sorted(cache_dir.glob("*/*.json")) if cache_dir.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            ok = entry.get("prompt_version") == prompt_version and isinstance(entry.get("model"), str)
        except (OSError, ValueError, AttributeError):
            ok = False
        if ok:
            models.add(entry["model"])
        broken += not ok
    return sorted(models), broken


def llm_agreement(rubric: pd.DataFrame, llm: pd.DataFrame, *, groups: Any = None, n_boot: int = 1000,
                  seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Spearman of the rubric's scores with an LLM's, per dimension and for ``complexity``, with a percentile
    bootstrap interval (over texts, or over ``groups``, e.g. documents, when given). Rows pair by position;
    a text either scorer failed on (NaN) is left out, and ``n`` counts the texts both scored. Fewer than 3
    such texts give NaN."""
    for what, df in (("rubric", rubric), ("llm", llm)):
        missing = [c for c in COLUMNS if c not in getattr(df, "columns", [])]
        if missing:
            raise ValueError(f"{what} scores lack columns {missing}; pass the DataFrame a scorer's .score() returns")
    same_length(rubric, llm, "rubric", "llm")
    g = None if groups is None else np.asarray(groups)
    if g is not None:
        same_length(g, rubric, "groups", "rubric")
    rows = {}
    for col in COLUMNS:
        a, b = rubric[col].to_numpy(dtype=float), llm[col].to_numpy(dtype=float)
        ok = ~(np.isnan(a) | np.isnan(b))
        rows[col] = {**_spearman_ci(a[ok], b[ok], None if g is None else g[ok], n_boot, seed, alpha)._asdict(),
                     "n": int(ok.sum())}
    return pd.DataFrame.from_dict(rows, orient="index").rename(columns={"estimate": "spearman"})


def _spearman_ci(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None, n_boot: int, seed: int, alpha: float) -> CI:
    """Spearman with its bootstrap CI (rows, or whole groups); NaN with fewer than 3 pairs or 2 groups."""
    if len(a) < 3 or (groups is not None and len(np.unique(groups)) < 2):
        return CI(np.nan, np.nan, np.nan)
    if groups is None:
        return bootstrap_ci(spearman, a, b, n_boot=n_boot, seed=seed, alpha=alpha)
    return group_bootstrap_ci(lambda x, y: spearman(x, y), a, b, groups=groups, n_boot=n_boot, seed=seed, alpha=alpha)
