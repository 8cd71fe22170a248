"""Claim 1 tested beyond the paper: is complexity linearly encoded by the model, or only in its words?

The paper's evidence is a ridge probe's held-out correlation. With labels built from word statistics
(our rubric), a good correlation can come from the words alone. This module asks the sharper questions:

* **like for like**: the probe and every control use one preprocessing rule (:data:`PREPROCESSING`:
  features z-scored with the statistics of the training part only, inside every fold too), document-grouped
  splits, and scores pooled, within a source and **leave one source out** (:func:`source_transfer`);
* **incremental validity**: the cross-fitted R² that the hidden state adds to a lexical baseline (bag of
  input embeddings + length + the rubric's own features, :func:`lexical_baseline`), with an interval over
  documents (:func:`incremental_r2`);
* **word order**: how far the probe's prediction moves when each context's words are shuffled, against the
  lexical baseline's move and the label's (:func:`shuffle_words`, :func:`order_sensitivity`);
* **human labels**: OneStopEnglish reading level as the target, whole articles read in chunks with a pooled
  readout (:func:`chunk_texts`, :func:`pooled_chunk_readout`, :func:`onestop_as_labels`). It is validation
  data: nothing here is tuned on it;
* a computed **verdict** per question (:func:`claim1_verdicts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from .checks import int_at_least, real_tensor, text_list
from .linear_encoding import (
    SCORE_COLUMNS,
    document_scores,
    length_features,
    mean_input_embeddings,
    mean_pool,
    within_source_scores,
)
from .probe import LAMBDAS, RidgeProbe, out_of_fold_predict
from .stats import bootstrap_ci, group_bootstrap_ci, pearson, r2, spearman, validation_folds

PREPROCESSING = {"standardize": True}  # one rule for the probe and every control: z-score on the training part
LEVELS = (0, 1, 2)  # OneStopEnglish: elementary, intermediate, advanced
PAIR_CHANCE = 0.5  # chance share of correctly ordered within-article level pairs
ORDER_CHANCE = 1 / 6  # chance share of articles whose three levels are fully ordered


# ----------------------------------------------------------------------------- the lexical baseline
def rubric_features(texts: Sequence[str]) -> torch.Tensor:
    """The rubric's own raw features [n, 29] (float64), in :data:`adaptivek.complexity.FEATURES` order.

    An undefined rate (e.g. no lower-case word to measure) becomes the calibration's centre, exactly as
    :class:`~adaptivek.complexity.RubricScorer` counts it as average. A text without words has no label:
    drop it first (it is refused here).
    """
    from .complexity import FEATURES, RubricScorer, features

    texts = text_list(texts)
    feats = features(texts)
    nowords = np.flatnonzero(feats["words"].to_numpy() == 0)
    if len(nowords):
        raise ValueError(f"{len(nowords)} texts have no words (e.g. index {int(nowords[0])}); they have no label, "
                         f"drop them before building features")
    names = list(chain.from_iterable(FEATURES.values()))
    centre = pd.Series({f: s["center"] for f, s in RubricScorer().calibration["features"].items()})
    return torch.tensor(feats[names].fillna(centre[names]).to_numpy(dtype=np.float64))


def lexical_baseline(lm, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Word statistics without context processing [n, d + 6 + 29] (float64), for the texts the model read.

    The bag of input embeddings (:func:`~adaptivek.linear_encoding.mean_input_embeddings`), the length
    features and the rubric's raw features side by side; each column is z-scored by the probe that uses it.
    """
    texts = text_list(texts)
    bag = mean_input_embeddings(lm, texts, max_length).double()
    return torch.cat([bag, length_features(texts, lm.tokenizer, max_length=max_length), rubric_features(texts)], 1)


# ----------------------------------------------------------------------------- like-for-like controls
def _fit(X: Any, y: torch.Tensor, rows: torch.Tensor, groups: np.ndarray, **kw) -> RidgeProbe:
    """A ridge probe on ``rows`` with :data:`PREPROCESSING`, CV folds grouped by document."""
    return RidgeProbe.fit(X[rows], y[rows], groups=groups[rows.numpy()], **PREPROCESSING, **kw)


