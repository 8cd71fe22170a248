"""RidgeProbe against scikit-learn, CV choice, complexity_to_k, bad inputs, metrics and the controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptivek import probe as pr
from adaptivek.linear_encoding import (
    MLPProbe,
    controls_table,
    layer_sweep,
    length_features,
    onestop_transfer,
    permutation_null,
)
from adaptivek.probe import LAMBDAS, RidgeProbe, complexity_to_k, fit_many
from adaptivek.stats import (
    bootstrap_ci,
    drop_nan_pairs,
    kfold_indices,
    pearson,
    rankdata,
    spearman,
    split_indices,
    validation_folds,
)

sk_linear = pytest.importorskip("sklearn.linear_model")
from sklearn.model_selection import KFold  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=200, d=30, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.2, 4.0, size=d) + rng.normal(size=d) * 3  # uneven scales, offsets
    w = rng.normal(size=d)
    return X, X @ w + 5.0 + noise * rng.normal(size=n)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# ----------------------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize("lam", [0.01, 1.0, 1000.0])
@pytest.mark.parametrize("shape", [(200, 30), (40, 80)], ids=["tall", "wide"])
def test_fixed_lambda_matches_sklearn_ridge(lam, shape):
    X, y = _data(*shape)
    p = RidgeProbe.fit(X, y, lambdas=[lam])
    sk = sk_linear.Ridge(alpha=lam, fit_intercept=True, solver="svd").fit(X, y)
    assert p.lambda_ == lam
    assert _rel(p.weight, sk.coef_) < 1e-6
    assert abs(float(p.bias) - sk.intercept_) / max(1.0, abs(sk.intercept_)) < 1e-6
    assert _rel(p.predict(torch.from_numpy(X), clamp=False), sk.predict(X)) < 1e-6
    assert _rel(p.predict(torch.from_numpy(X)), np.clip(sk.predict(X), y.min(), y.max())) < 1e-6


def test_gram_route_and_standardize_match_sklearn(monkeypatch):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _data(300, 20)
    monkeypatch.setattr(pr, "_SVD_MAX_ELEMENTS", 0)  # force the eigendecomposition of the Gram matrix
    p = RidgeProbe.fit(X, y, lambdas=[10.0])
    assert _rel(p.weight, sk_linear.Ridge(alpha=10.0).fit(X, y).coef_) < 1e-6
    ps = RidgeProbe.fit(X, y, lambdas=[10.0], standardize=True)
    pipe = make_pipeline(StandardScaler(), sk_linear.Ridge(alpha=10.0)).fit(X, y)
    assert ps.standardize and _rel(ps.weight, pipe[1].coef_ / pipe[0].scale_) < 1e-6  # raw-unit weights
    assert _rel(ps.predict(X, clamp=False), pipe.predict(X)) < 1e-6
    assert _rel(RidgeProbe(standardize=True).fit(X, y, lambdas=[10.0]).weight, ps.weight) < 1e-12  # instance form


def test_cv_picks_lowest_mean_validation_rmse():
    X, y = _data(n=80, d=60, noise=4.0, seed=1)  # few samples, many features: the grid matters
    splits = list(KFold(n_splits=5, shuffle=True, random_state=0).split(X))
    grid = LAMBDAS
    want = np.zeros(len(grid))  # independent: sklearn Ridge per fold, clamped to the fold's label range
    for tr, va in splits:
        for j, lam in enumerate(grid):
            pred = np.clip(sk_linear.Ridge(alpha=lam).fit(X[tr], y[tr]).predict(X[va]), y[tr].min(), y[tr].max())
            want[j] += np.sqrt(np.mean((pred - y[va]) ** 2)) / len(splits)
    p = RidgeProbe.fit(X, y, folds=[va for _, va in splits])
    assert np.allclose(p.cv_rmse.numpy(), want, rtol=1e-6)
    assert p.lambda_ == grid[int(np.argmin(want))]
    assert want.max() / want.min() > 1.05  # the choice is not a toss-up
    full = sk_linear.Ridge(alpha=p.lambda_).fit(X, y)  # refit on all rows given
    assert _rel(p.weight, full.coef_) < 1e-6
    # an int number of folds is the same as passing kfold_indices explicitly
    a = RidgeProbe.fit(X, y, folds=5, seed=3)
    b = RidgeProbe.fit(X, y, folds=kfold_indices(len(y), 5, seed=3))
    assert torch.equal(a.cv_rmse, b.cv_rmse) and a.cv_rmse_folds.shape == (5, len(grid))


# ----------------------------------------------------------------------------- predict / evaluate / io
def test_predictions_clamped_to_training_label_range():
    X, y = _data()
    p = RidgeProbe.fit(X, y)
    extreme = torch.from_numpy(np.vstack([X * 50, -X * 50]))
    pred, raw = p.predict(extreme), p.predict(extreme, clamp=False)
    assert (pred >= y.min()).all() and (pred <= y.max()).all()
    assert (raw < y.min()).any() and (raw > y.max()).any()  # the clamp did something
    assert (p.y_min, p.y_max) == (y.min(), y.max())


def test_device_and_dtype_handling():
    X, y = _data()
    p = RidgeProbe.fit(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert p.weight.dtype == torch.float64  # solved in float64 whatever the input
    x32 = torch.tensor(X[:5], dtype=torch.float32)
    out = p.predict(x32)
    assert out.dtype == torch.float32 and out.device == x32.device and out.shape == (5,)
    assert p.predict(torch.tensor(X[:5])).dtype == torch.float64
    assert p.predict(X[0]).shape == ()  # a single vector
    ev = p.evaluate(x32, y[:5].tolist())
    assert set(ev) == {"rmse", "pearson", "spearman", "r2", "n"} and ev["n"] == 5
    if torch.cuda.is_available():
        assert p.predict(x32.cuda()).device.type == "cuda"


def test_evaluate_matches_independent_metrics():
    from scipy import stats
    from sklearn.metrics import mean_squared_error, r2_score

    X, y = _data()
    p = RidgeProbe.fit(X[:150], y[:150])
    ev, pred = p.evaluate(X[150:], y[150:]), p.predict(X[150:]).numpy()
    assert np.isclose(ev["rmse"], np.sqrt(mean_squared_error(y[150:], pred)))
    assert np.isclose(ev["r2"], r2_score(y[150:], pred))
    assert np.isclose(ev["pearson"], stats.pearsonr(pred, y[150:]).statistic)
    assert np.isclose(ev["spearman"], stats.spearmanr(pred, y[150:]).statistic)


def test_save_load_round_trip_exact(tmp_path):
    X, y = _data()
    p = RidgeProbe.fit(X, y, standardize=True)
    p.save(tmp_path / "probe")
    q = RidgeProbe.load(tmp_path / "probe")
    for name in ("weight", "bias", "x_mean", "x_scale", "lambdas", "cv_rmse", "cv_rmse_folds"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    assert (q.lambda_, q.y_min, q.y_max, q.standardize, q.n_train) == (p.lambda_, p.y_min, p.y_max, True, 200)
    assert torch.equal(p.predict(X), q.predict(X))
    emb = {"sae.W": torch.zeros(2), **p.to_tensors(prefix="probe.")}  # embedded in another file's dict
    assert torch.equal(RidgeProbe.from_tensors(emb, prefix="probe.").weight, p.weight)


@pytest.mark.parametrize("case, exc, match", [
    ("not_a_probe", KeyError, "not a saved RidgeProbe"),
    ("no_files", FileNotFoundError, "no saved probe"),
    ("unfitted", RuntimeError, "not fitted"),
])
def test_probe_io_errors(tmp_path, case, exc, match):
    with pytest.raises(exc, match=match):
        if case == "not_a_probe":
            RidgeProbe.from_tensors({"sae.W": torch.zeros(2)})
        elif case == "no_files":
            RidgeProbe.load(tmp_path / "nothing")
        else:
            RidgeProbe().predict(np.zeros((2, 3)))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, match", [
    ("length", "different lengths"),
    ("nan_x", "X contains NaN or inf"),
    ("inf_y", "y contains NaN or inf"),
    ("constant_y", "y is constant"),
    ("few_samples", r"fewer samples \(4\) than folds \(5\)"),
    ("empty_grid", "lambdas is empty"),
    ("negative_lambda", ">= 0"),
    ("x_1d", "X must be 2-D"),
    ("y_2d", "y must be 1-D"),
    ("one_fold", "folds must be >= 2"),
])
def test_bad_input_raises_clearly(case, match):
    X, y = _data(n=20, d=3)
    kw = {}
    if case == "length":
        y = y[:-1]
    elif case == "nan_x":
        X[3, 1] = np.nan
    elif case == "inf_y":
        y[2] = np.inf
    elif case == "constant_y":
        y[:] = 4.0
    elif case == "few_samples":
        X, y = X[:4], y[:4]
    elif case == "empty_grid":
        kw["lambdas"] = []
    elif case == "negative_lambda":
        kw["lambdas"] = [1.0, -0.1]
    elif case == "x_1d":
        X = X[:, 0]
    elif case == "y_2d":
        y = np.stack([y, y], 1)
    elif case == "one_fold":
        kw["folds"] = 1
    with pytest.raises(ValueError, match=match):
        RidgeProbe.fit(X, y, **kw)


def test_predict_rejects_wrong_width():
    X, y = _data(d=5)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 5\]"):
        RidgeProbe.fit(X, y).predict(np.zeros((3, 4)))


# ----------------------------------------------------------------------------- complexity_to_k
def test_complexity_to_k_table():
    assert complexity_to_k([0.0, 5.0, 10.0]).tolist() == [34, 170, 306]
    # the digest's table, computed from the reference code, for three k_max settings
    c = [0, 2, 3.2, 4, 5, 6, 7, 8, 8.7, 10]
    assert complexity_to_k(c).tolist() == [34, 63, 96, 126, 170, 214, 251, 277, 291, 306]
    assert complexity_to_k(c, k_max=480).tolist() == [42, 85, 137, 183, 250, 317, 374, 415, 435, 458]
    assert complexity_to_k(c, k_max=640).tolist() == [49, 108, 177, 240, 330, 420, 496, 552, 579, 611]


def test_complexity_to_k_types_shapes_monotonic():
    c = torch.linspace(-5, 15, 2001)
    k = complexity_to_k(c)
    assert k.dtype == torch.int64 and k.shape == c.shape
    assert (k.diff() >= 0).all() and k.min() >= 20 and k.max() <= 320
    assert complexity_to_k(5.0).shape == () and int(complexity_to_k(5)) == 170
    assert complexity_to_k(np.array([[0.0, 10.0]])).tolist() == [[34, 306]]
    assert complexity_to_k(torch.tensor([5.0], dtype=torch.float16)).tolist() == [170]
    assert complexity_to_k([0.0, 10.0], k_min=7, k_max=7).tolist() == [7, 7]
    # with a very steep sigmoid the clamp bounds are reached
    assert complexity_to_k([-100.0, 100.0], steepness=1e3).tolist() == [20, 320]


@pytest.mark.parametrize("kw, exc, match", [
    ({"k_min": 400}, ValueError, r"k_min \(400\) > k_max \(320\)"),
    ({"k_min": 0}, ValueError, "k_min must be >= 1"),
    ({"c_min": 10.0, "c_max": 10.0}, ValueError, "c_max must be finite and > c_min"),
    ({"steepness": -1.0}, ValueError, "steepness must be"),
    ({"k_max": 320.5}, TypeError, "k_max must be an int"),
])
def test_complexity_to_k_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        complexity_to_k([1.0, 2.0], **kw)


def test_complexity_to_k_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        complexity_to_k([1.0, float("nan")])


# ----------------------------------------------------------------------------- metrics
def test_rank_metrics_match_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, size=97).astype(float), rng.normal(size=97)
    assert np.array_equal(rankdata(a).numpy(), stats.rankdata(a))
    assert np.isclose(float(spearman(a, b)), stats.spearmanr(a, b).statistic)
    assert np.isclose(float(pearson(a, b)), stats.pearsonr(a, b).statistic)
    batch = torch.tensor(np.stack([a, b]))  # [2, n]: metrics reduce over the last dim
    assert np.allclose(spearman(batch, batch.flip(0)).numpy(), stats.spearmanr(a, b).statistic)


def test_bootstrap_ci_vectorised_equals_loop_and_covers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=120)
    b = a + rng.normal(size=120)
    v = bootstrap_ci(pearson, a, b, n_boot=300, seed=1)
    s = bootstrap_ci(lambda x, y: float(pearson(x, y)), a, b, n_boot=300, seed=1, vectorized=False)
    assert np.allclose(v, s)
    assert v.lo < v.estimate < v.hi and v.hi - v.lo < 0.4


@pytest.mark.parametrize("kw, match", [
    ({"short_b": True}, "different lengths"),
    ({"n_boot": 0}, "n_boot must be an int >= 1"),
    ({"alpha": 1.0}, "alpha must be a finite number in"),
])
def test_bootstrap_ci_bad_input(kw, match):
    a = np.arange(10.0)
    b = a[:-1] if kw.pop("short_b", False) else a
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(pearson, a, b, **kw)


def test_spearman_omitting_nan_pairs():
    from scipy import stats

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, size=60).astype(float), rng.normal(size=60)
    a[::7], b[3::11] = np.nan, np.nan
    keep = ~(np.isnan(a) | np.isnan(b))
    got = float(spearman(a, b, nan_policy="omit"))
    assert np.isclose(got, stats.spearmanr(a[keep], b[keep]).statistic)
    x, z = drop_nan_pairs(a, b)
    assert len(x) == len(z) == keep.sum() and not (x.isnan().any() or z.isnan().any())
    assert np.isnan(float(spearman([1.0, 2.0, np.nan, 4.0], [2.0, 1.0, 3.0, np.nan], nan_policy="omit")))  # < 3 pairs
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        spearman(a, b, nan_policy="drop")


@pytest.mark.parametrize("folds, exc, match", [
    (True, TypeError, "got a bool"),
    (1, ValueError, "folds must be >= 2"),
    (30, ValueError, r"fewer samples \(20\) than folds \(30\)"),
    ([[0, 1, 2]], ValueError, "need at least 2 folds"),
    ([[0, 1], []], ValueError, "fold 1 must hold between 1 and 19 indices"),
    ([[0, 1], [19, 20]], ValueError, r"fold 1 must hold .* in \[19, 20\]"),
])
def test_validation_folds_bad_input(folds, exc, match):
    with pytest.raises(exc, match=match):
        validation_folds(folds, 20)


# ----------------------------------------------------------------------------- layer sweep and controls
def _planted(n=300, d=16, seed=0):
    """Layer 1 carries y linearly (plus noise), layer 0 is pure noise; y is 'complexity' in [0, 10]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 10
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    signal = noise + (y[:, None] - 5) * direction / direction.norm()
    return {0: noise.float(), 1: signal.float()}, y


