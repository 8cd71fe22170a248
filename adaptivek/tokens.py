"""Token-level data for SAEs: positions, the excluded tokens, per-token complexity labels, token sets.

``extract(lm, texts, layer, token="all")`` returns one row per real token, texts in order and the
tokens of one text in sequence order. This module turns those rows into an SAE data set:

- :func:`token_positions`: each row's position in its text.
- :func:`select_tokens` with an :class:`ExclusionRule`: drop the first positions (position 0 is an
  attention sink whose residual norm is ~100x the median on SmolLM2; SAELens and dictionary_learning
  exclude such tokens too) and any other token whose norm exceeds a multiple of the median, counted.
- :func:`prefix_labels`: the complexity target of token ``t`` is the rubric score of the prefix it has
  read, scored as text at cut points every ``every`` tokens from ``first`` on.
- :class:`TokenSet`: activations with their text, position, document and label, subset by rows or
  by texts (a document-grouped split of texts becomes a split of token rows with :func:`rows_of_texts`).
  The paper's last-token data set is the special case :func:`last_token_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .checks import int_at_least, matrix, non_negative_int, same_length

_CHUNK = 65_536  # rows per block when computing norms (bounds the float32 copy of float16 activations)


def _text_index(text_index: Any, name: str = "text_index") -> Tensor:
    """A 1-D int64 tensor whose equal values are contiguous (each text's tokens in one run)."""
    t = torch.as_tensor(text_index)
    if t.ndim != 1 or t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be a 1-D integer tensor [n_tokens] (as returned by extract(..., token='all')),"
                         f" got dtype {t.dtype} and shape {tuple(t.shape)}")
    t = t.long()
    runs = torch.unique_consecutive(t)
    if len(runs) != len(torch.unique(t)):
        raise ValueError(f"{name} is not grouped by text: a text's tokens must be contiguous rows, in order, as "
                         "extract(..., token='all') returns them; keep that order when subsetting")
    return t


def _run_starts(text_index: Tensor) -> Tensor:
    """True at the first row of each text's run. [n] -> [n] bool"""
    start = torch.ones(len(text_index), dtype=torch.bool)
    start[1:] = text_index[1:] != text_index[:-1]
    return start


def token_positions(text_index: Any) -> Tensor:
    """Position of each token within its text (0 for a text's first row). ``[n_tokens]`` int64.

    ``text_index`` is extract's ``[n_tokens]`` text id per row (each text's rows contiguous, in order).
    """
    ti = _text_index(text_index)
    start = _run_starts(ti)
    rows = torch.arange(len(ti))
    first_row = rows[start]  # [n_runs] the first row of each run
    return rows - first_row[start.cumsum(0) - 1]


def last_token_rows(text_index: Any) -> Tensor:
    """Row of each text's final token, in text order: the paper's last-token data set.

    ``acts[last_token_rows(text_index)]`` equals ``extract(..., token="last")`` on the same texts.
    """
    ti = _text_index(text_index)
    end = torch.ones(len(ti), dtype=torch.bool)
    end[:-1] = ti[:-1] != ti[1:]
    return end.nonzero().flatten()


def rows_of_texts(text_index: Any, text_ids: Any) -> Tensor:
    """Rows (in row order) of the tokens whose text is in ``text_ids``: a split of texts -> a split of rows.

    A text with no rows (all its tokens excluded) contributes none.
    """
    ti = _text_index(text_index)
    ids = torch.as_tensor(np.asarray(text_ids)).reshape(-1)
    if len(ids) == 0:
        return torch.empty(0, dtype=torch.long)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"text_ids must be integer text ids (e.g. a split of range(len(texts))), got dtype {ids.dtype}")
    return torch.isin(ti, ids.long()).nonzero().flatten()


