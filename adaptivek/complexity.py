"""An offline, deterministic stand-in for the paper's GPT-4.1-mini complexity rubric.

The paper asks an LLM to rate each context 0-10 on six dimensions and combines them with fixed
weights. :class:`RubricScorer` rates the same six dimensions from measurable features. Each feature
is a per-word or per-sentence rate (so text length barely matters), standardised with a robust
z-score (winsorised mean and sd) fitted on the embedded corpus; a dimension is the mean of its signed
z-scores, standardised again on the corpus and mapped to [0, 10] by a logistic that sends the corpus
mean to 5 and mean -+ 1.645 sd (the 5th/95th percentiles of a normal) to 1.5 / 8.5. The
calibration lives in ``adaptivek/data/rubric_calibration.json`` and is refitted with
:meth:`RubricScorer.fit_calibration` (``python -m adaptivek.complexity``) on the embedded corpus
only, never on validation data. ``complexity`` is the paper's weighted sum of the six dimensions.

| dimension, weight | feature, sign    | why it stands for the dimension
|-------------------|------------------|----------------------------------------
| lexical 0.20      | rare +           | share of words outside the ~5,000 most frequent (wordfreq Zipf < 4.22): the prompt's own criterion
|                   | syllables +      | mean syllables per word (textstat: CMUdict, pyphen): Flesch-Kincaid's word term
|                   | chars +          | mean letters per word: Coleman-Liau's word term
|                   | dale_chall +     | share of 2+-syllable words not among Dale-Chall's 3,000 words known to 4th graders
|                   | msttr +          | mean type-token ratio of 50-word segments: lexical diversity, not confounded by length
|                   | content +        | share of content (non-function) words: lexical density
| syntactic 0.20    | sent_len +       | log words per sentence: the sentence term of every readability formula
|                   | subord +         | subordinators and relative pronouns per sentence: clause density, subordination
|                   | passive +        | a form of *be* followed (within one word) by a participle, per sentence
|                   | punct +          | commas, semicolons, colons, dashes, brackets per sentence: embedded phrases, lists
|                   | preps +          | prepositions per sentence: nested noun/prepositional phrases (embedding depth)
| conceptual 0.25   | ideas +          | log content words per sentence: concepts packed into one unit (idea density)
|                   | nominal +        | nominalisations and Latinate derivations (-tion, -ity, -ism, -ive ...): abstraction
|                   | poly +           | share of words of 3+ syllables (SMOG's term): abstract, Latinate vocabulary
|                   | content_rarity + | mean rarity (7 - Zipf) of content words: information per content word
|                   | personal -       | personal pronouns per word: narrative, concrete, involved text (Biber's dimension 1)
|                   | contractions -   | contractions per word: spoken, informal register
| domain 0.15       | very_rare +      | words with Zipf < 3 (outside the ~50k most frequent): specialised terminology
|                   | technical +      | Greek/Latin technical morphemes (-ology, -osis, bio-, electro- ...)
|                   | numeric +        | numbers, %, $, = and degree signs per word: quantitative detail
|                   | acronyms +       | all-capital tokens of 2+ letters per word (GDP, NATO)
|                   | parens +         | brackets per word: definitions, asides, citations
| logical 0.10      | causal +         | because, therefore, thus, hence, as a result ... per sentence: reasoning chains
|                   | contrast +       | however, although, whereas, nevertheless ... per sentence: concession, contrast
|                   | conditional +    | if, unless, whether, provided ... per sentence: conditional reasoning
|                   | comparative +    | than, compared, relatively, respectively ... per sentence: comparison
| contextual 0.10   | proper +         | capitalised words not opening a sentence, per word: names the reader must know
|                   | anaphora +       | this/these/such/former/latter/thereof ... per word: reference to earlier discourse
|                   | citations +      | years, 'according to', 'et al.', 'cf.', 'i.e.' ... per 100 words: intertextuality

Word-property rates (rarity, syllables, length, Dale-Chall, 3+ syllables) skip capitalised tokens:
names are not vocabulary (they count under ``proper``). Rates of counted events are square-root
transformed (variance-stabilising, as for Poisson counts) before the z-score.

textstat's per-text functions each re-tokenise the text (Flesch-Kincaid alone runs at about the speed
of this whole scorer, and we need thirty features); we use its syllable counter (cached per distinct
word) and its Dale-Chall word list, and compute every rate in one vectorised pass over all tokens.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .checks import text_list
from .io import write_json

DIMENSIONS: dict[str, float] = {  # the paper's weights
    "lexical": 0.20,
    "syntactic": 0.20,
    "conceptual": 0.25,
    "domain": 0.15,
    "logical": 0.10,
    "contextual": 0.10,
}
FEATURES: dict[str, dict[str, int]] = {  # dimension -> feature -> sign
    "lexical": {"rare": 1, "syllables": 1, "chars": 1, "dale_chall": 1, "msttr": 1, "content": 1},
    "syntactic": {"sent_len": 1, "subord": 1, "passive": 1, "punct": 1, "preps": 1},
    "conceptual": {"ideas": 1, "nominal": 1, "poly": 1, "content_rarity": 1, "personal": -1, "contractions": -1},
    "domain": {"very_rare": 1, "technical": 1, "numeric": 1, "acronyms": 1, "parens": 1},
    "logical": {"causal": 1, "contrast": 1, "conditional": 1, "comparative": 1},
    "contextual": {"proper": 1, "anaphora": 1, "citations": 1},
}
# rates of counted events (mostly rare per text): square-root transformed, as for Poisson counts
SQRT_FEATURES = ["subord", "passive", "punct", "preps", "nominal", "personal", "contractions", "very_rare",
                 "technical", "numeric", "acronyms", "parens", "causal", "contrast", "conditional",
                 "comparative", "proper", "anaphora", "citations"]
COLUMNS = [*DIMENSIONS, "complexity"]
CALIBRATION_PATH = Path(__file__).parent / "data" / "rubric_calibration.json"
CALIBRATION_VERSION = 1
RARE_ZIPF = 4.22  # Zipf frequency of the 5,000th most frequent English word (wordfreq large_en)
VERY_RARE_ZIPF = 3.0
MAX_SEGMENTS = 1_000_000  # 50-word segments per text, far above any real text
Z_CLIP = 4.0
LOGIT_SLOPE = math.log(0.85 / 0.15) / 1.645  # a dimension's mean -+ 1.645 sd maps to 1.5 / 8.5

# ---------------------------------------------------------------------------------------- word lists
_FUNCTION = set("""
a an the this that these those some any no every each either neither both all few many much more most
less least several such what which who whom whose whoever whatever whichever i me my mine myself you your
yours yourself yourselves he him his himself she her hers herself it its itself we us our ours ourselves
they them their theirs themselves one ones oneself about above across after against along amid among around
as at before behind below beneath beside besides between beyond by despite down during except for from in
inside into like near of off on onto out outside over past per since than through throughout till to toward
towards under underneath unlike until unto up upon via with within without and but or nor so yet for if
unless because although though while whereas whether when whenever where wherever why how however therefore
thus then there here now not n't am is are was were be been being have has had having do does did doing will
would shall should can could may might must ought very too also just only even still quite rather really
yes no oh o ah well let shan't won't can't don't doesn't didn't isn't aren't wasn't weren't hasn't haven't
hadn't wouldn't shouldn't couldn't mustn't i'm you're he's she's it's we're they're i've you've we've
they've i'd you'd he'd she'd we'd they'd i'll you'll he'll she'll we'll they'll that's there's what's
thee thou thy thine ye hath doth art unto
""".split())
_PERSONAL = set("""i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
we us our ours ourselves they them their theirs themselves thee thou thy thine ye""".split())
_SUBORD = set("""because although though while whereas whether if unless since until till whenever wherever
whereby wherein which who whom whose that when where why how lest once provided""".split())
_BE = set("am is are was were be been being 's 're get gets got gotten".split())
_PARTICIPLE_IRREGULAR = set("""done made given taken known seen found held built brought told thought sent left
paid set put kept shown written born chosen bought caught taught spent won lost led read heard felt meant
struck sold understood begun run drawn driven eaten fallen forgotten forgiven frozen hidden ridden risen shaken
spoken stolen sworn torn thrown worn woven broken cut hit hurt let shut split spread cast cost laid said
bound ground wound fought sought""".split())
_PREPS = set("""about above across after against along amid among around at before behind below beneath beside
besides between beyond by despite during except for from in inside into near of off on onto outside over past
per through throughout toward towards under underneath unlike upon via with within without""".split())
_CAUSAL = set("because therefore thus hence consequently accordingly since wherefore".split())
_CONTRAST = set("""however although though whereas nevertheless nonetheless notwithstanding despite conversely
instead albeit yet otherwise""".split())
_CONDITIONAL = set("if unless whether provided providing assuming suppose supposing lest".split())
_COMPARATIVE = set("than whereas compared relatively respectively comparatively similarly likewise".split())
_ANAPHORA = set("""this these those such former latter aforementioned aforesaid thereof therein thereby
herein hereby foregoing respectively""".split())
_MULTI = {  # multi-word connectives, counted on the lower-cased text
    "causal": r"\b(?:as a result|due to|owing to|in order to|so that|it follows|for this reason)\b",
    "contrast": r"\b(?:on the other hand|in contrast|even though|rather than|by contrast)\b",
    "conditional": r"\b(?:as long as|in case|even if|only if|in the event)\b",
    "comparative": r"\b(?:as well as|in comparison|more than|less than|as much as)\b",
    "citations": r"\b(?:according to|et al\b|cf\.|ibid\b|i\.e\.|e\.g\.|see also|as noted)",
}
_NOMINAL = re.compile(r"(?:tion|sion|ment|ness|ity|ance|ence|ancy|ency|ism|ship|hood|ure|acy|ive|ical|al|"
                      r"ous|ary|ory|ize|ise|ate)s?$")
_TECHNICAL = re.compile(
    r"(?:^(?:bio|neuro|micro|macro|hydro|electro|thermo|photo|chrom|cyto|geo|aero|astro|poly|mono|"
    r"hyper|hypo|endo|exo|proto|pseudo|quasi|meta|para|iso|immuno|psycho|socio|phys|chem)\w{3,}|"
    r"(?:ology|ologist|osis|itis|ase|ide|ium|ene|ine|oid|onomy|graphy|metry|ics|tic)s?$)"
)

_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_SENT_END = r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)"
_NUMERIC = r"\d+(?:[.,]\d+)*|[%$=\u00a3\u20ac\u00b0]"
_YEAR = r"\b(?:1[0-9]|20)\d\d\b"


@functools.lru_cache(maxsize=1)
def _frequencies() -> dict[str, float]:
    import wordfreq

    return wordfreq.get_frequency_dict("en", wordlist="large")


@functools.lru_cache(maxsize=1)
def _easy_words() -> frozenset[str]:
    text = (importlib.resources.files("textstat") / "resources" / "en" / "easy_words.txt").read_text()
    return frozenset(text.split())


_SYLLABLES: dict[str, int] = {}


def _syllables(words: Iterable[str]) -> np.ndarray:
    """Syllables per word with textstat 0.7.8 (CMUdict, pyphen fallback), cached per distinct word."""
    import textstat

    out = []
    for w in words:
        s = _SYLLABLES.get(w)
        if s is None:
            s = _SYLLABLES[w] = max(1, textstat.syllable_count(w)) if w.isascii() else max(1, len(w) // 3)
        out.append(s)
    return np.asarray(out, dtype=np.float64)


# ------------------------------------------------------------------------------------------ features
def _vocab_properties(vocab: list[str]) -> dict[str, np.ndarray]:
    """Per distinct lower-cased word ([n_vocab]): Zipf frequency, syllables, length, word-list membership
    and the suffix patterns (contraction, participle, nominalisation, technical term)."""
    freq = _frequencies()
    p = {"zipf": np.array([math.log10(freq[w]) + 9 if w in freq else 0.0 for w in vocab], dtype=np.float64),
         "syl": _syllables(vocab), "len": np.array([len(w) for w in vocab], dtype=np.float64)}
    p.update({name: np.array([w in ws for w in vocab], dtype=bool) for name, ws in [
        ("function", _FUNCTION), ("personal", _PERSONAL), ("subord", _SUBORD), ("be", _BE),
        ("preps", _PREPS), ("causal", _CAUSAL), ("contrast", _CONTRAST), ("conditional", _CONDITIONAL),
        ("comparative", _COMPARATIVE), ("anaphora", _ANAPHORA), ("easy", _easy_words())]})
    vs = pd.Series(vocab, dtype=object)
    p["contraction"] = vs.str.contains("'", regex=False).to_numpy(dtype=bool)
    p["participle"] = (vs.str.contains(r"(?:ed|en)$").to_numpy(dtype=bool) & (p["len"] > 3)
                       | vs.isin(_PARTICIPLE_IRREGULAR).to_numpy())
    p["nominal"] = vs.str.contains(_NOMINAL).to_numpy(dtype=bool) & (p["len"] >= 6) & ~p["function"]
    p["technical"] = vs.str.contains(_TECHNICAL).to_numpy(dtype=bool) & (p["len"] >= 6) & ~p["function"]
    return p


def _sentence_counts(s: pd.Series) -> np.ndarray:
    """Sentences per text ([n], at least 1): sentence-end marks, plus one for an unterminated last sentence."""
    n_sent_marks = s.str.count(_SENT_END).to_numpy()
    ends = s.str.rstrip().str.contains(r"[.!?][\"'\u201d\u2019)\]]*$").to_numpy()
    return np.maximum(1, n_sent_marks + ~ends)


class _Tokens:
    """Every token of every text in flat arrays ([n_tokens]), each word's properties looked up once per
    distinct word (``v``: name -> [n_vocab]), and the per-text denominators ([n]) the rates divide by."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.n = len(texts)
        self.s = pd.Series(list(texts), dtype=object)
        self.low = self.s.str.lower()
        toks = [_WORD.findall(t) for t in texts]
        self.n_words = np.fromiter((len(t) for t in toks), dtype=np.int64, count=self.n)
        self.flat = pd.Series(list(chain.from_iterable(toks)), dtype=object)
        self.doc = np.repeat(np.arange(self.n), self.n_words)  # [n_tokens] text index of each token
        lower = self.flat.str.lower().str.replace("\u2019", "'", regex=False)
        self.code, vocab = pd.factorize(lower)  # code [n_tokens] -> vocab [n_vocab]
        self.vocab = list(vocab)
        self.v = _vocab_properties(self.vocab)
        self.cap = self.flat.str[:1].str.isupper().to_numpy(dtype=bool)  # tokens start with a letter
        self.content_tok = ~self.v["function"][self.code]
        self.vocab_tok = ~self.cap  # word-property rates skip capitalised tokens: names are not vocabulary
        n_vocab = self.per_text(self.vocab_tok.astype(np.float64))
        self.nv = np.where(n_vocab > 0, n_vocab, np.nan)
        n_content = self.per_text((self.content_tok & self.vocab_tok).astype(np.float64))
        self.nc = np.where(n_content > 0, n_content, np.nan)
        self.n_sent = _sentence_counts(self.s)
        self.w = np.maximum(self.n_words, 1).astype(np.float64)

    def per_text(self, values: np.ndarray) -> np.ndarray:
        """Sum of a per-token value ([n_tokens]) over each text: [n]."""
        return np.bincount(self.doc, weights=values, minlength=self.n)

    def count(self, vocab_mask: np.ndarray) -> np.ndarray:
        """Tokens per text whose word is in ``vocab_mask`` ([n_vocab] bool)."""
        return self.per_text(vocab_mask[self.code].astype(np.float64))

    def vcount(self, vocab_mask: np.ndarray) -> np.ndarray:
        """As :meth:`count`, over lower-case tokens only."""
        return self.per_text((vocab_mask[self.code] & self.vocab_tok).astype(np.float64))

    def multi(self, kind: str) -> np.ndarray:
        """Occurrences per text of the multi-word connectives of ``kind`` (``_MULTI``)."""
        return self.low.str.count(_MULTI[kind]).to_numpy()


