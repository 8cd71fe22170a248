"""evaluate / downstream_loss against direct computations; compare and its statistics (adaptivek.frontier)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from adaptivek import TopKSAE
from adaptivek.comparison import CompareConfig, compare, load_results, rank_match
from adaptivek.evaluation import downstream_loss, downstream_losses, evaluate
from adaptivek.frontier import recon_stats, vs_frontier, weighted_sst
from adaptivek.stats import bootstrap_counts, interpolate, pareto_mask
from adaptivek.training import TrainConfig


class Identity(torch.nn.Module):
    """A stand-in SAE whose reconstruction is its input (codes = x, so L0 = d_in)."""

    def encode(self, x, k=None):
        return x

    def decode(self, codes):
        return codes


class Shrink(torch.nn.Module):
    """A stand-in SAE with a visible reconstruction error."""

    def encode(self, x, k=None):
        return x

    def decode(self, codes):
        return 0.6 * codes + 0.1


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(37, 12, generator=g) + 40.0  # a large common offset: FVE must subtract the mean
    sae = TopKSAE(12, 48, 5, seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(X.mean(0))
    return X, sae


def test_evaluate_matches_direct_computation(data):
    X, sae = data
    res = evaluate(sae, X)
    with torch.no_grad():
        codes = sae.encode(X)
        x_hat = sae.decode(codes)
    err = (X - x_hat).double().pow(2)
    Xd = X.double()
    fve = 1 - err.sum() / (Xd - Xd.mean(0)).pow(2).sum()
    assert res["fve"] == pytest.approx(float(fve), rel=1e-6)
    assert res["fvu"] == pytest.approx(1 - float(fve), rel=1e-6)
    assert res["mse"] == pytest.approx(float(err.mean()), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(X.double(), x_hat.double(), dim=1)
    assert res["cosine"] == pytest.approx(float(cos.mean()), rel=1e-6)
    ratio = x_hat.double().norm(dim=1) / Xd.norm(dim=1)
    assert res["l2_ratio"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    l0 = (codes != 0).sum(1)
    assert torch.equal(res["l0"], l0)
    assert res["l0_mean"] == pytest.approx(float(l0.double().mean()))
    assert res["l0_std"] == pytest.approx(float(l0.double().std()))
    fired = (codes != 0).any(0).double().mean()
    assert res["ever_fired_frac"] == pytest.approx(float(fired))
    assert res["dead_frac"] == pytest.approx(1 - float(fired))
    assert res["n"] == 37 and res["d_sae"] == 48
    # the pre-6.45.1 SAELens formula (no mean subtracted) is a different number here: the test can fail
    wrong = 1 - err.sum() / Xd.pow(2).sum()
    assert abs(float(wrong) - res["fve"]) > 0.1


def test_fve_is_stable_with_a_huge_offset():
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(64, 8, generator=g, dtype=torch.float64) + 1e4).float()
    res = evaluate(Identity(), X, batch_size=5)
    assert res["fve"] == pytest.approx(1.0, abs=1e-9)  # perfect reconstruction: no cancellation noise
    shrunk = evaluate(Shrink(), X, batch_size=7)
    x_hat = (0.6 * X + 0.1).double()  # what the stand-in computes, in float32
    direct = 1 - (X.double() - x_hat).pow(2).sum() / (X.double() - X.double().mean(0)).pow(2).sum()
    assert shrunk["fve"] == pytest.approx(float(direct), rel=1e-9)


def test_streaming_equals_one_batch(data):
    X, sae = data
    one = evaluate(sae, X, batch_size=4096, per_row=True)
    many = evaluate(sae, X, batch_size=4, per_row=True)
    for key in ("mse", "fve", "cosine", "l2_ratio", "l0_mean", "l0_std", "dead_frac", "ever_fired_frac"):
        assert many[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert torch.equal(many["l0"], one["l0"])
    assert torch.allclose(many["row_sq_err"], one["row_sq_err"])


def test_one_row_and_constant_sets_raise(data):
    X, sae = data
    with pytest.raises(ValueError, match="undefined"):
        evaluate(sae, X[:1])
    with pytest.raises(ValueError, match="same vector"):
        evaluate(sae, X[:1].expand(5, -1).contiguous())
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(sae, bad)


def test_per_row_k(data):
    X, sae = data
    k = torch.arange(len(X)) % 4 + 1
    res = evaluate(sae, X, k=k, batch_size=6)
    assert torch.equal(res["l0"], k)  # enough positive pre-activations: exactly k_i active
    with pytest.raises(ValueError, match="one k per row"):
        evaluate(sae, X, k=k[:-1])


# ----------------------------------------------------------------------------- downstream loss
TEXTS = ["The capital of France is Paris.", "Hi there", "Sparse autoencoders split activations into features.",
         "one two three four five six seven"]


def test_identity_splice_gives_clean_loss(tiny_neox):
    res = downstream_loss(tiny_neox, Identity(), TEXTS, 1, max_length=16, batch_size=3)
    assert torch.allclose(res["rows_sae"], res["rows_clean"], atol=1e-5)
    assert res["frac_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert not torch.allclose(res["rows_ablate"], res["rows_clean"], atol=1e-3)  # the ablation does something
    # clean loss = the model's own next-token loss of each text's last token, text by text, unpadded
    hf = tiny_neox._module
    tok = tiny_neox.tokenizer
    direct = []
    for t in TEXTS:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=16).input_ids
        with torch.no_grad():
            logits = hf(ids).logits[0, -2]
        direct.append(float(torch.nn.functional.cross_entropy(logits[None], ids[0, -1:])))
    assert torch.allclose(res["rows_clean"], torch.tensor(direct, dtype=torch.float64), atol=1e-4)


def test_cached_and_full_splices_agree(tiny_neox):
    saes = {"id": Identity(), "shrink": Shrink()}
    kv = downstream_losses(tiny_neox, saes, TEXTS, 2, max_length=16, batch_size=2, method="kv")
    full = downstream_losses(tiny_neox, saes, TEXTS, 2, max_length=16, batch_size=2, method="full")
    for name in saes:
        assert torch.allclose(kv["saes"][name]["rows"], full["saes"][name]["rows"], atol=1e-4)
    assert torch.allclose(kv["rows_ablate"], full["rows_ablate"], atol=1e-4)
    # the splice really happens: a lossy reconstruction changes the loss
    assert not torch.allclose(kv["saes"]["shrink"]["rows"], kv["rows_clean"], atol=1e-3)
    # scale: the SAE sees x * scale and x_hat / scale is spliced, so an identity stays an identity
    scaled = downstream_losses(tiny_neox, {"id": Identity()}, TEXTS, 2, max_length=16, scale=7.0)
    assert torch.allclose(scaled["saes"]["id"]["rows"], scaled["rows_clean"], atol=1e-4)


def test_downstream_rejects_bad_input(tiny_neox):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        downstream_loss(tiny_neox, Identity(), ["Hi", "Hello there my friend"], 1, max_length=1 + 1)
    with pytest.raises(ValueError, match="out of range"):
        downstream_loss(tiny_neox, Identity(), TEXTS, 99)
    with pytest.raises(ValueError, match="token must be 'last'"):
        downstream_loss(tiny_neox, Identity(), TEXTS, 1, token="all")


# ----------------------------------------------------------------------------- comparison pieces
def test_interpolation_pareto_and_rank_match():
    xp = torch.tensor([[10.0, 20.0, 40.0]])
    fp = torch.tensor([[0.1, 0.3, 0.5]])
    assert float(interpolate(torch.tensor([15.0]), xp, fp, log=False)) == pytest.approx(0.2)
    assert float(interpolate(torch.tensor([20.0 * 2 ** 0.5]), xp, fp, log=True)) == pytest.approx(0.4)
    assert torch.isnan(interpolate(torch.tensor([50.0]), xp, fp))
    assert pareto_mask([1, 2, 3], [0.5, 0.4, 0.9]) == [True, False, True]
    assert pareto_mask([1, 2], [0.5, 0.4], higher_better=False) == [True, True]
    k = rank_match(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([10, 30, 20]))
    assert k.tolist() == [30, 10, 20]


def test_bootstrap_fve_equals_fve_of_the_resample():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(25, 6, generator=g, dtype=torch.float64) + 3
    err = torch.rand(25, generator=g, dtype=torch.float64)
    W = bootstrap_counts(25, 4, seed=3)
    rows = {"sq_err": err, "cosine": err, "l2_ratio": err, "l0": err}
    stats = recon_stats(W, rows, X - X.mean(0))
    for r in range(4):
        idx = torch.repeat_interleave(torch.arange(25), W[r].long())  # the resampled rows
        Xr = X[idx]
        direct = 1 - err[idx].sum() / (Xr - Xr.mean(0)).pow(2).sum()
        assert float(stats["fve"][r]) == pytest.approx(float(direct), rel=1e-10)
    shared = recon_stats(W, rows, sst=weighted_sst(W, X - X.mean(0)), d=6)  # the SAE-free part computed once
    assert all(torch.equal(shared[m], stats[m]) for m in stats)


@pytest.mark.parametrize("kw, match", [({}, "needs Xc"), ({"sst": torch.ones(5)}, "pass d=")], ids=["nothing", "no_d"])
def test_recon_stats_needs_the_variance(kw, match):
    rows = {m: torch.ones(3, dtype=torch.float64) for m in ("sq_err", "cosine", "l2_ratio", "l0")}
    with pytest.raises(ValueError, match=match):
        recon_stats(bootstrap_counts(3, 4, seed=0), rows, **kw)


def test_vs_frontier_interpolates_per_replicate():
    # two TopK points on a line in log L0; the point sits 0.05 above it on the full data, 0.1 on replicate 1
    stats = {"topk_a": {"l0": torch.tensor([10.0, 10.0]), "fve": torch.tensor([0.5, 0.5])},
             "topk_b": {"l0": torch.tensor([40.0, 40.0]), "fve": torch.tensor([0.7, 0.7])},
             "p": {"l0": torch.tensor([20.0, 20.0]), "fve": torch.tensor([0.65, 0.7])}}
    out = vs_frontier(stats, ["topk_b", "topk_a"], "p", "fve")  # the sweep's order does not matter
    assert out["frontier"] == pytest.approx(0.6) and out["estimate"] == pytest.approx(0.05)
    assert out["lo"] == pytest.approx(0.1) and out["hi"] == pytest.approx(0.1)  # one replicate
    linear = vs_frontier(stats, ["topk_a", "topk_b"], "p", "fve", log=False)
    assert linear["frontier"] == pytest.approx(0.5 + 0.2 / 3)


def _small_data():
    """120 rows [120, 16], labels on the 0-10 scale, texts, and document ids (the first 90 rows, the training
    split, hold documents 0-14 of 6 rows each; each of the 30 test rows is its own document, 15-44, enough
    for the decisive comparison's document bootstrap)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 16, generator=g) * 2 + 5
    y = ((X[:, :4].sum(1) + torch.randn(120, generator=g)).double() / 2 - 5).clamp(0, 10)  # on the 0-10 scale
    t = [f"text number {i} " + "word " * (i % 9) for i in range(120)]
    return X, y, t, [f"doc{i // 6}" if i < 90 else f"doc{i - 75}" for i in range(120)]


def _small_compare(tmp_path, texts=True, groups_train=None, groups_test=None, **kw):
    X, y, t, _ = _small_data()
    cfg = CompareConfig(**(dict(d_sae=32, steps=4, batch_size=32, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=50,
                                n_seeds=1, jumprelu=False, val_frac=0.0) | kw))
    return compare(X[:90], y[:90], X[90:], y[90:], out=tmp_path / "results.json", cfg=cfg,
                   texts_train=t[:90] if texts else None, texts_test=t[90:] if texts else None, log=None,
                   groups_train=groups_train, groups_test=groups_test)


def test_compare_writes_results_json(tmp_path):
    comp = _small_compare(tmp_path)
    res = load_results(tmp_path / "results.json")
    names = set(res["saes"])
    batchtopk = sorted(n for n in names if n.startswith("batchtopk_"))
    assert len(batchtopk) == 2 and batchtopk[1] == batchtopk[0] + "_batch"  # threshold and batch-rule inference
    k = res["saes"][batchtopk[0]]["k"]
    assert res["saes"][batchtopk[1]]["metrics"]["l0_mean"] == pytest.approx(k, abs=0.5)  # the batch rule keeps k·n
    matched = {n for n in names if n.startswith("matched_")}
    assert 1 <= len(matched) <= 2  # TopK at the integers around AdaptiveK's mean k
    assert names - set(batchtopk) - matched == {"topk_2", "topk_4", "topk_8", "adaptivek_2_8", "shuffled_k",
                                                "length_k", "norm_k"}
    assert res["saes"]["shuffled_k"]["metrics"]["l0_mean"] == pytest.approx(
        res["saes"]["adaptivek_2_8"]["metrics"]["l0_mean"], abs=0.5)  # same k distribution
    assert set(res["vs_topk"]["adaptivek_2_8"]) == {"fve", "cosine", "mse"}
    assert len(res["by_complexity"]["bins"]) == 3
    assert res["downstream"]["skipped"]
    assert "paper_k_range_ablation" not in res  # the chapter joins adaptivek.paper's table itself
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert set(comp.rows["sae"]) == set(res["saes"])
    assert not any(sae.training for sae in comp.saes.values())  # every SAE is left in inference mode


def test_compare_without_texts_skips_the_length_ablation(tmp_path):
    res = _small_compare(tmp_path, texts=False, batchtopk="none", n_bins=2, interp="linear").results
    assert res["skipped"] == {"length_k": "no texts or lengths given"}
    assert {s["kind"] for s in res["saes"].values()} == {"topk", "adaptivek", "ablation", "matched"}
    assert len(res["by_complexity"]["bins"]) == 2 and res["config"]["interp"] == "linear"


def test_compare_leaves_no_partial_file_when_a_step_fails(tmp_path, monkeypatch):
    import adaptivek.comparison as cmp

    def boom(*a, **k):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(cmp, "evaluate", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        _small_compare(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither results.json nor a temporary file
    # and the atomic writer itself: a failure while serialising leaves the old file untouched
    from adaptivek.io import write_json

    target = tmp_path / "r.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_compare_checks_the_output_path_before_training(tmp_path, monkeypatch):
    import adaptivek.lineup

    def no_training(*a, **k):
        raise AssertionError("trained before checking the output path")

    monkeypatch.setattr(adaptivek.lineup, "train_sae", no_training)
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="is a directory"):
        compare(X, torch.rand(10), X, torch.rand(10), out=tmp_path, cfg=CompareConfig(d_sae=8, topk_ks=(1, 2),
                                                                                      k_ranges=((1, 2),)))


@pytest.mark.parametrize("kw, match", [
    ({"topk_ks": (2,)}, "at least 2 values"),
    ({"topk_ks": (1, 16)}, "exceeds d_sae"),
    ({"k_ranges": ()}, "k_ranges is empty"),
    ({"k_ranges": ((4, 2),)}, "1 <= k_min <= k_max"),
    ({"k_ranges": ((1, 9),)}, "d_sae=8"),
    ({"ablation_range": (1, 3)}, "must be one of k_ranges"),
    ({"batchtopk": "some"}, "batchtopk"),
    ({"interp": "cubic"}, "interp"),
    ({"scale": 0.0}, "scale"),
    ({"scale": "big"}, "scale"),
    ({"n_boot": 0}, "n_boot"),
    ({"steps": 2.5}, "steps"),
    ({"d_sae": True}, "d_sae"),
], ids=["one-topk", "topk-above-d_sae", "no-k-range", "k-range-reversed", "k-range-above-d_sae",
        "ablation-not-a-range", "batchtopk", "interp", "scale-zero", "scale-word", "n_boot", "steps-float",
        "d_sae-bool"])
def test_compare_config_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**({"d_sae": 8, "topk_ks": (1, 2), "k_ranges": ((1, 2),)} | kw))


# ----------------------------------------------------------------------------- document ids
def _record_training(monkeypatch):
    """Wrap lineup.train_sae: returns the list of (SAE class name, per-row k or None) of every training."""
    import adaptivek.lineup

    calls, real = [], adaptivek.lineup.train_sae

    def recording(sae, X, y=None, cfg=None, *, k=None, **kw):
        calls.append((type(sae).__name__, None if k is None else k.clone()))
        return real(sae, X, y, cfg, k=k, **kw)

    monkeypatch.setattr(adaptivek.lineup, "train_sae", recording)
    return calls


def _phase1_k(X, y, docs, scale, grouped):
    """AdaptiveK (2, 8)'s training k recomputed from public pieces: complexity_to_k of the out-of-fold
    predictions (grouped) or of the in-sample predictions of the paper's probe."""
    from adaptivek.probe import RidgeProbe, complexity_to_k, out_of_fold_predict
    from adaptivek.training import TrainConfig

    Xs, lam = X * scale, TrainConfig().probe_lambdas  # compare scales X before any fit
    if grouped:
        pred = out_of_fold_predict(Xs, y, groups=docs, folds=5, lambdas=lam, seed=0, extend_grid=True)
    else:
        pred = RidgeProbe.fit(Xs, y, lambdas=lam, folds=5, seed=0).predict(Xs)
    return complexity_to_k(pred.float(), k_min=2, k_max=8)


@pytest.mark.parametrize("grouped", [True, False], ids=["document-ids", "no-ids"])
def test_compare_training_k(tmp_path, monkeypatch, grouped):
    X, y, _, docs = _small_data()
    calls = _record_training(monkeypatch)
    res = _small_compare(tmp_path, groups_train=docs[:90] if grouped else None,
                         groups_test=docs[90:] if grouped else None)
    k = _phase1_k(X[:90], y[:90], docs[:90], res.scale, grouped)
    other = _phase1_k(X[:90], y[:90], docs[:90], res.scale, not grouped)
    assert not torch.equal(k, other)  # in-sample and out-of-fold k differ here: the test can tell them apart
    (ada_k,) = [kk for cls, kk in calls if cls == "AdaptiveKSAE"]
    if grouped:
        assert torch.equal(ada_k, k)  # phase 2 trains with the out-of-fold k
    else:
        assert ada_k is None  # phase 2 takes k from the probe itself, as before
    saes, probe = res.results["saes"], res.results["probe"]
    ada = saes["adaptivek_2_8"]
    assert ada["k_train_source"] == probe["k_train_source"] == ("out_of_fold" if grouped else "in_sample")
    assert (ada["k_train_mean"], ada["k_train_min"], ada["k_train_max"]) == (
        float(k.float().mean()), int(k.min()), int(k.max()))
    ablation_k = [kk for cls, kk in calls if cls == "TopKSAE" and kk is not None]
    assert len(ablation_k) == 3  # shuffled_k, length_k and norm_k
    for kk in ablation_k:  # the same multiset of k values as AdaptiveK's training k
        assert torch.equal(kk.sort().values, k.sort().values)
    batchtopk = next(s for s in saes.values() if s["kind"] == "batchtopk")
    assert batchtopk["k"] == max(1, round(float(k.float().mean())))
    assert ("train_out_of_fold" in probe) == grouped
    assert (res.results["config"]["n_documents_train"], res.results["config"]["n_documents_test"]) == (
        (15, 30) if grouped else (None, None))


def test_grouped_probe_is_the_document_cv_fit(tmp_path):
    from adaptivek.probe import RidgeProbe, out_of_fold_predict
    from adaptivek.stats import pearson
    from adaptivek.training import TrainConfig

    X, y, _, docs = _small_data()
    res = _small_compare(tmp_path, groups_train=docs[:90], groups_test=docs[90:])
    Xs = X[:90] * res.scale
    probe = RidgeProbe.fit(Xs, y[:90], lambdas=TrainConfig().probe_lambdas, folds=5, seed=0, groups=docs[:90],
                           extend_grid=True)
    got = res.results["probe"]
    assert (got["lambda"], got["lambda_at_edge"], got["grid_extensions"]) == (
        probe.lambda_, probe.lambda_at_edge, probe.grid_extensions)
    assert got["train"]["pearson"] == pytest.approx(float(pearson(probe.predict(Xs).double(), y[:90])), rel=1e-9)
    pred = out_of_fold_predict(Xs, y[:90], groups=docs[:90], lambdas=TrainConfig().probe_lambdas, seed=0)
    assert got["train_out_of_fold"]["pearson"] == pytest.approx(float(pearson(pred.double(), y[:90])), rel=1e-9)
    assert got["train_out_of_fold"]["pearson"] < got["train"]["pearson"]  # in-sample flatters the probe


def test_compare_without_ids_trains_adaptivek_as_before(tmp_path):
    """Without document ids AdaptiveK is the paper's: train_sae from the in-sample probe, no k given."""
    from dataclasses import replace

    from adaptivek import AdaptiveKSAE
    from adaptivek.probe import RidgeProbe
    from adaptivek.training import TrainConfig, train_sae

    X, y, _, _ = _small_data()
    comp = _small_compare(tmp_path)
    Xs, Xte = X[:90] * comp.scale, X[90:] * comp.scale
    tc = replace(TrainConfig(), seed=0, steps=4, batch_size=32)
    probe = RidgeProbe.fit(Xs, y[:90], lambdas=tc.probe_lambdas, folds=tc.probe_folds, seed=0)
    sae, _ = train_sae(AdaptiveKSAE(16, 32, probe, k_min=2, k_max=8, seed=0), Xs, y[:90], tc, progress=False)
    got = comp.saes["adaptivek_2_8"].state_dict()
    assert all(torch.equal(v, got[name]) for name, v in sae.state_dict().items())
    assert comp.results["saes"]["adaptivek_2_8"]["metrics"]["fve"] == evaluate(sae, Xte)["fve"]
    assert comp.results["probe"]["lambda"] == probe.lambda_


def _docs():
    return _small_data()[3]


@pytest.mark.parametrize("groups, cfg, match", [
    ((_docs()[:90], _docs()[90:-1] + ["doc3"]), {}, r"share 1 document\(s\), e\.g\. \['doc3'\]"),
    ((_docs()[:89], None), {}, "groups_train has 89 entries"),
    ((_docs()[:90], _docs()[91:]), {}, "groups_test has 29 entries"),
    (([None] + _docs()[1:90], None), {}, "groups_train has 1 missing"),
    ((["a", "b"] * 45, None), {}, "the 2 training document"),
    ((_docs()[:90], None), {"probe_folds": 2}, "3 <= probe_folds"),
], ids=["shared-document", "train-length", "test-length", "missing-id", "too-few-documents", "two-folds"])
def test_compare_rejects_bad_document_ids(tmp_path, monkeypatch, groups, cfg, match):
    import adaptivek.lineup
    from adaptivek.training import TrainConfig

    def no_training(*a, **k):
        raise AssertionError("trained before checking the document ids")

    monkeypatch.setattr(adaptivek.lineup, "train_sae", no_training)
    with pytest.raises(ValueError, match=match):
        _small_compare(tmp_path, groups_train=groups[0], groups_test=groups[1], train_cfg=TrainConfig(**cfg))
    assert list(tmp_path.iterdir()) == []


def _data(n=20, d=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.rand(n, generator=g, dtype=torch.float64)


def _nan_label():
    X, y = _data()
    y[3] = float("nan")
    return X[:10], y[:10], X[10:], y[10:], {}


@pytest.mark.parametrize("case, exc, match", [
    (_nan_label, ValueError, "NaN"),
    (lambda: (_data()[0][:10, :3], torch.rand(10), _data()[0][10:], torch.rand(10), {}), ValueError, "shape"),
    (lambda: (_data()[0][:10], torch.rand(9), _data()[0][10:], torch.rand(10), {}), ValueError, "paired row by row"),
    (lambda: (_data()[0][:10], torch.rand(10), _data()[0][10:11], torch.rand(1), {}), ValueError, "at least 2 rows"),
    (lambda: (_data()[0][:10].numpy(), torch.rand(10), _data()[0][10:], torch.rand(10), {}), TypeError, "X_train"),
    (lambda: (_data()[0][:10], torch.rand(10), _data()[0][10:], torch.rand(10), {"texts_test": ["a"]}),
     ValueError, "texts_test"),
    (lambda: (_data()[0][:10], torch.rand(10), _data()[0][10:], torch.rand(10), {"lm": object()}),
     ValueError, "lm, cfg.layer and texts_test"),
], ids=["nan-label", "d-mismatch", "label-count", "one-test-row", "numpy-X", "text-count", "lm-without-layer"])
def test_compare_rejects_bad_input(tmp_path, case, exc, match):
    X_train, y_train, X_test, y_test, kw = case()
    with pytest.raises(exc, match=match):
        compare(X_train, y_train, X_test, y_test, out=tmp_path / "r.json", log=None,
                cfg=CompareConfig(d_sae=8, topk_ks=(1, 2), k_ranges=((1, 2),)), **kw)
    assert not (tmp_path / "r.json").exists()


def test_sliding_window_model_and_text_order(tiny_gemma2):
    # Gemma-2 has sliding-window layers: "auto" must give the same numbers as re-running everything
    auto = downstream_losses(tiny_gemma2, {"shrink": Shrink()}, TEXTS, 1, max_length=16, batch_size=2)
    full = downstream_losses(tiny_gemma2, {"shrink": Shrink()}, TEXTS, 1, max_length=16, batch_size=2, method="full")
    assert torch.allclose(auto["saes"]["shrink"]["rows"], full["saes"]["shrink"]["rows"], atol=1e-4)
    # rows come back in the order of the texts, whatever the internal length sorting does
    rev = downstream_losses(tiny_gemma2, {"shrink": Shrink()}, TEXTS[::-1], 1, max_length=16, batch_size=3)
    assert torch.allclose(rev["rows_clean"].flip(0), auto["rows_clean"], atol=1e-4)


def test_compare_with_downstream_loss(tmp_path, tiny_neox):
    from adaptivek import extract

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "omicron"]
    texts = [" ".join(words[(i * j) % 10] for j in range(2 + i % 7)) + f" {i}" for i in range(48)]
    X = extract(tiny_neox, texts, 1, max_length=16, progress=False)
    y = torch.tensor([len(t) for t in texts], dtype=torch.float64) / 6  # on the 0-10 scale
    cfg = CompareConfig(d_sae=32, steps=3, batch_size=16, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=20, layer=1,
                        max_length=16, n_ce=12, ce_batch_size=5, n_seeds=1, jumprelu=False, val_frac=0.0)
    comp = compare(X[:36], y[:36], X[36:], y[36:], out=tmp_path / "r.json", cfg=cfg, texts_train=texts[:36],
                   texts_test=texts[36:], lm=tiny_neox, log=None)
    res = comp.results
    ds = res["downstream"]
    assert ds["n"] == 12 and ds["ce_ablate"] != ds["ce_clean"]
    for name, s in res["saes"].items():
        assert set(s["ce"]) >= {"ce_sae", "frac_recovered", "l0_mean"}, name
    btk = next(n for n in res["saes"] if n.endswith("_batch"))
    assert res["saes"][btk]["ce"]["l0_mean"] == pytest.approx(res["saes"][btk]["k"], abs=1.0)  # batch rule per batch
    assert res["saes"]["shuffled_k"]["ce"]["l0_mean"] <= 8  # the ablation's k reached the splice
    assert {"ce", "frac_recovered"} <= set(res["vs_topk"]["adaptivek_2_8"])
    assert {"ce", "frac_recovered"} <= set(res["ablations"]["minus"]["shuffled_k"])
    assert set(res["frontier"]) == {"fve", "cosine", "mse", "ce", "frac_recovered"}


def _token_rows(lm, n_texts):
    """Texts, every token's activation at block 1, text index, position and label (NaN on the first two tokens
    of every text: unlabelled) from the tiny model ``lm``."""
    from adaptivek import extract
    from adaptivek.tokens import token_positions

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "omicron"]
    texts = [" ".join(words[(i * j) % 10] for j in range(4 + i % 7)) + f" {i}" for i in range(n_texts)]
    acts, ti = extract(lm, texts, 1, token="all", max_length=16, progress=False)
    pos = token_positions(ti)
    y = (pos.double() / 2).clamp(0, 10)
    y[pos < 2] = float("nan")
    return texts, acts, ti, pos, y