def test_layer_sweep_finds_the_planted_layer():
    acts, y = _planted()
    df = layer_sweep(acts, y, n_boot=200)
    assert list(df.index) == [0, 1] and (df["n"] == 60).all() and (df["n_train"] == 240).all()
    assert df.loc[1, "pearson"] > 0.8 and df.loc[1, "pearson_lo"] > df.loc[0, "pearson_hi"]
    assert df.loc[1, "rmse"] < df.loc[0, "rmse"]
    assert (df["pearson_lo"] <= df["pearson"]).all() and (df["pearson"] <= df["pearson_hi"]).all()


def test_controls_probe_beats_shuffled_labels_and_length():
    acts, y = _planted()
    texts_len = torch.rand(len(y), 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    df, preds, y_test = controls_table(acts[1], y, features={"text length": texts_len}, n_boot=200,
                                       mlp={"hidden": 32, "max_epochs": 40, "patience": 5},
                                       return_predictions=True)
    assert list(df.index) == ["ridge probe", "shuffled labels", "text length", "MLP probe"]
    assert (df["n"] == len(y_test)).all()
    shuffled, probe = df.loc["shuffled labels"], df.loc["ridge probe"]
    # permuted labels predict nothing (its Pearson can be far from 0: see permutation_null's docstring)
    assert shuffled["r2"] < 0.05 and shuffled["rmse"] > 2 * probe["rmse"]
    assert shuffled["dpearson_lo"] > 0.3  # paired bootstrap CI of the gap lies above 0
    assert df.loc["text length", "r2"] < 0.05 and df.loc["text length", "dpearson_lo"] > 0
    assert probe["pearson"] > 0.8 and probe["r2"] > 0.7 and df.loc["MLP probe", "pearson"] > 0.6
    assert df.loc["ridge probe", "dpearson"] == 0
    _, test = split_indices(len(y))
    assert torch.equal(y_test, y[test])  # every row scored on the same test rows


def test_permutation_null_predicts_nothing():
    acts, y = _planted(n=200)
    null = permutation_null(acts[1], y, n_perm=5, lambdas=(1.0, 1000.0), folds=3)
    real = layer_sweep({1: acts[1]}, y, n_boot=10).iloc[0]
    assert len(null) == 5 and null["r2"].max() < 0.5 * real["r2"]
    assert null["rmse"].min() > 1.5 * real["rmse"]
    # (its Pearson is not a good null here: one dominant label direction in X makes the shrunken
    # permuted-label probes correlate with y, with a random sign; see permutation_null's docstring)


def test_mlp_probe_is_seeded():
    acts, y = _planted(n=120)
    kw = dict(hidden=16, max_epochs=15, patience=5, seed=3)
    assert torch.equal(MLPProbe.fit(acts[1], y, **kw).predict(acts[1]), MLPProbe.fit(acts[1], y, **kw).predict(acts[1]))


def test_length_features_without_tokenizer():
    f = length_features(["one two three", "a"])
    assert f.shape == (2, 4) and f[0, :2].tolist() == [3, 13] and torch.allclose(f[:, 2:], f[:, :2].log1p())


def test_onestop_transfer_ordering():
    class Identity:  # a "probe" whose prediction is the first feature
        def predict(self, X):
            return torch.as_tensor(X)[:, 0]

    levels = torch.tensor([0, 1, 2] * 4)
    topics = [t for t in "abcd" for _ in range(3)]
    good = onestop_transfer(Identity(), (levels.double() + torch.arange(12) * 0.01)[:, None], levels, topics, n_boot=50)
    assert good["ordered_share"] == 1.0 and good["pairwise_share"] == 1.0 and good["n_topics"] == 4
    assert good["spearman"] > 0.9
    bad_x = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0, 2.0] * 2)[:, None]  # topics a, c reversed; b, d right
    res = onestop_transfer(Identity(), bad_x, levels, topics, n_boot=50)
    assert res["ordered_share"] == 0.5 and res["mean_by_level"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="levels must be 0"):
        onestop_transfer(Identity(), bad_x, levels + 1, topics)