# --------------------------------------------------------------------------------------- exclusion
@dataclass(frozen=True)
class ExclusionRule:
    """Which token vectors an SAE never sees; every exclusion is counted by :func:`select_tokens`."""

    drop_first: int = 1
    """Tokens at positions < ``drop_first`` are excluded. Position 0 is an attention sink: on SmolLM2 its
    residual norm is ~100x the median, and SAELens and dictionary_learning exclude such tokens too."""
    max_norm_ratio: float | None = 10.0
    """A token whose residual norm exceeds this multiple of the median norm of the tokens left after
    ``drop_first`` is excluded too: other sink-like tokens (on SmolLM2 a few texts put a second sink at
    position 1, tens of times the median, while ordinary tokens stay within about 2x). ``None`` disables
    the rule."""

    def __post_init__(self) -> None:
        non_negative_int(self.drop_first, "ExclusionRule.drop_first")
        r = self.max_norm_ratio
        if r is not None and not (isinstance(r, (int, float)) and not isinstance(r, bool) and 1 < r < math.inf):
            raise ValueError(f"ExclusionRule.max_norm_ratio must be a finite number > 1 (a multiple of the median "
                             f"norm: at most 1 would exclude about half the tokens) or None to disable, got {r!r}")


class TokenSelection(NamedTuple):
    """What :func:`select_tokens` keeps, and why the rest is excluded."""

    keep: Tensor  # [n_tokens] bool
    counts: dict[str, int]  # total, first_positions, extreme_norm, kept
    median_norm: float  # median norm of the tokens left after drop_first (the lower one for an even count)
    threshold: float | None  # max_norm_ratio * median_norm (None: no norm rule)
    norms: Tensor  # [n_tokens] residual norm of every token (for the norm distribution)


def _row_norms(acts: Tensor) -> Tensor:
    """L2 norm of each row in float32, block by block; refuses NaN or inf activations."""
    norms = torch.cat([torch.linalg.vector_norm(b, dim=1, dtype=torch.float32) for b in acts.split(_CHUNK)])
    bad = ~torch.isfinite(norms)
    if bad.any():
        rows = bad.nonzero().flatten()
        broken = rows[~torch.isfinite(acts[rows]).all(dim=1)]
        if len(broken):
            raise ValueError(f"acts contains NaN or inf in {len(broken)} token row(s) (first: {broken[:5].tolist()});"
                             " the activations are broken (e.g. float16 overflow): re-extract them in float32")
        norms[rows] = torch.linalg.vector_norm(acts[rows].double(), dim=1).float()  # finite but overflowed float32
    return norms


def select_tokens(acts: Tensor, text_index: Any, rule: ExclusionRule = ExclusionRule()) -> TokenSelection:
    """Apply ``rule`` to extract's token rows: a keep mask, the counts per reason, the norm threshold.

    The median is taken over the tokens left after ``drop_first``, so at most half of them can exceed
    any ratio > 1: the norm rule can never exclude every token. NaN/inf activations raise.
    """
    if not isinstance(rule, ExclusionRule):
        raise TypeError(f"rule must be an ExclusionRule, got {type(rule).__name__}")
    matrix(acts, "acts")
    ti = _text_index(text_index)
    same_length(acts, ti, "acts", "text_index")
    norms = _row_norms(acts)
    late = token_positions(ti) >= rule.drop_first
    if not late.any():
        raise ValueError(f"no token left: all {len(ti)} tokens are at positions < drop_first={rule.drop_first} "
                         "(texts too short); lower ExclusionRule.drop_first or extract longer texts (max_length)")
    median = float(norms[late].median())
    threshold = None if rule.max_norm_ratio is None else rule.max_norm_ratio * median
    extreme = late & (norms > threshold) if threshold is not None else torch.zeros_like(late)
    keep = late & ~extreme
    counts = {"total": len(ti), "first_positions": int((~late).sum()), "extreme_norm": int(extreme.sum()),
              "kept": int(keep.sum())}
    return TokenSelection(keep, counts, median, threshold, norms)


# ------------------------------------------------------------------------------------ prefix labels
class CutPoints(NamedTuple):
    """Prefix lengths (in tokens) to score, sorted by text then cut."""

    text: Tensor  # [n_cuts] int64 text id
    cut: Tensor  # [n_cuts] int64 prefix length in tokens (the prefix is tokens 0..cut-1)


