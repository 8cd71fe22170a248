"""The vectors the SAEs of chapters 4 and 5 train and are tested on: last tokens or every token.

Two regimes, one function (:func:`build_sae_data`):

- ``"last_token"`` (the paper's): one vector per context, its last real token, labelled with the
  context's complexity. With a few thousand contexts a dictionary of thousands of latents memorises
  them (chapter 4 shows the gap between training and held-out FVE).
- ``"all_tokens"``: every token that the :class:`~adaptivek.tokens.ExclusionRule` keeps (position 0, an
  attention sink, and extreme-norm tokens are excluded and counted), labelled with the complexity of the
  prefix it has read (:func:`~adaptivek.tokens.prefix_labels`; NaN before the first scored prefix: such
  rows train the SAEs but never the probe). AdaptiveK's k depends only on the vector it encodes, so the
  same SAE serves every token; the paper's set is the special case of each context's final position.

Both split the **texts** into train and test by source document (chapter 3's split), so no document
has tokens on both sides, and both scale the activations by ``sqrt(d / mean‖x_train‖²)``.
:func:`load_sae_data` does the chapters' loading (chapter 1's cache, chapter 2's labels) around it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .checks import matrix, one_of
from .io import CacheError, CacheWarning, file_digest, save_tensors, write_json
from .tokens import ExclusionRule, TokenSelection, TokenSet, last_token_rows, prefix_labels, select_tokens

SAEDataMode = Literal["last_token", "all_tokens"]
MODES = ("last_token", "all_tokens")


@dataclass
class SAEData:
    """Training and held-out vectors for the SAEs, with their labels, documents and what was excluded."""

    mode: str
    """``"last_token"`` or ``"all_tokens"``."""
    train: TokenSet
    """Training rows (activations in model units; multiply by :attr:`scale` before an SAE)."""
    test: TokenSet
    """Held-out rows: texts (and documents) that no training row comes from."""
    scale: float
    """``sqrt(d / mean‖x_train‖²)``: SAEs train on ``acts * scale`` (SAELens' convention)."""
    texts_train: Tensor
    """[n] ids of the training texts (indices into the texts given to :func:`build_sae_data`)."""
    texts_test: Tensor
    """Ids of the held-out texts."""
    counts: dict[str, int] = field(default_factory=dict)
    """Tokens in, excluded per reason, kept, labelled and unlabelled, per split."""
    selection: TokenSelection | None = None
    """The exclusion rule's result over every token (None for ``last_token``), for the norm plot."""

    def scaled(self, split: Literal["train", "test"]) -> Tensor:
        """The split's activations times :attr:`scale`, float32: what the SAEs see."""
        return getattr(self, split).acts.float() * self.scale

    def last_rows(self, split: Literal["train", "test"]) -> Tensor:
        """Row of each text's last kept token in ``split`` (every row in ``last_token`` mode)."""
        return last_token_rows(getattr(self, split).text_index)

    def splice_texts(self, n_tokens: int, *, seed: int = 0, split: Literal["train", "test"] = "test") -> list[int]:
        """Text ids of ``split`` in a seeded random order, as few as give at least ``n_tokens`` scored tokens
        when spliced at every kept position (:func:`~adaptivek.evaluation.splice_metrics` scores a kept token
        with a next token: at least each text's kept tokens minus one). Too few held-out tokens is an error."""
        if self.mode != "all_tokens":
            raise ValueError("splice_texts needs token-level data (mode='all_tokens'); in last_token mode the "
                             "rows are one per context: splice the texts themselves")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        ids, kept = torch.unique(getattr(self, split).text_index, return_counts=True)  # [T] texts, kept tokens
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        scored = (kept[order] - 1).cumsum(0)  # scored tokens (at least) after each text in this order
        if len(scored) == 0 or int(scored[-1]) < n_tokens:
            have = int(scored[-1]) if len(scored) else 0
            raise ValueError(f"the {split} split holds about {have:,} scorable tokens in {len(ids)} texts, fewer than "
                             f"n_tokens={n_tokens:,}: lower n_tokens or hold out more texts (test_frac, n_texts)")
        n = int(torch.searchsorted(scored, n_tokens)) + 1  # the first prefix of texts that reaches n_tokens
        return ids[order[:n]].tolist()

    def downstream_rows(self, split: Literal["train", "test"] = "test") -> tuple[Tensor, Tensor]:
        """``(text ids [m], rows [m])`` for a downstream loss on ``split``'s texts: each text once, in row
        order, with the row of the position the loss splices (the second-to-last token; the last kept row
        when that token was excluded or the text has one kept token). In ``last_token`` mode: every row."""
        part = getattr(self, split)
        last = self.last_rows(split)
        if self.mode == "last_token":
            return part.text_index[last], last
        prev = (last - 1).clamp(min=0)
        ok = (part.text_index[prev] == part.text_index[last]) & (part.position[prev] == part.position[last] - 1)
        return part.text_index[last], torch.where(ok, prev, last)


def _check_split(train_texts: Any, test_texts: Any, n_texts: int) -> tuple[Tensor, Tensor]:
    tr, te = (torch.as_tensor(np.asarray(t)).long().flatten() for t in (train_texts, test_texts))
    for name, t in (("train_texts", tr), ("test_texts", te)):
        if len(t) == 0:
            raise ValueError(f"{name} is empty; every split needs at least one text")
        if int(t.min()) < 0 or int(t.max()) >= n_texts:
            raise ValueError(f"{name} must hold text ids in [0, {n_texts}), got values in [{int(t.min())}, "
                             f"{int(t.max())}]")
    if len(np.intersect1d(tr.numpy(), te.numpy())):
        raise ValueError("train_texts and test_texts share a text; a text must belong to one split")
    return tr, te


def build_sae_data(acts: Tensor, text_index: Tensor | None, documents: Any, labels: Any, *, mode: SAEDataMode,
                   train_texts: Any, test_texts: Any, rule: ExclusionRule | None = None) -> SAEData:
    """Split, select and scale the SAE's vectors.

    ``mode="last_token"``: ``acts [n_texts, d]`` (``extract(..., token="last")``), ``text_index`` None,
    ``labels [n_texts]`` the contexts' complexity. ``mode="all_tokens"``: ``acts [n_tokens, d]`` and
    ``text_index [n_tokens]`` (``extract(..., token="all")``), ``labels [n_tokens]`` per token (NaN:
    unlabelled). ``documents``: one source-document id per text; ``train_texts``, ``test_texts``: text ids
    of a document-grouped split (texts in neither are unused). A document on both sides is an error.
    ``rule``: which tokens are excluded (``all_tokens`` only; None: the default :class:`ExclusionRule`).
    """
    one_of(mode, "mode", MODES)
    matrix(acts, "acts")
    docs = np.asarray(documents)
    if mode == "last_token":
        if text_index is not None:
            raise ValueError("mode='last_token' takes one row per text (extract(..., token='last')): pass "
                             "text_index=None")
        text_index = torch.arange(len(acts))
    n_texts = len(docs)
    tr, te = _check_split(train_texts, test_texts, n_texts)
    tokens = TokenSet.from_extract(acts, text_index, docs, labels)
    selection, counts = None, {"tokens": len(tokens)}
    if mode == "all_tokens":
        selection = select_tokens(acts, text_index, rule if rule is not None else ExclusionRule())
        counts |= {f"excluded_{k}": v for k, v in selection.counts.items() if k not in ("total", "kept")}
        tokens = tokens.select(selection.keep)
        if len(tokens) == 0:
            raise ValueError("no token left after the exclusion rule; check the activations or the rule")
    train, test = tokens.split(tr, te)
    for name, part in (("train", train), ("test", test)):
        if len(part) < 2:
            raise ValueError(f"the {name} split has {len(part)} token(s) after exclusions; need at least 2")
        lab = int((~part.label.isnan()).sum())
        counts |= {f"{name}_rows": len(part), f"{name}_labelled": lab, f"{name}_unlabelled": len(part) - lab,
                   f"{name}_texts": len(torch.unique(part.text_index)), f"{name}_documents": len(set(part.document))}
    scale = float((train.acts.shape[1] / train.acts.double().pow(2).sum(1).mean()).sqrt())
    return SAEData(mode, train, test, scale, tr, te, counts, selection)


PREFIX_CACHE_FORMAT = 1


def _prefix_key(tokenizer: Any, texts: list[str], max_length: int, first: int, every: int) -> str:
    """What the rubric's prefix labels depend on: texts, truncation, cut points, tokenizer, scorer code."""
    from . import complexity

    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    scorer = hashlib.sha256(Path(complexity.__file__).read_bytes()).hexdigest()
    meta = {"texts": h.hexdigest(), "max_length": max_length, "first": first, "every": every,
            "tokenizer": [str(getattr(tokenizer, "name_or_path", "")), len(tokenizer)], "scorer": scorer,
            "calibration": complexity.CALIBRATION_VERSION, "format": PREFIX_CACHE_FORMAT}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def cached_prefix_labels(cache_dir: str | Path | None, tokenizer: Any, texts: list[str], max_length: int, *,
                         first: int = 16, every: int = 8) -> tuple[Tensor, Tensor, dict[str, int]]:
    """The rubric's :func:`~adaptivek.tokens.prefix_labels` as ``(label, text_index, counts)``, stored in
    ``cache_dir`` (None: not stored) keyed by the texts, ``max_length``, the cut points, the tokenizer and
    the scorer's code; an entry is used only after its checksum and length verify (else rebuilt with a
    :class:`~adaptivek.io.CacheWarning`). On the whole embedded corpus scoring takes minutes, and chapters
    3-5 all need the labels."""
    from safetensors.torch import load_file

    if cache_dir is None:
        pl = prefix_labels(tokenizer, texts, max_length, first=first, every=every)
        return pl.label, pl.text_index, pl.counts
    base = Path(cache_dir) / f"prefix-{_prefix_key(tokenizer, texts, max_length, first, every)}"
    tensors, meta = base.with_suffix(".safetensors"), base.with_suffix(".json")
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if not tensors.is_file() or file_digest(tensors, info["digest"].split(":")[0]) != info["digest"]:
                raise CacheError(f"{tensors} is missing or fails its checksum")
            got = load_file(str(tensors))
            if len(got["label"]) != info["counts"]["tokens"] or len(got["text_index"]) != len(got["label"]):
                raise CacheError(f"{tensors} holds {len(got['label'])} labels for {info['counts']['tokens']} tokens")
            return got["label"], got["text_index"], info["counts"]
        except (CacheError, KeyError, ValueError, OSError) as e:
            warnings.warn(f"prefix-label cache entry {meta} is unusable ({e}); recomputing it", CacheWarning,
                          stacklevel=2)
    pl = prefix_labels(tokenizer, texts, max_length, first=first, every=every)
    save_tensors(tensors, {"label": pl.label, "text_index": pl.text_index})
    write_json(meta, {"digest": file_digest(tensors), "counts": pl.counts})  # written last: marks the entry whole
    return pl.label, pl.text_index, pl.counts


def load_sae_data(artifacts_dir: str | Path, lm: Any, *, layer: int, mode: SAEDataMode, corpus: str = "embedded",
                  n_texts: int = 1000, seed: int = 0, max_length: int = 64, test_frac: float = 0.2,
                  rule: ExclusionRule | None = None, prefix_first: int = 16, prefix_every: int = 8,
                  ) -> tuple[SAEData, dict[str, Any]]:
    """Chapters 4 and 5's data: chapter 1's contexts and activation cache, chapter 2's labels, chapter 3's split.

    Texts whose chapter-2 label failed (NaN) are left out of both splits (counted); the rest are split by
    document exactly as chapter 3 splits them. In ``all_tokens`` mode each token's label is the rubric
    score of its prefix (``prefix_first``, ``prefix_every``: :func:`~adaptivek.tokens.prefix_labels`).
    Returns ``(data, info)``; ``info`` holds ``texts``, ``y_text`` (the contexts' labels), ``documents``,
    ``label_source``, ``prefix_counts`` and ``n_texts_unlabelled``.
    """
    from . import report
    from .activations import extract
    from .linear_encoding import held_out_split

    artifacts = Path(artifacts_dir)
    texts, y_text, source = report.contexts_and_labels(artifacts, lm.tokenizer, corpus=corpus, n_texts=n_texts,
                                                       seed=seed, max_length=max_length)
    docs = report.context_documents(artifacts, texts, corpus=corpus, n_texts=n_texts, seed=seed)
    keep = torch.isfinite(y_text).nonzero().flatten()  # chapter 3 splits the labelled contexts
    split = held_out_split(len(keep), test_frac=test_frac, seed=seed, groups=[docs[i] for i in keep.tolist()])
    train_texts, test_texts = keep[split.train], keep[split.test]
    info = {"texts": texts, "y_text": y_text, "documents": docs, "label_source": source,
            "n_texts_unlabelled": len(texts) - len(keep), "prefix_counts": None}
    cache = artifacts / "activations"
    if mode == "last_token":
        acts = extract(lm, texts, layer, max_length=max_length, cache_dir=cache, progress=False)
        data = build_sae_data(acts, None, docs, y_text.float(), mode=mode, train_texts=train_texts,
                              test_texts=test_texts)
        return data, info
    acts, text_index = extract(lm, texts, layer, token="all", max_length=max_length, cache_dir=cache, progress=False)
    label, label_index, info["prefix_counts"] = cached_prefix_labels(cache, lm.tokenizer, texts, max_length,
                                                                     first=prefix_first, every=prefix_every)
    if not torch.equal(label_index, text_index):
        raise ValueError("the prefix labels' tokens differ from the activation cache's (another tokenizer or "
                         "max_length?); rerun chapter 1 with this model and max_length")
    data = build_sae_data(acts, text_index, docs, label, mode=mode, train_texts=train_texts,
                          test_texts=test_texts, rule=rule)
    return data, info


__all__ = ["SAEData", "build_sae_data", "load_sae_data", "cached_prefix_labels", "MODES"]