@pytest.mark.slow
def test_embedding_controls_match_manual(tiny_gemma2):
    from adaptivek.linear_encoding import last_token_embeddings, mean_input_embeddings

    texts = ["The capital of France is Paris.", "Short one.", "Sparse autoencoders decompose activations."]
    emb, tok = tiny_gemma2._module.get_input_embeddings(), tiny_gemma2.tokenizer
    with torch.no_grad():
        rows = [emb(torch.tensor(tok(t, truncation=True, max_length=5)["input_ids"])) for t in texts]
    got = mean_input_embeddings(tiny_gemma2, texts, max_length=5, batch_size=2)
    assert got.shape == (3, 64) and torch.allclose(got, torch.stack([r.mean(0) for r in rows]), atol=1e-6)
    assert torch.allclose(last_token_embeddings(tiny_gemma2, texts, max_length=5), torch.stack([r[-1] for r in rows]))
    with torch.no_grad():  # the embedding-layer output at the last token, as transformers reports it
        enc = tok(texts[:1], return_tensors="pt", truncation=True, max_length=5)
        h0 = tiny_gemma2._module(**enc, output_hidden_states=True).hidden_states[0][0, -1]
    assert torch.allclose(last_token_embeddings(tiny_gemma2, texts[:1], max_length=5)[0], h0, atol=1e-6)
    feats = length_features(texts, tok, max_length=5)
    assert feats.shape == (3, 6) and feats[:, 0].tolist() == [len(r) for r in rows]