def prefix_cut_points(n_tokens_per_text: Any, first: int = 16, every: int = 8, *,
                      include_end: bool = True) -> CutPoints:
    """Cut points ``first, first + every, ... <= L`` of each text of ``L`` tokens (none when ``L < first``).

    With ``include_end`` (the default) a text's full length ``L >= first`` is a cut point too, so its last
    token is labelled with the complexity of everything it has read: the paper's last-token label.
    """
    int_at_least(first, "first", why="the shortest prefix that is scored, in tokens")
    int_at_least(every, "every", why="tokens between cut points")
    lengths = torch.as_tensor(n_tokens_per_text)
    if lengths.ndim != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool or (lengths < 0).any():
        raise ValueError(f"n_tokens_per_text must be a 1-D tensor of non-negative ints, got {lengths!r}")
    lengths = lengths.long()
    top = int(lengths.max()) if len(lengths) else 0
    grid = first + every * torch.arange(max(0, (top - first) // every + 1))  # [m] regular cuts
    on = grid[None, :] <= lengths[:, None]  # [n_texts, m]
    text = torch.arange(len(lengths))[:, None].expand_as(on)[on]
    cut = grid[None, :].expand_as(on)[on]
    if include_end:
        end = (lengths >= first) & ((lengths - first) % every != 0)
        text, cut = torch.cat([text, end.nonzero().flatten()]), torch.cat([cut, lengths[end]])
    order = torch.argsort(text * (top + 1) + cut)
    return CutPoints(text[order], cut[order])


@dataclass
class PrefixLabels:
    """Per-token complexity labels aligned row by row with ``extract(..., token="all")``."""

    label: Tensor
    """[n_tokens] float32: complexity of the prefix the token has read; NaN where unlabelled."""
    text_index: Tensor
    """[n_tokens] int64: the text of each row (equal to extract's)."""
    position: Tensor
    """[n_tokens] int64: position of each row within its text."""
    counts: dict[str, int]
    """texts, texts_short (< first tokens: no label), tokens, tokens_in_short_texts, tokens_before_first,
    prefixes, prefixes_unscored (the scorer gave NaN), tokens_unscored, tokens_labelled."""
    prefixes: pd.DataFrame = field(repr=False)
    """One row per scored prefix: text, cut (tokens), prefix (the text read), complexity."""


def _fast_encoding(tokenizer, texts: list[str], max_length: int) -> dict:
    """extract's tokenizer call (same truncation) with the offset mapping."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: prefix labels need its "
                         "offset mapping; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]])
    if (lengths == 0).any():
        raise ValueError(f"texts[{int((lengths == 0).nonzero()[0])}] tokenises to zero tokens; drop it")
    return {"lengths": lengths, "offsets": enc["offset_mapping"]}


def _prefix_texts(texts: list[str], offsets: list, cuts: CutPoints) -> list[str]:
    """``text[:end of token cut-1]`` for each cut point (a running max skips special tokens' (0, 0) offsets)."""
    ends = [np.maximum.accumulate(np.asarray([e for _, e in off], dtype=np.int64)) for off in offsets]
    return [texts[t][: ends[t][c - 1]] for t, c in zip(cuts.text.tolist(), cuts.cut.tolist(), strict=True)]


def _score(scorer, prefixes: list[str]) -> np.ndarray:
    """The scorer's ``complexity`` for each prefix, checked for length."""
    df = scorer.score(prefixes)
    if "complexity" not in df or len(df) != len(prefixes):
        raise ValueError(f"scorer.score must return a DataFrame with a 'complexity' column and one row per text; "
                         f"got columns {list(df.columns)} and {len(df)} rows for {len(prefixes)} prefixes")
    return df["complexity"].to_numpy(dtype=np.float64)


def _inherit(text_index: Tensor, position: Tensor, cuts: CutPoints, scores: Tensor, top: int):
    """Score of the latest cut ``c <= position + 1`` of each token's own text (NaN if none), and whether one exists."""
    key = cuts.text * (top + 1) + cuts.cut  # [n_cuts] sorted
    want = text_index * (top + 1) + position + 1  # [n_tokens]
    j = (torch.searchsorted(key, want, right=True) - 1).clamp(min=0)  # latest cut key <= want (or cut 0)
    has_cut = (key[j] <= want) & (cuts.text[j] == text_index)  # [n_tokens] that cut is this text's
    label = torch.full((len(text_index),), float("nan"), dtype=torch.float32)
    label[has_cut] = scores[j[has_cut]].float()
    return label, has_cut


def prefix_labels(tokenizer, texts: Sequence[str], max_length: int, scorer=None, *, first: int = 16,
                  every: int = 8, include_end: bool = True) -> PrefixLabels:
    """Per-token complexity: token ``t`` gets the score of the prefix it has read (tokens ``0..t``).

    Prefixes ending at the cut points of :func:`prefix_cut_points` are scored as text (``text[:end offset of
    token c-1]``, via the offset mapping of extract's own tokenizer call) by ``scorer`` (a
    :class:`~adaptivek.RubricScorer` by default; any object with ``.score(texts)``). Token ``t`` inherits
    the score of the latest cut ``c <= t + 1``: it lags its own prefix by fewer than ``every`` tokens.
    Tokens before ``first`` and texts shorter than ``first`` tokens are unlabelled (NaN, counted).
    """
    from .activations import _check_texts

    texts = _check_texts(texts)
    int_at_least(max_length, "max_length")
    int_at_least(first, "first", why="the shortest prefix that is scored, in tokens")
    int_at_least(every, "every", why="tokens between cut points")
    if scorer is None:
        from .complexity import RubricScorer

        scorer = RubricScorer()
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(f"scorer must have a .score(texts) method (e.g. RubricScorer()), got {type(scorer).__name__}")
    enc = _fast_encoding(tokenizer, texts, max_length)
    lengths = enc["lengths"]
    cuts = prefix_cut_points(lengths, first, every, include_end=include_end)
    if not len(cuts.cut):
        raise ValueError(f"no text reaches first={first} tokens (longest: {int(lengths.max())} tokens at max_length="
                         f"{max_length}); lower first or use longer texts / a larger max_length")
    prefixes = _prefix_texts(texts, enc["offsets"], cuts)
    scores = torch.tensor(_score(scorer, prefixes))  # [n_cuts] float64
    text_index = torch.repeat_interleave(torch.arange(len(texts)), lengths)  # [n_tokens], extract's order
    position = token_positions(text_index)
    label, has_cut = _inherit(text_index, position, cuts, scores, int(lengths.max()))
    table = pd.DataFrame({"text": cuts.text.numpy(), "cut": cuts.cut.numpy(), "prefix": prefixes,
                          "complexity": scores.numpy()})
    return PrefixLabels(label, text_index, position, _label_counts(lengths, first, has_cut, label, scores), table)


def _label_counts(lengths: Tensor, first: int, has_cut: Tensor, label: Tensor, scores: Tensor) -> dict[str, int]:
    """Where every token's label came from: the counts of :attr:`PrefixLabels.counts`."""
    short = lengths < first  # [n_texts] no cut point at all
    return {"texts": len(lengths), "texts_short": int(short.sum()), "tokens": int(lengths.sum()),
            "tokens_in_short_texts": int(lengths[short].sum()),
            "tokens_before_first": int((~short).sum()) * (first - 1),
            "prefixes": len(scores), "prefixes_unscored": int(scores.isnan().sum()),
            "tokens_unscored": int((has_cut & label.isnan()).sum()), "tokens_labelled": int((~label.isnan()).sum())}


# ------------------------------------------------------------------------------------------ token set
@dataclass
class TokenSet:
    """Token activations with their text, position, source document and label, row by row."""

    acts: Tensor
    """[n, d] activations (float32, or float16 as stored)."""
    text_index: Tensor
    """[n] int64 text id of each row (rows of one text contiguous, in order)."""
    position: Tensor
    """[n] int64 position of each row within its text."""
    document: np.ndarray
    """[n] source-document id of each row (splits must never share one)."""
    label: Tensor
    """[n] float32 complexity label of each row; NaN where unlabelled."""

    def __post_init__(self) -> None:
        matrix(self.acts, "TokenSet.acts", min_rows=0)
        self.text_index = _text_index(self.text_index, "TokenSet.text_index")
        self.position = torch.as_tensor(self.position).long()
        self.document = np.asarray(self.document)
        self.label = torch.as_tensor(self.label, dtype=torch.float32)
        for name in ("text_index", "position", "document", "label"):
            value = getattr(self, name)
            if value.ndim != 1 or len(value) != len(self.acts):
                raise ValueError(f"TokenSet.{name} must have one entry per row of acts ({len(self.acts)}), "
                                 f"got shape {tuple(value.shape)}")

    @classmethod
    def from_extract(cls, acts: Tensor, text_index: Any, documents: Sequence[Any], label: Any = None) -> TokenSet:
        """From ``extract(..., token="all")``'s rows, one document id per TEXT, optional per-row labels."""
        ti = _text_index(text_index)
        documents = np.asarray(documents)
        if documents.ndim != 1 or (len(ti) and int(ti.max()) >= len(documents)) or (len(ti) and int(ti.min()) < 0):
            raise ValueError(f"documents must hold one id per text ({int(ti.max()) + 1 if len(ti) else 0} texts "
                             f"in text_index), got shape {documents.shape}")
        missing = np.flatnonzero(pd.isna(documents))
        if len(missing):
            raise ValueError(f"documents has {len(missing)} missing id(s) (first: text {int(missing[0])}); every text "
                             "needs its source document (load_corpus gives a 'document' column; a text with no "
                             "known source can be its own document: use its text index)")
        label = torch.full((len(ti),), float("nan")) if label is None else label
        return cls(acts, ti, token_positions(ti), documents[ti.numpy()], label)

    def __len__(self) -> int:
        return len(self.acts)

    def select(self, rows: Any) -> TokenSet:
        """The rows given by a bool mask ``[n]`` or row indices (kept in row order if increasing)."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool and rows.shape != (len(self),):
            raise ValueError(f"a row mask must have shape ({len(self)},), got {tuple(rows.shape)}")
        idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long().reshape(-1)
        return TokenSet(self.acts[idx], self.text_index[idx], self.position[idx], self.document[idx.numpy()],
                        self.label[idx])

    def of_texts(self, text_ids: Any) -> TokenSet:
        """The rows of the texts in ``text_ids``."""
        return self.select(rows_of_texts(self.text_index, text_ids))

    def split(self, *text_id_sets: Any, allow_shared_documents: bool = False) -> tuple[TokenSet, ...]:
        """One TokenSet per set of text ids (e.g. train/val/test from a document-grouped split of texts).

        Refuses sets that share a text, or (unless ``allow_shared_documents``) a source document.
        """
        parts = [self.of_texts(ids) for ids in text_id_sets]
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                _disjoint(parts[i], parts[j], i, j, allow_shared_documents)
        return tuple(parts)


def _disjoint(a: TokenSet, b: TokenSet, i: int, j: int, allow_shared_documents: bool) -> None:
    texts = np.intersect1d(a.text_index.numpy(), b.text_index.numpy())
    if len(texts):
        raise ValueError(f"text sets {i} and {j} share {len(texts)} text(s) (e.g. {texts[:3].tolist()}); "
                         "a text must belong to one split only")
    docs = np.intersect1d(a.document, b.document)
    if len(docs) and not allow_shared_documents:
        raise ValueError(f"text sets {i} and {j} share {len(docs)} source document(s) (e.g. {docs[:3].tolist()}): "
                         "the split leaks; split texts grouped by document (stats.group_split), or pass "
                         "allow_shared_documents=True to measure the leak on purpose")