def leave_one_source_out(X: Any, y: Any, sources: Sequence[Any], documents: Sequence[Any], *, min_n: int = 20,
                         lambdas: Sequence[float] = LAMBDAS, folds: int = 5, seed: int = 0,
                         n_boot: int = 1000) -> pd.DataFrame:
    """Train on every source but one, test on the one left out: one row per source with >= ``min_n`` rows.

    Columns: :func:`~adaptivek.linear_encoding.document_scores` (intervals resample the held-out source's
    documents) and ``n_train``. A probe that only learnt which source a text comes from cannot transfer.
    """
    X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
    y = real_tensor(y, "y").flatten()
    src, docs = np.asarray(sources, dtype=object), np.asarray(documents, dtype=object)
    if not (len(X) == len(y) == len(src) == len(docs)):
        raise ValueError(f"X, y, sources and documents have different lengths: {len(X)}, {len(y)}, {len(src)}, "
                         f"{len(docs)}; pass one of each per row")
    names, counts = np.unique(src, return_counts=True)
    if len(names) < 2:
        raise ValueError(f"leave-one-source-out needs at least 2 sources, got {names.tolist()}")
    rows = {}
    for s in names[counts >= int_at_least(min_n, "min_n", 2)]:  # a loop over sources, not rows
        held = torch.as_tensor(src == s)
        probe = _fit(X, y, (~held).nonzero().flatten(), docs, lambdas=lambdas, folds=folds, seed=seed)
        pred = probe.predict(X[held]).double()
        rows[s] = {**document_scores(pred, y[held], docs[held.numpy()], n_boot=n_boot, seed=seed),
                   "n_train": int((~held).sum())}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*SCORE_COLUMNS, "n_train"])
    table.index.name = "held-out source"
    return table