def test_fit_many_equals_separate_fits():
    X, y = _data(n=90, d=12, noise=3.0)
    rng = np.random.default_rng(1)
    Y = np.stack([y, rng.permutation(y), y * 2 + 1], 1)
    many = fit_many(X, Y, folds=4, seed=2, standardize=True)
    for j, p in enumerate(many):
        q = RidgeProbe.fit(X, Y[:, j], folds=4, seed=2, standardize=True)
        assert p.lambda_ == q.lambda_ and torch.allclose(p.cv_rmse, q.cv_rmse, rtol=1e-10)
        assert torch.allclose(p.weight, q.weight, rtol=1e-9, atol=1e-12) and torch.allclose(p.bias, q.bias)
        assert (p.y_min, p.y_max) == (q.y_min, q.y_max)
    g = np.repeat(np.arange(30), 3)
    grouped = fit_many(X, Y, folds=4, seed=2, groups=g)[1]
    assert torch.allclose(grouped.cv_rmse, RidgeProbe.fit(X, Y[:, 1], folds=4, seed=2, groups=g).cv_rmse, rtol=1e-10)


def test_mean_pool():
    from adaptivek.linear_encoding import mean_pool

    acts = torch.arange(10.0).reshape(5, 2)
    got = mean_pool(acts, torch.tensor([0, 0, 1, 1, 1]), 2)
    assert got.tolist() == [[1.0, 2.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match="has no tokens"):
        mean_pool(acts, torch.tensor([0, 0, 0, 0, 0]), 2)


# ----------------------------------------------------------------------------- grouped CV, grid extension, OOF
def _documents(n_docs, rows, d, rng, w, label_shift=2.0):
    """Rows of a document share a large random offset and a document-level label shift ``u`` that no
    feature can know: a new document's label is off by ``u`` (sd ``label_shift``) whatever the probe."""
    g = np.repeat(np.arange(n_docs), rows)
    offset = rng.normal(size=(n_docs, d)) * 3.0
    u = rng.normal(size=n_docs) * label_shift
    X = offset[g] + 0.1 * rng.normal(size=(len(g), d))
    return X, X @ w + u[g] + 0.1 * rng.normal(size=len(g)), g


def test_grouped_cv_does_not_underestimate_the_error_on_new_documents():
    rng = np.random.default_rng(0)
    d = 120  # more features than documents: a probe can memorise every training document's shift
    w = rng.normal(size=d) / np.sqrt(d)
    X, y, g = _documents(100, 5, d, rng, w)
    X_new, y_new, _ = _documents(300, 5, d, rng, w)  # unseen documents: the error that matters
    by_row, by_doc = RidgeProbe.fit(X, y), RidgeProbe.fit(X, y, groups=g)
    row_cv, doc_cv = float(by_row.cv_rmse.min()), float(by_doc.cv_rmse.min())
    # by construction no probe beats sd(u) = 2 on a new document; a row CV sees other rows of the
    # validation row's document in training and reports far less
    assert row_cv < 1.0 < 1.6 < doc_cv
    assert row_cv < 0.5 * by_row.evaluate(X_new, y_new)["rmse"]
    assert doc_cv > 0.8 * by_doc.evaluate(X_new, y_new)["rmse"]
    assert by_doc.evaluate(X_new, y_new)["rmse"] <= by_row.evaluate(X_new, y_new)["rmse"]
    folds = pr.validation_folds(5, len(y), 0, groups=g)
    assert all(not set(g[f.numpy()]) & set(np.delete(g, f.numpy())) for f in folds)  # no document cut


def _ridge_case(noise, n=100, d=80, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ rng.normal(size=d) + noise * rng.normal(size=n)


def test_grid_extends_while_the_edge_wins_and_stops_inside():
    X, y = _ridge_case(noise=5.0)  # a noisy, wide problem: the best λ is well above 0.1
    p = RidgeProbe.fit(X, y, lambdas=(0.01, 0.1), extend_grid=True)
    grid = p.lambdas.tolist()
    assert p.grid_extensions >= 1 and grid[:2] == [0.01, 0.1]
    assert grid[2:] == pytest.approx([0.1 * 10 ** (i + 1) for i in range(p.grid_extensions)])  # factors of 10
    assert p.lambda_ not in (min(grid), max(grid)) and not p.lambda_at_edge  # stopped once the best was inside
    fixed = RidgeProbe.fit(X, y, lambdas=grid)  # the same grid given up front: the same choice and CV
    assert fixed.lambda_ == p.lambda_ and torch.allclose(fixed.cv_rmse, p.cv_rmse)
    inside = RidgeProbe.fit(X, y, lambdas=grid, extend_grid=True)
    assert inside.grid_extensions == 0 and inside.lambdas.tolist() == grid
    plain = RidgeProbe.fit(X, y, lambdas=(0.01, 0.1))  # the old call: no extension, the edge is reported
    assert plain.lambdas.tolist() == [0.01, 0.1] and plain.lambda_ == 0.1 and plain.lambda_at_edge


def test_grid_extension_is_bounded_and_warns():
    X, y = _ridge_case(noise=0.0, n=200, d=10)  # exactly linear: less penalty is always better
    with pytest.warns(UserWarning, match="edge still wins after 6 extensions"):
        p = RidgeProbe.fit(X, y, lambdas=(10.0, 100.0), extend_grid=True)
    assert p.grid_extensions == pr.MAX_GRID_EXTENSIONS and p.lambda_at_edge
    assert p.lambda_ == pytest.approx(10.0 / 10**pr.MAX_GRID_EXTENSIONS)
    zero = RidgeProbe.fit(X, y, lambdas=(0.0, 1.0), extend_grid=True)  # λ = 0 is a final edge
    assert zero.lambda_ == 0.0 and zero.grid_extensions == 0 and not zero.lambda_at_edge


def test_grid_extension_survives_save_and_load(tmp_path):
    X, y = _ridge_case(noise=5.0)
    p = RidgeProbe.fit(X, y, lambdas=(0.01, 0.1), extend_grid=True)
    q = RidgeProbe.load(p.save(tmp_path / "probe"))
    assert (q.grid_extensions, q.lambda_at_edge) == (p.grid_extensions, p.lambda_at_edge)
    assert torch.equal(q.lambdas, p.lambdas)


@pytest.mark.parametrize("d", [20, 200], ids=["tall_gram_sums", "wide_rows"])
def test_out_of_fold_prediction_ignores_its_own_label(d):
    X, y = _ridge_case(noise=1.0, n=150, d=d)
    g = np.repeat(np.arange(30), 5)
    grid = (0.0, 0.1, 10.0)  # λ = 0 closes the small end
    oof = pr.out_of_fold_predict(X, y, groups=g, folds=4, lambdas=grid)
    i = 17
    y2 = y.copy()
    y2[i] += 5.0  # a changed label: it would move any in-sample fit, and a λ chosen with it
    oof2 = pr.out_of_fold_predict(X, y2, groups=g, folds=4, lambdas=grid)
    assert oof2[i] == pytest.approx(float(oof[i]), rel=1e-12, abs=1e-12)
    assert not torch.allclose(oof, oof2)  # the label does reach the rows of other folds
    assert oof.dtype == torch.float64 and oof.shape == (len(y),)


def test_out_of_fold_equals_a_probe_fitted_without_the_fold():
    X, y = _ridge_case(noise=1.0, n=150)
    g = np.repeat(np.arange(30), 5)
    folds = pr.validation_folds(5, len(y), 4, groups=g)
    val = folds[2].numpy()
    y[val] += 30 * np.random.default_rng(0).normal(size=len(val))  # fold 2's labels are mostly noise: a λ
    # chosen with them in training is much larger than one chosen without them
    oof = pr.out_of_fold_predict(torch.tensor(X, dtype=torch.float32), y, groups=g, folds=5, seed=4,
                                 lambdas=(0.01, 0.1))
    assert oof.dtype == torch.float32  # float32 features give float32 predictions, as predict does
    train = np.setdiff1d(np.arange(len(y)), val)
    where = {r: k for k, r in enumerate(train)}  # the other folds, re-indexed inside the training part
    inner = [np.array([where[r] for r in f.numpy()]) for j, f in enumerate(folds) if j != 2]
    p = RidgeProbe.fit(X[train], y[train], folds=inner, lambdas=(0.01, 0.1), extend_grid=True)
    assert p.grid_extensions > 0  # the extension is part of what is compared
    assert torch.allclose(oof[val].double(), p.predict(X[val]), atol=1e-4)
    everything = RidgeProbe.fit(X, y, groups=g, seed=4, lambdas=(0.01, 0.1), extend_grid=True)
    assert everything.lambda_ != p.lambda_  # so a λ chosen once on all rows would fail the check above


def test_gram_sums_route_matches_the_row_route(monkeypatch):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(400, 15)) * rng.uniform(0.2, 4, size=15) + rng.normal(size=15) * 30  # big offsets
    X[:, 3] = 7.0  # a constant feature
    y = X @ rng.normal(size=15) + 3 * rng.normal(size=400)
    g = np.repeat(np.arange(80), 5)
    want = [RidgeProbe.fit(X, y, groups=g, standardize=s) for s in (False, True)]
    monkeypatch.setattr(pr, "_SVD_MAX_ELEMENTS", 0)
    for s, a in zip((False, True), want, strict=True):
        b = RidgeProbe.fit(X, y, groups=g, standardize=s)
        assert b.lambda_ == a.lambda_ and torch.allclose(b.cv_rmse, a.cv_rmse, rtol=1e-10)
        assert _rel(b.weight, a.weight) < 1e-9 and torch.allclose(b.x_scale, a.x_scale, rtol=1e-10)


@pytest.mark.parametrize("call, match", [
    (lambda X, y, g: pr.out_of_fold_predict(X, y, groups=g, folds=2), "needs folds >= 3"),
    (lambda X, y, g: pr.out_of_fold_predict(X, y, groups=None, folds=[[0, 1], [2, 3], [4, 5]]),
     "must partition the rows"),
    (lambda X, y, g: pr.out_of_fold_predict(X, y, groups=[None] + list(g[1:])), r"missing or empty id\(s\)"),
    (lambda X, y, g: RidgeProbe.fit(X, y, groups=g, folds=[[0, 1, 2], [3, 4, 5]]), "share 1 group"),
    (lambda X, y, g: RidgeProbe.fit(X, y, groups=g[:-1]), "groups has 59 ids but there are 60 samples"),
], ids=["oof_two_folds", "oof_partial_folds", "missing_group", "fold_cuts_a_document", "groups_length"])
def test_grouped_probe_bad_input(call, match):
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(60, 4)), rng.normal(size=60)
    with pytest.raises(ValueError, match=match):
        call(X, y, np.repeat(np.arange(15), 4))


