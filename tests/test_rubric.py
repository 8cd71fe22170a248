"""RubricScorer: range, weights, bad input, determinism, calibration, and held-out validation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from adaptivek.complexity import CALIBRATION_PATH, COLUMNS, DIMENSIONS, RubricScorer
from adaptivek.corpus import load_corpus
from adaptivek.stats import auroc, ordered_share, spearman
from adaptivek.validation import validate_onestop

SIMPLE = "The cat sat on the mat. It was a sunny day. The dog ran to the cat. They played in the sun."
HARD = ("Notwithstanding the heterogeneity of epistemological frameworks, the constitutive indeterminacy of "
        "quantum-mechanical observables, as formalised by non-commuting self-adjoint operators on a Hilbert "
        "space, necessitates a reconceptualisation of measurement whereby the ontological status of "
        "eigenvalues remains contingent upon the experimental arrangement.")


@pytest.fixture(scope="module")
def scorer() -> RubricScorer:
    return RubricScorer()


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return load_corpus("embedded", n=400, seed=3)["text"]


def test_range_columns_and_weights(scorer, sample):
    df = scorer.score(sample)
    assert list(df.columns) == COLUMNS and len(df) == len(sample)
    assert df.notna().all(axis=None)
    assert ((df >= 0) & (df <= 10)).all(axis=None)
    assert df["complexity"].to_numpy() == pytest.approx(sum(df[d] * w for d, w in DIMENSIONS.items()).to_numpy())
    assert sum(DIMENSIONS.values()) == pytest.approx(1.0)
    assert df["complexity"].std() > 0.8  # the scores spread, they are not all ~5
    s = scorer.score([SIMPLE, HARD])["complexity"]
    assert s[0] < 3.5 < 6.5 < s[1]


def test_deterministic_and_batch_independent(scorer, sample):
    a = scorer.score(sample[:50])
    b = scorer.score(sample[:50])
    pd.testing.assert_frame_equal(a, b)
    alone = scorer.score([sample[7]])
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), a.iloc[[7]].reset_index(drop=True))


def test_empty_and_whitespace_are_nan_with_warning(scorer):
    with pytest.warns(UserWarning, match="2 empty or whitespace-only"):
        df = scorer.score([SIMPLE, "", " \n\t ", HARD])
    assert df.iloc[[1, 2]].isna().all(axis=None)
    assert df.iloc[[0, 3]].notna().all(axis=None)
    with pytest.warns(UserWarning, match="no words"):
        assert scorer.score(["12 34 !!! 56"]).isna().all(axis=None)
    assert scorer.score([]).columns.tolist() == COLUMNS


def test_non_english_and_binary_do_not_crash(scorer):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    texts = ["Der schnelle braune Fuchs springt über den faulen Hund, während es regnet.",
             "敏捷的棕色狐狸跳过了懒狗。这是一个测试。", "Быстрая коричневая лиса прыгает через ленивую собаку.",
             junk.decode("latin-1"), "\x00\x01\x02 word \x7f\ufffd", "a" * 5000, "ÅÄÖ " * 50]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = scorer.score(texts)
        by_bytes = scorer.score([junk, b"plain text as bytes"])
    assert len(df) == len(texts)
    assert ((df.dropna() >= 0) & (df.dropna() <= 10)).all(axis=None)
    assert df.iloc[[0, 1, 2, 4, 6]].notna().all(axis=None)
    assert by_bytes["complexity"].notna().all()


@pytest.mark.parametrize("texts, match", [(SIMPLE, "single string"), ([SIMPLE, 3], r"texts\[1\] is a int")],
                         ids=["single_string", "not_a_str"])
def test_bad_texts_are_refused(scorer, texts, match):
    with pytest.raises(TypeError, match=match):
        scorer.score(texts)


def test_calibration_fit_and_errors(tmp_path, sample):
    path = tmp_path / "cal.json"
    cal = RubricScorer.fit_calibration(sample, path, source="test")
    assert json.loads(path.read_text()) == cal
    df = RubricScorer(path).score(sample)
    assert abs(df["complexity"].median() - 5) < 1  # centred on the data it was fitted on
    packaged = json.loads(CALIBRATION_PATH.read_text())
    assert packaged["source"].startswith("embedded corpus") and packaged["n_texts"] > 20_000


@pytest.mark.parametrize("case, exc, match", [
    ("too_few_texts", ValueError, "at least 100"),
    ("wrong_version", ValueError, "version"),
    ("missing_file", FileNotFoundError, "python -m adaptivek.complexity"),
])
def test_calibration_errors(tmp_path, sample, case, exc, match):
    with pytest.raises(exc, match=match):
        if case == "too_few_texts":
            RubricScorer.fit_calibration(sample[:20], None)
        elif case == "wrong_version":
            RubricScorer({**json.loads(CALIBRATION_PATH.read_text()), "version": -1})
        else:
            RubricScorer(tmp_path / "missing.json")


def test_metrics():
    assert float(spearman([1, 2, 3, 4], [10, 20, 30, 45], nan_policy="omit")) == pytest.approx(1.0)
    assert float(spearman([1, 2, 3, 4], [4, 3, 2, 1], nan_policy="omit")) == pytest.approx(-1.0)
    assert float(spearman([1, 2, 3, 4, 5], [4, 3, float("nan"), 2, 1], nan_policy="omit")) == pytest.approx(-1.0)
    assert auroc([0.1, 0.2, float("nan"), 0.8, 0.9], [0, 0, 1, 1, 1]) == 1.0  # NaN scores dropped
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert ordered_share([1, 2, 3, 3, 2, 1], [0, 1, 2, 0, 1, 2], ["a", "a", "a", "b", "b", "b"]) == 0.5


def test_onestopenglish_level_validation(scorer):
    """Held-out human labels (never used for fitting): Spearman with level must stay >= 0.5."""
    res, df = validate_onestop(scorer)
    assert res["n_texts"] == 567
    assert res["spearman_level"] >= 0.5, res
    assert res["ordered_share"] >= 0.8, res  # chance is 1/6