def source_transfer(features: dict[str, Any], y: Any, sources: Sequence[Any], documents: Sequence[Any],
                    train: Any, test: Any, *, min_n: int = 20, lambdas: Sequence[float] = LAMBDAS, folds: int = 5,
                    seed: int = 0, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each model pooled, within a source and leave one source out, all with :data:`PREPROCESSING`.

    ``features``: ``{model: X [n, d]}`` (the probe's activations and every control). ``train``/``test``:
    the document-grouped held-out split. Returns ``(summary, loso)``: ``summary`` has one row per model with
    the held-out Pearson pooled and with each source's training mean removed (document-bootstrap CIs), and
    the mean and minimum Pearson over held-out sources; ``loso`` the per-source rows (index model, source).
    """
    y = real_tensor(y, "y").flatten()
    src, docs = np.asarray(sources, dtype=object), np.asarray(documents, dtype=object)
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    kw = dict(lambdas=lambdas, folds=folds, seed=seed)
    summary, loso = {}, {}
    for name, X in features.items():  # a loop over models
        probe = _fit(X, y, train, docs, **kw)
        within = within_source_scores(
            probe.predict(X[test]).double(), y[test], src[test.numpy()], docs[test.numpy()],
            train_pred=probe.predict(X[train]).double(), train_y=y[train], train_sources=src[train.numpy()],
            min_n=min_n, n_boot=n_boot, seed=seed)
        loso[name] = leave_one_source_out(X, y, src, docs, min_n=min_n, n_boot=n_boot, **kw)
        pooled, removed = within.loc["pooled"], within.loc["pooled, source means removed"]
        summary[name] = {"pooled": pooled["pearson"], "pooled_lo": pooled["pearson_lo"],
                         "pooled_hi": pooled["pearson_hi"], "within": removed["pearson"],
                         "within_lo": removed["pearson_lo"], "within_hi": removed["pearson_hi"],
                         "loso_mean": float(loso[name]["pearson"].mean()),
                         "loso_min": float(loso[name]["pearson"].min())}
    summary = pd.DataFrame.from_dict(summary, orient="index")
    summary.index.name = "model"
    return summary, pd.concat(loso, names=["model", "held-out source"])


# ----------------------------------------------------------------------------- incremental validity
def _stack(pred_base: torch.Tensor, pred_extra: torch.Tensor, y: torch.Tensor, val_sets: list) -> torch.Tensor:
    """Cross-fitted least-squares combination ``a + b·pred_base + c·pred_extra`` [n]: fold f's rows are
    predicted by the coefficients fitted on the other folds."""
    D = torch.stack([torch.ones_like(y), pred_base, pred_extra], 1)  # [n, 3]
    out = torch.empty_like(y)
    for val in val_sets:  # a loop over folds
        fit = torch.ones(len(y), dtype=torch.bool)
        fit[val] = False
        coef = torch.linalg.lstsq(D[fit], y[fit, None]).solution  # [3, 1]
        out[val] = (D[val] @ coef)[:, 0]
    return out


def incremental_r2(base: Any, extra: Any, y: Any, groups: Sequence[Any], *, folds: int = 5,
                   lambdas: Sequence[float] = LAMBDAS, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Cross-fitted R² of ``base`` [n, a] alone, of ``extra`` [n, b] alone and of both, and ΔR².

    Every row is predicted by ridge probes (:data:`PREPROCESSING`, λ by a nested CV) that never saw its
    document's fold (:func:`~adaptivek.probe.out_of_fold_predict`). "Both" stacks the two out-of-fold
    predictions with a least-squares fit (intercept and two weights) cross-fitted over the same folds: one
    ridge on both feature sets would shrink the base features with the extra ones under one λ and could
    score below the base alone. ΔR² = R²(both) - R²(base) is what ``extra`` adds on new documents; its
    interval resamples documents, both predictions of a document drawn together (paired). Returns
    ``r2_base``, ``r2_extra``, ``r2_full``, ``delta``, ``delta_lo``, ``delta_hi``, ``n``, ``n_documents``
    and the predictions ``pred_base``, ``pred_extra``, ``pred_full`` (float64 [n]).
    """
    y = real_tensor(y, "y").flatten()
    B, E = real_tensor(base, "base"), real_tensor(extra, "extra")
    if not (B.ndim == E.ndim == 2 and len(B) == len(E) == len(y)):
        raise ValueError(f"base {tuple(B.shape)} and extra {tuple(E.shape)} must be [n, d] with one row per label "
                         f"({len(y)})")
    g = np.asarray(groups, dtype=object)
    kw = dict(groups=g, folds=folds, lambdas=lambdas, seed=seed, **PREPROCESSING)
    preds = {k: out_of_fold_predict(X, y, **kw).double() for k, X in (("base", B), ("extra", E))}
    preds["full"] = _stack(preds["base"], preds["extra"], y, validation_folds(folds, len(y), seed, groups=g))
    d = group_bootstrap_ci(lambda pb, pf, t: r2(pf, t) - r2(pb, t), preds["base"], preds["full"], y, groups=g,
                           n_boot=n_boot, seed=seed)
    return {**{f"r2_{k}": float(r2(p, y)) for k, p in preds.items()}, "delta": d.estimate, "delta_lo": d.lo,
            "delta_hi": d.hi, "n": len(y), "n_documents": len(set(g.tolist())),
            **{f"pred_{k}": p for k, p in preds.items()}}


# ----------------------------------------------------------------------------- word order
def shuffle_words(texts: Sequence[str], *, seed: int = 0) -> list[str]:
    """Each text's whitespace-separated words in a seeded random order, joined by single spaces.

    The same bag of words (punctuation stays attached to its word), no syntax or discourse left. Text ``i``
    is shuffled by a generator seeded with ``(seed, i)``: the same call gives the same texts.
    """
    out = []
    for i, t in enumerate(text_list(texts)):  # strings: no tensor op does this
        words = t.split()
        order = np.random.default_rng([int(seed), i]).permutation(len(words))
        out.append(" ".join(words[j] for j in order))
    return out


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def order_sensitivity(probe: tuple[Any, Any], baseline: tuple[Any, Any], label: tuple[Any, Any],
                      documents: Sequence[Any], *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """How far the probe, the lexical baseline and the label move when a context's words are shuffled.

    Each argument is ``(on the original texts [n], on the shuffled texts [n])``. Rows (``estimate``, ``lo``,
    ``hi``; intervals resample documents, every row from the same draws, so differences are paired):
    mean |move| of the probe, the baseline and the label; ``probe minus baseline |move|`` (above 0: the probe
    responds to word order beyond what the word statistics change); the Pearson of each move with the
    label's move; the probe's Pearson with the original labels on original and on shuffled inputs.
    """
    (p0, p1), (b0, b1), (y0, y1) = ((real_tensor(a, "predictions").flatten(), real_tensor(b, "predictions").flatten())
                                    for a, b in (probe, baseline, label))
    docs = np.asarray(documents, dtype=object)
    if not all(len(t) == len(docs) for t in (p0, p1, b0, b1, y0, y1)):
        raise ValueError("probe, baseline and label pairs and documents must all have one entry per shuffled text")
    stats = {
        "probe: mean |move|": lambda p0, p1, b0, b1, y0, y1: _mean_abs(p1, p0),
        "lexical baseline: mean |move|": lambda p0, p1, b0, b1, y0, y1: _mean_abs(b1, b0),
        "label: mean |move|": lambda p0, p1, b0, b1, y0, y1: _mean_abs(y1, y0),
        "probe minus baseline |move|": lambda p0, p1, b0, b1, y0, y1: _mean_abs(p1, p0) - _mean_abs(b1, b0),
        "probe move vs label move (Pearson)": lambda p0, p1, b0, b1, y0, y1: pearson(p1 - p0, y1 - y0),
        "baseline move vs label move (Pearson)": lambda p0, p1, b0, b1, y0, y1: pearson(b1 - b0, y1 - y0),
        "probe on original texts (Pearson)": lambda p0, p1, b0, b1, y0, y1: pearson(p0, y0),
        "probe on shuffled texts (Pearson with original labels)": lambda p0, p1, b0, b1, y0, y1: pearson(p1, y0),
    }
    rows = {k: group_bootstrap_ci(fn, p0, p1, b0, b1, y0, y1, groups=docs, n_boot=n_boot, seed=seed)._asdict()
            for k, fn in stats.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "quantity"
    return table


# ----------------------------------------------------------------------------- OneStopEnglish as labels
class Chunks(NamedTuple):
    """Texts cut into windows of at most ``max_length`` tokens."""

    texts: list[str]  # [n_chunks] the windows, as text
    text_index: torch.Tensor  # [n_chunks] int64: the text each window comes from
    read: list[str]  # [n_texts] the part of each text that its windows cover (what the model read)


def chunk_texts(tokenizer, texts: Sequence[str], max_length: int, max_chunks: int | None = None) -> Chunks:
    """Cut each text into consecutive windows of ``max_length`` tokens (at most ``max_chunks`` per text).

    Windows are cut at token boundaries and returned as the text they span, so ``extract(..., max_length)``
    reads each whole. A tokenizer that adds special tokens (a BOS) leaves room for them in every window.
    """
    texts = text_list(texts)
    int_at_least(max_length, "max_length")
    if max_chunks is not None:
        int_at_least(max_chunks, "max_chunks")
    room = max_length - len(tokenizer("a")["input_ids"]) + len(tokenizer("a", add_special_tokens=False)["input_ids"])
    int_at_least(room, "max_length minus the tokenizer's special tokens", why="a window needs one token")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, index, read = [], [], []
    for i, (text, offsets) in enumerate(zip(texts, enc, strict=True)):  # strings: no tensor op does this
        if not offsets:
            raise ValueError(f"texts[{i}] tokenises to zero tokens; drop it")
        starts = range(0, len(offsets), room)[:max_chunks]
        spans = [(offsets[s][0], offsets[min(s + room, len(offsets)) - 1][1]) for s in starts]
        out += [text[a:b] for a, b in spans]
        index += [i] * len(spans)
        read.append(text[spans[0][0]:spans[-1][1]])
    return Chunks(out, torch.tensor(index, dtype=torch.int64), read)


def pooled_chunk_readout(lm, texts: Sequence[str], layer: int, *, max_length: int, max_chunks: int | None = None,
                         batch_size: int = 32, cache_dir: Any = None) -> tuple[torch.Tensor, list[str]]:
    """Whole texts read in windows: the mean over windows of each window's mean-pooled residual [n, d].

    Returns the readout and the text each readout covers (:attr:`Chunks.read`: what the model read, for the
    lexical baseline). ``max_chunks`` caps the windows per text (None: the whole text).
    """
    from .activations import extract

    ch = chunk_texts(lm.tokenizer, texts, max_length, max_chunks)
    acts, token_text = extract(lm, ch.texts, layer, token="all", max_length=max_length, batch_size=batch_size,
                               cache_dir=cache_dir, progress=False)  # [n_tokens, d], [n_tokens]
    per_chunk = mean_pool(acts.double(), token_text, len(ch.texts))  # [n_chunks, d]
    return mean_pool(per_chunk, ch.text_index, len(ch.read)), ch.read  # [n_texts, d]


def level_ordering(scores: Any, levels: Any, topics: Sequence[Any], *, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, float]:
    """Within-article ordering of the three levels by ``scores`` (mean per article and level).

    ``pairwise`` share of within-article level pairs in the right order (chance :data:`PAIR_CHANCE`) with a
    bootstrap interval over articles, ``ordered`` share of articles fully ordered (chance
    :data:`ORDER_CHANCE`), ``n_topics`` (articles with all three levels).
    """
    df = pd.DataFrame({"s": real_tensor(scores, "scores").flatten().numpy(),
                       "level": real_tensor(levels, "levels").flatten().numpy(), "topic": list(topics)})
    if not df["level"].isin(LEVELS).all():
        raise ValueError("levels must be 0 (elementary), 1 (intermediate) or 2 (advanced)")
    full = df.groupby(["topic", "level"])["s"].mean().unstack("level").reindex(columns=list(LEVELS)).dropna()
    m = torch.tensor(full.to_numpy())  # [n_topics, 3]
    if len(m) < 2:
        raise ValueError(f"{len(m)} articles have all three levels; level ordering needs at least 2")
    pairs = torch.stack([m[:, 1] > m[:, 0], m[:, 2] > m[:, 1], m[:, 2] > m[:, 0]], 1).double()  # [n_topics, 3]
    ci = bootstrap_ci(lambda p: p.mean(-1), pairs.mean(1), n_boot=n_boot, seed=seed)
    return {"pairwise": ci.estimate, "pairwise_lo": ci.lo, "pairwise_hi": ci.hi,
            "ordered": float(pairs.all(1).double().mean()), "n_topics": len(m)}


def residualize(a: Any, b: Any) -> torch.Tensor:
    """``a`` minus its least-squares fit ``α + β b``: what ``a`` holds that is not a linear function of ``b``."""
    a, b = real_tensor(a, "a").flatten(), real_tensor(b, "b").flatten()
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"a and b must have the same length >= 3, got {len(a)} and {len(b)}")
    D = torch.stack([torch.ones_like(b), b], 1)  # [n, 2]
    coef = torch.linalg.lstsq(D, a[:, None]).solution  # [2, 1]
    return a - (D @ coef)[:, 0]


def onestop_as_labels(hidden: Any, lexical: Any, levels: Any, topics: Sequence[Any], *, folds: int = 5,
                      lambdas: Sequence[float] = LAMBDAS, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Reading level (0, 1, 2) as the target: hidden readout against the lexical baseline, grouped by article.

    Cross-fitted as :func:`incremental_r2` with articles as the groups (``r2_*``, ``delta*``); Spearman of
    each out-of-fold prediction with level (``spearman_hidden``, ``spearman_lexical``, intervals over
    articles); and the within-article ordering (:func:`level_ordering`) of the hidden prediction after
    removing its linear fit on the lexical prediction (``residual_*``): does what the hidden state adds
    still order the three versions of one article? Chance: :data:`PAIR_CHANCE`, :data:`ORDER_CHANCE`.
    """
    inc = incremental_r2(lexical, hidden, levels, topics, folds=folds, lambdas=lambdas, seed=seed, n_boot=n_boot)
    y, g = real_tensor(levels, "levels").flatten(), np.asarray(topics, dtype=object)
    out = {k: v for k, v in inc.items() if not k.startswith("pred_")}
    for name, key in (("hidden", "pred_extra"), ("lexical", "pred_base")):
        ci = group_bootstrap_ci(spearman, inc[key], y, groups=g, n_boot=n_boot, seed=seed)
        out.update({f"spearman_{name}": ci.estimate, f"spearman_{name}_lo": ci.lo, f"spearman_{name}_hi": ci.hi})
        out.update({f"{name}_{k}": v for k, v in level_ordering(inc[key], y, g, n_boot=n_boot, seed=seed).items()})
    resid = residualize(inc["pred_extra"], inc["pred_base"])
    out.update({f"residual_{k}": v for k, v in level_ordering(resid, y, g, n_boot=n_boot, seed=seed).items()})
    return out


# ----------------------------------------------------------------------------- the verdict
def _verdict(answer: bool | None, value: float, lo: float = math.nan, hi: float = math.nan, **detail) -> dict:
    return {"answer": "not measured" if answer is None else ("yes" if answer else "no"), "value": float(value),
            "lo": float(lo), "hi": float(hi), **detail}


def claim1_verdicts(*, probe_pearson: float, null_pearson: Any, beyond_length: dict[str, float],
                    incremental: dict[str, Any], word_order: pd.DataFrame | None = None,
                    transfer: dict[str, Any] | None = None, human_labels: dict[str, Any] | None = None) -> dict:
    """One computed yes/no per question of claim 1, each with its number (``value``, ``lo``, ``hi``).

    * ``decodable``: the probe's held-out Pearson above the permutation null (one-sided p < 0.05 over
      ``null_pearson``, the Pearsons of probes fitted to shuffled labels), not above 0;
    * ``beyond_length``: the paired CI of probe minus length-control Pearson above 0 (``dpearson*`` keys);
    * ``beyond_lexical``: the ΔR² interval of :func:`incremental_r2` above 0;
    * ``order_sensitive``: under word shuffling the probe moves more than the lexical baseline (CI > 0)
      **and** its move follows the label's own move (``tracks``: their Pearson, CI > 0). A probe that moves
      but not the way the label does reads something order-dependent that is not this complexity;
    * ``transfers``: the rubric-trained probe's Spearman with OneStopEnglish level, CI above 0;
    * ``human_beyond_lexical``: the hidden readout, residualised on the lexical one, orders the three
      levels within articles above chance (pairwise share CI above :data:`PAIR_CHANCE`).
    A question without its evidence (None) is ``"not measured"``.
    """
    null = real_tensor(null_pearson, "null_pearson").flatten()
    p = float((1 + (null >= probe_pearson).sum()) / (1 + len(null)))
    out = {"decodable": _verdict(p < 0.05, probe_pearson, p=p, n_perm=len(null), null_lo=float(null.quantile(0.025)),
                                 null_hi=float(null.quantile(0.975))),
           "beyond_length": _verdict(beyond_length["dpearson_lo"] > 0, beyond_length["dpearson"],
                                     beyond_length["dpearson_lo"], beyond_length["dpearson_hi"]),
           "beyond_lexical": _verdict(incremental["delta_lo"] > 0, incremental["delta"], incremental["delta_lo"],
                                      incremental["delta_hi"], r2_base=incremental["r2_base"],
                                      r2_full=incremental["r2_full"])}
    w = None if word_order is None else word_order.loc["probe minus baseline |move|"]
    if w is None:
        out["order_sensitive"] = _verdict(None, math.nan)
    else:
        t = word_order.loc["probe move vs label move (Pearson)"]
        out["order_sensitive"] = _verdict(w["lo"] > 0 and t["lo"] > 0, w["estimate"], w["lo"], w["hi"],
                                          tracks=float(t["estimate"]),
                                          tracks_lo=float(t["lo"]), tracks_hi=float(t["hi"]))
    out["transfers"] = (_verdict(None, math.nan) if transfer is None else
                        _verdict(transfer["spearman_lo"] > 0, transfer["spearman"], transfer["spearman_lo"],
                                 transfer["spearman_hi"]))
    h = human_labels
    out["human_beyond_lexical"] = (_verdict(None, math.nan) if h is None else
                                   _verdict(h["residual_pairwise_lo"] > PAIR_CHANCE, h["residual_pairwise"],
                                            h["residual_pairwise_lo"], h["residual_pairwise_hi"],
                                            chance=PAIR_CHANCE, n_topics=h["residual_n_topics"]))
    return out