def _msttr(t: _Tokens) -> np.ndarray:
    """Mean segmental type-token ratio over 50-word segments (MSTTR-50) per text [n]; a shorter (final)
    segment of m >= 10 words is put on the same footing with Herdan's law, TTR(N) = N^(C-1)."""
    starts = np.r_[0, np.cumsum(t.n_words)[:-1]]
    seg = t.doc * (MAX_SEGMENTS + 1) + np.minimum((np.arange(len(t.code)) - starts[t.doc]) // 50, MAX_SEGMENTS)
    seg_id, seg_of_tok = np.unique(seg, return_inverse=True)
    m = np.bincount(seg_of_tok).astype(np.float64)  # [n_segments] words
    n_vocab = len(t.vocab) + 1
    v = np.bincount(np.unique(seg_of_tok.astype(np.int64) * n_vocab + t.code) // n_vocab,
                    minlength=len(seg_id)).astype(np.float64)  # [n_segments] distinct words
    ok = m >= 10
    ttr50 = np.where(ok, np.exp((np.log(v) / np.log(np.maximum(m, 2)) - 1) * np.log(50)), 0.0)
    seg_doc = seg_id // (MAX_SEGMENTS + 1)
    wsum = np.bincount(seg_doc, weights=np.where(ok, m, 0.0), minlength=t.n)
    return np.bincount(seg_doc, weights=ttr50 * np.where(ok, m, 0.0), minlength=t.n) / np.where(wsum > 0, wsum, np.nan)


def _passive(t: _Tokens) -> np.ndarray:
    """Passives per text [n]: a form of "be" followed by a participle directly or after one word
    ("was quickly sold")."""
    part_tok = t.v["participle"][t.code]
    part_next = np.zeros(len(t.code), dtype=bool)  # [n_tokens] a participle 1 or 2 tokens later, same text
    for k in (1, 2):
        part_next[:-k] |= part_tok[k:] & (t.doc[k:] == t.doc[:-k])
    return t.per_text((t.v["be"][t.code] & part_next).astype(np.float64))


def _lexical(t: _Tokens) -> dict[str, np.ndarray]:
    v, syl = t.v, t.v["syl"]
    return {
        "rare": t.vcount(v["zipf"] < RARE_ZIPF) / t.nv,
        "syllables": t.per_text(np.where(t.vocab_tok, syl[t.code], 0.0)) / t.nv,
        "chars": t.per_text(np.where(t.vocab_tok, v["len"][t.code], 0.0)) / t.nv,
        "dale_chall": t.vcount(~v["easy"] & (syl >= 2)) / t.nv,
        "msttr": _msttr(t),
        "content": t.count(~v["function"]) / t.w,
    }


def _syntactic(t: _Tokens) -> dict[str, np.ndarray]:
    return {
        "sent_len": np.log(t.w / t.n_sent),
        "subord": t.count(t.v["subord"]) / t.n_sent,
        "passive": _passive(t) / t.n_sent,
        "punct": t.s.str.count(r"[,;:()\[\]\u2014\u2013]|--").to_numpy() / t.n_sent,
        "preps": t.count(t.v["preps"]) / t.n_sent,
    }


def _conceptual(t: _Tokens) -> dict[str, np.ndarray]:
    v = t.v
    rarity = np.where(t.content_tok & t.vocab_tok, 7.0 - np.minimum(v["zipf"][t.code], 7.0), 0.0)  # [n_tokens]
    return {
        "nominal": t.count(v["nominal"]) / t.w,
        "poly": t.vcount(v["syl"] >= 3) / t.nv,
        "ideas": np.log1p(t.count(~v["function"]) / t.n_sent),
        "content_rarity": t.per_text(rarity) / t.nc,
        "personal": t.count(v["personal"]) / t.w,
        "contractions": t.count(v["contraction"]) / t.w,
    }


def _domain(t: _Tokens) -> dict[str, np.ndarray]:
    flat = t.flat
    allcaps = (flat.str.len() >= 2).to_numpy() & flat.str.isupper().to_numpy(dtype=bool) & (flat != "I").to_numpy()
    return {
        "very_rare": t.vcount(t.v["zipf"] < VERY_RARE_ZIPF) / t.nv,
        "technical": t.count(t.v["technical"]) / t.w,
        "numeric": t.s.str.count(_NUMERIC).to_numpy() / t.w,
        "acronyms": t.per_text(allcaps.astype(np.float64)) / t.w,
        "parens": t.s.str.count(r"[()\[\]]").to_numpy() / t.w,
    }


def _logical(t: _Tokens) -> dict[str, np.ndarray]:
    return {k: (t.count(t.v[k]) + t.multi(k)) / t.n_sent for k in ("causal", "contrast", "conditional", "comparative")}


def _contextual(t: _Tokens) -> dict[str, np.ndarray]:
    proper = np.maximum(t.per_text(t.cap & (t.flat != "I").to_numpy()) - t.n_sent, 0)
    return {
        "proper": proper / t.w,
        "anaphora": t.count(t.v["anaphora"]) / t.w,
        "citations": 100 * (t.s.str.count(_YEAR).to_numpy() + t.multi("citations")) / t.w,
    }


def features(texts: Sequence[str]) -> pd.DataFrame:
    """Raw rubric features, one row per text, plus ``words`` (NaN features where a text has no words).

    One regex pass tokenises every text; per-word properties are looked up once per distinct
    word and summed per text with ``np.bincount``. One helper per dimension computes its rates.
    """
    t = _Tokens(texts)
    f = pd.DataFrame({**_lexical(t), **_syntactic(t), **_conceptual(t), **_domain(t), **_logical(t),
                      **_contextual(t)})
    f[SQRT_FEATURES] = np.sqrt(f[SQRT_FEATURES])  # counts per unit: square root stabilises the variance
    f.loc[t.n_words == 0] = np.nan
    f["words"] = t.n_words
    return f


# ------------------------------------------------------------------------------------------- scorer
def _check(texts: Sequence[str] | str) -> list[str]:
    """A list of str; bytes are decoded as UTF-8 (invalid bytes replaced) with a warning."""
    out = text_list(texts, allow_bytes=True)
    for i, t in enumerate(out):
        if isinstance(t, bytes):
            warnings.warn(f"texts[{i}] is bytes; decoded as UTF-8 with invalid bytes replaced", stacklevel=3)
            out[i] = t.decode("utf-8", errors="replace")
    return out


class RubricScorer:
    """Offline six-dimension complexity scorer (see the module docstring for every feature).

    ``RubricScorer().score(texts)`` returns a DataFrame with ``lexical, syntactic, conceptual,
    domain, logical, contextual, complexity`` in [0, 10]; texts that are empty or have no words
    get a NaN row and a warning. Deterministic: the same texts always get the same scores.
    """

    def __init__(self, calibration: str | Path | dict[str, Any] | None = None):
        if calibration is None:
            calibration = CALIBRATION_PATH
        if not isinstance(calibration, dict):
            path = Path(calibration)
            if not path.exists():
                raise FileNotFoundError(f"rubric calibration {path} is missing; refit it with "
                                        "`python -m adaptivek.complexity` (fits on the embedded corpus)")
            calibration = json.loads(path.read_text())
        if calibration.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"rubric calibration version {calibration.get('version')} != {CALIBRATION_VERSION}; "
                             "refit it with `python -m adaptivek.complexity`")
        self.calibration = calibration

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Scores in [0, 10] for each text: the six dimensions and the weighted ``complexity``."""
        texts = _check(texts)
        if not texts:
            return pd.DataFrame(columns=COLUMNS, dtype=float)
        empty = np.array([not t.strip() for t in texts])
        if empty.any():
            warnings.warn(f"{int(empty.sum())} empty or whitespace-only texts (e.g. index "
                          f"{int(np.flatnonzero(empty)[0])}) get NaN scores", stacklevel=2)
        feats = features(texts)
        nowords = (feats["words"].to_numpy() == 0) & ~empty
        if nowords.any():
            warnings.warn(f"{int(nowords.sum())} texts contain no words (e.g. index "
                          f"{int(np.flatnonzero(nowords)[0])}) and get NaN scores", stacklevel=2)
        return self._map(feats)

    def _map(self, feats: pd.DataFrame) -> pd.DataFrame:
        cal = self.calibration
        out = {}
        for dim, fs in FEATURES.items():
            raw = self._raw(feats, dim, fs)
            mean, sd = cal["dimensions"][dim]["mean"], cal["dimensions"][dim]["sd"]
            out[dim] = 10 / (1 + np.exp(-LOGIT_SLOPE * (raw - mean) / sd))
        df = pd.DataFrame(out, index=feats.index)
        df["complexity"] = sum(df[d] * wt for d, wt in DIMENSIONS.items())
        df.loc[feats["words"].to_numpy() == 0] = np.nan
        return df

    def _raw(self, feats: pd.DataFrame, dim: str, fs: dict[str, int]) -> np.ndarray:
        """Mean signed z-score (clipped at +-4) of a dimension's features."""
        stats = self.calibration["features"]
        z = [sign * np.clip((feats[f].to_numpy() - stats[f]["center"]) / stats[f]["scale"], -Z_CLIP, Z_CLIP)
             for f, sign in fs.items()]
        return np.nanmean(np.nan_to_num(z, nan=0.0), axis=0)  # an undefined rate (no lower-case word) counts as average

    @classmethod
    def fit_calibration(cls, texts: Sequence[str], path: str | Path | None = CALIBRATION_PATH,
                        *, source: str = "custom") -> dict[str, Any]:
        """Fit the feature and dimension scaling on ``texts`` and write it to ``path`` (None: don't).

        Fit on the embedded corpus only: never on data used for validation (OneStopEnglish).
        """
        feats = features(_check(texts))
        feats = feats[feats["words"] > 0]
        if len(feats) < 100:
            raise ValueError(f"need at least 100 texts with words to fit a calibration, got {len(feats)}")
        # mean and sd of the values winsorised at their 1st/99th percentiles: robust to outliers,
        # and unlike the median it does not put sparse rates (most texts: 0 connectives) at the centre
        stats = {}
        for f in chain.from_iterable(FEATURES.values()):
            x = feats[f].dropna()
            x = np.clip(x, *np.quantile(x, [0.01, 0.99]))
            stats[f] = {"center": float(x.mean()), "scale": float(max(x.std(), 1e-6))}
        cal: dict[str, Any] = {"version": CALIBRATION_VERSION, "source": source, "n_texts": len(feats),
                               "features": stats, "dimensions": {}}
        scorer = cls(cal)
        for dim, fs in FEATURES.items():
            raw = scorer._raw(feats, dim, fs)
            cal["dimensions"][dim] = {"mean": float(raw.mean()), "sd": float(max(raw.std(), 1e-6))}
        if path is not None:
            write_json(path, cal)
        return cal


def fit_embedded_calibration(path: str | Path | None = CALIBRATION_PATH) -> dict[str, Any]:
    """Refit the packaged calibration on the whole embedded corpus."""
    from .corpus import CORPUS_VERSION, load_corpus

    ds = load_corpus("embedded")
    return RubricScorer.fit_calibration(ds["text"], path, source=f"embedded corpus v{CORPUS_VERSION}, "
                                        f"sources {sorted(set(ds['source']))}")


if __name__ == "__main__":
    cal = fit_embedded_calibration()
    print(f"wrote {CALIBRATION_PATH} from {cal['n_texts']} texts ({cal['source']})")