def test_compare_on_token_rows(tmp_path, tiny_neox):
    from adaptivek.tokens import last_token_rows

    texts, acts, ti, pos, y = _token_rows(tiny_neox, 24)
    docs = np.array([f"doc{i // 3}" for i in range(24)])[ti.numpy()]
    tr, te = ti < 18, ti >= 18
    unl = TrainConfig(unlabelled="reconstruct_only", probe_folds=3)
    cfg = CompareConfig(d_sae=32, steps=4, batch_size=16, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=30, layer=1,
                        max_length=16, n_ce=6, ce_batch_size=3, train_cfg=unl, n_seeds=1, jumprelu=False, val_frac=0.0)
    last = last_token_rows(ti[te])
    kw = dict(out=tmp_path / "r.json", log=None, groups_train=docs[tr.numpy()], groups_test=docs[te.numpy()],
              lengths_train=pos[tr] + 1, lengths_test=pos[te] + 1)
    with pytest.raises(ValueError, match="reconstruct_only"):
        compare(acts[tr], y[tr], acts[te], y[te], cfg=replace(cfg, train_cfg=TrainConfig(probe_folds=3)), **kw)
    comp = compare(acts[tr], y[tr], acts[te], y[te], cfg=cfg, lm=tiny_neox, ce_texts=texts[18:], ce_rows=last - 1,
                   **kw)
    res = comp.results
    assert res["config"]["n_unlabelled_train"] == int(y[tr].isnan().sum()) > 0
    assert res["probe"]["n_labelled_train"] == int((~y[tr].isnan()).sum())
    assert res["probe"]["k_train_source"] == "out_of_fold" and "length_k" in res["saes"]
    assert sum(b["n"] for b in res["by_complexity"]["bins"]) == int((~y[te].isnan()).sum())  # labelled rows only
    assert set(res["downstream"]["not_run"]) == {"shuffled_k", "length_k", "norm_k"}  # k belongs to test rows
    assert "needs at least 20" in res["decision"]["skipped"]  # 2 held-out documents: no document bootstrap
    assert "ce" in res["saes"]["adaptivek_2_8"] and "ce" not in res["saes"]["shuffled_k"]
    assert res["config"]["n_documents_test"] == 2
    with pytest.raises(ValueError, match="not both"):
        compare(acts[tr], y[tr], acts[te], y[te], cfg=cfg, texts_train=["a"] * int(tr.sum()), **kw)