def test_out_of_fold_predicts_unlabelled_rows_with_their_folds_probe():
    X, y = _ridge_case(noise=1.0, n=150)
    g = np.repeat(np.arange(30), 5)
    y_nan = y.copy()
    unl = np.arange(0, 150, 5)  # the first row of every document has no label
    y_nan[unl] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        pr.out_of_fold_predict(X, y_nan, groups=g, folds=5)
    oof = pr.out_of_fold_predict(X, y_nan, groups=g, folds=5, seed=2, unlabelled="predict")
    assert oof.shape == (150,) and bool(torch.isfinite(oof).all())
    lab = np.setdiff1d(np.arange(150), unl)
    folds = pr.validation_folds(5, 150, 2, groups=g)
    # the labelled rows get what the labelled rows alone (in the same document folds) would give
    where = {r: k for k, r in enumerate(lab)}
    lab_folds = [np.array([where[r] for r in f.numpy() if r in where]) for f in folds]
    want = pr.out_of_fold_predict(X[lab], y[lab], groups=None, folds=lab_folds)
    assert torch.allclose(oof[lab], want)
    # an unlabelled row: the label of its own document never reaches it, another fold's does
    i = int(unl[3])
    y2 = y_nan.copy()
    same_doc = np.flatnonzero(g == g[i])
    y2[same_doc[1]] += 50.0
    assert pr.out_of_fold_predict(X, y2, groups=g, folds=5, seed=2, unlabelled="predict")[i] == pytest.approx(
        float(oof[i]), abs=1e-12)