def test_replicate_weights_resample_whole_documents():
    from adaptivek.frontier import replicate_weights

    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    W = replicate_weights(10, 200, seed=1, groups=groups)
    assert W.shape == (201, 10) and bool((W[0] == 1).all())
    for g in range(4):  # every row of a document carries that document's draw count
        assert bool((W[1:, groups == g] == W[1:, groups == g][:, :1]).all())
    per_doc = W[1:, [0, 3, 5, 9]]
    assert bool((per_doc.sum(1) == 4).all())  # 4 documents drawn per replicate
    assert not bool((W[1:].sum(1) == 10).all())  # so the number of rows varies, unlike a row bootstrap
    with pytest.raises(ValueError, match="one code per row"):
        replicate_weights(9, 10, seed=0, groups=groups)


@pytest.mark.slow
def test_compare_decides_over_seeds_and_splices_every_position(tmp_path, tiny_neox):
    texts, acts, ti, pos, y = _token_rows(tiny_neox, 64)
    docs = np.array([f"doc{i}" for i in range(64)])[ti.numpy()]  # every text its own document
    tr, te = ti < 40, ti >= 40
    cfg = CompareConfig(d_sae=32, steps=6, batch_size=16, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=30, layer=1,
                        max_length=16, ce_batch_size=6, train_cfg=TrainConfig(unlabelled="reconstruct_only",
                                                                               probe_folds=3))
    comp = compare(acts[tr], y[tr], acts[te], y[te], cfg=cfg, lm=tiny_neox, out=tmp_path / "r.json", log=None,
                   groups_train=docs[tr.numpy()], groups_test=docs[te.numpy()], lengths_train=pos[tr] + 1,
                   lengths_test=pos[te] + 1,
                   splice={"texts": texts[40:], "documents": [f"doc{i}" for i in range(40, 64)], "max_norm": None})
    res = comp.results
    dec = res["decision"]
    assert dec["n_seeds"] == 3 and dec["seeds"] == [0, 1, 2] and dec["n_documents"] == 24
    assert set(dec["vs"]) == {"shuffled_k", "length_k", "norm_k", "batchtopk", "jumprelu"}
    assert all(len(d["fve"]["per_seed"]) == 3 for d in dec["vs"].values())
    assert -1 <= dec["precondition"]["estimate"] <= 1 and dec["oracle"]["headroom"] >= 0  # the oracle never loses
    btk = next(s for s in res["saes"].values() if s["kind"] == "batchtopk" and s["inference"] == "threshold")
    assert btk["calibrated_on"] == "validation" and res["config"]["n_documents_val"] >= 1
    sp = res["splice"]
    assert sp["n_texts"] == 24 and sp["n_tokens"] > 0 and "adaptivek_2_8" in sp["saes"]
    assert set(sp["not_run"]) == {"shuffled_k", "length_k", "norm_k"}
    assert "n" not in res["downstream"]  # the one-position loss is replaced by the splice


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_finite_rows_names_the_bad_rows(bad):
    from adaptivek.checks import finite_rows

    X = torch.ones(6, 3)
    X[[1, 4], 2] = bad
    with pytest.raises(ValueError, match=r"in 2 row\(s\) \(first: \[1, 4\]\)"):
        finite_rows(X, "X")


def test_finite_rows_passes_finite_data_whose_sum_overflows():
    from adaptivek.checks import finite_rows

    X = torch.full((4, 2), 3e38)  # float32: every value finite, their sum is inf
    assert not torch.isfinite(X.sum()) and finite_rows(X, "X") is X
    half = torch.full((8, 4), 60000.0, dtype=torch.float16)
    assert finite_rows(half, "half") is half
